"""Proofs of the distributed engine on 2 gloo workers (fp32, deterministic, tight tolerances).

* Equivalence: 2 workers x batch b with SyncBN (our gloo SyncBN on CPU) end with the same
  weights and BatchNorm statistics as 1 worker x batch 2b; DeepSpeed ZeRO-1/2/3 end with the
  same weights as DDP.
* Exact resume: runs resumed from a mid-epoch checkpoint end with the uninterrupted run's
  weights (model, optimizer, scheduler, step, data position and RNG restored), for DDP and
  ZeRO-2; a ZeRO-2 checkpoint from 2 workers loads on 1 with its Adam moments (universal
  checkpoint).
* Non-finite losses on one rank are skipped on all ranks and counted (DDP, ZeRO-2 and ZeRO-3,
  from the gradient norm, checked once per optimizer step); past the limit the run stops with
  a message.

Every 2-worker run happens in ONE ``torch.multiprocessing.spawn`` (DeepSpeed start-up is slow).
Each run: AdamW with warmup + cosine, gradient clipping, 2 epochs x 3 steps, a checkpoint every
2 steps (so step 2 is mid-epoch and step 6 the end).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
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

from bigmodel.engine import NonFiniteLossError
from bigmodel.engine.checkpoint import consolidated_state_dict, load_checkpoint

STEPS_PER_EPOCH = 3
EVAL_SAMPLES = 7
PER_WORKER = 4
STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "zero1": {"strategy": "deepspeed", "zero_stage": 1},
    "zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "zero_stage": 3},
}
# run name: (strategy, resume from (run, step) or None, {rank: poisoned (epoch, batch)})
RUNS = {
    "ddp": ("ddp", None, {}),
    "zero1": ("zero1", None, {}),
    "zero2": ("zero2", None, {}),
    "zero3": ("zero3", None, {}),
    "ddp-from2": ("ddp", ("ddp", 2), {}),
    "zero2-from2": ("zero2", ("zero2", 2), {}),
    "ddp-nan": ("ddp", None, {0: {(0, 1)}}),
    "zero2-nan": ("zero2", None, {1: {(1, 0)}}),
    "zero3-nan": ("zero3", None, {0: {(0, 2)}}),
}


def _config(tmp: Path, name: str, strategy: str, workers: int = 2, **train):
    return tiny_config(
        tmp,
        name,
        data={"batch_size": PER_WORKER * 2 // workers, "image_size": 16},
        optim={"name": "adamw", "lr": 0.01, "lr_scaling": "none", "grad_clip": 1.0},
        schedule={"name": "cosine", "warmup_steps": 2, "warmup_lr": 0.001},
        train={"epochs": 2, "checkpoint_every": 2, "log_every": 1, **train},
        distributed=STRATEGIES[strategy],
        cluster={"num_workers": workers},
    )


def _ckpt(tmp: Path, run: str, step: int) -> str:
    return str(tmp / run / "checkpoints" / f"step_{step:07d}")


def _workers(rank: int, world_size: int, port: int, tmp_str: str) -> None:
    set_dist_env(rank, world_size, port)
    deterministic()
    tmp = Path(tmp_str)
    for name, (strategy, resume, poison) in RUNS.items():
        # ZeRO-3 also evaluates: ranks get 4 and 3 samples (2 and 1 batches), so the rank with
        # fewer batches must keep joining the parameter gathers of the other
        evaluate = EVAL_SAMPLES if name == "zero3" else 0
        cfg = _config(tmp, name, strategy, eval_every=1 if evaluate else 0)
        resume_from = _ckpt(tmp, *resume) if resume else None
        figures, _ = run_fit(
            cfg, rank, world_size, STEPS_PER_EPOCH, resume_from, poison.get(rank, set()), evaluate
        )
        if rank == 0:
            (tmp / name / "figures.json").write_text(json.dumps(figures))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("engine")
    env = dict(os.environ)
    try:
        mp.spawn(_workers, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    finally:
        os.environ.clear()
        os.environ.update(env)
    deterministic()  # the reference: one worker with the global batch, in this process
    run_fit(_config(tmp, "single", "ddp", workers=1), 0, 1, STEPS_PER_EPOCH)
    torch.use_deterministic_algorithms(False)
    return tmp


def _assert_same(actual: dict, expected: dict, exact: bool = False) -> None:
    assert actual.keys() == expected.keys()
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-6}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tol, msg=key)


def test_syncbn_two_workers_equal_one_worker_with_double_batch(runs: Path):
    single, double = load_weights(runs / "single"), load_weights(runs / "ddp")
    torch.manual_seed(0)
    initial = TinyMultiTask().state_dict()
    # the runs moved the weights and the BN statistics: the comparison is not vacuous
    assert not torch.allclose(single["features.0.weight"], initial["features.0.weight"])
    assert not torch.allclose(single["features.1.running_var"], initial["features.1.running_var"])
    assert int(single["features.1.num_batches_tracked"]) == 2 * STEPS_PER_EPOCH
    _assert_same(double, single)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_equal_ddp(runs: Path, stage: int):
    _assert_same(load_weights(runs / f"zero{stage}"), load_weights(runs / "ddp"))


def test_zero3_evaluation_sees_every_sample_once_with_unequal_ranks(runs: Path):
    figures = json.loads((runs / "zero3" / "figures.json").read_text())
    assert figures["val/num_samples"] == EVAL_SAMPLES
    assert 0.0 <= figures["val/diag/accuracy"] <= 1.0


def test_zero_checkpoints_are_sharded_per_rank(runs: Path):
    shards = sorted(p.name for p in (Path(_ckpt(runs, "zero2", 2)) / "ds").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # one optimizer partition per rank
    ddp = Path(_ckpt(runs, "ddp", 2))
    assert (ddp / "model.pt").is_file() and not (ddp / "ds").exists()
    assert (ddp / "rng" / "rank_00000.pt").is_file() and (ddp / "rng" / "rank_00001.pt").is_file()


def test_checkpoints_mark_data_position(runs: Path):
    meta = json.loads((Path(_ckpt(runs, "ddp", 2)) / "meta.json").read_text())
    assert (meta["epoch"], meta["step_in_epoch"], meta["world_size"]) == (0, 2, 2)
    meta = json.loads((Path(_ckpt(runs, "ddp", 4)) / "meta.json").read_text())
    assert (meta["epoch"], meta["step_in_epoch"]) == (1, 1)
    meta = json.loads((Path(_ckpt(runs, "ddp", 6)) / "meta.json").read_text())
    assert (meta["epoch"], meta["step_in_epoch"], meta["step"]) == (2, 0, 6)


@pytest.mark.parametrize("kind", ["ddp", "zero2"])
def test_resumed_run_ends_with_uninterrupted_weights(runs: Path, kind: str):
    _assert_same(load_weights(runs / f"{kind}-from2"), load_weights(runs / kind), exact=True)


def test_zero_checkpoint_resumes_on_fewer_workers_with_its_adam_moments(runs: Path, caplog):
    """A 2-worker ZeRO-2 checkpoint loads on 1 worker through DeepSpeed's universal checkpoint.

    The loaded Adam moments equal the two saved partitions joined (the previous behaviour
    re-initialised them); the weights equal the consolidated ones. Resharding with steps run
    after each load (2 -> 1 -> 4 workers) is proven in ``test_engine_reshard.py``.
    """
    from bigmodel.engine._strategy import distribute, init_distributed

    ckpt = Path(_ckpt(runs, "zero2", 2 * STEPS_PER_EPOCH))
    partitions = [
        torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        for f in sorted((ckpt / "ds").glob("zero_pp_rank_*_optim_states.pt"))
    ]
    assert len(partitions) == 2
    deterministic()
    cfg = _config(runs, "zero2-one-worker", "zero2", workers=1)
    device = torch.device("cpu")
    init_distributed(cfg, 0, 0, 1, device)
    torch.manual_seed(cfg.seed)
    dm = distribute(TinyMultiTask(), cfg, 1, device, 2 * STEPS_PER_EPOCH, load_universal=True)
    with caplog.at_level("INFO", logger="bigmodel.engine.checkpoint"):
        load_checkpoint(dm, ckpt, 0, 1, cfg.seed, runs / "zero2-one-worker")
    torch.use_deterministic_algorithms(False)
    assert "resharded from the universal checkpoint" in caplog.text
    base = dm.engine.optimizer.optimizer  # the AdamW that ZeRO steps on its flat fp32 groups
    for group, flat in enumerate(p for g in base.param_groups for p in g["params"]):
        size = sum(p.numel() for p in dm.engine.optimizer.bit16_groups[group])
        for key in ("exp_avg", "exp_avg_sq"):
            saved = torch.cat([part["state"][group][key] for part in partitions])[:size]
            assert saved.abs().sum() > 0  # six AdamW steps left non-zero moments
            torch.testing.assert_close(base.state[flat][key][:size], saved, rtol=0, atol=0)
    weights = {k: v.detach() for k, v in dm.module.state_dict().items()}
    _assert_same(weights, consolidated_state_dict(ckpt))


@pytest.mark.parametrize("run", ["ddp-nan", "zero2-nan", "zero3-nan"])
def test_nonfinite_loss_on_one_rank_is_skipped_on_all(runs: Path, run: str):
    figures = json.loads((runs / run / "figures.json").read_text())
    assert figures["nonfinite_skipped"] == 1.0
    assert figures["step"] == 2 * STEPS_PER_EPOCH
    weights = load_weights(runs / run)
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    # the skipped update changed the outcome (it was not silently applied as a normal step)
    assert not torch.equal(
        weights["head.weight"], load_weights(runs / run.split("-")[0])["head.weight"]
    )


def test_nonfinite_limit_stops_the_run(tmp_path: Path):
    cfg = _config(tmp_path, "stop", "ddp", workers=1, max_nonfinite=0)
    with pytest.raises(NonFiniteLossError, match="train.max_nonfinite=0"):
        run_fit(cfg, 0, 1, STEPS_PER_EPOCH, poison={(0, 1)})


def test_resume_refuses_incomplete_checkpoint(tmp_path: Path):
    broken = tmp_path / "step_0000002"
    broken.mkdir()
    cfg = _config(tmp_path, "broken", "ddp", workers=1)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run_fit(cfg, 0, 1, STEPS_PER_EPOCH, str(broken))
