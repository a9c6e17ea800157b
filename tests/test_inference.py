"""The model folder and prediction on files: load without unpickling, predict like the in-memory
model on a real NIfTI volume (nibabel's anatomical.nii) keeping its affine, and one-line errors.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from _inference_fixtures import IMAGE_SIZE, build_demo_shards, make_model_folder
from nibabel.testing import data_path
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bigmodel.inference.predict import Predictor, main
from bigmodel.model_folder import (
    PREPROCESSING,
    WEIGHTS,
    ModelFolderError,
    load_model,
)
from bigmodel.models.window import fit_to_size, whole_image_outputs
from bigmodel.preprocessing import InputError, Preprocessing, slice_volume
from sharding._samples import SamplePlan, _cut

REAL_VOLUME = Path(data_path) / "anatomical.nii"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    shards = build_demo_shards(root)
    path, model = make_model_folder(shards, root / "model")
    return path, model, shards


def test_model_folder_loads_the_same_model_without_pickle(folder):
    path, model, _ = folder
    loaded = load_model(path)
    assert not loaded.model.training
    saved = loaded.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
    prep = loaded.preprocessing
    assert prep.image_size == IMAGE_SIZE and prep.in_chans == 1 and prep.layout == "2d"
    assert prep.classes["organs"] == ["background", "tissue", "lesion"]
    assert prep.classes["diagnosis"] == ["lesion", "normal"]
    assert prep.mean is not None and prep.std is not None
    assert loaded.card["dataset_manifest_sha256"]


def test_broken_model_folders_name_the_file(folder, tmp_path):
    path, _, shards = folder
    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    (missing / PREPROCESSING).unlink()
    with pytest.raises(ModelFolderError, match=rf"{PREPROCESSING}: missing"):
        load_model(missing)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    (corrupt / WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFolderError, match=rf"{WEIGHTS}: not a readable safetensors"):
        load_model(corrupt)

    # Weights of another architecture under this config: named, with the first differing key.
    other, _ = make_model_folder(
        shards,
        tmp_path / "other",
        heads={"organs": {"type": "segmentation", "target": "mask", "decoder_channels": 8}},
    )
    mismatched = tmp_path / "mismatched"
    shutil.copytree(path, mismatched)
    shutil.copy(other / WEIGHTS, mismatched / WEIGHTS)
    with pytest.raises(ModelFolderError, match=rf"{WEIGHTS}: weights do not fit config.yaml"):
        load_model(mismatched)


@pytest.mark.parametrize("axis, context", [("z", 0), ("z", 1), ("y", 2), ("x", 1)])
def test_slice_volume_cuts_as_the_shard_builder(axis, context):
    volume = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    prep = Preprocessing(
        in_chans=2 * (2 * context + 1),
        source_channels=2,
        layout="2.5d" if context else "2d",
        axis=axis,
        context=context,
        image_size=8,
        normalize="none",
        mean=None,
        std=None,
        classes={},
        head_types={},
    )
    plan = SamplePlan(layout=prep.layout, axis=axis, context=context)
    expected = np.stack([img for _, img, _, _ in _cut("v", volume, None, (1, 1, 1), plan)])
    np.testing.assert_array_equal(slice_volume(volume, prep), expected)


def test_predict_nifti_equals_the_in_memory_model_and_keeps_the_affine(folder, tmp_path):
    path, model, _ = folder
    prep = load_model(path).preprocessing
    summary = Predictor(path, batch_size=8).predict_file(REAL_VOLUME, tmp_path)

    # The same prediction by hand: nibabel's array, z slices, manifest z-score, whole image.
    source = nib.load(REAL_VOLUME)
    data = np.asarray(source.dataobj, dtype=np.float32)  # [x, y, z]
    slices = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))[:, None]
    assert max(slices.shape[-2:]) > IMAGE_SIZE  # the sliding window is exercised
    images = (slices - prep.mean[0]) / prep.std[0]
    with torch.no_grad():
        outputs = whole_image_outputs(model, images, IMAGE_SIZE)
    labels = outputs["organs"].argmax(dim=1).numpy().transpose(2, 1, 0)  # back to [x, y, z]
    probs = outputs["diagnosis"].softmax(dim=1).mean(dim=0).numpy()

    written = nib.load(summary["heads"]["organs"]["output"])
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(source.affine)
    np.testing.assert_allclose(written.header.get_zooms()[:3], source.header.get_zooms()[:3])
    got = summary["heads"]["diagnosis"]["probabilities"]
    np.testing.assert_allclose([got["lesion"], got["normal"]], probs, atol=1e-5)
    voxel_ml = np.prod(source.header.get_zooms()[:3]) / 1000
    tissue = summary["heads"]["organs"]["volumes_ml"]["tissue"]
    assert tissue == pytest.approx((labels == 1).sum() * voxel_ml, abs=1e-3)
    on_disk = json.loads((tmp_path / "anatomical.json").read_text())
    assert on_disk["heads"]["organs"]["volumes_ml"] == summary["heads"]["organs"]["volumes_ml"]


def _dicom_series(out: Path, slices: int = 3) -> Path:
    """A CT series from pydicom's CT_small.dcm: the slice repeated at 5 mm steps."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series = generate_uid()
    out.mkdir()
    for i in range(slices):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        position = [float(v) for v in source.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1], position[2] + 5.0 * i]
        ds.save_as(out / f"slice{i}.dcm")
    return out


