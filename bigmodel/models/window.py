"""Whole-image outputs of a multi-task model on images larger than the training size.

A model trained on ``roi_size`` crops sees a 512 x 512 CT slice in three ways at once, as each
head's task (:data:`bigmodel.tasks.TASKS`, ``Task.window``) says:

* ``blend`` (segmentation): logits come from MONAI's ``sliding_window_inference``: overlapping
  windows of ``roi_size``, blended with a Gaussian importance map (nnU-Net's scheme: window
  centres count more than their borders), so every pixel gets a prediction;
* ``gather`` (detection): each window's output is kept with the window's place in the image
  (MONAI hands the predictor each window's coordinates) and the task merges them per image
  (``Task.merge_windows``: boxes shifted back, duplicates across windows removed);
* ``whole`` (classification, retrieval): the head reads the whole image resized to fit
  ``roi_size`` (aspect kept, padded with 0, the normalised mean), since a global label belongs
  to the whole image, not to any one window.

Images no larger than ``roi_size`` go through the model once, padded to it (centred, with 0, as
training padded them; models with a fixed input size need that) and cut back (``Task.crop``). The result has the
format of ``model(images)["outputs"]``, so metrics and writers take it as is. Used by the
evaluation during training (``bigmodel.engine``) and by evaluation/prediction on files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigmodel.tasks import TASKS, Task

__all__ = ["fit_to_size", "needs_windows", "whole_image_outputs"]


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


def _head_tasks(model: nn.Module) -> dict[str, Task]:
    configs = getattr(model, "head_configs", None)
    if configs is None:
        raise TypeError(
            "whole_image_outputs needs a bigmodel MultiTaskModel (with head_configs); pass the "
            "unwrapped model (Distributed.module), not a DDP/DeepSpeed wrapper"
        )
    return {name: TASKS[cfg.type] for name, cfg in configs.items()}


class _WindowPredictor:
    """The predictor MONAI calls per batch of windows: maps to blend out, other parts kept aside.

    MONAI blends only tensors, so the outputs of ``gather`` heads (detections: lists of dicts)
    are kept here, each with its window's place in the (unpadded) image; a one-channel coverage
    map is always returned too, which also gives models without a ``blend`` head a tensor for
    MONAI to blend.
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: dict[str, Task],
        pad: tuple[int, int],
        batch_size: int,
    ) -> None:
        self.model = model
        self.blend = [name for name, task in tasks.items() if task.window == "blend"]
        self.gather = {name: task for name, task in tasks.items() if task.window == "gather"}
        self.pad = pad  # (top, left) padding MONAI added when the image is smaller than a window
        self.parts: dict[str, list[list[Any]]] = {
            name: [[] for _ in range(batch_size)] for name in self.gather
        }
        self.windows: list[list[tuple[int, int, int, int]]] = [[] for _ in range(batch_size)]

    def __call__(self, windows: Tensor, coords: list[list[slice]]) -> dict[str, Tensor]:
        outputs = self.model(windows)["outputs"]
        for i, coord in enumerate(coords):
            index = coord[0].start
            top, left = coord[2].start - self.pad[0], coord[3].start - self.pad[1]
            window = (top, left, coord[2].stop - self.pad[0], coord[3].stop - self.pad[1])
            self.windows[index].append(window)
            for name, task in self.gather.items():
                self.parts[name][index].append(task.window_part(outputs[name][i], window))
        blended = {name: outputs[name].float() for name in self.blend}
        blended["_coverage"] = windows.new_ones((len(windows), 1, *windows.shape[-2:])).float()
        return blended


def _padded_pass(
    model: nn.Module, images: Tensor, roi: tuple[int, int], tasks: dict[str, Task]
) -> dict[str, Any]:
    """One forward of images smaller than ``roi``, padded (centred, 0) as training padded them.

    Models with a fixed input size (ViTs) need the training size; each head's task cuts its
    output back to the image (``Task.crop``: maps cropped, boxes shifted and clipped).
    """
    height, width = images.shape[-2:]
    top, left = (roi[0] - height) // 2, (roi[1] - width) // 2
    padded = F.pad(images, [left, roi[1] - width - left, top, roi[0] - height - top])
    outputs = dict(model(padded)["outputs"])
    for name, task in tasks.items():
        outputs[name] = task.crop(outputs[name], (top, left), (height, width))
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
    tasks = _head_tasks(model)
    if not needs_windows(size, roi):
        return _padded_pass(model, images, roi, tasks)
    pad = (max(0, roi[0] - size[0]) // 2, max(0, roi[1] - size[1]) // 2)
    predictor = _WindowPredictor(model, tasks, pad, len(images))
    outputs: dict[str, Any] = {}
    if predictor.blend or predictor.gather:
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
        outputs.update({name: blended[name] for name in predictor.blend})
        outputs["_coverage"] = blended["_coverage"]
        for name, task in predictor.gather.items():
            cfg = model.head_configs[name]
            outputs[name] = [
                task.merge_windows(parts, size, cfg, iou_threshold)
                for parts in predictor.parts[name]
            ]
    if len(predictor.blend) + len(predictor.gather) < len(tasks):
        whole = model(_global_view(images, roi))["outputs"]
        outputs.update({name: whole[name] for name in tasks if name not in outputs})
    coverage = outputs.pop("_coverage", None)
    if coverage is not None and not bool((coverage > 0).all()):
        # MONAI's windows tile the image by construction; this guards our offsets, not MONAI.
        raise RuntimeError("sliding window left pixels without a prediction")
    return {name: outputs[name] for name in tasks}
