"""Checkpoints: save (collective) and restore everything a run needs to continue exactly.

A checkpoint folder ``checkpoints/step_XXXXXXX/`` holds:

==========================  =====================================================================
``meta.json``               step, epoch, data position, world size, strategy; written last, by
                            rank 0, after a barrier: a folder without it is incomplete
``trainer.pt``              scheduler, gradient scaler, counters (rank 0)
``model.pt``                DDP only: model + optimizer state (rank 0; replicated state)
``ds/``                     DeepSpeed only: ``engine.save_checkpoint`` (every rank writes its shards)
``rng/rank_00000.pt``       each rank's torch / CUDA / numpy / python RNG states
==========================  =====================================================================

Every file has a rank-unique name, so under Ray Train (where each rank reports its own folder and
Ray merges them in storage) the folders combine without clashes.

Resuming on a different number of workers:
    * DDP: the state is replicated, so it loads as is; ranks without a saved RNG state are
      seeded from (seed, rank, step), with a warning.
    * DeepSpeed ZeRO-1/2/3: the optimizer state is partitioned by world size. We consolidate the
      fp32 weights with DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (zero_to_fp32),
      load them into the model and **re-initialise the optimizer state** (moments restart from
      zero), with a warning; step, scheduler and data position are restored. ZeRO-0 keeps its
      full optimizer state and loads normally.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bigmodel.engine._strategy import Distributed

__all__ = [
    "TrainState",
    "checkpoint_dir",
    "consolidated_state_dict",
    "files_for_rank",
    "full_state_dict",
    "is_complete",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

META = "meta.json"
DS_TAG = "ds"


@dataclass
class TrainState:
    """Counters that locate the run: optimizer steps done and the data position."""

    step: int = 0
    """Optimizer steps done in the whole run."""
    epoch: int = 0
    """Epoch in progress (or the next one when ``step_in_epoch`` is 0)."""
    step_in_epoch: int = 0
    """Optimizer steps done in ``epoch``: the data position inside the epoch."""
    nonfinite: int = 0
    """Optimizer steps skipped so far for a non-finite gradient norm."""
    best_score: float | None = None
    """Best ``train.best_metric`` so far (the evaluation whose weights are in ``model/``)."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """``{run_dir}/checkpoints/step_XXXXXXX``."""
    return run_dir / "checkpoints" / f"step_{step:07d}"


def is_complete(directory: str | Path) -> bool:
    """True when the folder holds a finished checkpoint (its ``meta.json`` was written)."""
    return (Path(directory) / META).is_file()


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoint folders under ``run_dir/checkpoints``.

    Call it on every rank after a save has completed everywhere (the loop does, after the
    report barrier), so no folder is being written: ranks on other nodes hold only their own
    partitions and no ``meta.json``, so folders are ordered by step, not by completeness. Ranks
    of one node share the folder; one that another rank removed first is skipped.
    """
    folders = sorted((run_dir / "checkpoints").glob("step_*"))
    removed = folders[: max(len(folders) - keep, 0)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def files_for_rank(meta: dict[str, Any], rank: int, world_size: int) -> list[str] | None:
    """Glob patterns (relative to a checkpoint folder) of the files ``rank`` reads to resume.

    Lets a runner on remote storage download only what this rank loads instead of every ZeRO
    partition. ``None`` means every file (a resume that reshards the optimizer state needs all
    partitions). ``meta`` is the checkpoint's ``meta.json``.
    """
    common = [META, "trainer.pt", f"rng/rank_{rank:05d}.pt"]
    if meta["strategy"] != "deepspeed":
        return [*common, "model.pt"]
    if meta["world_size"] != world_size and meta["zero_stage"] > 0:
        return None
    own = f"{DS_TAG}/*zero_pp_rank_{rank}_mp_rank_*"  # this rank's partitions (any precision)
    if meta["zero_stage"] == 3:
        return [*common, own]
    if meta["zero_stage"] == 0:
        return [*common, f"{DS_TAG}/mp_rank_*_model_states.pt"]
    return [*common, f"{DS_TAG}/mp_rank_*_model_states.pt", own]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by :func:`save_checkpoint` for this rank."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(
    dm: Distributed, directory: Path, state: TrainState, rank: int, world_size: int
) -> Path:
    """Write a checkpoint of this run into ``directory``. Collective: call it on every rank."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rng").mkdir(exist_ok=True)
    _barrier()  # every rank sees the folder before writing into it
    if dm.engine is not None:
        # Collective: each rank writes its ZeRO partition (and rank 0 the module states).
        dm.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
    elif rank == 0:
        _atomic_torch_save(
            {"model": dm.module.state_dict(), "optimizer": dm.optimizer.state_dict()},
            directory / "model.pt",
        )
    _atomic_torch_save(_rng_state(), directory / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        _atomic_torch_save(
            {
                "scheduler": dm.scheduler.state_dict(),
                "scaler": dm.scaler.state_dict(),  # empty unless fp16 under DDP
            },
            directory / "trainer.pt",
        )
    _barrier()  # all parts written before the folder is marked complete
    if rank == 0:
        meta = {
            **asdict(state),
            "world_size": world_size,
            "strategy": dm.strategy,
            "zero_stage": dm.zero_stage,
        }
        tmp = directory / (META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory / META)
    _barrier()
    return directory


def load_checkpoint(
    dm: Distributed, directory: str | Path, rank: int, world_size: int, seed: int
) -> tuple[TrainState, dict[str, Any]]:
    """Restore model, optimizer, scheduler and scaler; return the counters and this rank's RNG.

    The RNG state is returned rather than applied: the loop applies it after it has moved the
    data loader to the saved position, so the run continues exactly where it stopped.
    """
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(
            f"{directory} is not a complete checkpoint (no {META}); it was interrupted while "
            f"being written: resume from an earlier checkpoints/step_* folder"
        )
    meta = json.loads((directory / META).read_text())
    if meta["strategy"] != dm.strategy:
        raise ValueError(
            f"{directory} was written by strategy {meta['strategy']!r} but this run uses "
            f"{dm.strategy!r}: set distributed.strategy={meta['strategy']} to resume"
        )
    same_world = meta["world_size"] == world_size
    if dm.engine is not None:
        _load_deepspeed(dm, directory, meta, same_world)
    else:
        saved = torch.load(directory / "model.pt", map_location=dm.device, weights_only=False)
        dm.module.load_state_dict(saved["model"])
        dm.optimizer.load_state_dict(saved["optimizer"])
    trainer = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)
    dm.scheduler.load_state_dict(trainer["scheduler"])
    if trainer["scaler"]:  # the loss scale of an fp16 run continues where it stopped
        dm.scaler.load_state_dict(trainer["scaler"])
    defaults = asdict(TrainState())  # fields added later default in older checkpoints
    state = TrainState(**{k: meta.get(k, v) for k, v in defaults.items()})
    dm.scheduler.step_update(state.step)  # the LR of the next update, as before the interruption

    rng_file = directory / "rng" / f"rank_{rank:05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
    else:
        log.warning(
            "checkpoint %s has no RNG state for rank %d (saved with %d workers); seeding it "
            "from (seed, rank, step)",
            directory,
            rank,
            meta["world_size"],
        )
        generator_seed = hash((seed, rank, state.step)) % 2**31
        torch.manual_seed(generator_seed)
        rng = _rng_state()
    return state, rng


def _load_deepspeed(dm: Distributed, directory: Path, meta: dict[str, Any], same: bool) -> None:
    if same or meta["zero_stage"] == 0:
        path, _ = dm.engine.load_checkpoint(
            str(directory), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory}/{DS_TAG}")
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log.warning(
        "resuming a ZeRO-%d checkpoint written by %d workers on %d: loading consolidated fp32 "
        "weights (zero_to_fp32) and re-initialising the optimizer state",
        meta["zero_stage"],
        meta["world_size"],
        dm.world_size,
    )
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DS_TAG)
    _load_full_state_dict(dm, state_dict)


def _load_full_state_dict(dm: Distributed, state_dict: dict[str, torch.Tensor]) -> None:
    """Load full (unpartitioned) weights into the model, whatever the ZeRO stage."""
    module = dm.module
    if dm.zero_stage == 3:
        import deepspeed

        params = list(module.parameters())
        # Gathers the partitions, lets rank 0 write the full tensors, re-partitions on exit.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if dist.get_rank() == 0:
                module.load_state_dict(state_dict, strict=False)
        buffers = {n: b for n, b in module.named_buffers() if n in state_dict}
        for name, buf in buffers.items():
            buf.copy_(state_dict[name])
    else:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
        # zero_to_fp32 returns parameters and buffers; anything else missing is a real mismatch
        if unexpected or [m for m in missing if m in dict(module.named_parameters())]:
            raise ValueError(f"consolidated weights do not fit the model: {missing} {unexpected}")
    if dm.zero_stage in (1, 2):
        # ZeRO-1/2 step from their fp32 partitions: refresh them from the loaded weights.
        opt = dm.engine.optimizer
        if hasattr(opt, "refresh_fp32_params"):
            opt.refresh_fp32_params()


def full_state_dict(dm: Distributed) -> dict[str, torch.Tensor] | None:
    """Full fp32-or-native model weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    module = dm.module
    if dm.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank != 0:
                return None
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if rank != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def consolidated_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of a complete checkpoint, whatever strategy wrote it.

    Needs no process group and no DeepSpeed engine (``bigmodel-export`` runs it on a laptop):
    DDP checkpoints hold the full state (read with ``weights_only=True``); DeepSpeed ZeRO-1/2/3
    partitions are merged by DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
    (zero_to_fp32: the fp32 master weights, not a bf16/fp16 copy), ZeRO-0 keeps the module
    whole in its model-states file.
    """
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(
            f"{directory}: not a complete checkpoint (no {META}); use a checkpoints/step_* folder "
            f"that finished writing"
        )
    meta = json.loads((directory / META).read_text())
    if meta["strategy"] != "deepspeed":
        saved = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in saved["model"].items()}
    if meta["zero_stage"] == 0:
        files = sorted((directory / DS_TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{directory / DS_TAG}: no DeepSpeed model-states file")
        # DeepSpeed pickles its config beside the weights; this is our own checkpoint.
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DS_TAG)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
