"""Tests that catch scale bugs: plain SGD, no clipping, against an autograd oracle.

The AdamW equivalence tests in ``test_engine_distributed.py`` cannot see a gradient that is off
by a constant factor: Adam's update is invariant to it and active clipping rescales it away. So
summing instead of averaging over ranks, or dividing the loss by the accumulation steps twice or
not at all, would pass there. Here every run uses SGD (momentum 0.9, no weight decay, constant
LR, clipping off), where the update is proportional to the gradient, and checks:

* gradients: the first update of every run equals ``lr x (1 + momentum) x`` the autograd gradient
  of the mean loss over the step's global batch (timm's ``sgd`` is Nesterov SGD: its first update
  is ``g + momentum * g``), computed in this file on the plain model (no engine involved);
  and the logged gradient norm of every step equals the single-worker run's;
* weights after several steps: every run ends with the weights (and BatchNorm statistics) of one
  worker taking the whole global batch.

Runs: ``N workers x b == 1 worker x N*b`` under DDP and ZeRO-1/2/3 (BatchNorm, SyncBN), and
``k accumulated micro-batches == one batch k times larger`` on one worker and on two (DDP's
``no_sync`` path and DeepSpeed's own micro-step count), with GroupNorm, because BatchNorm
normalises each micro-batch by its own statistics. Every 2-worker run is in ONE spawn.
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
    logged,
    make_batch,
    run_fit,
    set_dist_env,
    tiny_config,
)

STEPS = 3
GLOBAL_BATCH = 4
LR = 0.1
MOMENTUM = 0.9
STRATEGIES = {
    "ddp": {"strategy": "ddp"},
    "zero1": {"strategy": "deepspeed", "zero_stage": 1},
    "zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "zero_stage": 3},
}
# run name: (strategy, workers, accumulation steps, norm, reference run)
RUNS = {
    "ddp": ("ddp", 2, 1, "batch", "single"),
    "zero1": ("zero1", 2, 1, "batch", "single"),
    "zero2": ("zero2", 2, 1, "batch", "single"),
    "zero3": ("zero3", 2, 1, "batch", "single"),
    "ddp-acc": ("ddp", 2, 2, "group", "single-gn"),
    "zero2-acc": ("zero2", 2, 2, "group", "single-gn"),
    "acc": ("ddp", 1, 2, "group", "single-gn"),
    "zero2-acc-1w": ("zero2", 1, 2, "group", "single-gn"),
    # references: one worker, the whole global batch at once
    "single": ("ddp", 1, 1, "batch", None),
    "single-gn": ("ddp", 1, 1, "group", None),
}
COMPARED = [name for name, run in RUNS.items() if run[4] is not None]
LOCAL_BN = "ddp-local-bn"  # 2 workers without SyncBN: statistics averaged before saving


def _config(tmp: Path, name: str, **train):
    strategy, workers, accumulation, _, _ = RUNS[name]
    return tiny_config(
        tmp,
        name,
        data={"batch_size": GLOBAL_BATCH // (workers * accumulation), "image_size": 16},
        optim={
            "name": "sgd",
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": 0.0,
            "lr_scaling": "none",
            "grad_clip": None,
            "accumulation_steps": accumulation,
        },
        schedule={"name": "constant", "warmup_steps": 0},
        train={"epochs": 1, "checkpoint_every": 1, "log_every": 1, **train},
        distributed=STRATEGIES[strategy],
        cluster={"num_workers": workers},
    )


def _run(tmp: Path, name: str, rank: int) -> None:
    _, workers, accumulation, norm, _ = RUNS[name]
    run_fit(_config(tmp, name), rank, workers, STEPS * accumulation, norm=norm)


def _workers(rank: int, world_size: int, port: int, tmp_str: str) -> None:
    set_dist_env(rank, world_size, port)
    deterministic()
    for name, run in RUNS.items():
        if run[1] == world_size:
            _run(Path(tmp_str), name, rank)
    cfg = _config(Path(tmp_str), "ddp", sync_bn=False).model_copy(update={"name": LOCAL_BN})
    run_fit(cfg, rank, world_size, STEPS)
    # the engine's own checks must fire: record what each one raised
    errors = {}
    checks = {
        # rank 1's loader yields one batch more: DDP would hang at the extra step
        "unequal-steps": dict(batches=STEPS + rank),
        # both ranks evaluate rank 0's share: every sample seen twice
        "duplicate-eval": dict(batches=1, eval_total=6, eval_share=(0, world_size)),
    }
    for name, kwargs in checks.items():
        cfg = _config(Path(tmp_str), "ddp", eval_every=1).model_copy(update={"name": name})
        try:
            run_fit(cfg, rank, world_size, **kwargs)
            errors[name] = None
        except RuntimeError as err:
            errors[name] = str(err)
    if rank == 0:
        (Path(tmp_str) / "errors.json").write_text(json.dumps(errors))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("scale")
    env = dict(os.environ)
    try:
        mp.spawn(_workers, args=(2, free_port(), str(tmp)), nprocs=2, join=True)
    finally:
        os.environ.clear()
        os.environ.update(env)
    deterministic()
    try:
        for name, run in RUNS.items():
            if run[1] == 1:
                _run(tmp, name, 0)
    finally:
        torch.use_deterministic_algorithms(False)
    return tmp


def _weights_after_step_1(run_dir: Path) -> dict[str, torch.Tensor]:
    """Model weights in the step-1 checkpoint (DDP's file, or DeepSpeed's consolidated masters)."""
    ckpt = run_dir / "checkpoints" / "step_0000001"
    if (ckpt / "model.pt").is_file():
        return torch.load(ckpt / "model.pt", map_location="cpu", weights_only=False)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")


def _oracle_gradient(norm: str) -> dict[str, torch.Tensor]:
    """Autograd gradient of the mean loss over step 1's global batch, on the plain model."""
    torch.manual_seed(0)  # the config's seed: the engine's initial weights
    model = TinyMultiTask(norm)
    batch = make_batch(0, 0, 0, GLOBAL_BATCH)
    model(batch["image"], batch)["loss"].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", COMPARED)
