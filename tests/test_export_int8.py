"""bigmodel-export --int8: a trained tiny model, calibrated on its shards, checked, refused, predicted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _inference_fixtures import build_demo_shards, tiny_config
from onnx import numpy_helper

from bigmodel.config import config_from_dict
from bigmodel.data import SplitSamples, load_manifest
from bigmodel.engine import LocalSession, train
from bigmodel.inference import predict
from bigmodel.inference.export import ExportError, Int8Options, main, quantize_int8
from bigmodel.inference.predict import Predictor
from bigmodel.model_folder import MODEL_CARD, ModelFolderError
from bigmodel.preprocessing import normalize


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Demo shards and the model/ folder of 30 real training steps on them."""
    root = tmp_path_factory.mktemp("int8")
    shards = build_demo_shards(root)
    raw = tiny_config(shards).to_dict()
    raw["data"].update(loader_workers=0, shuffle_buffer=8)
    raw["train"].update(
        epochs=1, steps_per_epoch=30, eval_every=0, checkpoint_every=0, output_dir=str(root)
    )
    raw["optim"].update(lr_scaling="none", lr=0.01)
    train(config_from_dict(raw), LocalSession())
    return shards, root / "tiny" / "model"


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    shards, model = trained
    out = tmp_path_factory.mktemp("int8_out") / "exported"
    argv = [str(model), "--out", str(out), "--format", "onnx", "--int8"]
    assert main([*argv, "--calibration-shards", str(shards), "--calibration-samples", "32"]) == 0
    return out


