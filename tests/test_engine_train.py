"""``bigmodel.engine.train`` end to end on real pieces: shards -> loaders -> multi-task model.

Tiny shards are written with the data tests' ``write_dataset`` (webdataset tars per format.py);
the run uses the real manifest, augmentation, timm backbone, heads, losses and metrics. Resuming
from an epoch-boundary checkpoint reads the same seeded data stream and restores the RNG, so it
ends with exactly the uninterrupted run's weights (a mid-epoch resume draws a fresh stream for
the rest of the epoch: tests/test_data_position.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data_pipeline import write_dataset

from bigmodel.config import config_from_dict
from bigmodel.engine import LocalSession, train
from bigmodel.model_folder import file_sha256

TASKS = {
    "cls": {"type": "multiclass", "classes": ["normal", "lesion"]},
    "mask": {"classes": ["background", "organ", "lesion"]},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, {"train": [6, 6], "val": [5, 4]}, size=32, tasks=TASKS)
    return root


def _config(shards: Path, out: Path, name: str):
    return config_from_dict(
        {
            "name": name,
            "seed": 3,
            "data": {"shards": str(shards), "image_size": 32, "batch_size": 4, "loader_workers": 0},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {
                    "diag": {"type": "classification", "target": "cls"},
                    "seg": {"type": "segmentation", "target": "mask", "decoder_channels": 8},
                },
            },
            "optim": {"name": "adamw", "lr": 0.003, "lr_scaling": "none"},
            "schedule": {"name": "cosine", "warmup_steps": 1},
            "train": {
                "epochs": 2,
                "steps_per_epoch": 2,
                "log_every": 1,
                "checkpoint_every": 1,
                "output_dir": str(out),
            },
        }
    )


def test_train_runs_evaluates_and_resumes_exactly(shards: Path, tmp_path: Path):
    torch.use_deterministic_algorithms(True)
    try:
        full = LocalSession()
        figures = train(_config(shards, tmp_path, "full"), full)
        # step 2 ends epoch 0: the resumed run starts epoch 1 as the uninterrupted one did
        resumed = LocalSession(resume_from=str(tmp_path / "full/checkpoints/step_0000002"))
        train(_config(shards, tmp_path, "resumed"), resumed)
    finally:
        torch.use_deterministic_algorithms(False)

    run = tmp_path / "full"
    for name in ("config.yaml", "metrics.csv", "curves.png", "tb", "model/model.safetensors"):
        assert (run / name).exists(), name
    assert [Path(c).name for c in full.checkpoints] == [f"step_{s:07d}" for s in (1, 2, 3, 4)]
    # every validation sample evaluated exactly once; metrics from both heads
    assert figures["val/num_samples"] == 9.0
    assert "val/diag/accuracy" in figures and "val/seg/dice_mean" in figures
    assert {"loss/diag", "loss/seg", "lr", "samples_per_s_total"} <= figures.keys()
    card = json.loads((run / "model/model_card.json").read_text())
    assert card["dataset_manifest_sha256"] == file_sha256(shards / "dataset.json")
    assert card["heads"] == {"diag": "classification", "seg": "segmentation"}
    # the resolved config (channels, class counts, steps) is saved with the run
    saved = (run / "config.yaml").read_text()
    assert "in_chans: 1" in saved and "steps_per_epoch: 2" in saved

    expected = load_file(str(run / "model/model.safetensors"))
    actual = load_file(str(tmp_path / "resumed/model/model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
