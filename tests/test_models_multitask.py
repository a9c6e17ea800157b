"""Multi-task model: one backbone, any heads, partial labels, config errors, retrieval index."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from bigmodel.config import ConfigError, ModelConfig
from bigmodel.models import build_model
from bigmodel.tasks.heads import RetrievalIndex

pytestmark = pytest.mark.usefixtures("one_thread")


B, SIZE = 4, 64

HEADS = {
    "diag": {"type": "classification", "num_classes": 3, "loss_weight": 0.5},
    "seg": {"type": "segmentation", "num_classes": 3, "decoder_channels": 16},
    "det": {"type": "detection", "num_classes": 2, "fpn_channels": 16, "detector": "fasterrcnn"},
    "emb": {"type": "retrieval", "embed_dim": 8, "target": "group"},
}


def _model(heads=HEADS, **backbone_kw) -> torch.nn.Module:
    backbone = {"name": "test_resnet", "in_chans": 1, **backbone_kw}
    return build_model(ModelConfig.model_validate({"backbone": backbone, "heads": heads}))


def _batch(has_cls, has_mask, has_boxes) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 3, (B, SIZE, SIZE), generator=g)
    has_mask = torch.tensor(has_mask)
    mask[~has_mask] = 255  # the data side marks absent masks as ignore
    boxes = [
        {"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "labels": torch.tensor([i % 2])}
        for i in range(B)
    ]
    return {
        "image": torch.randn(B, 1, SIZE, SIZE, generator=g),
        "cls": torch.tensor([0, 1, 2, 1]),
        "mask": mask,
        "boxes": boxes,
        "group": ["p1", "p1", "p2", "p2"],
        "has": {
            "cls": torch.tensor(has_cls),
            "mask": has_mask,
            "boxes": torch.tensor(has_boxes),
        },
    }


def _head_grads(model, name):
    return [p.grad for p in model.heads[name].parameters()]


def test_one_backbone_all_heads_output_contract():
    model = _model()
    batch = _batch([True] * 4, [True] * 4, [True] * 4)
    out = model(batch["image"], batch)
    assert set(out["losses"]) == set(HEADS)
    torch.testing.assert_close(out["loss"], sum(out["losses"].values()))
    assert out["outputs"]["diag"].shape == (B, 3)
    assert out["outputs"]["seg"].shape == (B, 3, SIZE, SIZE)
    assert out["outputs"]["emb"].shape == (B, 8)
    assert out["outputs"]["det"] == {}
    model.eval()
    with torch.no_grad():
        out = model(batch["image"], batch)
    assert "det" not in out["losses"] and len(out["outputs"]["det"]) == B
    assert set(out["outputs"]["det"][0]) == {"boxes", "scores", "labels"}


def test_loss_weights_scale_each_head():
    torch.manual_seed(0)
    heads = {"diag": dict(HEADS["diag"], loss_weight=1.0)}
    model = _model(heads)
    batch = _batch([True] * 4, [True] * 4, [True] * 4)
    full = model(batch["image"], batch)["losses"]["diag"]
    model.head_configs["diag"] = model.head_configs["diag"].model_copy(update={"loss_weight": 0.25})
    torch.testing.assert_close(model(batch["image"], batch)["losses"]["diag"], 0.25 * full)


def test_absent_tasks_get_exactly_zero_gradient_and_stay_in_the_graph():
    torch.manual_seed(0)
    model = _model()
    # No sample has a class label or a mask; two images carry boxes; groups are always there.
    batch = _batch([False] * 4, [False] * 4, [True, False, True, False])
    out = model(batch["image"], batch)
    assert out["losses"]["diag"].item() == 0.0 and out["losses"]["seg"].item() == 0.0
    out["loss"].backward()
    for name in ("diag", "seg"):
        grads = _head_grads(model, name)
        assert all(g is not None for g in grads), f"{name} left the graph (DDP would hang)"
        assert all(torch.count_nonzero(g) == 0 for g in grads), name
    assert any(torch.count_nonzero(g) > 0 for g in _head_grads(model, "det") if g is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_partial_labels_equal_the_labelled_subset():
    torch.manual_seed(0)
    model = _model({"diag": HEADS["diag"]}).eval()  # eval: BatchNorm does not mix samples
    batch = _batch([True, False, True, False], [True] * 4, [True] * 4)
    loss = model(batch["image"], batch)["losses"]["diag"]
    sub = {"cls": batch["cls"][[0, 2]]}
    expected = model(batch["image"][[0, 2]], sub)["losses"]["diag"]
    torch.testing.assert_close(loss, expected)


def test_detection_without_boxes_in_batch_gets_zero_gradient():
    model = _model({"det": HEADS["det"], "diag": HEADS["diag"]})
    batch = _batch([True] * 4, [True] * 4, [False] * 4)
    out = model(batch["image"], batch)
    out["loss"].backward()
    grads = _head_grads(model, "det")
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


def test_batch_without_the_task_field_at_all():
    model = _model({"diag": HEADS["diag"], "seg": HEADS["seg"]})
    batch = _batch([True] * 4, [True] * 4, [True] * 4)
    del batch["mask"], batch["has"]["mask"]
    out = model(batch["image"], batch)
    assert out["losses"]["seg"].item() == 0.0 and out["losses"]["diag"].item() > 0


def test_two_stage_recipe_loads_stage_one_into_a_frozen_backbone():
    torch.manual_seed(0)
    stage1 = _model({"diag": HEADS["diag"]})
    stage2 = _model({"diag": HEADS["diag"]}, freeze="all")
    stage2.load_state_dict(stage1.state_dict(), strict=True)
    trainable = {n for n, p in stage2.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("heads.") for n in trainable)
    w1 = stage1.backbone.model.layer1[0].conv1.weight
    torch.testing.assert_close(stage2.backbone.model.layer1[0].conv1.weight, w1)


def test_channels_last_model_matches_the_contiguous_one():
    """channels_last changes the memory layout only: same losses, same gradients, every head."""
    batch = _batch([True] * 4, [True] * 4, [True] * 4)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = _model(channels_last=channels_last)
        out = model(batch["image"], batch)
        out["loss"].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["losses"], grads))
    (losses, grads), (losses_cl, grads_cl) = results
    assert set(losses) == set(HEADS) and all(v.item() > 0 for v in losses.values())
    for name in losses:
        torch.testing.assert_close(losses_cl[name], losses[name], rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_cl.keys()
    for name in ("diag", "seg", "det", "emb"):
        head = [n for n in grads if n.startswith(f"heads.{name}.")]
        assert head and any(torch.count_nonzero(grads[n]) for n in head), name
    for name in grads:  # summation order differs between layouts: compare whole tensors
        error = (grads_cl[name] - grads[name]).norm() / grads[name].norm().clamp(min=1e-12)
        assert error < 1e-2, (name, float(error))  # a layout bug gives O(1)


@pytest.mark.parametrize(
    "heads,match",
    [
        ({"diag": {"type": "classification"}}, "model.heads.diag.num_classes is not set"),
        ({"seg": {"type": "segmentation", "num_classes": 1}}, "needs at least 2"),
        ({"seg": {"type": "segmentation", "num_classes": 2, "target": "cls"}}, "target='cls'"),
        (
            {"diag": {"type": "classification", "num_classes": 2, "class_weights": [1.0]}},
            "class_weights has 1 entries",
        ),
    ],
)
def test_config_errors_name_the_field(heads, match):
    with pytest.raises(ConfigError, match=match):
        _model(heads)


def test_retrieval_index_exact_top_k():
    torch.manual_seed(0)
    gallery, queries = torch.randn(50, 8), torch.randn(7, 8)
    index = RetrievalIndex(8, max_scores=20)  # forces several query chunks
    index.add(gallery[:30])
    index.add(gallery[30:])
    scores, idx = index.search(queries, k=5)
    sim = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T
    expected = sim.argsort(dim=1, descending=True)[:, :5]
    assert torch.equal(idx, expected)
    torch.testing.assert_close(scores, sim.gather(1, expected))
    assert len(index) == 50
    assert index.search(queries, k=100)[1].shape == (7, 50)
    with pytest.raises(ValueError, match=r"expects \[N, 8\]"):
        index.add(torch.randn(3, 4))


def test_faiss_backend_without_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        RetrievalIndex(8, backend="faiss")


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
def test_faiss_backend_agrees_with_torch():
    torch.manual_seed(0)
    gallery, queries = torch.randn(40, 8), torch.randn(5, 8)
    exact, approx = RetrievalIndex(8), RetrievalIndex(8, backend="faiss")
    exact.add(gallery)
    approx.add(gallery)
    assert torch.equal(exact.search(queries, 3)[1], approx.search(queries, 3)[1])


def test_detection_boxes_stay_fp32_under_bf16_autocast():
    model = _model()
    batch = _batch([True] * 4, [True] * 4, [True] * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch["image"], batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(batch["image"])["outputs"]["det"]
    assert detections[0]["boxes"].dtype == torch.float32


def test_anchor_sizes_per_level():
    det = dict(HEADS["det"], anchor_sizes=[8, 16, 32, 64])
    anchors = _model({"det": det}).heads["det"].detector.rpn.anchor_generator
    assert [s[0] for s in anchors.sizes] == [8, 16, 32, 64]
    with pytest.raises(ConfigError, match="anchor_sizes has 2 entries"):
        _model({"det": dict(det, anchor_sizes=[8, 16])})
