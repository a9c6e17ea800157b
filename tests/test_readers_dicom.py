"""DicomReader on pydicom's shipped CT/MR/RGB files and series made from them."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from sharding.readers.dicom import DicomReader, _locate
from sharding.records import SourceError

SALT = "test-salt-0123456789abcdef"
CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
RGB_2FRAME = get_testdata_file("SC_rgb_rle_2frame.dcm")
TRUNCATED = get_testdata_file("MR_truncated.dcm")
Z_POSITIONS = [10.0, 2.5, 7.5, 5.0]  # written in this (shuffled) file order


@pytest.fixture(autouse=True)
def _salt_env(monkeypatch):
    """The salt comes from the environment here (or a salt file): never from the command line."""
    monkeypatch.setenv("BIGMODEL_SHARD_SALT", SALT)


def _ct_series(folder: Path, patient_id: str = "1CT1", positions=Z_POSITIONS, geometry=True) -> str:
    """Copies of CT_small forming one series; slice k (by z) has raw pixels + 10*k."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    order = np.argsort(positions)
    rank = {int(i): r for r, i in enumerate(order)}
    for i, z in enumerate(positions):
        ds = pydicom.dcmread(CT)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.PatientID = patient_id
        ds.InstanceNumber = len(positions) - rank[i]  # reversed: position must win
        if geometry:
            ds.ImagePositionPatient = [-158.135803, -179.035797, z]
        else:
            del ds.ImagePositionPatient
            ds.InstanceNumber = rank[i] + 1
        arr = ds.pixel_array.astype(np.int16) + 10 * rank[i]
        ds.PixelData = arr.tobytes()
        ds.save_as(folder / f"IM{i:04d}")
    return uid


def _phi_values(*files: str) -> set[str]:
    """Identifying values of the source files: names, ids, dates, places, UIDs."""
    values = set()
    keep_vr = {"PN", "DA", "DT", "UI", "LO", "SH"}
    public = {
        "SOPClassUID",
        "TransferSyntaxUID",
        "MediaStorageSOPClassUID",
        "ImplementationClassUID",
    }
    for f in files:
        ds = pydicom.dcmread(f)
        for el in [*ds.file_meta, *ds]:
            if el.VR in keep_vr and el.keyword not in public and el.keyword:
                v = str(el.value).strip()
                # short numbers and zero runs (time zones, "000000000") also fill tar headers
                if len(v) < 4 or re.fullmatch(r"[-+]?0*\d{0,4}|-+|ISO_IR \d+|GE.*", v):
                    continue
                values.add(v)
    return values | {"CompressedSamples", "1CT1", "4MR1", "JFK IMAGING CENTER", "20040119"}


def test_ct_series_ordered_by_position_in_hu(tmp_path):
    _ct_series(tmp_path / "CompressedSamples^CT1" / "s1")
    reader = DicomReader(str(tmp_path), window="lung")
    items, schema = reader.scan()
    assert len(items) == 1 and schema.cls is None
    vol = reader.load(items[0])
    assert vol.image.shape == (1, 4, 128, 128)
    assert vol.image.dtype == np.int16  # slope 1, intercept -1024: exact in int16
    base = pydicom.dcmread(CT).pixel_array.astype(np.int32) - 1024
    for k in range(4):  # slice k along z carries +10*k
        np.testing.assert_array_equal(vol.image[0, k], base + 10 * k)
    assert vol.spacing == pytest.approx((2.5, 0.661468, 0.661468))
    assert vol.meta["modality"] == "CT" and vol.meta["units"] == "HU"
    assert vol.meta["slice_order"] == "position"
    assert vol.meta["window"] == {"name": "lung", "center": -600.0, "width": 1500.0}
    assert vol.meta["orientation"]["normal"] == [0.0, 0.0, 1.0]


