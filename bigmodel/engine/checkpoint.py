"""Checkpoints: save (collective) and restore everything a run needs to continue exactly.

A checkpoint folder ``checkpoints/step_XXXXXXX/`` holds:

==========================  =====================================================================
``meta.json``               step, epoch, data position, world size, strategy; written last, by
                            rank 0, after a barrier: a folder without it is incomplete
``trainer.pt``              scheduler, gradient scaler, counters (rank 0)
``model.pt``                DDP only: model + optimizer state (rank 0; replicated state)
``ds/``                     DeepSpeed only: ``engine.save_checkpoint`` (every rank writes its shards)
``rng/rank_00000.pt``       each rank's torch / CUDA / numpy / python RNG states
``ema.pt``                  ``train.ema_decay``: the weight average (rank 0; the same on every
                            rank, since it averages the same weights)
==========================  =====================================================================

Every file has a rank-unique name, so under Ray Train (where each rank reports its own folder and
Ray merges them in storage) the folders combine without clashes.

Resuming on a different number of workers:
    * DDP: the state is replicated, so it loads as is; ranks without a saved RNG state are
      seeded from (seed, rank, step), with a warning.
    * DeepSpeed ZeRO-1/2/3 with AdamW: the optimizer state is partitioned by world size, so it
      is resharded with DeepSpeed's universal checkpointing.
      One process per node converts the checkpoint (``ds_to_universal``: every partition is
      merged into one file per parameter and state) into ``{run_dir}/resume/step_XXXXXXX_universal``
      (node-local, written under a temporary name and renamed, reused when already complete),
      and the engine, initialised with ``checkpoint.load_universal`` (:func:`loads_universal`
      tells the loop before ``distribute``), loads its own slice of the fp32 master weights and
      the Adam moments. Weights, moments, step, scheduler and data position all survive, so the
      run continues as the uninterrupted one would (up to float summation order). BatchNorm
      buffers, which the universal format leaves out, are read from the module states.
    * DeepSpeed with SGD, LARS or LAMB: DeepSpeed 0.19's universal converter and ZeRO-3 loader
      know only Adam's ``exp_avg``/``exp_avg_sq`` (and ZeRO-3 a per-parameter ``step``; see
      :data:`UNIVERSAL_OPTIMIZERS` for LAMB), so these are not resharded: the fp32 weights are
      consolidated (``get_fp32_state_dict_from_zero_checkpoint``, zero_to_fp32) and the state is
      **re-initialised** (momentum restarts from zero), with a warning. ZeRO-0 keeps its full
      optimizer state and loads normally.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import shutil
import socket
import time
from argparse import Namespace
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bigmodel.config import Config, TrainConfig
from bigmodel.engine._strategy import Distributed
from sharding.helpers import atomic_write, atomic_write_json

__all__ = [
    "CheckpointClock",
    "TrainState",
    "checkpoint_dir",
    "checkpoint_due",
    "consolidated_state_dict",
    "files_for_rank",
    "full_state_dict",
    "is_complete",
    "load_checkpoint",
    "loads_universal",
    "model_weights",
    "prune_checkpoints",
    "read_meta",
    "reshards_optimizer",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

META = "meta.json"
DS_TAG = "ds"
EMA = "ema.pt"
# Optimizers whose state DeepSpeed 0.19's universal checkpoint carries, per ZeRO stage: its
# converter extracts only ``exp_avg``/``exp_avg_sq`` (+ ``step``), and its ZeRO-3 loader also
# reads ``step`` from the per-parameter state, which timm's LAMB keeps in the param group. LAMB
# under ZeRO-1/2 converts, but its trust ratio is taken over each rank's flat partition, so a
# LAMB run depends on the world size anyway and its reshard was not verified: AdamW only.
UNIVERSAL_OPTIMIZERS = {1: ("adamw",), 2: ("adamw",), 3: ("adamw",)}


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


def checkpoint_due(
    train: TrainConfig, step: int, epoch_done: bool, run_done: bool, since_last_s: float = 0.0
) -> bool:
    """Whether the loop saves after optimizer step ``step``.

    Every ``train.checkpoint_every`` steps; when it is 0, at the end of an epoch once
    ``since_last_s`` (seconds since the last checkpoint, :class:`CheckpointClock`) reaches
    ``train.checkpoint_interval_s``; always at the end of the run.
    """
    every = train.checkpoint_every
    if run_done or (every and step % every == 0):
        return True
    return epoch_done and not every and since_last_s >= train.checkpoint_interval_s


class CheckpointClock:
    """Seconds since the last checkpoint of this attempt, the same figure on every rank.

    Every rank must decide alike (a checkpoint is collective), and each reads its own clock:
    :meth:`seconds` takes the largest across ranks (one all-reduce of one number; call it on
    every rank at the same step).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.restart()

    def restart(self) -> None:
        self._since = time.monotonic()

    def seconds(self) -> float:
        elapsed = time.monotonic() - self._since
        if dist.is_initialized() and dist.get_world_size() > 1:
            tensor = torch.tensor([elapsed], dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            elapsed = float(tensor.item())
        return elapsed


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


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of a complete checkpoint; a clear error for an interrupted one."""
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(
            f"{directory} is not a complete checkpoint (no {META}); it was interrupted while "
            f"being written: resume from an earlier checkpoints/step_* folder"
        )
    return json.loads((directory / META).read_text())


def reshards_optimizer(meta: dict[str, Any], world_size: int) -> bool:
    """True when resuming on ``world_size`` workers must repartition ZeRO optimizer state."""
    return (
        meta["strategy"] == "deepspeed"
        and meta["zero_stage"] > 0
        and meta["world_size"] != world_size
    )


def loads_universal(meta: dict[str, Any], cfg: Config, world_size: int) -> bool:
    """True when this resume goes through DeepSpeed's universal checkpoint.

    The loop asks before :func:`~bigmodel.engine._strategy.distribute`, because the engine reads
    ``checkpoint.load_universal`` at ``deepspeed.initialize``. False for a resume on the same
    world size (the native format loads exactly) and for optimizers the universal format cannot
    carry (:data:`UNIVERSAL_OPTIMIZERS`; those fall back to consolidated weights).
    """
    return (
        cfg.distributed.strategy == "deepspeed"
        and reshards_optimizer(meta, world_size)
        and meta["zero_stage"] == cfg.distributed.zero_stage
        and cfg.optim.name in UNIVERSAL_OPTIMIZERS[meta["zero_stage"]]
    )


def files_for_rank(meta: dict[str, Any], rank: int, world_size: int) -> list[str] | None:
    """Glob patterns (relative to a checkpoint folder) of the files ``rank`` reads to resume.

    Lets a runner on remote storage download only what this rank loads instead of every ZeRO
    partition. ``None`` means every file (a resume that reshards the optimizer state needs all
    partitions). ``meta`` is the checkpoint's ``meta.json``.
    """
    common = [META, "trainer.pt", f"rng/rank_{rank:05d}.pt", EMA]
    if meta["strategy"] != "deepspeed":
        return [*common, "model.pt"]
    if reshards_optimizer(meta, world_size):
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
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
    dm: Distributed,
    directory: Path,
    state: TrainState,
    rank: int,
    world_size: int,
    ema: nn.Module | None = None,
) -> Path:
    """Write a checkpoint of this run into ``directory``. Collective: call it on every rank.

    ``ema``: timm's ``ModelEmaV3`` of the run (``train.ema_decay``), saved beside the model.
    """
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
    if rank == 0 and ema is not None:
        _atomic_torch_save(ema.module.state_dict(), directory / EMA)
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
        atomic_write_json(directory / META, meta)
    _barrier()
    return directory


def load_checkpoint(
    dm: Distributed,
    directory: str | Path,
    rank: int,
    world_size: int,
    seed: int,
    run_dir: Path | None = None,
    local_rank: int = 0,
    ema: nn.Module | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Restore model, optimizer, scheduler and scaler; return the counters and this rank's RNG.

    The RNG state is returned rather than applied: the loop applies it after it has moved the
    data loader to the saved position, so the run continues exactly where it stopped.

    Args:
        run_dir: the run's folder; a ZeRO resume on another world size writes its universal
            conversion under ``run_dir/resume`` (the checkpoint folder itself may be read-only
            or shared storage). Defaults to the checkpoint folder's parent.
        local_rank: this worker's index on its node; local rank 0 converts for the node.
        ema: the run's ``ModelEmaV3``; restored from ``ema.pt``, or restarted from the loaded
            weights (with a warning) when the checkpoint has none.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if meta["strategy"] != dm.strategy:
        raise ValueError(
            f"{directory} was written by strategy {meta['strategy']!r} but this run uses "
            f"{dm.strategy!r}: set distributed.strategy={meta['strategy']} to resume"
        )
    if dm.engine is not None:
        scratch = run_dir if run_dir is not None else directory.parent
        _load_deepspeed(dm, directory, meta, scratch, local_rank)
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
    if ema is not None:
        if (directory / EMA).is_file():
            ema.module.load_state_dict(torch.load(directory / EMA, map_location=dm.device))
        else:
            log.warning(
                "checkpoint %s has no weight average (ema.pt): it starts again from the loaded "
                "weights",
                directory,
            )
            ema.module.load_state_dict(dm.module.state_dict())

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


def _load_deepspeed(
    dm: Distributed, directory: Path, meta: dict[str, Any], scratch: Path, local_rank: int
) -> None:
    engine = dm.engine
    if not reshards_optimizer(meta, dm.world_size):
        path, _ = engine.load_checkpoint(
            str(directory), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory}/{DS_TAG}")
        return
    if engine.load_universal_checkpoint():
        universal = _universal_checkpoint(directory, meta, scratch, local_rank)
        log.info(
            "resuming a ZeRO-%d checkpoint written by %d workers on %d: weights and optimizer "
            "state resharded from the universal checkpoint %s",
            meta["zero_stage"],
            meta["world_size"],
            dm.world_size,
            universal,
        )
        groups = [{k: v for k, v in g.items() if k != "params"} for g in dm.optimizer.param_groups]
        path, _ = engine.load_checkpoint(
            str(universal), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no universal checkpoint under {universal}")
        if dm.zero_stage == 3:
            # DeepSpeed's ZeRO-3 universal loader copies the FIRST param group's values
            # (weight decay, LR scale) into every group; ours differ (no decay on norms and
            # biases, layer decay), and come from the config anyway: put them back.
            for group, own in zip(dm.optimizer.param_groups, groups, strict=True):
                group.update(own)
            # It also hands every group's state the SAME ``step`` tensor, which AdamW
            # increments in place: each optimizer step would count once per group, and
            # Adam's bias correction would drift. One tensor per state, as a fresh run has.
            for param_state in dm.engine.optimizer.optimizer.state.values():
                if torch.is_tensor(param_state.get("step")):
                    param_state["step"] = param_state["step"].clone()
        _load_buffers(dm, universal / DS_TAG)
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    log.warning(
        "resuming a ZeRO-%d checkpoint written by %d workers on %d workers at ZeRO-%d with %s: "
        "DeepSpeed's universal checkpoint (Adam moments only, same stage) cannot carry this "
        "optimizer's state, so the consolidated fp32 weights (zero_to_fp32) are loaded and the "
        "optimizer state is re-initialised",
        meta["zero_stage"],
        meta["world_size"],
        dm.world_size,
        dm.zero_stage,
        type(dm.optimizer).__name__,
    )
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DS_TAG)
    _load_full_state_dict(dm, state_dict)


def _universal_checkpoint(
    directory: Path, meta: dict[str, Any], scratch: Path, local_rank: int
) -> Path:
    """The universal form of a ZeRO checkpoint, converted once per node. Collective.

    Local rank 0 of each node converts (every node needs the files its ranks load; the other
    ranks wait at the barrier) into ``scratch/resume/step_XXXXXXX_universal``: written under a
    name unique to this process, then renamed, so a folder with that name is complete. A folder
    converted earlier from the same checkpoint (same ``meta.json``) is reused; when nodes share
    ``scratch``, the first rename wins and the others discard their copy.
    """
    target = scratch / "resume" / f"{directory.name}_universal"
    if local_rank == 0 and not _converted_from(target, meta):
        from deepspeed.checkpoint import ds_to_universal

        tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        args = Namespace(
            input_folder=str(directory / DS_TAG),
            output_folder=str(tmp / DS_TAG),
            # in this process: a process pool would fork a worker holding the process group
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            # our engine saves no universal_checkpoint_info (no tensor/pipeline parallelism)
            inject_missing_state=True,
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # its step-by-step prints; tqdm stays
            ds_to_universal.main(args)
        log.debug("ds_to_universal %s:\n%s", directory, printed.getvalue())
        shutil.copy2(directory / META, tmp / META)  # says which checkpoint it came from
        if target.exists() and not _converted_from(target, meta):
            shutil.rmtree(target, ignore_errors=True)  # a stale conversion of another run
        try:
            os.replace(tmp, target)
        except OSError:
            if not _converted_from(target, meta):  # not "another node renamed first"
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    if not _converted_from(target, meta):
        raise FileNotFoundError(
            f"{target}: no universal checkpoint after conversion on this node; the run "
            f"directory must be writable by local rank 0 and visible to the node's other ranks"
        )
    return target


def _converted_from(target: Path, meta: dict[str, Any]) -> bool:
    marker = target / META
    return marker.is_file() and json.loads(marker.read_text()) == meta


def _load_buffers(dm: Distributed, ds_dir: Path) -> None:
    """Load BatchNorm statistics (buffers) from DeepSpeed's module states file.

    DeepSpeed's universal load restores parameters only (buffers have no optimizer state);
    every stage saves them whole in its model states (ZeRO-1/2: ``mp_rank_00_model_states.pt``,
    ZeRO-3: one ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank, parameters partitioned).
    """
    files = sorted(ds_dir.glob("*mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ds_dir}: no DeepSpeed model-states file")
    # DeepSpeed pickles its config beside the weights; this is our own checkpoint.
    module_state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    for name, buf in dm.module.named_buffers():
        if name in module_state:
            buf.copy_(module_state[name])


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


def model_weights(directory: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights a model folder gets from a checkpoint, and which they are.

    The weight average (``ema.pt``, ``train.ema_decay``) when the run kept one, as ``model/``
    holds it; otherwise the trained weights (:func:`consolidated_state_dict`).
    """
    directory = Path(directory)
    if is_complete(directory) and (directory / EMA).is_file():
        saved = torch.load(directory / EMA, map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in saved.items()}, "average"
    return consolidated_state_dict(directory), "trained"


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