def test_dicom_series_gives_nifti_in_patient_space_and_a_dicom_seg(folder, tmp_path):
    _, _, shards = folder
    # Trained at 128 px, the series' size: one window per slice keeps the test fast.
    path, _ = make_model_folder(shards, tmp_path / "model128", image_size=128)
    series = _dicom_series(tmp_path / "series")
    summary = Predictor(path).predict_file(series, tmp_path / "out")
    assert summary["shape"] == [1, 3, 128, 128]
    assert summary["spacing_mm"] == pytest.approx([5.0, 0.661468, 0.661468])
    entry = summary["heads"]["organs"]
    image = nib.load(entry["output"])
    assert image.shape == (128, 128, 3)
    # DICOM LPS -> NIfTI RAS: first voxel at the first slice's ImagePositionPatient, x/y negated.
    first = pydicom.dcmread(series / "slice0.dcm").ImagePositionPatient
    np.testing.assert_allclose(image.affine[:3, 3], [-first[0], -first[1], first[2]], atol=1e-4)
    np.testing.assert_allclose(np.diag(image.affine)[:3], [-0.661468, -0.661468, 5.0], atol=1e-5)
    seg = pydicom.dcmread(entry["dicom_seg"])
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 2
    referenced = {
        r.ReferencedSOPInstanceUID
        for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {pydicom.dcmread(f).SOPInstanceUID for f in series.iterdir()}


def test_bad_inputs_are_one_line_errors_naming_the_file(folder, tmp_path, capsys):
    path, _, _ = folder
    predictor = Predictor(path)
    rgb = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(InputError, match=r"photo\.png: has 3 channel\(s\) but the model was"):
        predictor.predict_file(rgb, tmp_path / "out")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(InputError, match=r"broken\.nii\.gz: unreadable NIfTI"):
        predictor.predict_file(broken, tmp_path / "out")
    with pytest.raises(InputError, match=r"notes\.txt: unknown input kind"):
        (tmp_path / "notes.txt").write_text("x")
        predictor.predict_file(tmp_path / "notes.txt", tmp_path / "out")

    out = tmp_path / "cli"
    assert main([str(path), str(rgb), str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "photo.png: has 3 channel(s)" in err and "broken.nii.gz: unreadable NIfTI" in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written
    assert main([str(tmp_path / "no_model"), str(rgb), "--out", str(out)]) == 2
    assert "no_model: no such model folder" in capsys.readouterr().err


def test_predict_cli_on_a_png_writes_a_label_map(folder, tmp_path, capsys):
    path, _, _ = folder
    gray = tmp_path / "slice.png"
    Image.fromarray((np.arange(50 * 60) % 251).reshape(50, 60).astype(np.uint8)).save(gray)
    assert main([str(path), str(gray), "--out", str(tmp_path / "out")]) == 0
    labels = np.asarray(Image.open(tmp_path / "out" / "slice_organs.png"))
    assert labels.shape == (50, 60) and labels.max() < 3
    summary = json.loads((tmp_path / "out" / "slice.json").read_text())
    assert set(summary["heads"]["diagnosis"]["probabilities"]) == {"lesion", "normal"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "slice.json",
        "slice_organs.png",
    ]


def test_mr_intensity_and_resize_fit_are_applied_as_recorded(tmp_path):
    """An MR model with data.resize=fit: per-image z-score, fitted, outputs back on the grid."""
    shards = build_demo_shards(tmp_path, modality="MR")
    path, model = make_model_folder(shards, tmp_path / "model", resize="fit")
    prep = load_model(path).preprocessing
    assert prep.intensity["scheme"] == "mr" and prep.resize == "fit"
    summary = Predictor(path).predict_file(REAL_VOLUME, tmp_path / "out")

    data = np.asarray(nib.load(REAL_VOLUME).dataobj, dtype=np.float32).transpose(2, 1, 0)
    slices = torch.from_numpy(np.ascontiguousarray(data))[:, None]  # [z, 1, y, x]
    mean = slices.mean(dim=(-2, -1), keepdim=True)
    std = slices.std(dim=(-2, -1), keepdim=True, unbiased=False).clamp_min(1e-6)
    height, width = slices.shape[-2:]
    with torch.no_grad():
        logits = model(fit_to_size((slices - mean) / std, IMAGE_SIZE))["outputs"]["organs"]
    scale = IMAGE_SIZE / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    top, left = (IMAGE_SIZE - new_h) // 2, (IMAGE_SIZE - new_w) // 2
    inside = logits[..., top : top + new_h, left : left + new_w]
    back = torch.nn.functional.interpolate(inside, size=(height, width), mode="bilinear")
    expected = back.argmax(dim=1).numpy().transpose(2, 1, 0)
    written = np.asarray(nib.load(summary["heads"]["organs"]["output"]).dataobj)
    assert written.shape == nib.load(REAL_VOLUME).shape
    np.testing.assert_array_equal(written, expected)