def _sessions(folder: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    return tuple(
        ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
        for name in ("model.onnx", "model.int8.onnx")
    )


def test_int8_file_holds_integer_weights_and_is_smaller(exported):
    graph = onnx.load(str(exported / "model.int8.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    initializers = {t.name: t for t in graph.initializer}
    produced_by = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert convs
    for conv in convs:  # every convolution's weight is an int8 tensor, dequantized in the graph
        dequant = produced_by[conv.input[1]]
        assert dequant.op_type == "DequantizeLinear", conv.name
        weight = numpy_helper.to_array(initializers[dequant.input[0]])
        assert weight.dtype == np.int8, conv.name
        assert numpy_helper.to_array(initializers[dequant.input[1]]).size == weight.shape[0]
    fp32, int8 = (exported / n for n in ("model.onnx", "model.int8.onnx"))
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size

    report = json.loads((exported / "export_report.json").read_text())["formats"]["int8"]
    assert report["file"] == "model.int8.onnx" and report["format"] == "QDQ"
    assert report["calibration"]["split"] == "train" and report["calibration"]["windows"] == 32
    assert report["check"]["split"] == "val"
    card = json.loads((exported / MODEL_CARD).read_text())
    assert card["int8"]["agreement"] == report["agreement"]
    assert not [p.name for p in exported.iterdir() if ".tmp" in p.name or ".pre." in p.name]


def test_int8_agrees_with_fp32_on_held_out_samples(exported, trained):
    shards, _ = trained
    manifest = load_manifest(shards)
    prep = Predictor(exported).prep
    # Centre 32 px windows of every test slice (a split the export's own check never saw).
    images = [
        normalize(s["image"], prep, s.get("window"), s.get("volume"))[:, 8:40, 8:40]
        for s in SplitSamples(manifest, "test")
    ]
    batch = torch.stack(images).numpy()
    fp32, int8 = _sessions(exported)
    names = [o.name for o in fp32.get_outputs()]
    want = dict(zip(names, fp32.run(None, {"images": batch}), strict=True))
    got = dict(zip(names, int8.run(None, {"images": batch}), strict=True))
    a, b = got["organs"].argmax(1), want["organs"].argmax(1)
    assert len(np.unique(b)) > 1  # the trained model segments something, not all background
    present = [k for k in (1, 2) if np.any(a == k) or np.any(b == k)]
    dice = [2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k)) for k in present]
    assert present and min(dice) > 0.95
    assert np.mean(got["diagnosis"].argmax(1) == want["diagnosis"].argmax(1)) >= 0.95
    assert 0 < np.abs(got["organs"] - want["organs"]).max() < 1.0  # int8 differs, but little
    report = json.loads((exported / "export_report.json").read_text())["formats"]["int8"]
    assert report["agreement"]["organs"]["dice"] >= 0.95
    assert report["agreement"]["diagnosis"]["top1_agreement"] >= 0.95
    assert report["agreement"]["patient"]["cosine"] >= 0.95
    assert 0 < report["max_abs_logit_diff"]["organs"] < 1.0


def test_refused_below_the_threshold_with_nothing_written(exported, trained, tmp_path, capsys):
    shards, model = trained
    out = tmp_path / "strict"
    argv = [str(model), "--out", str(out), "--format", "onnx", "--int8"]
    assert main([*argv, "--calibration-samples", "8", "--int8-min-agreement", "1.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err[-1].splitlines()) == 1
    assert "below --int8-min-agreement 1.01; model.int8.onnx not kept" in err[-1]
    assert "--calibration-samples" in err[-1] and "--int8-exclude-head" in err[-1]
    assert not out.exists() and not list(tmp_path.iterdir())

    # In place on an exported folder: the folder is left as it was.
    copy = shutil.copytree(exported, tmp_path / "copy")
    (copy / "model.int8.onnx").unlink()
    card = (copy / MODEL_CARD).read_text()
    with pytest.raises(ExportError, match="organs.* dice .* below --int8-min-agreement 1.01"):
        quantize_int8(copy, Int8Options(shards=str(shards), min_agreement=1.01), log=print)
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        p.name for p in exported.iterdir() if p.name != "model.int8.onnx"
    )
    assert (copy / MODEL_CARD).read_text() == card


def test_excluded_head_stays_fp32(exported, trained, tmp_path):
    shards, _ = trained
    copy = shutil.copytree(exported, tmp_path / "copy")
    entry = quantize_int8(
        copy, Int8Options(shards=str(shards), exclude_heads=("organs",)), log=lambda line: None
    )
    assert entry["nodes_kept_fp32"] > 0 and entry["excluded_heads"] == ["organs"]
    graph = onnx.load(str(copy / "model.int8.onnx")).graph
    float_weights = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    fp32_convs = [n for n in convs if n.input[1] in float_weights]
    assert fp32_convs and len(fp32_convs) < len(convs)  # the decoder's, not the backbone's
    with pytest.raises(ExportError, match="--int8-exclude-head nope: no such head"):
        quantize_int8(copy, Int8Options(shards=str(shards), exclude_heads=("nope",)))


def test_predict_with_the_int8_backend_writes_a_label_map(exported, trained, tmp_path):
    shards, model = trained
    case = sorted((shards.parent / "source").glob("case_*.nii.gz"))[0]
    source = nib.load(case)
    volume = tmp_path / "case.nii.gz"  # 32 x 32 in-plane: one window per slice
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[8:40, 8:40, :4], source.affine), volume)
    argv = [str(exported), str(volume), "--out", str(tmp_path / "p")]
    assert predict.main([*argv, "--backend", "onnxruntime-int8"]) == 0
    labels = np.asarray(nib.load(tmp_path / "p" / "case_organs.nii.gz").dataobj)
    assert labels.shape == (32, 32, 4) and labels.dtype == np.uint8 and labels.max() <= 2
    fp32 = Predictor(exported, backend="onnxruntime").predict_file(volume, tmp_path / "f")
    reference = np.asarray(nib.load(fp32["heads"]["organs"]["output"]).dataobj)
    assert np.mean(labels == reference) > 0.98 and len(np.unique(reference)) > 1

    with pytest.raises(ModelFolderError, match="model.int8.onnx: missing.*--int8"):
        Predictor(model, backend="onnxruntime-int8")
