"""The weight average (``train.ema_decay``): what evaluation scores, what model/ holds, and a
resume that continues it exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _engine_tiny import deterministic, load_weights, run_fit, tiny_config

from bigmodel.config import ConfigError, config_from_dict

EMA = {"epochs": 2, "ema_decay": 0.9, "checkpoint_every": 1, "eval_every": 1}


def _checkpoint_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from bigmodel.engine.checkpoint import checkpoint_dir, consolidated_state_dict

    return consolidated_state_dict(checkpoint_dir(run_dir, step))


def test_model_folder_holds_the_average_not_the_last_step(tmp_path: Path):
    deterministic()
    run_fit(tiny_config(tmp_path, "ema", train=EMA), 0, 1, batches=3, eval_total=6)
    saved = load_weights(tmp_path / "ema")
    raw = _checkpoint_weights(tmp_path / "ema", 6)
    ema = torch.load(tmp_path / "ema/checkpoints/step_0000006/ema.pt", weights_only=True)
    for name, value in saved.items():
        torch.testing.assert_close(value, ema[name].to(value.dtype))
    weight = "features.0.weight"
    assert not torch.allclose(saved[weight], raw[weight]), "model/ holds the raw weights"
    # an average of the path: between the first step's weights and the last
    first = _checkpoint_weights(tmp_path / "ema", 1)[weight]
    assert (saved[weight] - raw[weight]).norm() < (first - raw[weight]).norm()


def test_evaluation_scores_the_average(tmp_path: Path, monkeypatch):
    from bigmodel.engine import loop

    scored = []
    real = loop.evaluate

    def spy(dm, loader, metrics, cfg, module=None):
        scored.append(module is not None and module is not dm.module)
        return real(dm, loader, metrics, cfg, module)

    monkeypatch.setattr(loop, "evaluate", spy)
    run_fit(tiny_config(tmp_path, "ema", train=EMA), 0, 1, batches=2, eval_total=6)
    assert scored == [True, True]


def test_resume_continues_the_average_exactly(tmp_path: Path):
    deterministic()
    run_fit(tiny_config(tmp_path, "full", train=EMA), 0, 1, batches=3)
    run_fit(tiny_config(tmp_path, "part", train={**EMA, "epochs": 1}), 0, 1, batches=3)
    run_fit(
        tiny_config(tmp_path, "part", train=EMA),
        0,
        1,
        batches=3,
        resume_from=str(tmp_path / "part/checkpoints/step_0000003"),
    )
    full, resumed = load_weights(tmp_path / "full"), load_weights(tmp_path / "part")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0)


def test_ema_is_off_by_default_under_zero3_and_refused_when_asked_for():
    base = {
        "model": {"heads": {"diag": {"type": "classification", "num_classes": 2}}},
        "distributed": {"strategy": "deepspeed", "zero_stage": 3},
    }
    assert config_from_dict(base).train.ema_decay is None
    assert config_from_dict({"model": base["model"]}).train.ema_decay == 0.999
    with pytest.raises(ConfigError, match="train.ema_decay.*ZeRO-3"):
        config_from_dict({**base, "train": {"ema_decay": 0.99}})
