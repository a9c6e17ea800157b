"""Resuming on another world size, and the resume safety checks (issue 10).

* Resharding: a ZeRO-2 and a ZeRO-3 AdamW run on 2 workers is checkpointed mid-epoch (step 2),
  resumed on 1 worker, checkpointed mid-epoch again (step 4), resumed on 4 workers and trained to
  the end (step 6): its weights equal the uninterrupted 2-worker run's within ``RESHARD_TOL``.
  The global batch is the same at every world size (8 = 2 x 4 = 1 x 8 = 4 x 2) and BatchNorm is
  synchronised, so only float summation order differs. The same resume with the optimizer
  moments re-initialised (the previous behaviour) ends more than ``10^4 x`` the tolerance away.
* DDP on 2 -> 1 -> 4 workers: ranks 1-3 of 4 find no saved RNG state (the step-4 checkpoint is
  from 1 worker) and are seeded with a warning; the weights equal the uninterrupted run's.
* SGD/LARS/LAMB under ZeRO are not resharded (DeepSpeed's universal format carries Adam moments
  only): the consolidated weights load, with the warning that the optimizer state restarts.
* A rank that holds only the files ``files_for_rank`` names (what it would download from remote
  storage) resumes exactly like one reading the whole folder (DDP, ZeRO-2, ZeRO-3).
* fp16: the loss scale survives a resume; accumulation > 1: a mid-epoch resume is exact.

The runs of one world size share their worker processes (DeepSpeed start-up is slow): one
``torch.multiprocessing.spawn`` for the 2-worker phase, one for the 4-worker phase, and the
1-worker phase in the test process.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _engine_tiny import (
    TinyMultiTask,
    deterministic,
    free_port,
    load_weights,
    run_fit,
    set_dist_env,
    tiny_config,
)

from bigmodel.engine.checkpoint import files_for_rank, load_checkpoint, loads_universal, read_meta

STEPS_PER_EPOCH = 3
GLOBAL_BATCH = 8
# Float summation order differs between world sizes (gradient all-reduce, SyncBN statistics);
# after six AdamW steps the weights differ by ~1e-7. Moments restarting from zero at the
# resume (the previous behaviour) move them by ~6e-2.
RESHARD_TOL = {"rtol": 1e-5, "atol": 1e-6}
STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "zero_stage": 3},
}
# Phases in order: (world size, {run: (strategy, optimizer, resume from (run, step) or None,
# from a partial per-rank copy?)}). Every run trains 2 epochs x 3 steps, checkpointing every 2.
PHASES = [
    (
        2,
        {
            "zero2": ("zero2", "adamw", None, False),
            "zero3": ("zero3", "adamw", None, False),
            "ddp": ("ddp", "adamw", None, False),
            "ddp-part": ("ddp", "adamw", ("ddp", 4), True),
            "zero2-part": ("zero2", "adamw", ("zero2", 4), True),
            "zero3-part": ("zero3", "adamw", ("zero3", 4), True),
        },
    ),
    (
        1,
        {
            "zero2-1": ("zero2", "adamw", ("zero2", 2), False),
            "zero3-1": ("zero3", "adamw", ("zero3", 2), False),
            "ddp-1": ("ddp", "adamw", ("ddp", 2), False),
            "zero2-old": ("zero2", "adamw", ("zero2", 2), False),  # moments re-initialised
        },
    ),
    (
        4,
        {
            "zero2-4": ("zero2", "adamw", ("zero2-1", 4), False),
            "zero3-4": ("zero3", "adamw", ("zero3-1", 4), False),
            "ddp-4": ("ddp", "adamw", ("ddp-1", 4), False),
        },
    ),
]


def _config(tmp: Path, name: str, strategy: str, optimizer: str, workers: int, **train):
    optim = {"name": optimizer, "lr": 0.01, "lr_scaling": "none", "grad_clip": 1.0}
    if optimizer == "sgd":
        optim.update(lr=0.05, momentum=0.9)
    return tiny_config(
        tmp,
        name,
        data={"batch_size": GLOBAL_BATCH // workers, "image_size": 16},
        optim=optim,
        schedule={"name": "cosine", "warmup_steps": 2, "warmup_lr": 0.001},
        train={"epochs": 2, "checkpoint_every": 2, "log_every": 1, **train},
        distributed=STRATEGIES[strategy],
        cluster={"num_workers": workers},
    )


def _ckpt(tmp: Path, run: str, step: int) -> Path:
    return tmp / run / "checkpoints" / f"step_{step:07d}"


def _copy_rank_files(source: Path, target: Path, rank: int, world_size: int) -> None:
    """Copy only the files ``files_for_rank`` names, as a per-rank download would."""
    patterns = files_for_rank(read_meta(source), rank, world_size)
    assert patterns is not None
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source).as_posix()
        if path.is_file() and any(fnmatch.fnmatchcase(relative, p) for p in patterns):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)


def _phase(rank: int, phase: int, port: int, tmp_str: str) -> None:
    """Run one phase's runs on this rank, logging the checkpoint module's lines to a file."""
    import bigmodel.engine.loop as loop

    tmp = Path(tmp_str)
    world_size, runs = PHASES[phase]
    handler = logging.FileHandler(tmp / f"phase{phase}_rank{rank}.log")
    checkpoint_log = logging.getLogger("bigmodel.engine.checkpoint")
    checkpoint_log.setLevel(logging.INFO)
    checkpoint_log.addHandler(handler)
    loads_universal = loop.loads_universal
    set_dist_env(rank, world_size, port)
    deterministic()
    try:
        for name, (strategy, optimizer, resume, partial) in runs.items():
            cfg = _config(tmp, name, strategy, optimizer, world_size)
            resume_from = str(_ckpt(tmp, *resume)) if resume else None
            if partial:
                own = tmp / "partial" / name / f"rank{rank}" / f"step_{resume[1]:07d}"
                _copy_rank_files(_ckpt(tmp, *resume), own, rank, world_size)
                resume_from = str(own)
            # the previous behaviour: no universal checkpoint, so moments restart from zero
            loop.loads_universal = (lambda *a: False) if name == "zero2-old" else loads_universal
            run_fit(cfg, rank, world_size, STEPS_PER_EPOCH, resume_from)
    finally:
        loop.loads_universal = loads_universal
        checkpoint_log.removeHandler(handler)
        handler.close()
        torch.use_deterministic_algorithms(False)
        if dist.is_initialized():  # through DeepSpeed, which drops its cached groups too
            from deepspeed.comm import comm as ds_comm

            if ds_comm.cdb is not None:
                ds_comm.destroy_process_group()
            else:
                dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every phase in fresh worker processes (ZeRO-3 numbers its modules per process, and
    ranks must agree); the 1-worker phase runs in this process."""
    tmp = tmp_path_factory.mktemp("reshard")
    env = dict(os.environ)
    try:
        for phase, (world_size, _) in enumerate(PHASES):
            if world_size == 1:
                _phase(0, phase, free_port(), str(tmp))
            else:
                mp.spawn(_phase, args=(phase, free_port(), str(tmp)), nprocs=world_size)
    finally:
        os.environ.clear()
        os.environ.update(env)
    return tmp


