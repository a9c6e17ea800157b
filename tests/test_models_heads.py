"""Every head trains on tiny generated data on CPU, and its loss falls."""

from __future__ import annotations

import pytest
import torch

from bigmodel.config import ModelConfig
from bigmodel.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


SIZE = 32


def _model(heads: dict, backbone: str = "test_resnet", **backbone_kw) -> torch.nn.Module:
    cfg = ModelConfig.model_validate(
        {"backbone": {"name": backbone, "in_chans": 1, **backbone_kw}, "heads": heads}
    )
    return build_model(cfg)


def _train(model, batches, steps: int = 30, lr: float = 3e-3) -> list[float]:
    """Plain AdamW loop over a fixed set of batches; returns the loss per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(batch["image"], batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _falls(losses: list[float], factor: float = 0.6) -> bool:
    start, end = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    return end < factor * start


def _quadrant_images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise plus a bright square in the quadrant named by the label."""
    images = 0.3 * torch.randn(len(labels), 1, SIZE, SIZE, generator=generator)
    half = SIZE // 2
    for i, label in enumerate(labels.tolist()):
        y, x = divmod(label % 4, 2)
        images[i, 0, y * half + 4 : y * half + 12, x * half + 4 : x * half + 12] += 2.0
    return images


def _class_batches(n: int = 3, batch: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 4, (batch,), generator=g)
        out.append({"image": _quadrant_images(labels, g), "cls": labels})
    return out


@pytest.mark.parametrize(
    "options",
    [{}, {"label_smoothing": 0.1, "class_weights": [1.0, 2.0, 1.0, 0.5]}, {"focal": True}],
    ids=["ce", "smoothing+weights", "focal"],
)
def test_multiclass_classification_learns(options):
    torch.manual_seed(0)
    model = _model({"diag": {"type": "classification", "num_classes": 4, **options}})
    batches = _class_batches()
    losses = _train(model, batches)
    assert _falls(losses), losses
    with torch.no_grad():  # train mode: BatchNorm statistics have had only 30 steps to settle
        logits = model(batches[0]["image"])["outputs"]["diag"]
    assert logits.shape == (16, 4)
    assert (logits.argmax(1) == batches[0]["cls"]).float().mean() > 0.8


@pytest.mark.parametrize("focal", [False, True], ids=["bce", "focal"])
def test_multilabel_classification_learns_with_missing_labels(focal):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        # Label k is on when quadrant k holds a square; a third of the entries are unknown (-1).
        present = torch.rand(16, 4, generator=g) < 0.5
        images = 0.3 * torch.randn(16, 1, SIZE, SIZE, generator=g)
        for i, k in present.nonzero().tolist():
            y, x = divmod(k, 2)
            images[i, 0, y * 16 + 4 : y * 16 + 12, x * 16 + 4 : x * 16 + 12] += 2.0
        labels = present.float()
        labels[torch.rand(16, 4, generator=g) < 0.33] = -1
        batches.append({"image": images, "cls": labels})
    model = _model(
        {
            "findings": {
                "type": "classification",
                "num_classes": 4,
                "multilabel": True,
                "focal": focal,
            }
        }
    )
    losses = _train(model, batches)
    assert _falls(losses), losses


