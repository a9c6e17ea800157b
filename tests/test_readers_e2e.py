"""Each reader of this part through the real shard builder, read back from the tar files."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from test_readers_coco import _coco
from test_readers_dicom import CT, MR, SALT, _ct_series, _phi_values
from test_readers_images import _digits_folder

from sharding import cli


def _build(kind: str, path: Path, out: Path, *extra: str, **options: str) -> tuple[dict, dict]:
    """``bigmodel-shard build`` then ``verify``; return the manifest and samples by key."""
    argv = ["build", "--source", kind, "--input", str(path), "--out", str(out), "--quiet"]
    argv += ["--split-ratios", "0.5,0.25,0.25", "--seed", "1", *extra]
    for key, value in options.items():
        argv += ["--option", f"{key}={value}"]
    assert cli.main(argv) == 0
    assert cli.main(["verify", str(out)]) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    samples: dict[str, dict] = defaultdict(dict)
    for tar in sorted(out.glob("*.tar")):
        split = tar.name.split("-")[0]
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tf.extractfile(m).read()
                samples[key]["split"] = split
    return manifest, samples


def _image(sample: dict) -> np.ndarray:
    if "image.png" in sample:
        return np.asarray(Image.open(io.BytesIO(sample["image.png"])))
    return np.load(io.BytesIO(sample["image.npy"]))


def _split_groups(samples: dict[str, dict]) -> dict[str, set[bytes]]:
    by_split = defaultdict(set)
    for s in samples.values():
        by_split[s["split"]].add(s["group"])
    return by_split


def test_dicom_end_to_end_writes_nothing_identifying(tmp_path):
    for p in range(4):
        _ct_series(tmp_path / "src" / f"CompressedSamples^CT1_{p}" / "s", patient_id=f"PAT{p}")
    shutil.copy(MR, tmp_path / "src" / "mr.dcm")
    salt_file = tmp_path / "salt.txt"
    salt_file.write_text(SALT)
    manifest, samples = _build(
        "dicom", tmp_path / "src", tmp_path / "out", salt_file=str(salt_file), window="lung"
    )
    assert len(samples) == 4 * 4 + 1  # 2D slices of 4 CT series + the MR slice
    ct = [s for s in samples.values() if json.loads(s["meta.json"])["modality"] == "CT"]
    assert {_image(s).dtype for s in ct} == {np.dtype(np.int16)}
    groups = _split_groups(samples)
    assert sum(len(g) for g in groups.values()) == len(set().union(*groups.values())) == 5
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    leaked = [
        v for v in _phi_values(CT, MR) | {"PAT0", "PAT1", "PAT2", "PAT3"} if v.encode() in blob
    ]
    assert not leaked, leaked
    assert SALT.encode() not in blob
    assert manifest["splits"]["train"]["num_samples"] > 0


def test_imagefolder_end_to_end(tmp_path):
    written = _digits_folder(tmp_path / "src", per_class=4)
    manifest, samples = _build(
        "imagefolder", tmp_path / "src", tmp_path / "out", group_regex=r"^pat(\d+)_"
    )
    assert manifest["tasks"]["cls"]["classes"] == ["digit0", "digit1", "digit2"]
    assert len(samples) == len(written)
    rel_of = {r.replace("/", "-")[: -len(".png")]: r for r in written}
    for key, s in samples.items():
        rel = rel_of[key]
        np.testing.assert_array_equal(_image(s), written[rel])
        assert int(s["cls"]) == int(rel[5])
    groups = _split_groups(samples)
    assert sum(len(g) for g in groups.values()) == 2  # two patients, each in one split


def test_csv_end_to_end(tmp_path):
    (tmp_path / "src").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        img = rng.integers(-1000, 1000, (12, 10)).astype(np.int16)
        np.save(tmp_path / "src" / f"x{i}.npy", img)
        Image.fromarray((img > 0).astype(np.uint8)).save(tmp_path / "src" / f"m{i}.png")
        rows.append(f"x{i}.npy,{'a|b' if i % 2 else ''},P{i},m{i}.png")
    csv = tmp_path / "src" / "m.csv"
    csv.write_text("path,labels,patient_id,mask_path\n" + "\n".join(rows) + "\n")
    manifest, samples = _build("csv", csv, tmp_path / "out")
    assert manifest["tasks"]["mask"]["classes"] == ["background", "foreground"]
    for i in range(4):
        s = samples[f"x{i}"]
        img = np.load(tmp_path / "src" / f"x{i}.npy")
        np.testing.assert_array_equal(_image(s)[0], img)
        assert json.loads(s["cls.json"]) == ([1, 1] if i % 2 else [-1, -1])
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
        np.testing.assert_array_equal(mask, (img > 0).astype(np.uint8))


def test_coco_end_to_end(tmp_path):
    ann = _coco(tmp_path)
    manifest, samples = _build("coco", tmp_path / "images", tmp_path / "out", annotations=str(ann))
    assert manifest["tasks"]["boxes"]["classes"] == ["mass", "nodule"]
    assert json.loads(samples["im0"]["boxes.json"]) == {
        "boxes": [[1, 2, 11, 7], [0, 0, 32, 24]],
        "labels": [1, 0],
    }
    assert json.loads(samples["im2"]["boxes.json"]) == {"boxes": [], "labels": []}
    assert _image(samples["im1"]).shape == (24, 32, 3)


def test_npz_end_to_end_keeps_source_split(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1))
    np.savez_compressed(tmp_path / "m.npz", **arrays)
    manifest, _ = _build("npz", tmp_path / "m.npz", tmp_path / "out", "--use-source-split")
    assert {s: manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")} == {
        "train": 6,
        "val": 2,
        "test": 2,
    }
    with tarfile.open(tmp_path / "out" / "val-000000.tar") as tf:
        png = tf.extractfile("val_000001.image.png").read()
        cls = tf.extractfile("val_000001.cls").read()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), arrays["val_images"][1])
    assert int(cls) == int(arrays["val_labels"][1, 0])
