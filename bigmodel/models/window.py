"""Whole-image outputs of a multi-task model on images larger than the training size.

A model trained on ``roi_size`` crops sees a 512 x 512 CT slice in three ways at once:

* **segmentation** logits come from MONAI's ``sliding_window_inference``: overlapping windows of
  ``roi_size``, blended with a Gaussian importance map (nnU-Net's scheme: window centres count
  more than their borders), so every pixel gets a prediction;
* **detection** boxes are gathered from the same windows (MONAI hands the predictor each
  window's coordinates), shifted back to image coordinates and merged with torchvision's
  ``batched_nms``; a box cut by an inner window edge is dropped when a whole box of the same class
  covers it, so an object split across two windows is reported once;
* **classification / retrieval** heads read the whole image resized to fit ``roi_size`` (aspect
  kept, padded with 0, the normalised mean), since a global label belongs to the whole image,
  not to any one window.

Images no larger than ``roi_size`` go through the model once, padded to it (centred, with 0, as
training padded them; models with a fixed input size need that) and cut back. The result has the
format of ``model(images)["outputs"]``, so metrics and writers take it as is. Used by the
evaluation during training (``bigmodel.engine``) and by evaluation/prediction on files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_area

__all__ = ["fit_to_size", "needs_windows", "whole_image_outputs"]

# Pixels from an inner window edge within which a predicted box counts as cut by that edge.
_EDGE_MARGIN = 1.0
# Share of a cut box's area that a whole box of its class must cover for the cut one to go.
_COVERED = 0.5


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def needs_windows(image_size: tuple[int, int], roi_size: int | tuple[int, int]) -> bool:
    """True when an image of ``image_size`` (H, W) exceeds ``roi_size`` along some side."""
    roi = _pair(roi_size)
    return image_size[0] > roi[0] or image_size[1] > roi[1]


def fit_to_size(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize ``[B, C, H, W]`` to fit ``size`` with its aspect kept, then pad (centred) with 0."""
    height, width = images.shape[-2:]
    target_h, target_w = _pair(size)
    scale = min(target_h / height, target_w / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = F.interpolate(
        images.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True
    ).to(images.dtype)
    pad_h, pad_w = target_h - new_h, target_w - new_w
    return F.pad(resized, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


def _head_types(model: nn.Module) -> dict[str, str]:
    configs = getattr(model, "head_configs", None)
    if configs is None:
        raise TypeError(
            "whole_image_outputs needs a bigmodel MultiTaskModel (with head_configs); pass the "
            "unwrapped model (Distributed.module), not a DDP/DeepSpeed wrapper"
        )
    return {name: cfg.type for name, cfg in configs.items()}


class _WindowPredictor:
    """The predictor MONAI calls per batch of windows: segmentation logits out, boxes kept aside.

    MONAI blends only tensors, so detections (lists of dicts) are collected here with each
    window's offset in the (unpadded) image; a one-channel coverage map is always returned too,
    which also gives detection-only models a tensor for MONAI to blend.
    """

    def __init__(
        self,
        model: nn.Module,
        seg_heads: list[str],
        det_heads: list[str],
        pad: tuple[int, int],
        batch_size: int,
    ) -> None:
        self.model = model
        self.seg_heads = seg_heads
        self.det_heads = det_heads
        self.pad = pad  # (top, left) padding MONAI added when the image is smaller than a window
        self.boxes: dict[str, list[list[dict[str, Tensor]]]] = {
            name: [[] for _ in range(batch_size)] for name in det_heads
        }
        self.windows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(batch_size)]

    def __call__(self, windows: Tensor, coords: list[list[slice]]) -> dict[str, Tensor]:
        outputs = self.model(windows)["outputs"]
        for i, coord in enumerate(coords):
            index = coord[0].start
            top, left = coord[2].start - self.pad[0], coord[3].start - self.pad[1]
            window = (top, left, coord[2].stop - self.pad[0], coord[3].stop - self.pad[1])
            self.windows[index].append(window)
            for name in self.det_heads:
                self.boxes[name][index].append({**outputs[name][i], "window": window})
        blended = {name: outputs[name].float() for name in self.seg_heads}
        blended["_coverage"] = windows.new_ones((len(windows), 1, *windows.shape[-2:])).float()
        return blended


def _cut_by_inner_edge(
    boxes: Tensor, window: tuple[int, int, int, int], image_size: tuple[int, int]
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


def _padded_pass(
    model: nn.Module, images: Tensor, roi: tuple[int, int], types: dict[str, str]
) -> dict[str, Any]:
    """One forward of images smaller than ``roi``, padded (centred, 0) as training padded them.

    Models with a fixed input size (ViTs) need the training size; outputs are cut back to the
    image: segmentation cropped, boxes shifted and clipped.
    """
    height, width = images.shape[-2:]
    top, left = (roi[0] - height) // 2, (roi[1] - width) // 2
    padded = F.pad(images, [left, roi[1] - width - left, top, roi[0] - height - top])
    outputs = dict(model(padded)["outputs"])
    for name, kind in types.items():
        if kind == "segmentation":
            outputs[name] = outputs[name][..., top : top + height, left : left + width]
        elif kind == "detection":
            shifted = []
            for det in outputs[name]:
                boxes = det["boxes"] - det["boxes"].new_tensor([left, top, left, top])
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
                det = {**det, "boxes": boxes}
                if "masks" in det:
                    det["masks"] = det["masks"][..., top : top + height, left : left + width]
                shifted.append(det)
            outputs[name] = shifted
    return outputs


def _global_view(images: Tensor, roi: tuple[int, int]) -> Tensor:
    """The whole image as global heads saw images in training: shrunk to fit, padded to ``roi``."""
    height, width = images.shape[-2:]
    if height <= roi[0] and width <= roi[1]:
        top, left = (roi[0] - height) // 2, (roi[1] - width) // 2
        return F.pad(images, [left, roi[1] - width - left, top, roi[0] - height - top])
    return fit_to_size(images, roi)


@torch.no_grad()
def whole_image_outputs(
    model: nn.Module,
    images: Tensor,
    roi_size: int | tuple[int, int],
    overlap: float = 0.5,
    sw_batch_size: int = 8,
    mode: str = "gaussian",
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """``model(images)["outputs"]`` for images of any size, from ``roi_size`` windows.

    Args:
        model: a plain (unwrapped) :class:`~bigmodel.models.MultiTaskModel` in eval mode; under
            autocast when the caller wants it.
        images: normalised ``[B, C, H, W]``.
        roi_size: the window side(s) (H, W), normally ``data.image_size`` of training.
        overlap: fraction by which neighbouring windows overlap (nnU-Net uses 0.5).
        sw_batch_size: windows per forward pass.
        mode: MONAI blend mode, ``gaussian`` (centre-weighted) or ``constant``.
        iou_threshold: IoU above which two boxes of one class are the same object.

    Returns:
        One entry per head: segmentation ``[B, K, H, W]`` logits (blended), detection a list of
        ``{"boxes", "scores", "labels"}`` per image in image coordinates, classification and
        retrieval as the model gives them for the resized whole image.
    """
    size = (int(images.shape[-2]), int(images.shape[-1]))
    roi = _pair(roi_size)
    if size == roi:
        return model(images)["outputs"]
    types = _head_types(model)
    if not needs_windows(size, roi):
        return _padded_pass(model, images, roi, types)
    seg = [name for name, kind in types.items() if kind == "segmentation"]
    det = [name for name, kind in types.items() if kind == "detection"]
    pad = (max(0, roi[0] - size[0]) // 2, max(0, roi[1] - size[1]) // 2)
    predictor = _WindowPredictor(model, seg, det, pad, len(images))
    outputs: dict[str, Any] = {}
    if seg or det:
        # Imported here, not at the top: ``import monai`` loads most of MONAI (and MLflow), tens
        # of seconds on a busy node, and every training worker imports this module for its
        # evaluation while most runs never need a window (images of the training size).
        from monai.inferers import sliding_window_inference

        blended = sliding_window_inference(
            images,
            roi_size=roi,
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode=mode,
            with_coord=True,
        )
        outputs.update({name: blended[name] for name in seg})
        outputs["_coverage"] = blended["_coverage"]
        for name in det:
            keep = model.head_configs[name].detections_per_image
            outputs[name] = [
                _merge_boxes(parts, size, iou_threshold, keep) for parts in predictor.boxes[name]
            ]
    if len(seg) + len(det) < len(types):
        whole = model(_global_view(images, roi))["outputs"]
        outputs.update({name: whole[name] for name in types if name not in outputs})
    coverage = outputs.pop("_coverage", None)
    if coverage is not None and not bool((coverage > 0).all()):
        # MONAI's windows tile the image by construction; this guards our offsets, not MONAI.
        raise RuntimeError("sliding window left pixels without a prediction")
    return {name: outputs[name] for name in types}
