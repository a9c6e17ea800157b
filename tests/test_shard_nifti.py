"""The NIfTI + CSV reader on nibabel's own test volumes, through every layout, and its errors."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from sharding.build import BuildOptions, build_shards
from sharding.readers import NiftiCsvReader
from sharding.records import SourceError
from sharding.verify import load_manifest, verify_shards

DATA = Path(data_path)


def _zyx(file: Path) -> np.ndarray:
    """What the reader must produce: ``[C, z, y, x]`` of the stored values."""
    data = np.asarray(nib.load(file).dataobj)
    data = data[..., None] if data.ndim == 3 else data
    return data.transpose(3, 2, 1, 0)


def _read_all(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    manifest = load_manifest(out)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.fixture
def volumes(tmp_path) -> Path:
    """Four real single-channel volumes (int16, float32, float32, uint8) with a labels CSV."""
    names = [
        "anatomical.nii",
        "reoriented_anat_moved.nii",
        "resampled_anat_moved.nii",
        "standard.nii.gz",
    ]
    (tmp_path / "vols").mkdir()
    for n in names:
        shutil.copy(DATA / n, tmp_path / "vols" / n)
    rows = [
        "image,patient_id,label",
        "vols/anatomical.nii,P1,normal",
        "vols/reoriented_anat_moved.nii,P1,lesion",
        "vols/resampled_anat_moved.nii,P2,lesion",
        "vols/standard.nii.gz,P3,normal",
    ]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_3d_whole_volumes_round_trip_with_labels(volumes, tmp_path):
    out = tmp_path / "out"
    opts = BuildOptions(layout="3d", dtype="float32", progress=False, split_ratios=(1, 1, 1))
    manifest = build_shards(NiftiCsvReader(str(volumes)), out, opts)
    assert manifest["tasks"]["cls"] == {"type": "multiclass", "classes": ["lesion", "normal"]}
    assert manifest["image"]["dtype"] == "float32"
    samples = _read_all(out)
    assert len(samples) == 4
    for key, sample in samples.items():
        name = {"vols-anatomical": "anatomical.nii", "vols-standard": "standard.nii.gz"}.get(
            key, key.removeprefix("vols-") + ".nii"
        )
        expected = _zyx(DATA / name).astype(np.float32)
        np.testing.assert_array_equal(_npy(sample["image.npy"]), expected)
        assert int(sample["cls"]) == (1 if name in ("anatomical.nii", "standard.nii.gz") else 0)
    assert verify_shards(out).ok
    # patient P1's two volumes are in one split
    report = verify_shards(out)
    assert sum(r["groups"] for r in report.splits.values()) == 3


def test_mixed_dtypes_need_explicit_dtype(volumes, tmp_path):
    # all in train: sorted order puts anatomical (int16) first; float32 volumes cannot follow
    opts = BuildOptions(progress=False, split_ratios=(1, 0, 0))
    with pytest.raises(SourceError, match=r"reoriented_anat_moved.nii: dtype float32 cannot be"):
        build_shards(NiftiCsvReader(str(volumes)), tmp_path / "o", opts)


def test_2_5d_stacks_neighbours_as_channels(tmp_path):
    src = tmp_path / "labels.csv"
    shutil.copy(DATA / "example4d.nii.gz", tmp_path / "ex4d.nii.gz")  # 2 channels, int16
    src.write_text("image,patient_id\nex4d.nii.gz,A\n")
    out = tmp_path / "out"
    opts = BuildOptions(layout="2.5d", context=1, progress=False, split_ratios=(1, 0, 0))
    manifest = build_shards(NiftiCsvReader(str(src)), out, opts)
    assert manifest["image"]["channels"] == 6 and manifest["image"]["dtype"] == "int16"
    assert manifest["image"]["channel_names"][:3] == ["ch0[-1]", "ch0[+0]", "ch0[+1]"]
    vol = _zyx(DATA / "example4d.nii.gz")
    samples = _read_all(out)
    assert len(samples) == vol.shape[1]
    first = _npy(samples["ex4d_z0000"]["image.npy"])
    np.testing.assert_array_equal(first[0], vol[0, 0])  # edge slice repeated
    np.testing.assert_array_equal(first[2], vol[0, 1])
    np.testing.assert_array_equal(first[4], vol[1, 0])
    mid = _npy(samples["ex4d_z0010"]["image.npy"])
    np.testing.assert_array_equal(mid[3:], vol[1, 9:12])


def test_axis_y_slices_and_3d_patches_with_masks(tmp_path):
    anat = nib.load(DATA / "anatomical.nii")
    data = np.asarray(anat.dataobj)
    mask = (data > np.percentile(data, 70)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, anat.affine), tmp_path / "mask.nii.gz")
    shutil.copy(DATA / "anatomical.nii", tmp_path / "anat.nii")
    (tmp_path / "l.csv").write_text("image,patient_id,mask\nanat.nii,A,mask.nii.gz\n")
    reader = NiftiCsvReader(str(tmp_path / "l.csv"), mask_classes="background,bright")
    vol, msk = _zyx(tmp_path / "anat.nii"), mask.transpose(2, 1, 0)

    out = tmp_path / "y"
    build_shards(reader, out, BuildOptions(axis="y", progress=False, split_ratios=(1, 0, 0)))
    samples = _read_all(out)
    assert len(samples) == vol.shape[2]  # y has 41 rows
    from PIL import Image

    s = samples["anat_y0007"]
    np.testing.assert_array_equal(_npy(s["image.npy"]), vol[:, :, 7])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(s["mask.png"]))), msk[:, 7])

    out3 = tmp_path / "p"
    opts = BuildOptions(layout="3d", patch=(16, 32, 32), progress=False, split_ratios=(1, 0, 0))
    build_shards(reader, out3, opts)
    patches = _read_all(out3)
    # z=25 -> starts 0, 9; y=41 -> 0, 9; x=33 -> 0, 1: 8 tiles covering the volume
    assert len(patches) == 8
    rebuilt = np.full(msk.shape, -1, dtype=np.int64)
    for sample in patches.values():
        img, m = _npy(sample["image.npy"]), _npy(sample["mask.npy"])
        assert img.shape == (1, 16, 32, 32) and m.shape == (16, 32, 32)
        import json

        z, y, x = json.loads(sample["meta.json"])["patch_origin"]
        np.testing.assert_array_equal(img[0], vol[0, z : z + 16, y : y + 32, x : x + 32])
        rebuilt[z : z + 16, y : y + 32, x : x + 32] = m
    np.testing.assert_array_equal(rebuilt, msk)  # every voxel covered, labels intact
    assert verify_shards(out3).ok


def test_bad_csv_inputs_name_the_file(volumes, tmp_path):
    csv = volumes / "labels.csv"
    rows = csv.read_text().splitlines()
    csv.write_text("\n".join(rows[:2] + ["vols/standard.nii.gz,,normal"]) + "\n")
    with pytest.raises(SourceError, match=r"labels.csv:3: missing patient id"):
        NiftiCsvReader(str(volumes)).scan()

    csv.write_text("\n".join(rows[:2] + ["vols/gone.nii,P9,normal"]) + "\n")
    with pytest.raises(SourceError, match="gone.nii: file not found"):
        NiftiCsvReader(str(volumes)).scan()

    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(SourceError, match="unknown class 'lesion'"):
        NiftiCsvReader(str(volumes), classes="normal,other").scan()

    with pytest.raises(SourceError, match="unknown option.*image_column"):
        NiftiCsvReader(str(volumes), colour="red")

    csv.write_text("image,patient_id\n")
    with pytest.raises(SourceError, match="no rows"):
        NiftiCsvReader(str(volumes)).scan()
