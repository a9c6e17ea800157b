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


def _size(size: int | tuple[int, ...], spatial_dims: int = 2) -> tuple[int, ...]:
    """``size`` per spatial dimension (an int is the same along each)."""
    return (int(size),) * spatial_dims if isinstance(size, int) else tuple(int(s) for s in size)


def needs_windows(image_size: tuple[int, ...], roi_size: int | tuple[int, ...]) -> bool:
    """True when an image of spatial ``image_size`` ((D,) H, W) exceeds ``roi_size`` somewhere."""
    roi = _size(roi_size, len(image_size))
    return any(side > window for side, window in zip(image_size, roi, strict=True))


def _centre_pad(images: Tensor, roi: tuple[int, ...]) -> tuple[Tensor, tuple[int, ...]]:
    """Images no larger than ``roi`` padded to it (centred, with 0), and where they now start."""
    shape = images.shape[2:]
    offset = tuple((r - s) // 2 for s, r in zip(shape, roi, strict=True))
    pad: list[int] = []
    for s, r, o in reversed(list(zip(shape, roi, offset, strict=True))):  # F.pad: last dim first
        pad += [o, r - s - o]
    return F.pad(images, pad), offset


def fit_to_size(images: Tensor, size: int | tuple[int, ...]) -> Tensor:
    """Resize ``[B, C, *spatial]`` to fit ``size`` with its aspect kept, then pad (centred) with 0.

    Bilinear with antialiasing in 2D; trilinear in 3D (torch antialiases 2D only).
    """
    shape = images.shape[2:]
    target = _size(size, len(shape))
    scale = min(t / s for t, s in zip(target, shape, strict=True))
    new = tuple(max(1, round(s * scale)) for s in shape)
    if len(shape) == 2:
        resized = F.interpolate(
            images.float(), size=new, mode="bilinear", align_corners=False, antialias=True
        )
    else:
        resized = F.interpolate(images.float(), size=new, mode="trilinear", align_corners=False)
    return _centre_pad(resized.to(images.dtype), target)[0]


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
        pad: tuple[int, ...],
        batch_size: int,
    ) -> None:
        self.model = model
        self.blend = [name for name, task in tasks.items() if task.window == "blend"]
        self.gather = {name: task for name, task in tasks.items() if task.window == "gather"}
        # per spatial dimension, the padding MONAI added before where the image is smaller than
        # a window
        self.pad = pad
        self.parts: dict[str, list[list[Any]]] = {
            name: [[] for _ in range(batch_size)] for name in self.gather
        }
        self.windows: list[list[tuple[int, ...]]] = [[] for _ in range(batch_size)]

    def __call__(self, windows: Tensor, coords: list[list[slice]]) -> dict[str, Tensor]:
        outputs = self.model(windows)["outputs"]
        for i, coord in enumerate(coords):
            index = coord[0].start  # coord: batch, channel, then one slice per spatial dim
            spatial = list(zip(coord[2:], self.pad, strict=True))
            # the window's starts, then its stops, in the unpadded image's pixels
            window = (*(c.start - p for c, p in spatial), *(c.stop - p for c, p in spatial))
            self.windows[index].append(window)
            for name, task in self.gather.items():
                self.parts[name][index].append(task.window_part(outputs[name][i], window))
        blended = {name: outputs[name].float() for name in self.blend}
        blended["_coverage"] = windows.new_ones((len(windows), 1, *windows.shape[2:])).float()
        return blended


def _padded_pass(
    model: nn.Module, images: Tensor, roi: tuple[int, ...], tasks: dict[str, Task]
) -> dict[str, Any]:
    """One forward of images smaller than ``roi``, padded (centred, 0) as training padded them.

    Models with a fixed input size (ViTs) need the training size; each head's task cuts its
    output back to the image (``Task.crop``: maps cropped, boxes shifted and clipped).
    """
    padded, offset = _centre_pad(images, roi)
    outputs = dict(model(padded)["outputs"])
    shape = tuple(int(s) for s in images.shape[2:])
    return {name: task.crop(outputs[name], offset, shape) for name, task in tasks.items()}


def _global_view(images: Tensor, roi: tuple[int, ...]) -> Tensor:
    """The whole image as global heads saw images in training: shrunk to fit, padded to ``roi``."""
    if not needs_windows(tuple(images.shape[2:]), roi):
        return _centre_pad(images, roi)[0]
    return fit_to_size(images, roi)


@torch.no_grad()
def whole_image_outputs(
    model: nn.Module,
    images: Tensor,
    roi_size: int | tuple[int, ...],
    overlap: float = 0.5,
    sw_batch_size: int = 8,
    mode: str = "gaussian",
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """``model(images)["outputs"]`` for images of any size, from ``roi_size`` windows.

    Args:
        model: a plain (unwrapped) :class:`~bigmodel.models.MultiTaskModel` in eval mode; under
            autocast when the caller wants it.
        images: normalised ``[B, C, *spatial]`` (``spatial_dims`` = ``images.ndim - 2``: 2D
            images or 3D volumes).
        roi_size: the window side(s) ((D,) H, W), normally ``data.image_size`` of training.
        overlap: fraction by which neighbouring windows overlap (nnU-Net uses 0.5).
        sw_batch_size: windows per forward pass.
        mode: MONAI blend mode, ``gaussian`` (centre-weighted) or ``constant``.
        iou_threshold: IoU above which two boxes of one class are the same object.

    Returns:
        One entry per head: segmentation ``[B, K, *spatial]`` logits (blended), detection a list of
        ``{"boxes", "scores", "labels"}`` per image in image coordinates, classification and
        retrieval as the model gives them for the resized whole image.
    """
    size = tuple(int(s) for s in images.shape[2:])
    roi = _size(roi_size, len(size))
    if size == roi:
        return model(images)["outputs"]
    tasks = _head_tasks(model)
    if not needs_windows(size, roi):
        return _padded_pass(model, images, roi, tasks)
    pad = tuple(max(0, r - s) // 2 for s, r in zip(size, roi, strict=True))
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
