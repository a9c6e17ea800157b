"""What every task type is: the base of the entries of :data:`bigmodel.tasks.TASKS`.

A :class:`Task` names its head, loss and metric group (plain classes), takes the facts config
validation checks (targets, fewest classes) from its head config class, and owns what is done
with its head's outputs, so inference, evaluation and export ask the task instead of comparing
type names (STYLE.md rule 14):

* **to input pixels**: :meth:`Task.crop` cuts the padding the model saw off (a model with a fixed
  input size pads small images), :meth:`Task.to_pixels` maps an output of a resized input back
  onto the input's grid;
* **across sliding windows**: :attr:`Task.window` says whether windows blend the output (dense
  maps), gather it per window for :meth:`Task.merge_windows` (boxes), or leave the head to read
  the whole image (global heads);
* **to numpy**: :meth:`Task.to_numpy` (probabilities, label maps, boxes, embeddings) and
  :meth:`Task.concat`;
* **the JSON summary** of a prediction on a file (:meth:`Task.summary`, :meth:`Task.one_line`);
* **the evaluation report**: :meth:`Task.evaluation` gives the records one head keeps during an
  evaluation pass and the tables, intervals and plots they become.

Spatial arguments are tuples with one entry per spatial dimension (``spatial_dims`` = their
length, as in MONAI), so one code path serves 2D and, later, 3D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from bigmodel.config import HEAD_CONFIGS

__all__ = ["SHOW", "EvalRun", "Evaluation", "SummaryContext", "Task"]

SHOW = 4
"""Images (detection) and queries (retrieval) shown in the pictures of an evaluation report."""


class Task:
    """One head type: its classes, its config facts, and what is done with its outputs."""

    name: ClassVar[str]
    """The ``type`` of the head configs this task serves."""
    head: type[nn.Module]
    """``head(channels, reductions, cfg)``: the module reading the backbone's feature maps."""
    loss: type[nn.Module]
    """``loss(cfg)``: the module turning ``(output, target, has)`` into a loss."""
    metrics: type[nn.Module]
    """``metrics(name, cfg)``: the metric group reporting ``{head}/{figure}``."""
    window: ClassVar[str] = "whole"
    """How sliding windows treat the output: ``blend`` (MONAI blends the windows' maps),
    ``gather`` (each window's output is kept for :meth:`merge_windows`) or ``whole`` (the head
    reads the whole image, shrunk to fit one window)."""
    export_refusal: ClassVar[str | None] = None
    """Why the head cannot be exported to ONNX / torch.export; None: it can."""

    @property
    def config(self) -> type:
        """The head config class (``bigmodel.config``) of this type."""
        return HEAD_CONFIGS[self.name]

    @property
    def targets(self) -> tuple[str, ...]:
        """Batch fields the head can learn from (its config's ``target`` must be one of them)."""
        return self.config.targets

    @property
    def min_classes(self) -> int:
        """Fewest ``num_classes`` that make sense for this head type."""
        return self.config.min_classes

    @property
    def classes_note(self) -> str:
        """Why ``min_classes`` is what it is."""
        return self.config.classes_note

    def needs_classes(self, cfg: Any) -> bool:
        """Whether a head config needs ``num_classes`` (filled from the manifest) to be built."""
        return cfg.needs_classes()

    # ---------------------------------------------------------------- to input pixels

    def crop(self, output: Any, offset: tuple[int, ...], shape: tuple[int, ...]) -> Any:
        """The output of a padded input, cut back to the input (at ``offset``, of ``shape``)."""
        return output

    def to_pixels(
        self,
        output: Any,
        offset: tuple[int, ...],
        size: tuple[int, ...],
        shape: tuple[int, ...],
        scale: float,
    ) -> Any:
        """The output of a resized input, on the input's grid.

        The input of spatial ``shape`` was resized by ``scale`` to ``size`` and placed at
        ``offset`` in what the model saw.
        """
        return output

    # ---------------------------------------------------------------- sliding windows

    def window_part(self, output: Any, window: tuple[int, ...]) -> Any:
        """What a ``gather`` task keeps of one window's output (``window``: the window's start
        per spatial dimension, then its stop, in image pixels)."""
        raise NotImplementedError(f"{self.name} outputs are not gathered across windows")

    def merge_windows(
        self, parts: list[Any], shape: tuple[int, ...], cfg: Any, iou_threshold: float
    ) -> Any:
        """One image's output from the parts its windows kept (``gather`` tasks)."""
        raise NotImplementedError(f"{self.name} outputs are not gathered across windows")

    # ---------------------------------------------------------------- to numpy

    def to_numpy(self, output: Any, cfg: Any) -> Any:
        """One batch's output as numpy, what ``Predictor.predict_arrays`` returns."""
        return output.float().cpu().numpy()

    def concat(self, chunks: list[Any]) -> Any:
        """The numpy outputs of consecutive batches as one."""
        return np.concatenate(chunks) if chunks else np.zeros((0,))

    # ---------------------------------------------------------------- prediction summary

    def summary(self, head: str, value: Any, classes: list[str], ctx: SummaryContext) -> dict:
        """The JSON summary of one head's prediction on one input file (files it writes too)."""
        raise NotImplementedError

    def one_line(self, head: str, entry: dict) -> str | None:
        """The head's part of the one-line report of a prediction; None: nothing to say."""
        return None

    # ---------------------------------------------------------------- evaluation

    def evaluation(self, head: str, cfg: Any, classes: list[str]) -> Evaluation:
        """The records one head keeps during an evaluation pass (``bigmodel-eval``)."""
        return Evaluation(head, cfg, classes)


