"""The nnU-Net / MSD reader: both dataset.json dialects, test folders and layout errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sharding.readers import NnUNetReader
from sharding.records import SourceError


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.8, 0.8, 3.0, 1.0])), path)


def test_msd_v1_four_d_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 5, 4, 2)).astype(np.float32)  # MSD: channels in one 4D file
    label = rng.integers(0, 2, (6, 5, 4)).astype(np.uint8)
    _save(tmp_path / "imagesTr" / "prostate_00.nii.gz", image)
    _save(tmp_path / "labelsTr" / "prostate_00.nii.gz", label)
    spec = {"modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "PZ"}}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    reader = NnUNetReader(str(tmp_path))
    items, schema = reader.scan()
    assert [it.source_id for it in items] == ["prostate_00"]
    assert schema.mask == {"classes": ["background", "PZ"]}
    vol = reader.load(items[0])
    np.testing.assert_array_equal(vol.image, image.transpose(3, 2, 1, 0))
    np.testing.assert_array_equal(vol.mask, label.transpose(2, 1, 0))
    assert vol.spacing == pytest.approx((3.0, 0.8, 0.8))
    assert vol.meta["channel_names"] == ["T2", "ADC"]


def _v2(root: Path, cases=("a", "b"), channels=2, test=False) -> None:
    arr = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    for case in cases:
        for ch in range(channels):
            _save(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz", arr + ch)
        _save(root / "labelsTr" / f"{case}.nii.gz", (arr % 3).astype(np.uint8))
    if test:
        for ch in range(channels):
            _save(root / "imagesTs" / f"p3_t_{ch:04d}.nii.gz", arr)
    spec = {"channel_names": {"0": "CT", "1": "PET"}, "labels": {"background": 0, "x": 1, "y": 2}}
    (root / "dataset.json").write_text(json.dumps(spec))


def test_v2_channels_test_folder_and_group_regex(tmp_path):
    _v2(tmp_path, cases=("p1_a", "p1_b", "p2_a"), test=True)
    items, _ = NnUNetReader(str(tmp_path)).scan()
    assert len(items) == 3  # imagesTs has no labelsTs: left out by default
    items, _ = NnUNetReader(str(tmp_path), include_test="true", group_regex=r"^(p\d)_").scan()
    assert [(it.source_id, it.group, it.split) for it in items] == [
        ("p1_a", "p1", None),
        ("p1_b", "p1", None),
        ("p2_a", "p2", None),
        ("p3_t", "p3", "test"),
    ]
    vol = NnUNetReader(str(tmp_path)).load(items[0])
    assert vol.image.shape == (2, 3, 4, 5) and vol.image.dtype == np.int16
    np.testing.assert_array_equal(vol.image[1] - vol.image[0], 1)


def test_layout_errors_name_the_file(tmp_path):
    with pytest.raises(SourceError, match="dataset.json: not found"):
        NnUNetReader(str(tmp_path)).scan()
    _v2(tmp_path)
    (tmp_path / "imagesTr" / "b_0001.nii.gz").unlink()
    with pytest.raises(SourceError, match=r"b_0001.nii.gz: channel 1 \(PET\) of case b"):
        NnUNetReader(str(tmp_path)).scan()
    _v2(tmp_path)
    (tmp_path / "labelsTr" / "a.nii.gz").unlink()
    with pytest.raises(SourceError, match="a.nii.gz: label of training case a not found"):
        NnUNetReader(str(tmp_path)).scan()
    _v2(tmp_path)
    spec = json.loads((tmp_path / "dataset.json").read_text())
    spec["labels"]["whole"] = [1, 2]  # region-based training labels
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(SourceError, match="region-based"):
        NnUNetReader(str(tmp_path)).scan()
    with pytest.raises(SourceError, match="group_regex does not match"):
        _v2(tmp_path)
        NnUNetReader(str(tmp_path), group_regex=r"^(zz)").scan()


def test_building_needs_no_torch():
    code = "import sys, sharding.cli, sharding._samples; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
