"""k-fold cross-validation by patient: ``bigmodel-shard build --folds K`` to ``bigmodel-train --fold``.

The source is a real image folder made from scikit-learn's digits (12 patients, 3 images each).
The build deals the train+val patients into 3 folds and cuts shards at fold boundaries; the
reading side turns fold i into whole-shard splits; the engine trains each fold (no Ray here:
``cross_validate`` takes any function that trains a fold config) and the summary holds each
fold's validation figures and their mean ± std.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from bigmodel.config import config_from_dict
from bigmodel.data import load_manifest, make_eval_loader, make_train_loader
from bigmodel.engine import LocalSession, train
from launch import _folds
from launch.train import main as train_main
from sharding.cli import main as shard_main

K = 3
PATIENTS = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folds")
    digits = load_digits()
    for patient in range(PATIENTS):
        label = patient % 2
        picks = np.flatnonzero(digits.target == label)[patient * 3 : patient * 3 + 3]
        (root / "src" / f"digit{label}").mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(picks):
            pix = (digits.images[idx] * 15).astype(np.uint8)
            Image.fromarray(pix).save(root / "src" / f"digit{label}" / f"pat{patient:02d}_{i}.png")
    out = root / "shards"
    code = shard_main(
        [
            "build",
            "--source=imagefolder",
            f"--input={root / 'src'}",
            f"--out={out}",
            r"--option=group_regex=^(?P<patient>pat\d+)_",
            "--split-ratios=0.7,0.1,0.2",
            f"--folds={K}",
            "--max-shard-samples=4",
            "--quiet",
        ]
    )
    assert code == 0
    return out


def _groups_by_key(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {
            m.name.rsplit(".", 1)[0]: tar.extractfile(m).read().decode()
            for m in tar.getmembers()
            if m.name.endswith(".group")
        }


def test_folds_are_patient_disjoint_and_cover_the_pool(shards):
    manifest = json.loads((shards / "dataset.json").read_text())
    folds = manifest["folds"]
    assert folds["k"] == K and folds["pool"] == ["train", "val"]
    pool_groups, test_groups = set(), set()
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            groups = set(_groups_by_key(shards / shard["name"]).values())
            if split == "test":
                assert "fold" not in shard
                test_groups |= groups
                continue
            # every patient of a shard belongs to the shard's fold: folds are whole shards
            assert {folds["groups"][g] for g in groups} == {shard["fold"]}, shard["name"]
            pool_groups |= groups
    assert pool_groups == set(folds["groups"]) and not pool_groups & test_groups
    assert len(pool_groups | test_groups) == PATIENTS
    assert max(folds["num_groups"]) - min(folds["num_groups"]) <= 1
    pool_samples = sum(manifest["splits"][s]["num_samples"] for s in ("train", "val"))
    assert sum(folds["num_samples"]) == pool_samples


def test_fold_build_is_reproducible(shards, tmp_path):
    """The same command into another folder gives the same folds and byte-identical shards."""
    again = tmp_path / "again"
    source = shards.parent / "src"
    argv = ["build", "--source=imagefolder", f"--input={source}", f"--out={again}"]
    argv += [r"--option=group_regex=^(?P<patient>pat\d+)_"]
    argv += ["--split-ratios=0.7,0.1,0.2"]
    argv += [f"--folds={K}", "--max-shard-samples=4", "--quiet"]
    assert shard_main(argv) == 0
    first = json.loads((shards / "dataset.json").read_text())
    second = json.loads((again / "dataset.json").read_text())
    assert first["folds"] == second["folds"] and first["splits"] == second["splits"]
    assert (
        shard_main(
            ["build", "--source=imagefolder", f"--input={source}", "--out", str(again), "--folds=1"]
        )
        == 2
    )  # K=1 is refused


def _config(shards: Path, out: Path, name: str = "cv"):
    return config_from_dict(
        {
            "name": name,
            "data": {"shards": str(shards), "image_size": 32, "batch_size": 2, "loader_workers": 0},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {"digit": {"type": "classification", "target": "cls"}},
            },
            "optim": {"lr": 0.003, "lr_scaling": "none"},
            "train": {"epochs": 1, "steps_per_epoch": 2, "log_every": 1, "output_dir": str(out)},
        }
    )


def test_fold_i_trains_on_the_other_folds_and_validates_on_fold_i(shards, tmp_path, capsys):
    folds = json.loads((shards / "dataset.json").read_text())["folds"]
    cfg = _folds.fold_config(_config(shards, tmp_path), 1)
    assert cfg.name == "cv-fold1" and cfg.tracking.tags == {"cv": "cv", "fold": "1"}
    manifest = load_manifest(shards)
    val_keys = [k for b in make_eval_loader(cfg, manifest, 0, 1) for k in b["key"]]
    val_groups = {g for b in make_eval_loader(cfg, manifest, 0, 1) for g in b["group"]}
    assert {folds["groups"][g] for g in val_groups} == {1}
    assert len(val_keys) == folds["num_samples"][1] == len(set(val_keys))
    train_loader = make_train_loader(cfg, manifest, 0, 1, batches_per_epoch=20)
    train_groups = {g for b in train_loader for g in b["group"]}
    assert {folds["groups"][g] for g in train_groups} == {0, 2}

    config = tmp_path / "cv.yaml"
    config.write_text(json.dumps(_config(shards, tmp_path).to_dict()))
    assert train_main([str(config), "--fold", "2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "train_split: fold2-train" in printed and "name: cv-fold2" in printed
    assert train_main([str(config), "--fold", str(K)]) == 2
    assert f"has folds 0..{K - 1}" in capsys.readouterr().err


def test_cross_validate_trains_every_fold_and_summarises(shards, tmp_path):
    folds = json.loads((shards / "dataset.json").read_text())["folds"]
    seen = []

    def run_fold(cfg):
        seen.append((cfg.name, cfg.data.train_split, cfg.data.val_split))
        return train(cfg, LocalSession())

    cfg = _config(shards, tmp_path).model_copy(deep=True)
    cfg.tracking.enabled = True  # the default store: SQLite in train.output_dir
    summary = _folds.cross_validate(cfg, run_fold)
    assert seen == [(f"cv-fold{i}", f"fold{i}-train", f"fold{i}-val") for i in range(K)]
    # each fold validated on exactly its own samples
    assert [f["metrics"]["val/num_samples"] for f in summary["folds"]] == folds["num_samples"]
    accuracies = [f["metrics"]["val/digit/accuracy"] for f in summary["folds"]]
    assert summary["mean"]["val/digit/accuracy"] == pytest.approx(np.mean(accuracies))
    assert summary["stdev"]["val/digit/accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    written = json.loads((tmp_path / "cv-cv" / "summary.json").read_text())
    assert written["k"] == K and len(written["folds"]) == K
    table = _folds.format_summary(summary)
    assert "digit/accuracy" in table and "±" in table
    # one MLflow run holds the mean ± std and the summary file
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(summary["mlflow_run"])
    assert run.data.metrics["mean/val/digit/accuracy"] == pytest.approx(np.mean(accuracies))
    assert run.data.tags["cv"] == "cv" and run.info.run_name == "cv-cv"
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["summary.json"]