def _log(tmp: Path, phase: int, rank: int) -> str:
    return (tmp / f"phase{phase}_rank{rank}.log").read_text()


def logged_steps(run_dir: Path) -> list[float]:
    """The optimizer steps a run trained and logged (the ``lr`` row of each step)."""
    import csv

    with (run_dir / "metrics.csv").open(newline="") as f:
        return sorted(float(r["step"]) for r in csv.DictReader(f) if r["name"] == "lr")


def _max_difference(actual: dict, expected: dict) -> float:
    return max(float((actual[k].float() - expected[k].float()).abs().max()) for k in expected)


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_zero_resumed_on_one_then_four_workers_ends_like_uninterrupted_run(runs: Path, kind):
    reference = load_weights(runs / kind)
    assert "written by 2 workers on 1: weights and optimizer state resharded" in _log(runs, 1, 0)
    assert "written by 1 workers on 4: weights and optimizer state resharded" in _log(runs, 2, 0)
    # steps ran after each load: 3-6 on 1 worker (its step-4 checkpoint is mid-epoch), 5-6 on 4
    assert [int(s) for s in logged_steps(runs / f"{kind}-1")] == [3, 4, 5, 6]
    assert [int(s) for s in logged_steps(runs / f"{kind}-4")] == [5, 6]
    assert read_meta(_ckpt(runs, f"{kind}-1", 4))["step_in_epoch"] == 1
    for key in reference:
        torch.testing.assert_close(
            load_weights(runs / f"{kind}-4")[key], reference[key], **RESHARD_TOL
        )
    # the universal conversion happened once per node into the run's resume/ folder
    converted = sorted(p.name for p in (runs / f"{kind}-4" / "resume").iterdir())
    assert converted == ["step_0000004_universal"]


