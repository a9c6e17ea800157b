"""Fast single-process tests of the engine's parts: optimizer, schedule, DeepSpeed config,
SyncBN conversion, logs and the saved-model folder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from _engine_tiny import run_fit, tiny_config
from safetensors.torch import load_file
from timm.layers import BatchNormAct2d

from bigmodel.engine._optim import build_optimizer, build_scheduler
from bigmodel.engine._strategy import deepspeed_config
from bigmodel.engine._syncbn import GlooSyncBatchNorm, GlooSyncBatchNormAct, convert_sync_batchnorm


def _cfg(tmp: Path, **sections):
    return tiny_config(tmp, "parts", **sections)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lamb", "lars"])
def test_optimizer_excludes_norms_and_biases_from_weight_decay(tmp_path: Path, name: str):
    cfg = _cfg(tmp_path, optim={"name": name, "weight_decay": 0.05, "lr": 0.1})
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    optimizer = build_optimizer(model, cfg)
    expected = {"sgd": "SGD", "adamw": "AdamW", "lamb": "Lamb", "lars": "Lars"}[name]
    assert type(optimizer).__name__ == expected
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for pname, param in model.named_parameters():
        want = 0.0 if param.ndim <= 1 else 0.05  # norms and biases are 1-D
        assert decay_of[id(param)] == want, pname
    if name == "lars":  # no trust-ratio adaptation where there is no weight decay
        assert all(not g["always_adapt"] for g in optimizer.param_groups)


@pytest.mark.parametrize("rule,expected", [("linear", 0.1 * 4), ("sqrt", 0.1 * 2), ("none", 0.1)])
def test_lr_scaled_from_reference_batch(tmp_path: Path, rule: str, expected: float):
    cfg = _cfg(
        tmp_path,
        data={"batch_size": 32},
        optim={"lr": 0.1, "reference_batch_size": 64, "lr_scaling": rule, "accumulation_steps": 2},
        cluster={"num_workers": 4},
    )
    assert cfg.global_batch_size == 32 * 4 * 2
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize(
    "name,expected", [("adamw", 0.1 * 2), ("lamb", 0.1 * 2), ("sgd", 0.1 * 4), ("lars", 0.1 * 4)]
)
def test_lr_scaling_auto_is_sqrt_for_adaptive_and_linear_for_sgd(tmp_path, name, expected):
    cfg = _cfg(
        tmp_path,
        data={"batch_size": 32},
        optim={"name": name, "lr": 0.1, "reference_batch_size": 64, "lr_scaling": "auto"},
        cluster={"num_workers": 8},
    )
    assert cfg.global_batch_size == 4 * 64
    assert build_optimizer(torch.nn.Linear(2, 2), cfg).param_groups[0]["lr"] == pytest.approx(
        expected
    )


def test_layer_decay_reaches_timm(tmp_path: Path):
    cfg = _cfg(tmp_path, optim={"name": "adamw", "lr": 0.1, "layer_decay": 0.5})
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    optimizer = build_optimizer(model, cfg)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[-2] == 0.5  # the head, then decay


def test_warmup_then_cosine(tmp_path: Path):
    cfg = _cfg(
        tmp_path,
        optim={"lr": 1.0, "lr_scaling": "none"},
        schedule={"name": "cosine", "warmup_steps": 4, "warmup_lr": 0.0, "min_lr": 0.0},
    )
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=20)
    lrs = []
    for step in range(21):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(0.5)  # linear warmup
    assert lrs[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 20)))  # cosine after it
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[20] == pytest.approx(0.0, abs=1e-9)


def test_step_schedule(tmp_path: Path):
    cfg = _cfg(
        tmp_path,
        optim={"lr": 1.0, "lr_scaling": "none"},
        schedule={"name": "step", "decay_steps": 5, "decay_rate": 0.1},
    )
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=20)
    scheduler.step_update(4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    scheduler.step_update(12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_deepspeed_config_from_schema_with_overrides(tmp_path: Path):
    cfg = _cfg(
        tmp_path,
        data={"batch_size": 8},
        optim={"accumulation_steps": 2, "grad_clip": 0.5},
        train={"precision": "bf16"},
        distributed={
            "strategy": "deepspeed",
            "zero_stage": 3,
            "offload_optimizer": True,
            "offload_params": True,
            "deepspeed_overrides": {"zero_optimization": {"reduce_bucket_size": 1000}},
        },
    )
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 8 * 2 * 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 1000  # merged, not replaced
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_syncbn_conversion_keeps_parameters_and_timm_activations():
    model = timm.create_model("test_efficientnet", pretrained=False)  # BatchNormAct2d layers
    params = {id(p) for p in model.parameters()}
    assert any(isinstance(m, BatchNormAct2d) for m in model.modules())
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GlooSyncBatchNorm) for m in norms)
    assert any(isinstance(m, GlooSyncBatchNormAct) and hasattr(m, "act") for m in norms)
    assert {id(p) for p in converted.parameters()} == params  # the optimizer sees the same ones
    # without a process group it is plain BatchNorm: same output as before conversion
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x))


def test_run_folder_logs_and_saved_model(tmp_path: Path):
    cfg = _cfg(
        tmp_path, train={"epochs": 2, "log_every": 1, "eval_every": 1, "output_dir": str(tmp_path)}
    )
    figures, session = run_fit(cfg, 0, 1, batches=2, eval_total=7)
    run = tmp_path / "parts"
    for name in ("config.yaml", "metrics.csv", "curves.png", "tb", "model/model.safetensors"):
        assert (run / name).exists(), name
    with (run / "metrics.csv").open() as f:
        names = {row["name"] for row in csv.DictReader(f)}
    for figure in (
        "loss/diag",
        "lr",
        "samples_per_s",
        "samples_per_s_total",
        "data_wait_fraction",
        "memory_mb",
        "val/diag/accuracy",
    ):
        assert figure in names, figure
    assert figures["val/num_samples"] == 7.0  # every evaluation sample exactly once
    card = json.loads((run / "model" / "model_card.json").read_text())
    assert card["metrics"]["step"] == 4.0 and "val/diag/accuracy" in card["metrics"]
    assert load_file(str(run / "model" / "model.safetensors"))["head.weight"].shape == (4, 8)
    assert [Path(c).name for c in session.checkpoints] == ["step_0000002", "step_0000004"]
    assert session.history[-1]["step"] == 4.0


@pytest.mark.parametrize(
    "precision,distributed",
    [
        ("fp16", {"strategy": "ddp"}),  # autocast + GradScaler
        ("bf16", {"strategy": "deepspeed", "zero_stage": 2}),  # DeepSpeed's torch_autocast mode
        ("fp16", {"strategy": "deepspeed", "zero_stage": 1}),
    ],
)
def test_mixed_precision_keeps_fp32_weights_and_norm_statistics(
    tmp_path: Path, precision: str, distributed: dict
):
    """Parameters, BatchNorm statistics and the exported weights stay fp32 under autocast.

    DeepSpeed's bf16/fp16 modes cast the whole model: BatchNorm running statistics in bf16 lose
    small moving-average updates, and the exported weights were bf16 instead of the masters.
    """
    dtypes = {"bf16": "bfloat16", "fp16": "float16"}
    cfg = _cfg(tmp_path, train={"precision": precision, "epochs": 1}, distributed=distributed)
    figures, _ = run_fit(cfg, 0, 1, batches=2)
    assert math.isfinite(figures["loss/total"]) and figures["nonfinite_skipped"] == 0.0
    weights = load_file(str(tmp_path / "parts" / "model" / "model.safetensors"))
    for key in ("features.0.weight", "features.1.running_mean", "features.1.running_var"):
        assert weights[key].dtype == torch.float32, key
    assert int(weights["features.1.num_batches_tracked"]) == 2
    # the statistics moved by the momentum update of 2 steps (none of it rounded away)
    assert not torch.equal(weights["features.1.running_var"], torch.ones(8))
    if distributed["strategy"] == "deepspeed":
        ds = deepspeed_config(cfg, world_size=1)
        assert ds["torch_autocast"] == {"enabled": True, "dtype": dtypes[precision]}
        assert "bf16" not in ds and "fp16" not in ds  # DeepSpeed's model-casting modes stay off


def test_gradient_accumulation_same_under_ddp_and_deepspeed(tmp_path: Path):
    """Our accumulation (loss / k, step every k) and DeepSpeed's (its own micro-step count)."""
    weights = {}
    for name, distributed in {
        "acc-ddp": {"strategy": "ddp"},
        "acc-zero2": {"strategy": "deepspeed", "zero_stage": 2},
    }.items():
        cfg = tiny_config(
            tmp_path,
            name,
            optim={"name": "adamw", "lr": 0.01, "accumulation_steps": 2, "grad_clip": 0.5},
            train={"epochs": 1, "output_dir": str(tmp_path)},
            distributed=distributed,
        )
        figures, session = run_fit(cfg, 0, 1, batches=4)
        assert figures["step"] == 2.0  # 4 micro-batches, 2 optimizer steps
        weights[name] = load_file(str(tmp_path / name / "model" / "model.safetensors"))
    for key, value in weights["acc-ddp"].items():
        torch.testing.assert_close(weights["acc-zero2"][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "distributed",
    [{"strategy": "deepspeed", "zero_stage": 0}, {"strategy": "deepspeed", "zero_stage": 1}],
)
def test_nonfinite_step_is_skipped_under_deepspeed(tmp_path: Path, distributed: dict):
    """ZeRO-0 steps the client optimizer itself, so the engine checks the norm before it."""
    cfg = _cfg(tmp_path, train={"epochs": 1}, distributed=distributed)
    figures, session = run_fit(cfg, 0, 1, batches=3, poison={(0, 1)})
    assert figures["nonfinite_skipped"] == 1.0 and figures["step"] == 3.0
    assert "grad_norm" not in session.history[1] and session.history[2]["grad_norm"] > 0
    weights = load_file(str(tmp_path / "parts" / "model" / "model.safetensors"))
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_model_folder_holds_the_best_evaluation(tmp_path: Path):
    # best_mode=min on a score that rises as the run learns: the best evaluation is the first,
    # so model/ must not be the last weights
    cfg = _cfg(
        tmp_path,
        optim={"lr": 0.3},
        train={"epochs": 3, "eval_every": 1, "best_metric": "val/diag/auroc", "best_mode": "min"},
    )
    run_fit(cfg, 0, 1, batches=2, eval_total=9)
    run = tmp_path / "parts"
    scores = {
        int(r["step"]): float(r["value"]) for r in _rows(run) if r["name"] == "val/diag/auroc"
    }
    best_step = min(scores, key=lambda s: (scores[s], s))  # the first of equal scores
    assert best_step != max(scores), "the test needs a run whose last evaluation is not the best"
    card = json.loads((run / "model" / "model_card.json").read_text())
    assert card["metrics"]["step"] == best_step
    saved = torch.load(
        run / "checkpoints" / f"step_{best_step:07d}" / "model.pt", weights_only=False
    )
    model = load_file(str(run / "model" / "model.safetensors"))
    for key, value in saved["model"].items():
        torch.testing.assert_close(model[key], value, rtol=0, atol=0, msg=key)


def test_best_metric_must_be_reported(tmp_path: Path):
    cfg = _cfg(tmp_path, train={"eval_every": 1, "best_metric": "val/diag/nope"})
    with pytest.raises(ValueError, match="train.best_metric='val/diag/nope'.*val/diag/accuracy"):
        run_fit(cfg, 0, 1, batches=2, eval_total=5)


def test_keep_checkpoints_prunes_old_folders(tmp_path: Path):
    cfg = _cfg(tmp_path, train={"epochs": 2, "checkpoint_every": 1, "keep_checkpoints": 2})
    _, session = run_fit(cfg, 0, 1, batches=3)
    assert len(session.checkpoints) == 6  # every step was checkpointed and reported
    folders = sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir())
    assert folders == ["step_0000005", "step_0000006"]


