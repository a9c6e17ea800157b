"""CsvReader on real digits (PNG, npy), a generated NIfTI and pydicom's CT file."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from sklearn.datasets import load_digits

from sharding.readers.csv_manifest import CsvReader
from sharding.records import SourceError


def _digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.images[:n] * 15).astype(np.uint8), d.target[:n]


def _write(root: Path, header: str, rows: list[str]) -> Path:
    csv = root / "manifest.csv"
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    return csv


def test_png_and_npy_with_labels_masks_and_splits(tmp_path):
    images, targets = _digits(6)
    (tmp_path / "img").mkdir()
    rows = []
    for i, (pix, t) in enumerate(zip(images, targets, strict=True)):
        if i % 2:
            np.save(tmp_path / "img" / f"d{i}.npy", pix.astype(np.int16) - 100)
            path = f"img/d{i}.npy"
        else:
            Image.fromarray(pix).save(tmp_path / "img" / f"d{i}.png")
            path = f"img/d{i}.png"
        mask = ""
        if i == 0:
            pal = Image.fromarray((pix > 100).astype(np.uint8), mode="P")
            pal.putpalette([0, 0, 0, 255, 0, 0])
            pal.save(tmp_path / "img" / "m0.png")
            mask = "img/m0.png"
        split = ["train", "valid", ""][i % 3]
        rows.append(f"{path},{t},P{i // 2},{mask},{split}")
    csv = _write(tmp_path, "path,label,patient_id,mask_path,split", rows)
    reader = CsvReader(str(csv), mask_classes="background,ink")
    items, schema = reader.scan()
    assert schema.cls == {"type": "multiclass", "classes": ["0", "1", "2", "3", "4", "5"]}
    assert schema.mask == {"classes": ["background", "ink"]}
    assert [it.cls for it in items] == [int(t) for t in targets]
    assert [it.group for it in items] == ["P0", "P0", "P1", "P1", "P2", "P2"]
    assert [it.split for it in items] == ["train", "val", None] * 2
    vol0 = reader.load(items[0])
    np.testing.assert_array_equal(vol0.image[0], images[0])
    assert vol0.meta["encoding"] == "png" and vol0.image.dtype == np.uint8
    np.testing.assert_array_equal(vol0.mask, (images[0] > 100).astype(np.uint8))  # palette indices
    vol1 = reader.load(items[1])
    assert vol1.image.dtype == np.int16 and vol1.mask is None
    np.testing.assert_array_equal(vol1.image[0], images[1].astype(np.int16) - 100)


def test_multilabel_with_unknown_and_fixed_classes(tmp_path):
    images, _ = _digits(3)
    for i, pix in enumerate(images):
        Image.fromarray(pix).save(tmp_path / f"{i}.png")
    csv = _write(tmp_path, "path,labels,patient_id", ["0.png,b|a,p1", "1.png,,p2", "2.png,c,p3"])
    items, schema = CsvReader(str(csv), classes="c,b,a").scan()
    assert schema.cls == {"type": "multilabel", "classes": ["c", "b", "a"]}
    assert [it.cls for it in items] == [[0, 1, 1], [-1, -1, -1], [1, 0, 0]]
    with pytest.raises(SourceError, match=r"line 4: unknown class 'c'"):
        CsvReader(str(csv), classes="a,b").scan()


def test_nifti_and_dicom_rows(tmp_path):
    vol = np.arange(2 * 3 * 4, dtype=np.int16).reshape(4, 3, 2)  # x, y, z
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image((vol > 10).astype(np.uint8), affine), tmp_path / "ct_mask.nii.gz")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "slice.dcm")
    csv = _write(
        tmp_path,
        "path,label,patient_id,mask_path",
        ["ct.nii.gz,tumour,a,ct_mask.nii.gz", "slice.dcm,normal,b,"],
    )
    reader = CsvReader(str(csv))
    items, schema = reader.scan()
    assert schema.cls["classes"] == ["normal", "tumour"]
    nii = reader.load(items[0])
    assert nii.image.shape == (1, 2, 3, 4) and nii.image.dtype == np.int16  # [C, z, y, x]
    np.testing.assert_array_equal(nii.image[0], vol.transpose(2, 1, 0))
    np.testing.assert_array_equal(nii.mask, (vol > 10).transpose(2, 1, 0))
    assert nii.spacing == pytest.approx((2.0, 0.7, 0.5))
    assert nii.meta["orientation"] == "RAS"
    dcm = reader.load(items[1])
    ref = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.int32) - 1024
    assert dcm.image.shape == (1, 128, 128) and dcm.image.dtype == np.int16
    np.testing.assert_array_equal(dcm.image[0], ref)
    assert dcm.meta["modality"] == "CT"
    assert "CompressedSamples" not in repr(dcm.meta)


def test_bad_input_errors(tmp_path):
    images, _ = _digits(2)
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(images[1][:4]).save(tmp_path / "small.png")
    with pytest.raises(SourceError, match="missing column"):
        CsvReader(str(_write(tmp_path, "path,label", ["a.png,x"]))).scan()
    with pytest.raises(SourceError, match="line 3: missing patient_id"):
        CsvReader(str(_write(tmp_path, "path,label,patient_id", ["a.png,x,p", "a.png,y,"]))).scan()
    with pytest.raises(SourceError, match="unsupported file type"):
        CsvReader(str(_write(tmp_path, "path,patient_id", ["a.tiff,p"]))).scan()
    with pytest.raises(SourceError, match="unknown split 'holdout'"):
        CsvReader(str(_write(tmp_path, "path,patient_id,split", ["a.png,p,holdout"]))).scan()
    with pytest.raises(SourceError, match="same sample id"):
        CsvReader(str(_write(tmp_path, "path,patient_id", ["a.png,p", "./a.png,q"]))).scan()
    with pytest.raises(SourceError, match="valid options: classes"):
        CsvReader(str(tmp_path / "manifest.csv"), label_column="x")
    reader = CsvReader(
        str(_write(tmp_path, "path,patient_id,mask_path", ["a.png,p,small.png", "gone.png,q,"]))
    )
    items, _ = reader.scan()
    with pytest.raises(SourceError, match="small.png: mask shape"):
        reader.load(items[0])
    with pytest.raises(SourceError, match="gone.png: file not found .listed on line 3"):
        reader.load(items[1])