def test_reinitialised_moments_would_fail_the_reshard_tolerance(runs: Path):
    reference = load_weights(runs / "zero2")
    old = _max_difference(load_weights(runs / "zero2-old"), reference)
    new = _max_difference(load_weights(runs / "zero2-1"), reference)
    assert old > 10_000 * RESHARD_TOL["atol"], old
    assert new < RESHARD_TOL["atol"], new


def test_ddp_resume_on_other_world_sizes_reseeds_missing_ranks(runs: Path):
    reference = load_weights(runs / "ddp")
    for key in reference:
        torch.testing.assert_close(load_weights(runs / "ddp-4")[key], reference[key], **RESHARD_TOL)
    # the step-4 checkpoint was written by 1 worker: ranks 1-3 of 4 have no saved RNG state
    for rank in (1, 2, 3):
        assert f"no RNG state for rank {rank} (saved with 1 workers)" in _log(runs, 2, rank)
    assert "no RNG state" not in _log(runs, 2, 0)


def test_only_adam_state_is_resharded_other_optimizers_fall_back(runs: Path):
    """SGD/LARS/LAMB state does not go through DeepSpeed's universal format: consolidated weights."""
    cases = [("adamw", 2, True), ("sgd", 2, False), ("lars", 2, False), ("lamb", 2, False)]
    cases += [("adamw", 3, True), ("lamb", 3, False)]
    for optimizer, zero, expected in cases:
        meta = read_meta(_ckpt(runs, f"zero{zero}", 2))
        cfg = _config(runs, "any", f"zero{zero}", optimizer, 1)
        assert loads_universal(meta, cfg, 1) is expected, (optimizer, zero)
    meta = read_meta(_ckpt(runs, "zero2", 2))
    assert not loads_universal(meta, _config(runs, "any", "zero2", "adamw", 2), 2)  # same size
    # the fallback path (the "zero2-old" run: no universal engine) warns that moments restart
    assert "optimizer state is re-initialised" in _log(runs, 1, 0)


@pytest.mark.parametrize("kind", ["ddp", "zero2", "zero3"])
def test_rank_resuming_from_only_its_files_ends_like_full_folder_resume(runs: Path, kind):
    own = sorted(p.name for p in (runs / "partial" / f"{kind}-part" / "rank1").rglob("*.pt"))
    assert "rank_00000.pt" not in own  # the other rank's RNG (and partitions) were not copied
    torch.testing.assert_close(
        load_weights(runs / f"{kind}-part"), load_weights(runs / kind), rtol=0, atol=0
    )


