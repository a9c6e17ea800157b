"""Detection: boxes (and Mask R-CNN masks) from a torchvision detector on the shared backbone.

Outputs are, per image, ``{"boxes" [n, 4] xyxy pixels, "scores", "labels"}`` (``masks`` for
Mask R-CNN). Padding is cut off by shifting and clipping the boxes; a resized input's boxes are
shifted and scaled back. Sliding windows gather each window's boxes, shift them to image
coordinates and merge them with torchvision's ``batched_nms``; a box cut by an inner window edge
is dropped when a whole box of the same class covers it, so an object split across two windows
is reported once. The summary gives each box's corners in patient (RAS, mm) coordinates for a
volume. Detection heads do not export (see :attr:`DetectionTask.export_refusal`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_area

from bigmodel.tasks import _plots
from bigmodel.tasks._base import SHOW, EvalRun, Evaluation, SummaryContext, Task
from bigmodel.tasks.heads.detection import DetectionHead
from bigmodel.tasks.losses import DetectionLoss
from bigmodel.tasks.metrics import DetectionMetrics

__all__ = ["DetectionTask"]

# Pixels from an inner window edge within which a predicted box counts as cut by that edge.
_EDGE_MARGIN = 1.0
# Share of a cut box's area that a whole box of its class must cover for the cut one to go.
_COVERED = 0.5


def _xyxy(offset: tuple[int, ...]) -> list[int]:
    """A (top, left) offset as the shift of an ``xyxy`` box."""
    top, left = offset
    return [left, top, left, top]


class DetectionTask(Task):
    name = "detection"
    head = DetectionHead
    loss = DetectionLoss
    metrics = DetectionMetrics
    window = "gather"
    export_refusal = (
        "torchvision's detector post-processing (anchor decoding, score filtering and "
        "per-image NMS giving a different number of boxes per image) is data-dependent control "
        "flow that ONNX and torch.export cannot trace into one static graph; run it with "
        "bigmodel-predict, which has no such limit"
    )

    def crop(self, output: Any, offset: tuple[int, ...], shape: tuple[int, ...]) -> Any:
        """Boxes shifted to the input and clipped to it; masks cut like segmentation logits."""
        (top, left), (height, width) = offset, shape
        shifted = []
        for det in output:
            boxes = det["boxes"] - det["boxes"].new_tensor(_xyxy(offset))
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            det = {**det, "boxes": boxes}
            if "masks" in det:
                det["masks"] = det["masks"][..., top : top + height, left : left + width]
            shifted.append(det)
        return shifted

    def to_pixels(
        self,
        output: Any,
        offset: tuple[int, ...],
        size: tuple[int, ...],
        shape: tuple[int, ...],
        scale: float,
    ) -> Any:
        shift = torch.tensor(_xyxy(offset), dtype=torch.float32)
        return [{**det, "boxes": (det["boxes"] - shift.to(det["boxes"])) / scale} for det in output]

    def window_part(self, output: Any, window: tuple[int, ...]) -> Any:
        return {**output, "window": window}

    def merge_windows(
        self, parts: list[Any], shape: tuple[int, ...], cfg: Any, iou_threshold: float
    ) -> Any:
        return _merge_boxes(parts, shape, iou_threshold, cfg.detections_per_image)

    def to_numpy(self, output: Any, cfg: Any) -> Any:
        """A list of ``{"boxes", "scores", "labels"}`` per image (pixels)."""
        return [{k: v.detach().cpu().numpy() for k, v in det.items()} for det in output]

    def concat(self, chunks: list[Any]) -> Any:
        return [det for chunk in chunks for det in chunk]

    def summary(self, head: str, value: Any, classes: list[str], ctx: SummaryContext) -> dict:
        """Every box with its label and score; for a volume its slice and RAS corners in mm."""
        study = ctx.study
        found = []
        for index, det in enumerate(value):
            for box, score, label in zip(det["boxes"], det["scores"], det["labels"], strict=True):
                item: dict[str, Any] = {
                    "label": classes[int(label)] if int(label) < len(classes) else int(label),
                    "score": round(float(score), 4),
                    "box_pixels_xyxy": [round(float(v), 2) for v in box],
                }
                if study.is_volume:
                    item["slice"] = index
                    corners = []
                    for x, y in ((box[0], box[1]), (box[2], box[3])):
                        plane = [float(y), float(x)]  # the slice's two axes, in [D, H, W] order
                        plane.insert(ctx.slice_dim, float(index))
                        corners.append(plane)
                    world = _world(study.affine, np.array(corners))
                    if world is not None:
                        item["corners_ras_mm"] = world.round(2).tolist()
                found.append(item)
        entry: dict[str, Any] = {"detections": found}
        if study.is_volume and study.affine is not None:
            entry["coordinates"] = "corners_ras_mm: RAS+ world millimetres (NIfTI convention)"
        return entry

    def one_line(self, head: str, entry: dict) -> str | None:
        return f"{head}: {len(entry['detections'])} box(es)"

    def evaluation(self, head: str, cfg: Any, classes: list[str]) -> Evaluation:
        return DetectionEvaluation(head, cfg, classes)


def _world(affine: np.ndarray | None, points_zyx: np.ndarray) -> np.ndarray | None:
    """Voxel coordinates ``[..., (z, y, x)]`` -> world (RAS, mm) through the input's affine."""
    if affine is None:
        return None
    xyz = points_zyx[..., ::-1]
    return xyz @ affine[:3, :3].T + affine[:3, 3]