def test_first_update_follows_global_batch_gradient(runs: Path, name: str):
    torch.manual_seed(0)
    initial = dict(TinyMultiTask(RUNS[name][3]).named_parameters())
    after = _weights_after_step_1(runs / name)
    for key, grad in _oracle_gradient(RUNS[name][3]).items():
        assert grad.abs().max() > 1e-4, key  # a real gradient, not a vacuous comparison
        update = (initial[key].detach() - after[key].float()) / (LR * (1 + MOMENTUM))
        torch.testing.assert_close(update, grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", COMPARED)
def test_gradient_norm_of_every_step_equals_one_worker(runs: Path, name: str):
    norms, reference = logged(runs / name, "grad_norm"), logged(runs / RUNS[name][4], "grad_norm")
    assert len(reference) == STEPS and min(reference) > 0
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(reference), rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", COMPARED)
def test_weights_after_several_steps_equal_one_worker(runs: Path, name: str):
    actual, expected = load_weights(runs / name), load_weights(runs / RUNS[name][4])
    torch.manual_seed(0)
    initial = TinyMultiTask(RUNS[name][3]).state_dict()
    assert not torch.allclose(expected["head.weight"], initial["head.weight"])
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_batchnorm_statistics_are_averaged_across_ranks_without_syncbn(runs: Path):
    """timm's distribute_bn before saving: the saved statistics are the ranks' mean, not rank 0's.

    After one step the first BatchNorm's running mean is ``momentum x`` the mean of its input
    over the batch; averaged over two equal halves that is the mean over the global batch.
    """
    torch.manual_seed(0)
    model = TinyMultiTask("batch")
    batch = make_batch(0, 0, 0, GLOBAL_BATCH)
    model(batch["image"], batch)  # train mode: updates the running statistics once
    expected = model.state_dict()["features.1.running_mean"]
    step_1 = runs / LOCAL_BN / "checkpoints" / "step_0000001" / "model.pt"
    saved = torch.load(step_1, map_location="cpu", weights_only=False)["model"]
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(saved["features.1.running_mean"], expected, rtol=1e-5, atol=1e-7)


def test_ranks_with_unequal_step_counts_are_refused(runs: Path):
    error = json.loads((runs / "errors.json").read_text())["unequal-steps"]
    assert error and "between 3 and 4 batches per epoch" in error


def test_a_sample_evaluated_on_two_ranks_is_refused(runs: Path):
    error = json.loads((runs / "errors.json").read_text())["duplicate-eval"]
    assert error and "saw 3 sample(s) more than once across ranks" in error
