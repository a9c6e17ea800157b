"""benchmarks/bench_e2e.py: its data come from the real volume, and both runs get the same recipe."""

from __future__ import annotations

import argparse
import csv
import json

import nibabel as nib
import numpy as np

from benchmarks import bench_e2e
from bigmodel.config import load_config


def test_source_is_real_anatomy_in_patient_slabs_with_three_classes(tmp_path):
    csv_path = bench_e2e.write_source(tmp_path, size=64)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 8  # 4 slabs x 2 time points
    assert {r["split"] for r in rows if r["patient_id"] == "patient-2"} == {"val"}
    assert {r["split"] for r in rows if r["patient_id"] != "patient-2"} == {"train"}
    image = np.asarray(nib.load(tmp_path / rows[0]["image"]).dataobj)
    mask = np.asarray(nib.load(tmp_path / rows[0]["mask"]).dataobj)
    assert image.shape == (64, 48, bench_e2e.SLAB) and image.std() > 0
    assert set(np.unique(mask)) == {0, 1, 2}


def test_bigmodel_config_runs_the_scripts_recipe(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "dataset.json").write_text(json.dumps({"splits": {"train": {"num_samples": 36}}}))
    for steps in (30, 60, 7):  # 36 samples / batch 8: epochs of at most 4 steps
        args = bench_e2e._parser().parse_args(["--steps", str(steps), "--batch", "8"])
        cfg = load_config(bench_e2e._bigmodel_config(args, shards, tmp_path))
        assert cfg.train.epochs * cfg.train.steps_per_epoch == steps
        assert cfg.train.steps_per_epoch <= 4
    args = bench_e2e._parser().parse_args(["--steps", "60", "--batch", "8", "--lr", "2e-3"])
    cfg = load_config(bench_e2e._bigmodel_config(args, shards, tmp_path))
    assert cfg.data.batch_size == 8 and cfg.cluster.num_workers == 1
    assert cfg.scaled_lr() == 2e-3  # reference batch = batch: the script's lr, unscaled
    assert cfg.schedule.warmup_steps == args.warmup and cfg.optim.name == "adamw"
    assert cfg.model.heads["tissue"].decoder == "unet"
    # evaluation, checkpoint cadence and loader workers are left to the schema's defaults
    assert "eval_every" not in cfg.train.model_fields_set
    assert "checkpoint_every" not in cfg.train.model_fields_set
    assert "loader_workers" not in cfg.data.model_fields_set


def test_shared_flags_reach_the_script_parser():
    args = bench_e2e._parser().parse_args(["--steps", "7", "--size", "96"])
    again = bench_e2e._parser().parse_args(["baseline", *bench_e2e._shared_flags(args)])
    assert isinstance(again, argparse.Namespace)
    assert (again.steps, again.size, again.backbone) == (7, 96, args.backbone)


def test_bench_step_prints_the_variants_side_by_side(capsys, one_thread):
    from benchmarks import bench_step

    argv = ["--steps", "1", "--rounds", "1", "--size", "32", "--batch", "2"]
    assert bench_step.main([*argv, "--variants", "fp32,channels_last"]) == 0
    table = capsys.readouterr().out.split("| variant |")[1].splitlines()
    rows = {line.split("|")[1].strip(): line for line in table if line.startswith("| ")}
    rows.pop("---")
    assert set(rows) == {"fp32", "channels_last"}
    assert rows["fp32"].split("|")[3].strip() == "1.00"  # the ratio column is against fp32
