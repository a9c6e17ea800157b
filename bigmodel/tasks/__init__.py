"""The task table: one entry per head type, each owning everything done for that type.

``TASKS[type]`` (``type`` is the ``type`` field of a head's config) is a :class:`Task`: its head,
loss and metric group (plain classes), the facts config validation checks (read from its head
config class, so the schema checks heads without torch), and what is done with the head's
outputs (to input pixels, across sliding windows, to numpy, the JSON summary of a prediction,
the evaluation report: see :mod:`bigmodel.tasks._base`). Model building, the metrics, the sliding
window, prediction, evaluation and export all ask the task; none compares type names. Adding a
task type is its module here, one entry below and its head config in ``bigmodel/config.py``.
"""

from __future__ import annotations

from typing import Any

from bigmodel.tasks._base import EvalRun, Evaluation, SummaryContext, Task
from bigmodel.tasks.classification import ClassificationTask
from bigmodel.tasks.contrastive import ContrastiveTask
from bigmodel.tasks.detection import DetectionTask
from bigmodel.tasks.retrieval import RetrievalTask
from bigmodel.tasks.segmentation import SegmentationTask

__all__ = ["TASKS", "EvalRun", "Evaluation", "SummaryContext", "Task", "task_of"]

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        ClassificationTask(),
        SegmentationTask(),
        DetectionTask(),
        RetrievalTask(),
        ContrastiveTask(),
    )
}
"""Every head type, by the ``type`` field of its config."""


def task_of(head_cfg: Any) -> Task:
    """The task of a head config."""
    return TASKS[head_cfg.type]
