"""Whole-image outputs: every pixel predicted, boxes gathered from windows, global heads resized."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bigmodel.config import ModelConfig
from bigmodel.models import build_model
from bigmodel.models.window import fit_to_size, needs_windows, whole_image_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

ROI = 64


class _ThresholdModel(nn.Module):
    """A model with exactly known outputs, so blending and box offsets can be checked exactly.

    Segmentation logits are the image itself (identity); detection returns the bounding box of
    the bright (> 0.5) pixels of each window; classification the mean intensity. A real network's
    outputs depend on context, which would hide an off-by-a-window error in the bookkeeping.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head_configs = {
            "seg": SimpleNamespace(type="segmentation"),
            "det": SimpleNamespace(type="detection", detections_per_image=100),
            "diag": SimpleNamespace(type="classification"),
        }
        self.calls: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> dict:
        self.calls.append(tuple(images.shape[-2:]))
        detections = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            if len(ys):
                box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
                detections.append(
                    {"boxes": box[None], "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
                )
            else:
                detections.append(
                    {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
                )
        return {
            "outputs": {
                "seg": images.clone(),
                "det": detections,
                "diag": images.mean(dim=(1, 2, 3))[:, None],
            }
        }


def test_every_pixel_gets_its_own_prediction():
    model = _ThresholdModel()
    images = torch.rand(2, 1, 150, 97) * 0.4  # no box; odd sizes, wider and narrower than ROI
    out = whole_image_outputs(model, images, ROI, overlap=0.5, sw_batch_size=3)
    # Identity logits blended with any weights give the image back only if every pixel was
    # covered and the weights were normalised per pixel.
    torch.testing.assert_close(out["seg"], images)
    assert all(call == (ROI, ROI) for call in model.calls[:-1])
    assert model.calls[-1] == (ROI, ROI)  # the global pass on the resized image


def test_box_at_the_image_border_survives_and_split_boxes_merge():
    images = torch.zeros(1, 1, 160, 200)
    images[0, 0, 140:160, 180:200] = 1.0  # touching the bottom-right image corner
    images[0, 0, 20:50, 50:80] = 1.0  # a 30 px square that 64 px windows cut in places
    out = whole_image_outputs(_ThresholdModel(), images, ROI, overlap=0.5)
    boxes = out["det"][0]["boxes"].tolist()
    assert sorted(boxes) == [[50.0, 20.0, 80.0, 50.0], [180.0, 140.0, 200.0, 160.0]]
    assert out["det"][0]["scores"].tolist() == pytest.approx([0.9, 0.9])


def test_small_images_go_through_once_padded_and_cut_back():
    model = _ThresholdModel()
    images = torch.rand(3, 1, 48, 40) * 0.4
    images[:, :, 0:10, 30:40] = 1.0  # a box at the top-right image corner
    out = whole_image_outputs(model, images, ROI)
    assert model.calls == [(ROI, ROI)]  # one forward at the training size
    torch.testing.assert_close(out["seg"], images)
    assert out["det"][0]["boxes"].tolist() == [[30.0, 0.0, 40.0, 10.0]]
    assert not needs_windows((48, ROI), ROI) and needs_windows((ROI + 1, 10), ROI)


def test_fit_to_size_keeps_aspect_and_pads_with_zero():
    images = torch.ones(1, 1, 100, 200)
    fitted = fit_to_size(images, 64)
    assert fitted.shape == (1, 1, 64, 64)
    assert fitted[0, 0, 16:48].min() == pytest.approx(
        1.0
    )  # 200 -> 64 wide, 100 -> 32 high, centred
    assert fitted[0, 0, :16].abs().max() == 0 and fitted[0, 0, 48:].abs().max() == 0


def test_real_multitask_model_output_format():
    torch.manual_seed(0)
    heads = {
        "diag": {"type": "classification", "num_classes": 3},
        "seg": {"type": "segmentation", "num_classes": 2, "decoder_channels": 8},
        "det": {"type": "detection", "num_classes": 2, "fpn_channels": 8},
        "emb": {"type": "retrieval", "embed_dim": 8, "target": "group"},
    }
    cfg = ModelConfig.model_validate(
        {"backbone": {"name": "test_resnet", "in_chans": 1}, "heads": heads}
    )
    model = build_model(cfg).eval()
    images = torch.randn(2, 1, 96, 80)
    out = whole_image_outputs(model, images, ROI, overlap=0.25)
    assert list(out) == list(heads)
    assert out["seg"].shape == (2, 2, 96, 80) and torch.isfinite(out["seg"]).all()
    assert out["diag"].shape == (2, 3) and out["emb"].shape == (2, 8)
    assert len(out["det"]) == 2 and set(out["det"][0]) == {"boxes", "scores", "labels"}
    boxes = out["det"][0]["boxes"]
    if len(boxes):
        assert boxes[:, 2].max() <= 80 and boxes[:, 3].max() <= 96 and boxes.min() >= 0


def test_evaluation_during_training_counts_every_pixel_of_larger_images(tmp_path):
    """Engine evaluate() on 48 px shards with a 32 px training size: no pixel cropped away."""
    import contextlib
    from types import SimpleNamespace

    from test_data_pipeline import make_cfg, write_dataset

    from bigmodel.data import load_manifest, make_eval_loader, resolve_config
    from bigmodel.engine.loop import evaluate
    from bigmodel.metrics import build_metrics

    written = write_dataset(tmp_path, {"train": [2], "val": [3, 2]}, size=48)
    manifest = load_manifest(tmp_path)
    cfg = resolve_config(make_cfg(shards=str(tmp_path), image_size=32), manifest)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    dm = SimpleNamespace(  # the engine's Distributed, reduced to what evaluate() reads
        module=model, device=torch.device("cpu"), zero_stage=0, autocast=contextlib.nullcontext
    )
    loader = make_eval_loader(cfg, manifest, 0, 1)
    results = evaluate(dm, loader, build_metrics(cfg.model), cfg)
    labelled = sum(
        int((torch.as_tensor(w["mask"]) != 255).sum())
        for k, w in written.items()
        if k.startswith("val") and w.get("mask") is not None
    )
    assert labelled > 0 and results["seg/count"] == labelled  # 48 x 48, not the 32 x 32 centre
    assert results["num_samples"] == 5
