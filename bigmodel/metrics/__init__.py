"""Evaluation metrics of a multi-task model, as one flat dict of named figures.

``build_metrics(model_cfg)`` gives a :class:`MetricSet` with one metric group per head, picked by
the head's type from the task table (:data:`bigmodel.tasks.TASKS`; the groups live in
:mod:`bigmodel.tasks.metrics`). Everything underneath is torchmetrics, so the figures
are synced across ranks when ``torch.distributed`` is initialised: ``compute()`` gathers the
states of every rank (call it on all ranks) and every rank gets the same numbers.

Figures are named ``"{head}/{metric}"``:

* classification: ``accuracy``, ``balanced_accuracy``, ``auroc`` (macro), ``auroc_{k}``;
* segmentation: ``dice_mean``, ``iou_mean`` (foreground classes), ``dice_{k}``, ``iou_{k}``;
* detection: ``map`` (COCO mAP@[.5:.95]), ``map_50``, ``map_75``, ``mar_100``, ``precision_50``,
  ``recall_50`` (IoU .5, score >= 0.5);
* retrieval: ``recall@1``, ``recall@5``, ``recall@10``, ``map@r``;
* every head: ``count``, the labelled samples (pixels for segmentation, known labels for
  multi-label classification) the figures are computed over.

A figure that is undefined on the data seen (no labels at all, a class never present) is NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bigmodel.config import ModelConfig
from bigmodel.tasks import TASKS
from bigmodel.tasks.metrics import (
    ClassificationMetrics,
    DetectionMetrics,
    RetrievalMetrics,
    SegmentationMetrics,
)

__all__ = [
    "ClassificationMetrics",
    "DetectionMetrics",
    "MetricSet",
    "RetrievalMetrics",
    "SegmentationMetrics",
    "build_metrics",
]


class MetricSet(nn.Module):
    """The metric groups of all heads of one model; move it with ``.to(device)``."""

    def __init__(self, groups: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.groups = nn.ModuleDict(groups)

    def update(self, outputs: Mapping[str, Any], batch: Mapping[str, Any]) -> None:
        """Add one evaluation batch.

        Args:
            outputs: the model's ``"outputs"`` dict, ``{head_name: output}``.
            batch: the batch it came from (labels and ``has`` flags, see docs/contracts.md).
        """
        missing = [name for name in self.groups if name not in outputs]
        if missing:
            raise KeyError(
                f"model outputs lack heads {missing} (got {sorted(outputs)}); pass "
                "model(images)['outputs'] of the model these metrics were built for"
            )
        with torch.no_grad():
            for name, group in self.groups.items():
                group.update(outputs[name], batch)

    def compute(self) -> dict[str, float]:
        """All figures, ``{"{head}/{metric}": value}``; collective, so call it on every rank."""
        figures: dict[str, float] = {}
        with warnings.catch_warnings():
            # Both cases are handled here (the figure becomes NaN), so torchmetrics' warnings
            # about them are noise: a rank or head that saw no labelled sample, and a class with
            # no positive sample (AUROC undefined).
            warnings.filterwarnings("ignore", message=r".*was called before the ``update``")
            warnings.filterwarnings("ignore", message=r"No positive samples in targets")
            warnings.filterwarnings("ignore", message=r"No negative samples in targets")
            for name, group in self.groups.items():
                figures |= {f"{name}/{m}": value for m, value in group.compute().items()}
        return figures

    def reset(self) -> None:
        """Forget everything seen so far (e.g. before each evaluation pass)."""
        for group in self.groups.values():
            group.reset()


def build_metrics(model_cfg: ModelConfig) -> MetricSet:
    """One metric group per head of ``model_cfg``, each built from that head's config."""
    return MetricSet(
        {name: TASKS[head.type].metrics(name, head) for name, head in model_cfg.heads.items()}
    )
