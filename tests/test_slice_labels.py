"""Slice-label policy: a volume's cls reaches its slices from the masks, stays at volume level,
or is copied only when asked; the manifest says which, and contradictions stop the build."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bigmodel.config import ConfigError, config_from_dict
from bigmodel.data import load_manifest as load_data_manifest
from bigmodel.data import resolve_config
from sharding import cli
from sharding.build import BuildOptions, build_shards
from sharding.readers.nifti import NiftiCsvReader
from sharding.records import SourceError

DEPTH = 6
LESION_SLICES = (2, 3)


def _write(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _source(tmp_path: Path, normal_mask_has_lesion: bool = False) -> Path:
    """Two patients, 16 x 16 x 6: ``lesion`` (lesion in slices 2-3 only) and ``normal``."""
    rows = ["image,mask,patient_id,label"]
    for name, label in (("a", "lesion"), ("b", "normal")):
        image = np.full((16, 16, DEPTH), 100, dtype=np.int16)
        mask = np.zeros((16, 16, DEPTH), dtype=np.uint8)
        mask[4:12, 4:12, :] = 1  # tissue in every slice
        if label == "lesion" or normal_mask_has_lesion:
            for z in LESION_SLICES:
                mask[6:9, 6:9, z] = 2
                image[6:9, 6:9, z] = 900
        _write(tmp_path / f"{name}.nii.gz", image)
        _write(tmp_path / f"{name}_mask.nii.gz", mask)
        rows.append(f"{name}.nii.gz,{name}_mask.nii.gz,{name},{label}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "labels.csv"


def _build(csv: Path, out: Path, **options) -> dict:
    reader = NiftiCsvReader(str(csv), mask_classes="background,tissue,lesion")
    opts = BuildOptions(progress=False, split_ratios=(1, 0, 0), **options)
    return build_shards(reader, out, opts)


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _cls_by_slice(out: Path, patient: str) -> list[int | None]:
    samples = _samples(out)
    keys = sorted(k for k in samples if k.startswith(f"{patient}_z"))
    return [int(samples[k]["cls"]) if "cls" in samples[k] else None for k in keys]


def test_slice_labels_come_from_the_masks_by_default(tmp_path):
    manifest = _build(_source(tmp_path), tmp_path / "out")
    assert manifest["tasks"]["cls"]["slice_labels"] == "mask"
    lesion, normal = manifest["tasks"]["cls"]["classes"].index("lesion"), 1
    expected = [lesion if z in LESION_SLICES else normal for z in range(DEPTH)]
    assert _cls_by_slice(tmp_path / "out", "a") == expected  # tumour-free slices are normal
    assert _cls_by_slice(tmp_path / "out", "b") == [normal] * DEPTH
    counts = manifest["splits"]["train"]["label_counts"]["cls"]
    assert counts == [len(LESION_SLICES), 2 * DEPTH - len(LESION_SLICES)]


def test_volume_policy_keeps_the_label_off_the_slices(tmp_path):
    out = tmp_path / "out"
    manifest = _build(_source(tmp_path), out, slice_labels="volume")
    assert manifest["tasks"]["cls"]["slice_labels"] == "volume"
    assert _cls_by_slice(out, "a") == [None] * DEPTH
    meta = json.loads(next(s for k, s in _samples(out).items() if k.startswith("a_z"))["meta.json"])
    assert meta["volume_cls"] == 0
    # A 2D classification head on such shards would get no label at all: refused up front.
    cfg = config_from_dict(
        {"data": {"shards": str(out)}, "model": {"heads": {"diag": {"type": "classification"}}}}
    )
    with pytest.raises(ConfigError, match=r"slice_labels=volume.*-o slice_labels=mask"):
        resolve_config(cfg, load_data_manifest(out))


def test_copy_only_when_asked(tmp_path):
    out = tmp_path / "out"
    manifest = _build(_source(tmp_path), out, slice_labels="copy")
    assert manifest["tasks"]["cls"]["slice_labels"] == "copy"
    assert _cls_by_slice(out, "a") == [0] * DEPTH


def test_a_label_the_mask_contradicts_stops_the_build(tmp_path):
    csv = _source(tmp_path, normal_mask_has_lesion=True)
    with pytest.raises(SourceError, match=r"b_mask.nii.gz.*denies 'lesion'.*has 'lesion' voxels"):
        _build(csv, tmp_path / "out")


def test_mask_policy_needs_class_names_the_masks_use(tmp_path, capsys):
    csv = _source(tmp_path)
    argv = [
        "build",
        "--source",
        "nifti",
        "--input",
        str(csv),
        "--out",
        str(tmp_path / "out"),
        "-o",
        "mask_classes=background,tissue,tumour",  # no mask class is named like a cls class
        "-o",
        "slice_labels=mask",
        "--quiet",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "slice_labels=mask" in err and "cannot read cls classes" in err
    assert not (tmp_path / "out" / "dataset.json").exists()