def test_instance_number_fallback_without_positions(tmp_path):
    _ct_series(tmp_path, geometry=False)
    reader = DicomReader(str(tmp_path))
    (item,), _ = reader.scan()
    vol = reader.load(item)
    assert vol.meta["slice_order"] == "instance_number"
    means = vol.image[0].reshape(4, -1).mean(axis=1)
    assert np.all(np.diff(means) > 0)
    assert vol.spacing[0] == pytest.approx(5.0)  # from SpacingBetweenSlices


def test_mr_single_file_is_2d_with_file_window(tmp_path):
    shutil.copy(MR, tmp_path / "mr.dcm")
    reader = DicomReader(str(tmp_path), window="lung")
    (item,), _ = reader.scan()
    vol = reader.load(item)
    ref = pydicom.dcmread(MR).pixel_array
    assert vol.image.shape == (1, 64, 64) and vol.image.dtype == np.int16
    np.testing.assert_array_equal(vol.image[0], ref)
    assert vol.spacing == pytest.approx((0.3125, 0.3125))
    assert vol.meta["modality"] == "MR"
    assert vol.meta["window"] == {
        "name": "file",
        "center": 600.0,
        "width": 1600.0,
    }  # no HU preset on MR


def test_dx_monochrome1_is_inverted_2d(tmp_path):
    ds = pydicom.dcmread(MR)
    ds.Modality = "DX"
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelRepresentation = 0
    ds.BitsStored = 12
    ds.ImagerPixelSpacing = [0.15, 0.2]
    del ds.PixelSpacing, ds.ImagePositionPatient, ds.ImageOrientationPatient
    raw = np.clip(ds.pixel_array, 0, 4095).astype(np.uint16)
    ds.PixelData = raw.tobytes()
    ds.save_as(tmp_path / "dx.dcm")
    reader = DicomReader(str(tmp_path))
    (item,), _ = reader.scan()
    vol = reader.load(item)
    assert vol.image.shape == (1, 64, 64) and vol.spacing == pytest.approx((0.15, 0.2))
    np.testing.assert_array_equal(vol.image[0], 4095 - raw.astype(np.int32))
    assert vol.meta["modality"] == "DX" and vol.meta["inverted"] is True


def test_enhanced_multiframe_uses_functional_groups(tmp_path):
    ds = pydicom.dcmread(CT)
    base = ds.pixel_array.astype(np.int16)
    z = [6.0, 0.0, 3.0]  # stored frame order is not spatial order
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join((base + int(v)).tobytes() for v in z)
    del ds.RescaleSlope, ds.RescaleIntercept, ds.ImagePositionPatient, ds.ImageOrientationPatient
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.6]
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1024
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for v in z:
        fg = Dataset()
        fg.PlanePositionSequence = [Dataset()]
        fg.PlanePositionSequence[0].ImagePositionPatient = [0, 0, v]
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(tmp_path / "enhanced.dcm")
    reader = DicomReader(str(tmp_path))
    (item,), _ = reader.scan()
    vol = reader.load(item)
    assert vol.image.shape == (1, 3, 128, 128) and vol.image.dtype == np.int16
    for k, v in enumerate(sorted(z)):
        np.testing.assert_array_equal(vol.image[0, k], base.astype(np.int32) + int(v) - 1024)
    assert vol.spacing == pytest.approx((3.0, 0.5, 0.6))
    assert vol.meta["slice_order"] == "position" and vol.meta["orientation"]["normal"] == [0, 0, 1]


def test_rgb_multiframe(tmp_path):
    shutil.copy(RGB_2FRAME, tmp_path / "rgb.dcm")
    reader = DicomReader(str(tmp_path))
    (item,), _ = reader.scan()
    vol = reader.load(item)
    ref = pydicom.dcmread(RGB_2FRAME).pixel_array  # [F, H, W, 3]
    assert vol.image.shape == (3, 2, *ref.shape[1:3])
    np.testing.assert_array_equal(vol.image, ref.transpose(3, 0, 1, 2))


