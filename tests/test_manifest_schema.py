"""The one ``dataset.json`` schema (``sharding/format.py``): what the builder writes reads back
and writes again byte for byte for every source type, and a broken manifest is refused with the
same one-line message by ``bigmodel-shard verify`` and by ``bigmodel.data.load_manifest``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from test_readers_coco import _coco
from test_readers_dicom import SALT, _ct_series
from test_readers_images import _digits_folder
from test_shard_build import make_nnunet
from test_slice_labels import _source as nifti_source

from bigmodel.data import ManifestError, load_manifest
from sharding import cli
from sharding import format as fmt
from sharding.build import BuildOptions, build_shards
from sharding.readers import NiftiCsvReader, NnUNetReader


def _cli_build(kind: str, src: Path, out: Path, *extra: str) -> None:
    argv = ["build", "--source", kind, "--input", str(src), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--split-ratios", "0.5,0.25,0.25", "--seed", "1", *extra]) == 0


def _nnunet(tmp: Path, out: Path) -> None:
    make_nnunet(tmp / "src")
    bad = tmp / "src" / "labelsTr" / "pat1_v0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), bad)  # a skipped item
    reader = NnUNetReader(str(tmp / "src"), group_regex=r"^(pat\d+)_")
    opts = BuildOptions(max_shard_samples=16, progress=False, skip_bad=True, seed=3)
    build_shards(reader, out, opts)


def _nifti(tmp: Path, out: Path, **options) -> None:
    reader = NiftiCsvReader(str(nifti_source(tmp)), mask_classes="background,tissue,lesion")
    build_shards(reader, out, BuildOptions(progress=False, split_ratios=(1, 0, 0), **options))


def _dicom(tmp: Path, out: Path) -> None:
    for p in range(3):
        _ct_series(tmp / "src" / f"ct{p}" / "s", patient_id=f"PAT{p}")
    (tmp / "salt").write_text(SALT)
    _cli_build("dicom", tmp / "src", out, "--option", f"salt_file={tmp / 'salt'}")


def _imagefolder_folds(tmp: Path, out: Path) -> None:
    _digits_folder(tmp / "src", per_class=4)
    _cli_build("imagefolder", tmp / "src", out, "--folds", "2", "--max-shard-samples", "3")


def _csv(tmp: Path, out: Path) -> None:
    (tmp / "src").mkdir()
    rows = []
    for i in range(4):
        image = np.full((12, 10), 100 * i - 200, np.int16)
        np.save(tmp / "src" / f"x{i}.npy", image)
        Image.fromarray((image > 0).astype(np.uint8)).save(tmp / "src" / f"m{i}.png")
        rows.append(f"x{i}.npy,{'a|b' if i % 2 else 'a'},P{i},m{i}.png")
    csv = tmp / "src" / "m.csv"
    csv.write_text("path,labels,patient_id,mask_path\n" + "\n".join(rows) + "\n")
    _cli_build("csv", csv, out)


def _coco_boxes(tmp: Path, out: Path) -> None:
    _cli_build("coco", tmp / "images", out, "--option", f"annotations={_coco(tmp)}")


def _npz(tmp: Path, out: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1))
    np.savez_compressed(tmp / "m.npz", **arrays)
    _cli_build("npz", tmp / "m.npz", out, "--use-source-split")


SOURCES = {
    "nnunet-skip-bad": _nnunet,
    "nifti-2.5d": lambda tmp, out: _nifti(tmp, out, layout="2.5d", context=1),
    "nifti-3d-patches": lambda tmp, out: _nifti(tmp, out, layout="3d", patch=(2, 8, 8)),
    "dicom": _dicom,
    "imagefolder-folds": _imagefolder_folds,
    "csv-multilabel-masks": _csv,
    "coco": _coco_boxes,
    "npz": _npz,
}


@pytest.mark.parametrize("source", SOURCES)
def test_written_manifest_reads_back_and_writes_the_same_bytes(source, tmp_path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_SHARD_SALT", SALT)
    out = tmp_path / "out"
    SOURCES[source](tmp_path, out)
    text = (out / fmt.MANIFEST_NAME).read_text()
    manifest = fmt.read_manifest(out)
    assert manifest.to_json() == text  # write -> read -> write: identical bytes
    assert fmt.DatasetManifest.from_dict(json.loads(manifest.to_json())) == manifest
    loaded = load_manifest(out)  # the training side reads the same object
    assert loaded.dataset == manifest
    for name, split in manifest.splits.items():
        assert loaded.split(name).num_samples == split.num_samples
        assert [s.sha256 for s in loaded.split(name).shards] == [s.sha256 for s in split.shards]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("schema")
    _csv(tmp, tmp / "out")
    return tmp / "out"


def _set(path: list, value):
    def change(raw):
        *parents, last = path
        for key in parents:
            raw = raw[key]
        if value is _set:
            del raw[last]
        else:
            raw[last] = value

    return change


@pytest.mark.parametrize(
    "change,field",
    [
        (_set(["image", "channels"], "1"), "image.channels should be int"),
        (_set(["tasks", "cls", "classes"], _set), "tasks.cls.classes is missing"),
        (_set(["splits", "train", "shards", 0, "sha256"], 12), "sha256 should be str"),
        (_set(["splits", "val", "label_counts", "cls"], [1]), "label_counts.cls has 1 values"),
        (_set(["stats", "p0_5"], [0.0, 1.0]), "stats.p0_5 has 2 values for 1 channels"),
        (_set(["layout"], "4d"), "layout is '4d'; allowed: 2d, 2.5d, 3d"),
        (_set(["tasks", "cls", "slice_labels"], "some"), "tasks.cls.slice_labels is 'some'"),
        (_set(["splits", "train", "shards", 0, "fold"], "0"), r"shards\[0\].fold should be int"),
        (_set(["format_version"], 2), "format_version is 2 but this reader needs 1"),
        (_set(["splits", "val", "num_sample"], 2), r"splits.val.num_sample is not part of the"),
        (_set(["created_by"], "me"), "created_by should be an object"),
    ],
)
def test_a_broken_manifest_is_refused_the_same_way_by_verify_and_load_manifest(
    built, tmp_path, capsys, change, field
):
    copy = tmp_path / "shards"
    shutil.copytree(built, copy)
    raw = json.loads((copy / fmt.MANIFEST_NAME).read_text())
    change(raw)
    (copy / fmt.MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=field) as err:
        load_manifest(copy)
    message = str(err.value)
    assert message.startswith(f"{copy.resolve() / fmt.MANIFEST_NAME}: ")
    assert "\n" not in message and message.endswith(")")  # one line, ending with the fix
    capsys.readouterr()
    assert cli.main(["verify", str(copy.resolve())]) == 2  # exit code 2: bad input
    assert capsys.readouterr().err == f"bigmodel-shard: error: {message}\n"
