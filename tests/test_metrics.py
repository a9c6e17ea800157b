"""Metrics against independent references on the same predictions, and across two gloo ranks.

References: scikit-learn (accuracy, balanced accuracy, AUROC), pycocotools' COCOeval (mAP), numpy
(Dice/IoU, Recall@K, mAP@R, detection counts).
"""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from bigmodel.config import ModelConfig
from bigmodel.metrics import MetricSet, build_metrics
from bigmodel.models import build_model

K_CLS, K_SEG, K_DET, D_EMB = 4, 3, 3, 8


def _model_cfg(multilabel: bool = False) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "heads": {
                "diag": {"type": "classification", "num_classes": K_CLS, "multilabel": multilabel},
                "seg": {"type": "segmentation", "num_classes": K_SEG},
                "det": {"type": "detection", "num_classes": K_DET},
                "emb": {"type": "retrieval", "embed_dim": D_EMB, "target": "group"},
            }
        }
    )


def _boxes(rng: np.random.Generator, n: int, size: int = 64) -> np.ndarray:
    xy = rng.uniform(0, size - 20, (n, 2))
    wh = rng.uniform(6, 20, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _detections(rng: np.random.Generator, gt: np.ndarray, labels: np.ndarray) -> dict:
    """Jittered copies of some ground truth, some with the wrong class, plus false alarms."""
    keep = rng.random(len(gt)) < 0.8
    boxes = gt[keep] + rng.normal(0, 1.0, (int(keep.sum()), 4)).astype(np.float32)
    det_labels = labels[keep].copy()
    flip = rng.random(len(det_labels)) < 0.15
    det_labels[flip] = rng.integers(0, K_DET, int(flip.sum()))
    false = _boxes(rng, int(rng.integers(0, 3)))
    boxes = np.concatenate([boxes, false])
    det_labels = np.concatenate([det_labels, rng.integers(0, K_DET, len(false))])
    return {
        "boxes": torch.from_numpy(boxes),
        "scores": torch.from_numpy(rng.uniform(0.05, 1, len(boxes)).astype(np.float32)),
        "labels": torch.from_numpy(det_labels).long(),
    }


def _batches(seed: int = 0, n_batches: int = 6, b: int = 8, multilabel: bool = False) -> list:
    """(outputs, batch) pairs following docs/contracts.md, with partial labels everywhere."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n_batches):
        labels = rng.integers(0, K_CLS, b)
        logits = rng.normal(0, 1, (b, K_CLS)) + 1.5 * np.eye(K_CLS)[labels]
        if multilabel:
            cls = (rng.random((b, K_CLS)) < 0.4).astype(np.float32)
            logits = rng.normal(0, 1, (b, K_CLS)) + 1.5 * (2 * cls - 1)
            cls[rng.random((b, K_CLS)) < 0.2] = -1
        else:
            cls = np.where(rng.random(b) < 0.15, -1, labels)
        mask = rng.integers(0, K_SEG, (b, 16, 16))
        seg_logits = rng.normal(0, 1, (b, K_SEG, 16, 16)) + 2.0 * np.moveaxis(
            np.eye(K_SEG)[mask], -1, 1
        )
        mask[:, :3, :] = 255  # not annotated
        gts = [_boxes(rng, int(rng.integers(0, 4))) for _ in range(b)]
        gt_labels = [rng.integers(0, K_DET, len(g)) for g in gts]
        groups = [f"patient-{rng.integers(0, 6)}" for _ in range(b)]
        emb = rng.normal(0, 1, (b, D_EMB)) + 2.0 * np.eye(D_EMB)[[int(g[-1]) for g in groups]]
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        has_det = rng.random(b) < 0.8
        if i == 1:
            has_det[:] = False  # a batch without any detection label
        batch = {
            "image": torch.zeros(b, 1, 16, 16),
            "cls": torch.tensor(cls, dtype=torch.float32 if multilabel else torch.long),
            "mask": torch.from_numpy(mask).long(),
            "boxes": [
                {"boxes": torch.from_numpy(g), "labels": torch.from_numpy(lab).long()}
                for g, lab in zip(gts, gt_labels, strict=True)
            ],
            "group": groups,
            "has": {
                "cls": torch.ones(b, dtype=torch.bool),
                "mask": torch.from_numpy(rng.random(b) < 0.75),
                "boxes": torch.from_numpy(has_det),
            },
        }
        outputs = {
            "diag": torch.tensor(logits, dtype=torch.float32),
            "seg": torch.tensor(seg_logits, dtype=torch.float32),
            "det": [_detections(rng, g, lab) for g, lab in zip(gts, gt_labels, strict=True)],
            "emb": torch.tensor(emb, dtype=torch.float32),
        }
        pairs.append((outputs, batch))
    return pairs


def _run(pairs: list, multilabel: bool = False) -> dict[str, float]:
    metrics = build_metrics(_model_cfg(multilabel))
    for outputs, batch in pairs:
        metrics.update(outputs, batch)
    return metrics.compute()


def _emb_cfg(target: str) -> ModelConfig:
    return ModelConfig.model_validate(
        {"heads": {"emb": {"type": "retrieval", "embed_dim": D_EMB, "target": target}}}
    )


# ------------------------------------------------------------------------------------------
# classification vs scikit-learn


def test_multiclass_matches_sklearn() -> None:
    pairs = _batches(seed=1)
    figures = _run(pairs)
    logits = torch.cat([o["diag"] for o, _ in pairs])
    y = torch.cat([b["cls"] for _, b in pairs]).numpy()
    known = y >= 0
    probs = logits.softmax(1).numpy()[known]
    y = y[known]
    assert figures["diag/count"] == known.sum()
    assert figures["diag/accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    assert figures["diag/balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y, probs.argmax(1))
    )
    assert figures["diag/auroc"] == pytest.approx(
        roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-6
    )
    for k in range(K_CLS):
        assert figures[f"diag/auroc_{k}"] == pytest.approx(
            roc_auc_score(y == k, probs[:, k]), abs=1e-6
        )


def test_multiclass_class_absent_from_targets() -> None:
    """A class only ever predicted: sklearn leaves it out of balanced accuracy; AUROC is NaN."""
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0], [0, 2.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 1])
    cfg = ModelConfig.model_validate({"heads": {"c": {"type": "classification", "num_classes": 3}}})
    metrics = build_metrics(cfg)
    metrics.update({"c": logits}, {"cls": y, "has": {"cls": torch.ones(5, dtype=torch.bool)}})
    figures = metrics.compute()
    with pytest.warns(UserWarning):  # sklearn: y_pred contains classes not in y_true
        expected = balanced_accuracy_score(y.numpy(), logits.argmax(1).numpy())
    assert figures["c/balanced_accuracy"] == pytest.approx(expected)
    assert math.isnan(figures["c/auroc_2"])
    probs = logits.softmax(1).numpy()
    expected_auc = [roc_auc_score(y.numpy() == k, probs[:, k]) for k in (0, 1)]
    assert figures["c/auroc"] == pytest.approx(np.mean(expected_auc))


def test_multilabel_matches_sklearn() -> None:
    pairs = _batches(seed=2, multilabel=True)
    figures = _run(pairs, multilabel=True)
    probs = torch.cat([o["diag"] for o, _ in pairs]).sigmoid().numpy()
    y = torch.cat([b["cls"] for _, b in pairs]).numpy()
    known = y >= 0
    pred = (probs >= 0.5).astype(int)
    assert figures["diag/count"] == known.sum()
    assert figures["diag/accuracy"] == pytest.approx((pred[known] == y[known]).mean())
    per_label_bacc, per_label_auc = [], []
    for k in range(K_CLS):
        m = known[:, k]
        per_label_bacc.append(balanced_accuracy_score(y[m, k], pred[m, k]))
        per_label_auc.append(roc_auc_score(y[m, k], probs[m, k]))
        assert figures[f"diag/auroc_{k}"] == pytest.approx(per_label_auc[-1], abs=1e-6)
    assert figures["diag/balanced_accuracy"] == pytest.approx(np.mean(per_label_bacc))
    assert figures["diag/auroc"] == pytest.approx(np.mean(per_label_auc), abs=1e-6)


# ------------------------------------------------------------------------------------------
# segmentation vs numpy


def test_dice_iou_match_numpy() -> None:
    pairs = _batches(seed=3)
    figures = _run(pairs)
    pred = np.concatenate([o["seg"].argmax(1).numpy()[b["has"]["mask"]] for o, b in pairs])
    true = np.concatenate([b["mask"].numpy()[b["has"]["mask"]] for _, b in pairs])
    annotated = true != 255
    pred, true = pred[annotated], true[annotated]
    assert figures["seg/count"] == true.size
    dice, iou = [], []
    for k in range(K_SEG):
        inter = np.sum((pred == k) & (true == k))
        dice.append(2 * inter / (np.sum(pred == k) + np.sum(true == k)))
        iou.append(inter / np.sum((pred == k) | (true == k)))
        assert figures[f"seg/dice_{k}"] == pytest.approx(dice[-1])
        assert figures[f"seg/iou_{k}"] == pytest.approx(iou[-1])
    assert figures["seg/dice_mean"] == pytest.approx(np.mean(dice[1:]))
    assert figures["seg/iou_mean"] == pytest.approx(np.mean(iou[1:]))
    assert 0.5 < figures["seg/dice_mean"] < 1.0  # the logits favour the true class


# ------------------------------------------------------------------------------------------
# detection vs pycocotools


def _cocoeval_stats(pairs: list) -> np.ndarray:
    images, annotations, results = [], [], []
    for outputs, batch in pairs:
        for det, gt, has in zip(outputs["det"], batch["boxes"], batch["has"]["boxes"], strict=True):
            if not has:
                continue
            image_id = len(images) + 1
            images.append({"id": image_id, "width": 64, "height": 64})
            for box, label in zip(gt["boxes"].tolist(), gt["labels"].tolist(), strict=True):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
            for box, score, label in zip(
                det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
            ):
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": label + 1,
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                        "score": score,
                    }
                )
    gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1} for k in range(K_DET)],
    }
    gt.createIndex()
    evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def test_map_matches_cocoeval() -> None:
    pairs = _batches(seed=4, n_batches=5)
    figures = _run(pairs)
    stats = _cocoeval_stats(pairs)
    assert figures["det/count"] == sum(int(b["has"]["boxes"].sum()) for _, b in pairs)
    assert figures["det/map"] == pytest.approx(stats[0], abs=1e-4)
    assert figures["det/map_50"] == pytest.approx(stats[1], abs=1e-4)
    assert figures["det/map_75"] == pytest.approx(stats[2], abs=1e-4)
    assert figures["det/mar_100"] == pytest.approx(stats[8], abs=1e-4)
    assert 0.2 < figures["det/map_50"] < 1.0


def test_detection_precision_recall_counts() -> None:
    """3 objects; a hit, a duplicate, a low-score hit, a poor overlap, a wrong class."""
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50.0]])
    det = {
        "boxes": torch.tensor(
            [[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [40, 40, 46, 46], [40, 40, 50, 50.0]]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.3, 0.95, 0.7]),
        "labels": torch.tensor([0, 0, 0, 0, 1]),
    }
    cfg = ModelConfig.model_validate({"heads": {"d": {"type": "detection", "num_classes": 2}}})
    metrics = build_metrics(cfg)
    batch = {"boxes": [{"boxes": gt, "labels": torch.tensor([0, 0, 0])}]}
    metrics.update({"d": [det]}, batch)
    figures = metrics.compute()
    # score >= 0.5: hit (0.9), duplicate (0.8, FP), IoU .36 (0.95, FP), wrong class (0.7, FP)
    assert figures["d/precision_50"] == pytest.approx(1 / 4)
    assert figures["d/recall_50"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------
# retrieval vs numpy


def _numpy_retrieval(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    recall = {1: [], 5: [], 10: []}
    ap_at_r = []
    for q in range(len(labels)):
        relevant = labels[order[q, : len(labels) - 1]] == labels[q]
        r = int(relevant.sum())
        if r == 0:
            continue  # lone query
        for k in recall:
            recall[k].append(relevant[:k].any())
        top = relevant[:r]
        precision_at_i = np.cumsum(top) / np.arange(1, r + 1)
        ap_at_r.append(np.sum(precision_at_i * top) / r)
    return {f"recall@{k}": float(np.mean(v)) for k, v in recall.items()} | {
        "map@r": float(np.mean(ap_at_r))
    }


@pytest.mark.parametrize("target", ["group", "cls"])
def test_retrieval_matches_numpy(target: str) -> None:
    rng = np.random.default_rng(5)
    n = 60
    labels = rng.integers(0, 7, n)
    labels[0] = 99  # a lone query: left out
    emb = rng.normal(0, 1, (n, D_EMB)) + 1.2 * rng.normal(0, 1, (100, D_EMB))[labels]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    metrics = build_metrics(_emb_cfg(target))
    for start in range(0, n, 16):
        chunk = slice(start, start + 16)
        raw = (
            [f"p{v}" for v in labels[chunk]]
            if target == "group"
            else torch.from_numpy(labels[chunk]).long()
        )
        metrics.update({"emb": torch.tensor(emb[chunk], dtype=torch.float32)}, {target: raw})
    figures = metrics.compute()
    expected = _numpy_retrieval(emb.astype(np.float32), labels)
    assert figures["emb/count"] == n
    for name, value in expected.items():
        assert figures[f"emb/{name}"] == pytest.approx(value, abs=1e-6), name
    assert 0 < figures["emb/map@r"] < figures["emb/recall@10"] <= 1


# ------------------------------------------------------------------------------------------
# the set as a whole


def test_flat_names_reset_and_partial_labels() -> None:
    pairs = _batches(seed=6)
    metrics = build_metrics(_model_cfg())
    for outputs, batch in pairs:
        metrics.update(outputs, batch)
    first = metrics.compute()
    assert all(isinstance(v, float) for v in first.values())
    assert {"diag/accuracy", "seg/dice_mean", "det/map_50", "emb/recall@1", "emb/map@r"} <= set(
        first
    )
    metrics.reset()
    for outputs, batch in pairs[:2]:
        metrics.update(outputs, batch)
    assert metrics.compute() == pytest.approx(_run(pairs[:2]), nan_ok=True)
    assert metrics.compute() != pytest.approx(first, nan_ok=True)


def test_no_labels_gives_nan() -> None:
    outputs, batch = _batches(seed=7, n_batches=1)[0]
    batch["has"] = {key: torch.zeros_like(v) for key, v in batch["has"].items()}
    batch["cls"] = torch.full_like(batch["cls"], -1)
    figures = _run([(outputs, batch)])
    for name in ("diag/accuracy", "diag/auroc", "seg/dice_mean", "det/map", "det/precision_50"):
        assert math.isnan(figures[name]), name
    assert figures["diag/count"] == figures["seg/count"] == 0


def test_bad_input_names_the_head_and_field() -> None:
    outputs, batch = _batches(seed=8, n_batches=1)[0]
    metrics = build_metrics(_model_cfg())
    with pytest.raises(ValueError, match=r"head 'diag'.*\[B, 4\]"):
        metrics.update({**outputs, "diag": outputs["diag"][:, :3]}, batch)
    with pytest.raises(ValueError, match=r"head 'diag'.*'cls'.*holds 7"):
        metrics.update(outputs, {**batch, "cls": torch.full_like(batch["cls"], 7)})
    with pytest.raises(ValueError, match=r"head 'seg'.*'mask'.*label 5"):
        metrics.update(outputs, {**batch, "mask": torch.full_like(batch["mask"], 5)})
    with pytest.raises(KeyError, match="lack heads"):
        metrics.update({"diag": outputs["diag"]}, batch)
    with pytest.raises(ValueError, match="eval mode"):
        metrics.update({**outputs, "det": {}}, batch)
    cfg = ModelConfig.model_validate({"heads": {"c": {"type": "classification"}}})
    with pytest.raises(ValueError, match=r"model\.heads\.c\.num_classes"):
        build_metrics(cfg)


# ------------------------------------------------------------------------------------------
# two gloo ranks: the metric over two halves equals the metric over the whole


def _count_coco_runs() -> list[int]:
    """Count this process's COCOeval runs (the real method still runs)."""
    runs = [0]
    evaluate = COCOeval.evaluate

    def counted(self):
        runs[0] += 1
        return evaluate(self)

    COCOeval.evaluate = counted
    return runs


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, rank1_idle: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    coco_runs = _count_coco_runs()
    try:
        pairs = _batches(seed=9)
        metrics: MetricSet = build_metrics(_model_cfg())
        # rank 0 takes the even batches, rank 1 the odd ones (batch 1 has no detection labels),
        # or none at all: an idle rank must still take part in the gather
        mine = [] if rank1_idle and rank == 1 else pairs[rank::world_size]
        for outputs, batch in mine:
            metrics.update(outputs, batch)
        torch.save(metrics.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
        # COCOeval runs once, on rank 0, over the gathered images; rank 1 gets its figures
        torch.save(coco_runs[0], os.path.join(out_dir, f"coco_runs{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank1_idle", [False, True], ids=["halves", "idle-rank"])
def test_two_ranks_equal_the_whole(tmp_path, rank1_idle: bool) -> None:
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), rank1_idle), nprocs=2, join=True)
    pairs = _batches(seed=9)
    whole = _run(pairs[::2] if rank1_idle else pairs)
    assert [torch.load(tmp_path / f"coco_runs{rank}.pt") for rank in range(2)] == [1, 0]
    for rank in range(2):
        figures = torch.load(tmp_path / f"rank{rank}.pt")
        assert figures.keys() == whole.keys()
        for name, value in whole.items():
            assert figures[name] == pytest.approx(value, abs=1e-6, nan_ok=True), (rank, name)


