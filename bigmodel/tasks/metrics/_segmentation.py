"""Segmentation figures: Dice and IoU per class and their mean over the foreground classes.

Both come from one pixel confusion matrix accumulated over the whole evaluation set (torchmetrics
``MulticlassConfusionMatrix`` with the mask's ignore index), so a class's Dice is
``2 TP / (2 TP + FP + FN)`` over all its pixels; the state is a ``K x K`` sum, cheap to sync.
torchmetrics' ``DiceScore``/``MeanIoU`` average per image and take no ignore index, which the
batch contract needs (``255`` where a mask is not annotated).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from bigmodel.config import SegmentationHeadConfig
from bigmodel.tasks.metrics._common import NAN, labelled_mask, require_num_classes


class SegmentationMetrics(nn.Module):
    """Dice and IoU per class, and ``dice_mean``/``iou_mean`` over classes 1..K-1.

    Class 0 is background: it dominates the pixel count and would inflate a mean taken over all
    classes, so the means cover the foreground classes (all classes when there is only one).
    A class with no pixel in either the targets or the predictions has no Dice (NaN) and is left
    out of the mean.
    """

    def __init__(self, name: str, cfg: SegmentationHeadConfig) -> None:
        super().__init__()
        require_num_classes(name, cfg.num_classes)
        self.name = name
        self.target = cfg.target
        self.num_classes = cfg.num_classes
        self.ignore_index = cfg.ignore_index
        # Targets are validated in update() with messages naming the head.
        self.confmat = MulticlassConfusionMatrix(
            num_classes=cfg.num_classes, ignore_index=cfg.ignore_index, validate_args=False
        )

    def update(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Add one batch of logits ``[B, K, *spatial]`` and the batch's masks ``[B, *spatial]``
        (2D or 3D: the confusion matrix counts pixels or voxels alike)."""
        if logits.ndim not in (4, 5) or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"head {self.name!r}: segmentation logits must be [B, {self.num_classes}, "
                f"(D,) H, W], got {list(logits.shape)}"
            )
        device = self.confmat.device
        mask = torch.as_tensor(batch[self.target]).to(device).long()
        if mask.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"head {self.name!r}: batch[{self.target!r}] is {list(mask.shape)} but the logits "
                f"are {list(logits.shape)}; masks must be [B, H, W] at the logits' resolution"
            )
        keep = labelled_mask(batch, self.target, logits.shape[0]).to(device)
        if not keep.any():
            return
        mask = mask[keep]
        bad = ((mask < 0) | (mask >= self.num_classes)) & (mask != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"head {self.name!r}: batch[{self.target!r}] holds label {mask[bad][0].item()}, "
                f"outside 0..{self.num_classes - 1} and not the ignore index "
                f"{self.ignore_index}; check num_classes / ignore_index"
            )
        preds = logits.detach()[keep.to(logits.device)].argmax(dim=1).to(device)
        self.confmat.update(preds.flatten(), mask.flatten())

    def compute(self) -> dict[str, float]:
        """Figures over every annotated pixel seen since reset, gathered from all ranks."""
        confmat = self.confmat.compute().double()  # rows: true class, columns: predicted
        tp = confmat.diagonal()
        fp = confmat.sum(dim=0) - tp
        fn = confmat.sum(dim=1) - tp
        seen = (tp + fp + fn) > 0
        dice = torch.where(seen, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.nan)
        iou = torch.where(seen, tp / (tp + fp + fn).clamp(min=1), torch.nan)
        foreground = slice(1, None) if self.num_classes > 1 else slice(None)
        out = {"count": float(confmat.sum())}  # annotated pixels
        out["dice_mean"] = _nanmean(dice[foreground])
        out["iou_mean"] = _nanmean(iou[foreground])
        out |= {f"dice_{k}": float(v) for k, v in enumerate(dice)}
        out |= {f"iou_{k}": float(v) for k, v in enumerate(iou)}
        return out

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.confmat.reset()


def _nanmean(values: torch.Tensor) -> float:
    return float(values.nanmean()) if (~values.isnan()).any() else NAN