@pytest.mark.parametrize("interval_s,expected", [(0, [2, 4, 6]), (3600, [6])])
def test_epoch_checkpoints_follow_the_interval(tmp_path: Path, interval_s, expected):
    """``checkpoint_every=0``: an epoch's end is saved once ``checkpoint_interval_s`` passed
    since the last save; the end of the run always is."""
    cfg = _cfg(tmp_path, train={"epochs": 3, "checkpoint_interval_s": interval_s})
    _, session = run_fit(cfg, 0, 1, batches=2)
    assert [int(Path(c).name[5:]) for c in session.checkpoints] == expected
    assert [h["step"] for h in session.history] == [1, 2, 3, 4, 5, 6]  # figures as before


def test_resume_after_crash_logs_each_step_once(tmp_path: Path):
    """A crash after step 4 and a resume from the step-2 checkpoint: no duplicated rows."""
    cfg = _cfg(tmp_path, train={"epochs": 2, "checkpoint_every": 2})
    run_fit(cfg, 0, 1, batches=2)
    run = tmp_path / "parts"
    before = [(r["step"], r["name"]) for r in _rows(run)]
    run_fit(cfg, 0, 1, batches=2, resume_from=str(run / "checkpoints" / "step_0000002"))
    after = [(r["step"], r["name"]) for r in _rows(run) if not r["name"].startswith("time/")]
    assert len(after) == len(set(after)), "a step was logged twice"
    assert {s for s, _ in after} == {"1", "2", "3", "4"}
    assert sorted(after) == sorted(k for k in before if not k[1].startswith("time/"))