class DetectionEvaluation(Evaluation):
    """The first few labelled images with their boxes, for the picture (mAP has no interval)."""

    def __init__(self, head: str, cfg: Any, classes: list[str]) -> None:
        super().__init__(head, cfg, classes)
        self.shown: list[tuple] = []

    def add(self, output: Any, batch: dict[str, Any]) -> None:
        for i, det in enumerate(output):
            truth = batch["boxes"][i]["boxes"]
            if len(self.shown) < SHOW and len(truth):
                self.shown.append(
                    (
                        batch["key"][i],
                        batch["image"][i].numpy(),
                        truth.numpy(),
                        det["boxes"].cpu().numpy(),
                        det["scores"].cpu().numpy(),
                    )
                )

    def report(self, run: EvalRun, report: dict[str, Any], per_sample: dict[str, list]) -> None:
        if not self.shown:
            return
        report["plots"][f"{self.head}_boxes"] = str(
            _plots.detection_png(self.shown, self.head, run.out / f"{self.head}_boxes.png")
        )
        report["ci95"][f"{self.head}/map"] = None  # see docs/inference.md: no per-patient mAP


def _cut_by_inner_edge(
    boxes: Tensor, window: tuple[int, ...], image_size: tuple[int, ...]
) -> Tensor:
    """Which boxes touch an edge of their window that is not an edge of the image."""
    top, left, bottom, right = window
    height, width = image_size
    m = _EDGE_MARGIN
    cut = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    if left > 0:
        cut |= boxes[:, 0] <= left + m
    if top > 0:
        cut |= boxes[:, 1] <= top + m
    if right < width:
        cut |= boxes[:, 2] >= right - m
    if bottom < height:
        cut |= boxes[:, 3] >= bottom - m
    return cut


def _merge_boxes(
    parts: list[dict[str, Any]], image_size: tuple[int, int], iou_threshold: float, keep: int
) -> dict[str, Tensor]:
    """Boxes of every window of one image, in image coordinates, duplicates removed."""
    boxes, scores, labels, cut, masks = [], [], [], [], []
    height, width = image_size
    for part in parts:
        top, left = part["window"][:2]
        shifted = part["boxes"] + part["boxes"].new_tensor([left, top, left, top])
        shifted[:, 0::2] = shifted[:, 0::2].clamp(0, width)
        shifted[:, 1::2] = shifted[:, 1::2].clamp(0, height)
        boxes.append(shifted)
        scores.append(part["scores"])
        labels.append(part["labels"])
        cut.append(_cut_by_inner_edge(shifted, part["window"], image_size))
        if "masks" in part:  # Mask R-CNN: paste the window's masks into the image canvas
            canvas = part["masks"].new_zeros((len(part["masks"]), 1, height, width))
            bottom, right = part["window"][2:]
            # The window may extend past the image where MONAI padded it; keep the inside.
            y0, y1, x0, x1 = max(0, top), min(bottom, height), max(0, left), min(right, width)
            canvas[..., y0:y1, x0:x1] = part["masks"][
                ..., y0 - top : y1 - top, x0 - left : x1 - left
            ]
            masks.append(canvas)
    boxes_t, scores_t, labels_t, cut_t = (torch.cat(x) for x in (boxes, scores, labels, cut))
    # Our addition to NMS (not in torchvision): a fragment of an object that a neighbouring window
    # saw whole overlaps the whole box by less than the IoU threshold (it is small), so NMS would
    # keep both; drop a cut box when a whole box of its class covers most of its area.
    if bool(cut_t.any()) and bool((~cut_t).any()):
        lt = torch.max(boxes_t[cut_t, None, :2], boxes_t[None, ~cut_t, :2])
        rb = torch.min(boxes_t[cut_t, None, 2:], boxes_t[None, ~cut_t, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        same = labels_t[cut_t, None] == labels_t[None, ~cut_t]
        covered = ((inter / box_area(boxes_t[cut_t]).clamp(min=1e-6)[:, None]) * same).amax(1)
        drop = torch.zeros_like(cut_t)
        drop[cut_t] = covered >= _COVERED
        boxes_t, scores_t, labels_t = boxes_t[~drop], scores_t[~drop], labels_t[~drop]
        if masks:
            masks = [torch.cat(masks)[~drop]]
    kept = batched_nms(boxes_t, scores_t, labels_t, iou_threshold)[:keep]  # sorted by score
    merged = {"boxes": boxes_t[kept], "scores": scores_t[kept], "labels": labels_t[kept]}
    if masks:
        merged["masks"] = torch.cat(masks)[kept]
    return merged