@dataclass
class SummaryContext:
    """What a task's :meth:`Task.summary` knows of the input file and may ask the writer for."""

    study: Any
    """The input (``bigmodel.inference.files.Study``: ``is_volume``, ``spacing``, ``affine``,
    ``kind``)."""
    slice_dim: int
    """The volume axis (in ``[D, H, W]`` order) the model's 2D samples were cut along."""
    write_labels: Callable[[str, np.ndarray, list[str]], dict]
    """``write_labels(head, labels, classes)``: writes a label map (PNG, or NIfTI and DICOM SEG
    for a volume) and returns the summary entries naming the files."""


@dataclass
class EvalRun:
    """One evaluation pass as the per-head reports see it (``bigmodel.inference.evaluation``)."""

    split: str
    out: Path
    figures: dict[str, float]
    """The metric groups' figures, ``{head/figure: value}``."""
    keys: list[str]
    groups: list[str]
    patient: np.ndarray
    """Index of each sample's patient in ``patients``."""
    patients: list[str]
    counts: np.ndarray
    """Bootstrap replicates: ``[replicates, patients]`` draw counts."""
    samples_of: Callable[[set[str]], dict[str, dict]]
    """``samples_of(keys)``: those samples again (raw image and labels), for the pictures."""
    predict: Callable[[dict], dict[str, Any]]
    """``predict(sample)``: the model's whole-image outputs for one sample."""
    extra: dict[str, Any] = field(default_factory=dict)


class Evaluation:
    """One head's records during an evaluation pass, and what they add to the report.

    The base keeps nothing and reports nothing (a task without per-sample figures).
    """

    def __init__(self, head: str, cfg: Any, classes: list[str]) -> None:
        self.head = head
        self.cfg = cfg
        self.classes = classes

    def add(self, output: Any, batch: dict[str, Any]) -> None:
        """Keep what the report needs of one batch's output."""

    def report(self, run: EvalRun, report: dict[str, Any], per_sample: dict[str, list]) -> None:
        """Add the head's intervals, tables, per-patient figures and plots to ``report`` and its
        per-sample columns to ``per_sample``."""
