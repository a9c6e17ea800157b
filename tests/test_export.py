"""bigmodel-export: train (real DeepSpeed ZeRO-2) -> export -> predict, graphs match eager, refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import onnxruntime as ort
import pytest
import torch
from _inference_fixtures import build_demo_shards, tiny_config
from nibabel.testing import data_path
from safetensors.torch import load_file

from bigmodel.config import config_from_dict
from bigmodel.engine import LocalSession, train
from bigmodel.inference.export import ExportError, export, main
from bigmodel.inference.predict import Predictor
from bigmodel.model_folder import WEIGHTS, load_model, save_model
from bigmodel.models import build_model
from bigmodel.preprocessing import Preprocessing

REAL_VOLUME = Path(data_path) / "anatomical.nii"


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    """Two optimizer steps of a real in-process DeepSpeed ZeRO-2 run; its checkpoint and model/."""
    root = tmp_path_factory.mktemp("export")
    shards = build_demo_shards(root)
    raw = tiny_config(shards).to_dict()
    raw["data"].update(loader_workers=0, shuffle_buffer=8)
    raw["train"].update(
        epochs=1, steps_per_epoch=2, eval_every=0, checkpoint_every=0, output_dir=str(root)
    )
    raw["distributed"].update(strategy="deepspeed", zero_stage=2)
    raw["optim"].update(lr_scaling="none", lr=0.01)
    train(config_from_dict(raw), LocalSession())
    return root / "tiny"


@pytest.mark.slow
def test_train_export_predict_matches_the_trained_model(zero2_run, tmp_path):
    checkpoint = zero2_run / "checkpoints" / "step_0000002"
    assert (checkpoint / "ds").is_dir()  # ZeRO partitions, not a full state
    out = tmp_path / "exported"
    assert main([str(checkpoint), "--out", str(out)]) == 0

    # Consolidated fp32 weights are exactly the ones the run saved at its end.
    exported, trained = load_file(str(out / WEIGHTS)), load_file(str(zero2_run / "model" / WEIGHTS))
    assert exported.keys() == trained.keys()
    for key, value in trained.items():
        assert exported[key].dtype == value.dtype
        assert torch.equal(exported[key], value), key

    # ONNX (onnxruntime) and .pt2 agree with the eager model on real normalised slices.
    loaded = load_model(out)
    prep = loaded.preprocessing
    data = np.asarray(nib.load(REAL_VOLUME).dataobj, dtype=np.float32).transpose(2, 1, 0)
    images = torch.from_numpy(np.ascontiguousarray(data[:5, :32, :32]))[:, None]
    images = (images - prep.mean[0]) / prep.std[0]
    with torch.no_grad():
        features = loaded.model.backbone(images)
        eager = [loaded.model.heads[h](features, (32, 32)).numpy() for h in prep.head_types]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, {"images": images.numpy()}), eager, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        for got, want in zip(program(images), eager, strict=True):
            np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=1e-4)

    # Predicting with the export gives what the run's own model folder gives, in the same space
    # (the real volume's first 8 slices, to keep the test short).
    source = nib.load(REAL_VOLUME)
    volume = tmp_path / "anatomical_8.nii.gz"
    nib.save(
        nib.Nifti1Image(np.asarray(source.dataobj)[..., :8], source.affine, source.header), volume
    )
    ours = Predictor(out).predict_file(volume, tmp_path / "a")
    theirs = Predictor(zero2_run / "model").predict_file(volume, tmp_path / "b")
    a = nib.load(ours["heads"]["organs"]["output"])
    b = nib.load(theirs["heads"]["organs"]["output"])
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    np.testing.assert_allclose(a.affine, source.affine, atol=1e-5)
    assert (
        ours["heads"]["diagnosis"]["probabilities"] == theirs["heads"]["diagnosis"]["probabilities"]
    )
    # The ONNX Runtime backend of bigmodel-predict agrees with eager on the same volume.
    fast = Predictor(out, backend="onnxruntime").predict_file(volume, tmp_path / "c")
    c = np.asarray(nib.load(fast["heads"]["organs"]["output"]).dataobj)
    assert (c == np.asarray(a.dataobj)).mean() > 0.999  # argmax ties may flip at 1e-6
    for name, p in fast["heads"]["diagnosis"]["probabilities"].items():
        assert p == pytest.approx(ours["heads"]["diagnosis"]["probabilities"][name], abs=1e-4)
    card = loaded.card
    assert card["trained_zero_stage"] == 2 and card["checkpoint_step"] == 2
    assert card["dataset_manifest_sha256"]


def _detection_folder(tmp_path: Path, heads: dict) -> Path:
    """A model folder with a detection head (the demo shards have no boxes, so set by hand)."""
    cfg = config_from_dict(
        {
            "name": "det",
            "data": {"image_size": 32},
            "model": {"backbone": {"name": "test_resnet", "in_chans": 1}, "heads": heads},
        }
    )
    prep = Preprocessing(
        in_chans=1,
        source_channels=1,
        layout="2d",
        axis="z",
        context=0,
        image_size=32,
        normalize="none",
        mean=None,
        std=None,
        classes={name: [] for name in heads},
        head_types={name: head["type"] for name, head in heads.items()},
    )
    model = build_model(cfg.model)
    return save_model(model.state_dict(), cfg, tmp_path / "det", preprocessing=prep)


def test_detection_heads_are_refused_with_the_reason(tmp_path, capsys):
    boxes = {"type": "detection", "target": "boxes", "num_classes": 2, "fpn_channels": 16}
    both = _detection_folder(
        tmp_path, {"lesions": boxes, "diagnosis": {"type": "classification", "num_classes": 2}}
    )
    report = export(str(both), tmp_path / "out", ["safetensors", "pt2"])
    assert set(report["refused"]) == {"lesions"}
    assert "data-dependent control flow" in report["refused"]["lesions"]
    assert report["outputs"] == {"diagnosis": "classification"}
    assert (tmp_path / "out" / "model.pt2").is_file()

    only = _detection_folder(tmp_path, {"lesions": boxes})
    assert main([str(only), "--out", str(tmp_path / "none"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "no head can be exported to onnx" in err and "not exported: torchvision" in err
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none*"))


def test_unknown_source_and_format_are_one_line_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing: no such run, checkpoint or model folder" in capsys.readouterr().err
    with pytest.raises(ExportError, match="--format tflite: unknown"):
        export(str(tmp_path), tmp_path / "o", ["tflite"])