def test_real_model_outputs_feed_the_metrics() -> None:
    """The model's eval outputs (all four heads, one backbone) go straight into the metric set."""
    cfg = ModelConfig.model_validate(
        {
            "backbone": {"name": "test_resnet", "in_chans": 1},
            "heads": {
                "diag": {"type": "classification", "num_classes": K_CLS},
                "seg": {"type": "segmentation", "num_classes": K_SEG, "decoder_channels": 16},
                "det": {"type": "detection", "num_classes": K_DET, "fpn_channels": 16},
                "emb": {"type": "retrieval", "embed_dim": D_EMB, "target": "group"},
            },
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    metrics = build_metrics(cfg)
    for outputs, batch in _batches(seed=10, n_batches=2):
        images = torch.randn(len(batch["group"]), 1, 16, 16)
        with torch.no_grad():
            model_outputs = model(images)["outputs"]
        assert {k: type(v) for k, v in model_outputs.items()} == {
            k: type(v) for k, v in outputs.items()
        }
        metrics.update(model_outputs, batch)
    figures = metrics.compute()
    assert figures.keys() == _run(_batches(seed=10, n_batches=2)).keys()
    assert 0.0 <= figures["diag/accuracy"] <= 1.0 and 0.0 <= figures["seg/dice_mean"] <= 1.0
    assert figures["emb/count"] == 16