def test_groups_are_keyed_hashes_of_patient_id(tmp_path):
    _ct_series(tmp_path / "a1", patient_id="PAT-A")
    _ct_series(tmp_path / "a2", patient_id="PAT-A")
    _ct_series(tmp_path / "b1", patient_id="PAT-B")
    items, _ = DicomReader(str(tmp_path)).scan()
    groups = sorted(it.group for it in items)
    assert len(items) == 3 and len(set(groups)) == 2
    assert len({it.source_id for it in items}) == 3
    again, _ = DicomReader(str(tmp_path)).scan()
    assert [it.group for it in again] == [it.group for it in items]  # stable across runs
    (tmp_path / "other.txt").write_text(SALT + "x")
    other, _ = DicomReader(str(tmp_path), salt_file=str(tmp_path / "other.txt")).scan()
    assert not {it.group for it in other} & set(groups)


def test_no_identifying_value_in_anything_returned(tmp_path):
    _ct_series(tmp_path / "CompressedSamples^CT1" / "series")
    shutil.copy(MR, tmp_path / "mr.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,label\n1CT1,nodule\n4MR1,normal\n")
    reader = DicomReader(str(tmp_path), window="mediastinum", labels=str(labels))
    items, schema = reader.scan()
    assert sorted(it.cls for it in items) == [0, 1]
    dumped = {
        "items": [
            {k: v for k, v in vars(it).items() if k not in ("paths", "extra")} for it in items
        ],
        "meta": [reader.load(it).meta for it in items],
        "schema": schema.to_json(),
        "reader": repr(reader),
    }
    blob = json.dumps(dumped).encode()
    phi = _phi_values(CT, MR, *sorted(str(p) for p in tmp_path.rglob("IM*")))
    leaked = [v for v in phi if v.encode() in blob]
    assert not leaked, leaked
    assert SALT.encode() not in blob


def test_labels_csv_matching_nothing_is_an_error(tmp_path):
    _ct_series(tmp_path / "s")
    labels = tmp_path / "labels.csv"
    labels.write_text("series_uid,label\n1.2.3,normal\n")
    with pytest.raises(SourceError, match="no row matches"):
        DicomReader(str(tmp_path / "s"), labels=str(labels)).scan()


def test_bad_input_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BIGMODEL_SHARD_SALT")
    with pytest.raises(SourceError, match="salt_file"):
        DicomReader(str(tmp_path))
    salt_file = tmp_path / "salt.txt"
    salt_file.write_text("short\n")
    with pytest.raises(SourceError, match="shorter"):
        DicomReader(str(tmp_path), salt_file=str(salt_file))
    salt_file.write_text(SALT + "\n")
    with pytest.raises(SourceError, match="unknown option .*valid options: salt_file"):
        DicomReader(str(tmp_path), salt=SALT)  # never on a command line: it would be recorded
    with pytest.raises(SourceError, match="unknown window"):
        DicomReader(str(tmp_path), salt_file=str(salt_file), window="liver")
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(SourceError, match="no DICOM image files"):
        DicomReader(str(tmp_path), salt_file=str(salt_file)).scan()
    shutil.copy(TRUNCATED, tmp_path / "broken.dcm")
    reader = DicomReader(str(tmp_path), salt_file=str(salt_file))
    (item,), _ = reader.scan()
    assert item.paths == {}  # paths are not handed to the builder: they may hold names
    with pytest.raises(SourceError, match=f"series {item.source_id} slice 1/1: unreadable DICOM"):
        reader.load(item)
    monkeypatch.setenv("BIGMODEL_SHARD_SALT", SALT)
    _locate([str(tmp_path), item.source_id])
    assert capsys.readouterr().out.strip().endswith("broken.dcm")


def test_duplicate_positions_are_an_error(tmp_path):
    _ct_series(tmp_path, positions=[0.0, 5.0, 5.0])
    with pytest.raises(SourceError, match="same position"):
        DicomReader(str(tmp_path)).scan()
