"""What a run says about its validation figures: too few patients to rank checkpoints, and how
much the figure moved between evaluations (the driver's summary line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from test_data_pipeline import write_dataset

from bigmodel.config import config_from_dict
from bigmodel.engine import LocalSession, train
from launch._progress import read_evaluations, steadiness_note


def test_steadiness_note_names_the_figure_spread_and_drops(tmp_path: Path):
    csv_path = tmp_path / "metrics.csv"
    rows = ["step,epoch,name,value", "5,0,loss/total,1.0"]
    for step, dice in zip((10, 20, 30, 40), (0.5, 0.8, 0.4, 0.9), strict=True):
        rows += [f"{step},0,val/seg/dice_mean,{dice}", f"{step},0,val/seg/dice_1,0.1"]
    csv_path.write_text("\n".join(rows) + "\n")
    evaluations = read_evaluations(csv_path)
    assert [e["seg/dice_mean"] for e in evaluations] == [0.5, 0.8, 0.4, 0.9]
    note = steadiness_note(evaluations, None)
    assert note.startswith("seg/dice_mean over the last 4 evaluations 0.650 +- 0.206")
    assert "1 of 3 evaluations worse than the one before, the largest by 0.400" in note
    assert steadiness_note(evaluations, "val/seg/dice_1").startswith("seg/dice_1 over")
    assert steadiness_note(evaluations[:1], None) is None


def test_a_one_patient_validation_split_is_named_before_training(tmp_path: Path, caplog):
    shards = tmp_path / "shards"
    write_dataset(
        shards,
        {"train": [4], "val": [2]},
        size=16,
        tasks={"cls": {"type": "multiclass", "classes": ["a", "b"]}},
    )
    manifest = json.loads((shards / "dataset.json").read_text())
    manifest["splits"]["val"]["num_groups"] = 1
    (shards / "dataset.json").write_text(json.dumps(manifest))
    cfg = config_from_dict(
        {
            "data": {"shards": str(shards), "image_size": 16, "batch_size": 2, "loader_workers": 0},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {"diag": {"type": "classification", "target": "cls"}},
            },
            "train": {"epochs": 1, "steps_per_epoch": 1, "output_dir": str(tmp_path / "runs")},
        }
    )
    with caplog.at_level(logging.WARNING, logger="bigmodel.engine.loop"):
        train(cfg, LocalSession())
    assert "the validation split 'val' holds 1 patient(s)" in caplog.text
    assert "cannot rank checkpoints" in caplog.text


def test_bigmodel_train_says_so_before_ray_starts(tmp_path: Path):
    from launch import _preflight

    shards = tmp_path / "shards"
    write_dataset(shards, {"train": [4], "val": [2]}, size=16)
    manifest = json.loads((shards / "dataset.json").read_text())
    cfg = config_from_dict(
        {
            "data": {"shards": str(shards)},
            "model": {"heads": {"diag": {"type": "classification", "target": "cls"}}},
        }
    )
    assert _preflight.notes(cfg) == []  # 5 patients
    manifest["splits"]["val"]["num_groups"] = 2
    (shards / "dataset.json").write_text(json.dumps(manifest))
    (note,) = _preflight.notes(cfg)
    assert note.startswith("the validation split 'val' holds 2 patient(s)")
