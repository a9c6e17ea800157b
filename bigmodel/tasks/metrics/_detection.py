"""Detection figures: COCO mAP@[.5:.95], mAP@.5, mAP@.75, mAR@100, and precision/recall at IoU .5.

The mAP figures are torchmetrics' ``MeanAveragePrecision`` on the pycocotools backend, i.e. the
official COCOeval. Boxes are ``xyxy`` pixels (batch contract); class indices are used as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from bigmodel.config import DetectionHeadConfig
from bigmodel.tasks.metrics._common import NAN, labelled_mask

MATCH_IOU = 0.5
"""IoU at which a detection counts as a hit for ``precision_50`` / ``recall_50``."""
OPERATING_SCORE = 0.5
"""Detections scoring below this are not counted by ``precision_50`` / ``recall_50``."""

_COCO_FIGURES = {"map": "map", "map_50": "map_50", "map_75": "map_75", "mar_100": "mar_100"}


class DetectionCounts(Metric):
    """True/false positives and misses at one operating point (score >= 0.5, IoU >= 0.5).

    Written here because COCOeval (and torchmetrics) summarise the whole precision-recall curve
    and report no counts at a fixed score threshold, which is what a reader of ``precision`` and
    ``recall`` expects. Matching follows COCO: per image and class, detections in descending score
    order each take the unmatched ground-truth box of highest IoU, if that IoU >= 0.5.
    """

    full_state_update = False

    def __init__(self, iou_threshold: float = MATCH_IOU, score_threshold: float = OPERATING_SCORE):
        super().__init__()
        self.iou_threshold = iou_threshold
        self.score_threshold = score_threshold
        for state in ("tp", "fp", "fn", "images"):
            self.add_state(state, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, preds: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping]
    ) -> None:
        """Count hits, false alarms and misses over a list of images."""
        self.images += len(preds)
        for pred, target in zip(preds, targets, strict=True):
            confident = pred["scores"] >= self.score_threshold
            boxes, scores = pred["boxes"][confident], pred["scores"][confident]
            labels = pred["labels"][confident]
            for cls in torch.cat([labels, target["labels"]]).unique():
                gt = target["boxes"][target["labels"] == cls]
                of_cls = labels == cls
                det = boxes[of_cls][scores[of_cls].argsort(descending=True)]
                hits = _greedy_hits(box_iou(det, gt), self.iou_threshold)
                self.tp += hits
                self.fp += len(det) - hits
                self.fn += len(gt) - hits

    def compute(self) -> dict[str, torch.Tensor]:
        """Precision and recall; NaN when nothing was detected / nothing was there to find."""
        tp, fp, fn = (x.double() for x in (self.tp, self.fp, self.fn))
        nan = torch.tensor(torch.nan, dtype=torch.double)
        precision = tp / (tp + fp) if tp + fp > 0 else nan
        recall = tp / (tp + fn) if tp + fn > 0 else nan
        return {"precision": precision, "recall": recall, "images": self.images}


def _greedy_hits(iou: torch.Tensor, threshold: float) -> int:
    """Matches of score-sorted detections (rows) to ground truth (columns), COCO-style."""
    if iou.numel() == 0:
        return 0
    free = torch.ones(iou.shape[1], dtype=torch.bool, device=iou.device)
    hits = 0
    for row in iou:
        candidates = torch.where(free, row, torch.full_like(row, -1.0))
        best = int(candidates.argmax())
        if candidates[best] >= threshold:
            free[best] = False
            hits += 1
    return hits


class DetectionMetrics(nn.Module):
    """COCO mAP figures and precision/recall at IoU .5 of one detection head."""

    def __init__(self, name: str, cfg: DetectionHeadConfig) -> None:
        super().__init__()
        self.name = name
        self.target = cfg.target
        # Images are kept here (on CPU) and handed to MeanAveragePrecision only in compute(),
        # after gathering them from all ranks with all_gather_object (under NCCL this needs the
        # rank's CUDA device set, which the engine does). torchmetrics' own sync of its per-image
        # list states runs one all_gather per image, which aborts ("collective mismatch") as soon
        # as ranks hold different numbers of images: the normal case with partial labels.
        self.preds: list[dict[str, torch.Tensor]] = []
        self.truth: list[dict[str, torch.Tensor]] = []
        self.counts = DetectionCounts()

    def update(
        self, detections: Sequence[Mapping[str, torch.Tensor]], batch: Mapping[str, Any]
    ) -> None:
        """Add one batch: a list of ``{"boxes", "scores", "labels"}`` and the batch's targets."""
        targets = batch[self.target]
        if not isinstance(detections, Sequence) or len(detections) != len(targets):
            raise ValueError(
                f"head {self.name!r}: detection outputs must be a list with one dict per image "
                f"({len(targets)} images); got {type(detections).__name__} — is the model in "
                "eval mode? (detectors return no boxes in train mode)"
            )
        keep = labelled_mask(batch, self.target, len(targets)).tolist()
        preds = [
            {k: _tensor(det, k, self.name).detach().cpu() for k in ("boxes", "scores", "labels")}
            for det, kept in zip(detections, keep, strict=True)
            if kept
        ]
        truth = [
            {k: _tensor(t, k, self.name).cpu() for k in ("boxes", "labels")}
            for t, kept in zip(targets, keep, strict=True)
            if kept
        ]
        if not preds:
            return
        self.preds += preds
        self.truth += truth
        self.counts.update(preds, truth)

    def compute(self) -> dict[str, float]:
        """Figures over every image seen since reset, from all ranks; collective.

        COCOeval is single-process CPU work whose cost grows with the images: it runs once, on
        rank 0, over the images gathered there (``gather_object``; under NCCL it needs the
        rank's CUDA device set, which the engine does), and rank 0 sends the figures to the
        others.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            rank = dist.get_rank()
            gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object((self.preds, self.truth), gathered, dst=0)
            figures = None
            if rank == 0:
                preds = [p for rank_preds, _ in gathered for p in rank_preds]
                truth = [t for _, rank_truth in gathered for t in rank_truth]
                figures = coco_figures(preds, truth)
            box = [figures]
            dist.broadcast_object_list(box, src=0)
            out = dict(box[0])
        else:
            out = coco_figures(self.preds, self.truth)
        counts = self.counts.compute()
        out["count"] = float(counts["images"])
        out["precision_50"] = float(counts["precision"])
        out["recall_50"] = float(counts["recall"])
        return out

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.preds, self.truth = [], []
        self.counts.reset()


def coco_figures(
    preds: Sequence[Mapping[str, torch.Tensor]], truth: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, float]:
    """COCO mAP figures of the images given (pycocotools' COCOeval through torchmetrics).

    COCOeval reports -1 where there is no ground truth to score against: NaN here.
    """
    coco = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=False
    )
    if preds:
        coco.update(list(preds), list(truth))
        summary = coco.compute()
    else:
        summary = dict.fromkeys(_COCO_FIGURES.values(), torch.tensor(-1.0))
    return {
        name: (float(summary[key]) if float(summary[key]) >= 0 else NAN)
        for name, key in _COCO_FIGURES.items()
    }


def _tensor(record: Mapping[str, Any], key: str, head: str) -> torch.Tensor:
    if key not in record:
        raise KeyError(
            f"head {head!r}: a detection record lacks {key!r} (has {sorted(record)}); "
            "predictions need boxes/scores/labels, targets boxes/labels"
        )
    return torch.as_tensor(record[key])
