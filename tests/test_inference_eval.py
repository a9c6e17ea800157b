"""bigmodel-eval on whole images larger than the training size: every annotated pixel is scored."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _inference_fixtures import IMAGE_SIZE, build_demo_shards, make_model_folder
from PIL import Image

from bigmodel.data import load_manifest
from bigmodel.inference.evaluate import main


def _annotated_pixels_and_sizes(shards, split: str) -> tuple[int, set]:
    """Count the split's annotated mask pixels straight from the tar files (independent of us)."""
    manifest = load_manifest(shards)
    pixels, sizes = 0, set()
    for path in manifest.shard_paths(split):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".mask.png"):
                    mask = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                    pixels += int((mask != 255).sum())
                    sizes.add(mask.shape)
    return pixels, sizes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shards = build_demo_shards(root)
    folder, _ = make_model_folder(shards, root / "model")
    return shards, folder, root


def test_eval_scores_every_pixel_of_images_larger_than_training(setup, tmp_path, capsys):
    shards, folder, _ = setup
    out = tmp_path / "report"
    assert main([str(folder), "--shards", str(shards), "--out", str(out), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    assert "organs/dice_mean" in printed and "report:" in printed

    pixels, sizes = _annotated_pixels_and_sizes(shards, "test")
    assert all(max(size) > IMAGE_SIZE for size in sizes)  # larger than the model's windows
    report = json.loads((out / "report.json").read_text())
    assert report["organs_pixels"] == {"annotated": pixels, "evaluated": pixels}
    assert report["metrics"]["organs/count"] == pixels  # bigmodel.metrics saw the same pixels
    assert report["num_samples"] == load_manifest(shards).split("test").num_samples

    table = {row["class"]: row for row in report["per_class"]["organs"]}
    assert sum(row["pixels"] for row in table.values()) == pixels
    assert table["tissue"]["dice"] == pytest.approx(report["metrics"]["organs/dice_1"], nan_ok=True)
    assert {"diagnosis/accuracy", "organs/dice_mean", "patient/recall@1"} <= set(report["ci95"])
    for name in (
        "diagnosis_confusion",
        "diagnosis_roc_pr",
        "organs_overlays",
        "patient_neighbours",
    ):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    with (out / "per_sample.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == report["num_samples"]
    assert set(report["per_patient"]["organs"]["dice_mean_3d"]) == {r["patient"] for r in rows}


def test_eval_on_shards_that_do_not_fit_names_the_manifest(setup, tmp_path, capsys):
    _, folder, root = setup
    shards_25d = build_demo_shards(root, layout="2.5d")  # 3 stacked slices: 3 channels
    out = tmp_path / "report"
    assert main([str(folder), "--shards", str(shards_25d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dataset.json: images have 3 channel(s) but the model takes 1" in err
    assert not out.exists()
    assert main([str(folder), "--shards", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "no shard manifest" in capsys.readouterr().err


def test_eval_on_a_damaged_shard_names_it_and_writes_no_report(setup, tmp_path, capsys):
    shards, folder, _ = setup
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    shard = Path(load_manifest(copy).shard_paths("test")[0])
    with tarfile.open(shard) as tar:  # flip payload bytes of one image; tar headers stay intact
        member = next(m for m in tar if m.name.endswith(".npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 4 : member.offset_data + member.size] = b"\xff" * 4
    shard.write_bytes(bytes(data))
    out = tmp_path / "report"
    assert main([str(folder), "--shards", str(copy), "--out", str(out), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{shard.name}: its bytes do not match the sha256" in err
    assert not (out / "report.json").exists()


def test_eval_without_bootstrap_writes_the_report_with_no_intervals(setup, tmp_path):
    shards, folder, _ = setup
    out = tmp_path / "report"
    assert main([str(folder), "--shards", str(shards), "--out", str(out), "--bootstrap", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "organs/dice_mean" in report["metrics"]
    assert report["ci95"] and all(v is None for v in report["ci95"].values()), report["ci95"]
    assert report["ci_method"] == "none (--bootstrap 0)"