def test_epoch_shorter_than_one_step_is_refused(tmp_path: Path):
    cfg = _cfg(tmp_path, optim={"accumulation_steps": 4})
    with pytest.raises(ValueError, match="yields 3 batches per epoch, fewer than .*=4"):
        run_fit(cfg, 0, 1, batches=3)


def test_missing_evaluation_sample_is_refused(tmp_path: Path, monkeypatch):
    """The loader claims one sample more than it yields (an unreadable shard)."""
    import _engine_tiny

    class Short(_engine_tiny.EvalShare):
        def __init__(self, *args):
            super().__init__(*args)
            self.num_samples += 1

    monkeypatch.setattr(_engine_tiny, "EvalShare", Short)
    cfg = _cfg(tmp_path, train={"eval_every": 1})
    with pytest.raises(RuntimeError, match="saw 5 samples but the manifest lists 6"):
        run_fit(cfg, 0, 1, batches=2, eval_total=5)


def test_checkpoint_from_another_strategy_is_refused(tmp_path: Path):
    _, session = run_fit(_cfg(tmp_path), 0, 1, batches=2)
    cfg = _cfg(tmp_path, distributed={"strategy": "deepspeed", "zero_stage": 1})
    with pytest.raises(ValueError, match="written by strategy 'ddp'.*distributed.strategy=ddp"):
        run_fit(cfg, 0, 1, batches=2, resume_from=session.checkpoints[-1])