def _disk_batches(n: int = 2, batch: int = 8, seed: int = 0) -> list[dict]:
    """Two foreground classes: a bright disk (1) and a dark square (2) on noise; a border is ignored."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    out = []
    for _ in range(n):
        images = 0.3 * torch.randn(batch, 1, SIZE, SIZE, generator=g)
        masks = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
        for i in range(batch):
            cy, cx = torch.randint(8, SIZE - 8, (2,), generator=g).tolist()
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
            masks[i][disk] = 1
            sy, sx = torch.randint(2, SIZE - 8, (2,), generator=g).tolist()
            masks[i, sy : sy + 6, sx : sx + 6] = 2
            images[i, 0][masks[i] == 1] += 2.0
            images[i, 0][masks[i] == 2] -= 2.0
        masks[:, :, :2] = 255  # not annotated
        out.append({"image": images, "mask": masks})
    return out


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_segmentation_learns(backbone):
    torch.manual_seed(0)
    model = _model(
        {"seg": {"type": "segmentation", "num_classes": 3, "decoder_channels": 32}}, backbone
    )
    batches = _disk_batches()
    losses = _train(model, batches, lr=5e-3)
    assert _falls(losses, factor=0.7), losses
    model.eval()
    with torch.no_grad():
        logits = model(batches[0]["image"])["outputs"]["seg"]
    assert logits.shape == (8, 3, SIZE, SIZE)


def _box_batches(n: int = 2, batch: int = 4, size: int = 64, masks: bool = False) -> list[dict]:
    """One or two squares per image; bright squares are class 0, dark squares class 1."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        images = 0.2 * torch.randn(batch, 1, size, size, generator=g)
        targets = []
        for i in range(batch):
            boxes, labels, inst = [], [], []
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                side = int(torch.randint(12, 24, (1,), generator=g))
                x, y = torch.randint(0, size - side, (2,), generator=g).tolist()
                label = int(torch.randint(0, 2, (1,), generator=g))
                images[i, 0, y : y + side, x : x + side] = 2.0 if label == 0 else -2.0
                boxes.append([x, y, x + side, y + side])
                labels.append(label)
                m = torch.zeros(size, size, dtype=torch.uint8)
                m[y : y + side, x : x + side] = 1
                inst.append(m)
            target = {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels),
            }
            if masks:
                target["masks"] = torch.stack(inst)
            targets.append(target)
        out.append({"image": images, "boxes": targets})
    return out


@pytest.mark.parametrize("detector", ["retinanet", "fasterrcnn", "maskrcnn"])
def test_detection_learns(detector):
    torch.manual_seed(0)
    model = _model(
        {
            "det": {
                "type": "detection",
                "num_classes": 2,
                "detector": detector,
                "fpn_channels": 32,
                "rois_per_image": 64,
            }
        }
    )
    batches = _box_batches(masks=detector == "maskrcnn")
    losses = _train(model, batches, steps=30, lr=2e-3)
    assert _falls(losses, factor=0.75), losses
    model.eval()
    with torch.no_grad():
        detections = model(batches[0]["image"])["outputs"]["det"]
    assert len(detections) == 4
    for d in detections:
        assert d["boxes"].shape[1:] == (4,)
        assert len(d["boxes"]) == len(d["scores"]) == len(d["labels"])
        assert len(d["labels"]) == 0 or (d["labels"].min() >= 0 and d["labels"].max() <= 1)
        if detector == "maskrcnn":
            assert d["masks"].shape[1:] == (1, 64, 64)


def test_maskrcnn_without_masks_says_what_is_missing():
    model = _model({"det": {"type": "detection", "num_classes": 2, "detector": "maskrcnn"}})
    batch = _box_batches(n=1)[0]
    with pytest.raises(ValueError, match="needs per-instance masks"):
        model(batch["image"], batch)


def test_degenerate_box_is_reported():
    model = _model({"det": {"type": "detection", "num_classes": 2, "fpn_channels": 32}})
    batch = _box_batches(n=1)[0]
    batch["boxes"][1]["boxes"][0, 2] = batch["boxes"][1]["boxes"][0, 0]
    with pytest.raises(ValueError, match="boxes target 1: box .* has no area"):
        model(batch["image"], batch)


@pytest.mark.parametrize("metric_loss", ["supcon", "arcface", "triplet"])
def test_retrieval_learns(metric_loss):
    torch.manual_seed(0)
    model = _model(
        {
            "emb": {
                "type": "retrieval",
                "embed_dim": 16,
                "metric_loss": metric_loss,
                "num_classes": 4,
                "margin": 0.5 if metric_loss == "arcface" else 0.2,
            }
        }
    )
    batches = _class_batches()
    losses = _train(model, batches)
    assert _falls(losses, factor=0.8), losses
    model.eval()
    with torch.no_grad():
        emb = model(batches[0]["image"])["outputs"]["emb"]
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(16))


def test_retrieval_on_patient_groups():
    torch.manual_seed(0)
    batches = _class_batches()
    for b in batches:  # the patient id is the label here: same patient = positive pair
        b["group"] = [f"patient-{int(c)}" for c in b.pop("cls")]
    model = _model({"emb": {"type": "retrieval", "embed_dim": 16, "target": "group"}})
    assert _falls(_train(model, batches), factor=0.8)