def test_files_for_rank_is_none_when_the_world_size_changes(runs: Path):
    zero = read_meta(_ckpt(runs, "zero2", 2))
    assert files_for_rank(zero, 0, 1) is None and files_for_rank(zero, 0, 2) is not None
    ddp = read_meta(_ckpt(runs, "ddp", 2))
    own = ["meta.json", "trainer.pt", "rng/rank_00000.pt", "ema.pt", "model.pt"]
    assert files_for_rank(ddp, 0, 4) == own  # ema.pt: the weight average, when the run keeps one


def test_fp16_loss_scale_survives_a_resume(tmp_path: Path):
    """A NaN at the first step halves the loss scale; the resumed run starts from that scale."""
    cfg = _config(tmp_path, "fp16", "ddp", "sgd", 1, precision="fp16", max_nonfinite=1)
    run_fit(cfg, 0, 1, STEPS_PER_EPOCH, poison={(0, 0)})
    saved = torch.load(_ckpt(tmp_path, "fp16", 2) / "trainer.pt", weights_only=False)["scaler"]
    initial = torch.amp.GradScaler("cpu").get_scale()
    assert saved["scale"] == initial / 2
    from bigmodel.engine._strategy import distribute

    torch.manual_seed(0)
    dm = distribute(TinyMultiTask(), cfg, 1, torch.device("cpu"), 2 * STEPS_PER_EPOCH)
    assert dm.scaler.get_scale() == initial
    load_checkpoint(dm, _ckpt(tmp_path, "fp16", 2), 0, 1, cfg.seed)
    assert dm.scaler.get_scale() == saved["scale"]
    # and training continues from there to the uninterrupted run's weights
    resumed = _config(tmp_path, "fp16-resumed", "ddp", "sgd", 1, precision="fp16", max_nonfinite=1)
    run_fit(resumed, 0, 1, STEPS_PER_EPOCH, str(_ckpt(tmp_path, "fp16", 2)), poison={(0, 0)})
    torch.testing.assert_close(
        load_weights(tmp_path / "fp16-resumed"), load_weights(tmp_path / "fp16"), rtol=0, atol=0
    )


def test_accumulation_with_mid_epoch_resume_is_exact(tmp_path: Path):
    deterministic()
    cfg = _config(tmp_path, "accum", "ddp", "adamw", 1)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"accumulation_steps": 2})})
    run_fit(cfg, 0, 1, 2 * STEPS_PER_EPOCH)
    meta = read_meta(_ckpt(tmp_path, "accum", 2))
    assert (meta["epoch"], meta["step_in_epoch"]) == (0, 2)  # mid-epoch: 2 of 3 steps done
    resumed = cfg.model_copy(update={"name": "accum-resumed"})
    run_fit(resumed, 0, 1, 2 * STEPS_PER_EPOCH, str(_ckpt(tmp_path, "accum", 2)))
    torch.use_deterministic_algorithms(False)
    torch.testing.assert_close(
        load_weights(tmp_path / "accum-resumed"), load_weights(tmp_path / "accum"), rtol=0, atol=0
    )


def test_zero_buckets_are_capped_at_the_model_size(tmp_path: Path):
    """DeepSpeed allocates 5e8-element buckets whatever the model (seconds and a GB on CPU)."""
    from bigmodel.engine._strategy import deepspeed_config

    cfg = _config(tmp_path, "buckets", "zero2", "adamw", 2)
    zero = deepspeed_config(cfg, 2, num_params=860)["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 1024
    # an odd parameter count still gives a bucket ZeRO accepts (a multiple of its alignment)
    odd = deepspeed_config(cfg, 2, num_params=1001)["zero_optimization"]
    assert odd["allgather_bucket_size"] % 2 == 0 and odd["allgather_bucket_size"] >= 1001
    big = deepspeed_config(cfg, 2, num_params=10**10)["zero_optimization"]
    assert big["reduce_bucket_size"] == 500_000_000  # DeepSpeed's default for large models
