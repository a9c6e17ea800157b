"""The task table: everything the project knows about a head type, in one entry.

``TASKS[type]`` (``type`` is the ``type`` field of a head's config) names the head module, its
loss and its metric group, the batch fields (docs/contracts.md) it can learn from, and the fewest
classes it can have. Config validation (:mod:`bigmodel.config`), model building
(:mod:`bigmodel.models.build`) and the metrics (:mod:`bigmodel.metrics`) all read this table, so
adding a task type is one entry here plus its classes (a head config in ``bigmodel/config.py``
and its head, loss and metric modules).

The head, loss and metric classes are named, not imported: ``bigmodel.config`` reads this table
when a config is loaded, and light command-line tools load configs without torch, timm or
torchmetrics (importing them costs seconds). :class:`Lazy` imports a class on first use; a test
resolves every entry, so a misspelt name fails the suite rather than a run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TASKS", "Lazy", "Task"]


@dataclass(frozen=True)
class Lazy:
    """A class named by module and attribute, imported on first use; calling it constructs one."""

    module: str
    name: str

    def resolve(self) -> Any:
        """The named class (imported now if it was not yet)."""
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def _always(cfg: Any) -> bool:
    return True


@dataclass(frozen=True)
class Task:
    """One head type: its modules and the facts config validation checks up front."""

    head: Lazy
    """``head(channels, reductions, cfg)``: the module reading the backbone's feature maps."""
    loss: Lazy
    """``loss(cfg)``: the module turning ``(output, target, has)`` into a loss (bigmodel.losses)."""
    metrics: Lazy
    """``metrics(name, cfg)``: the metric group reporting ``{head}/{figure}`` (bigmodel.metrics)."""
    targets: tuple[str, ...]
    """Batch fields the head can learn from (its config's ``target`` must be one of them)."""
    min_classes: int
    """Fewest ``num_classes`` that make sense for this head type."""
    classes_note: str = ""
    """Why ``min_classes`` is what it is, appended to the error refusing fewer."""
    needs_classes: Callable[[Any], bool] = field(default=_always)
    """Whether a head config needs ``num_classes`` (filled from the manifest) to be built."""


TASKS: dict[str, Task] = {
    "classification": Task(
        head=Lazy("bigmodel.models.heads.classification", "ClassificationHead"),
        loss=Lazy("bigmodel.losses", "ClassificationLoss"),
        metrics=Lazy("bigmodel.metrics._classification", "ClassificationMetrics"),
        targets=("cls",),
        min_classes=1,
    ),
    "segmentation": Task(
        head=Lazy("bigmodel.models.heads.segmentation", "SegmentationHead"),
        loss=Lazy("bigmodel.losses", "SegmentationLoss"),
        metrics=Lazy("bigmodel.metrics._segmentation", "SegmentationMetrics"),
        targets=("mask",),
        min_classes=2,
        classes_note="segmentation counts background as class 0",
    ),
    "detection": Task(
        head=Lazy("bigmodel.models.heads.detection", "DetectionHead"),
        loss=Lazy("bigmodel.losses", "DetectionLoss"),
        metrics=Lazy("bigmodel.metrics._detection", "DetectionMetrics"),
        targets=("boxes",),
        min_classes=1,
    ),
    "retrieval": Task(
        head=Lazy("bigmodel.models.heads.retrieval", "RetrievalHead"),
        loss=Lazy("bigmodel.losses", "RetrievalLoss"),
        metrics=Lazy("bigmodel.metrics._retrieval", "RetrievalMetrics"),
        targets=("cls", "group"),
        min_classes=1,
        # Retrieval trained on patient groups has no class list; only ArcFace needs one.
        needs_classes=lambda cfg: cfg.metric_loss == "arcface",
    ),
}
"""Every head type, by the ``type`` field of its config."""
