"""Classification (multi-class or multi-label): one label per image from the pooled features.

Outputs are logits ``[B, K]`` of the whole image (the sliding window reads the image shrunk to
fit one window: a global label belongs to the whole image, not to any window). As numpy they are
probabilities (softmax, or sigmoid per class when multi-label). The evaluation report adds
bootstrap intervals of accuracy, balanced accuracy and AUROC over patients, a per-class table,
the confusion matrix, ROC and PR curves, and each patient's diagnosis from the mean probability
of its slices.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)

from bigmodel.tasks import _plots
from bigmodel.tasks._base import EvalRun, Evaluation, SummaryContext, Task
from bigmodel.tasks._stats import interval
from bigmodel.tasks.heads.classification import ClassificationHead
from bigmodel.tasks.losses import ClassificationLoss
from bigmodel.tasks.metrics import ClassificationMetrics

__all__ = ["ClassificationTask"]


def _probabilities(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return logits.float().sigmoid() if multilabel else logits.float().softmax(dim=1)


class ClassificationTask(Task):
    name = "classification"
    head = ClassificationHead
    loss = ClassificationLoss
    metrics = ClassificationMetrics

    def to_numpy(self, output: Any, cfg: Any) -> Any:
        """Class probabilities ``[N, K]``."""
        return _probabilities(output, getattr(cfg, "multilabel", False)).cpu().numpy()

    def summary(self, head: str, value: Any, classes: list[str], ctx: SummaryContext) -> dict:
        """The mean probability per class and the predicted class (per slice too, for volumes)."""
        names = classes or [str(k) for k in range(value.shape[1])]
        mean = value.mean(axis=0)
        entry: dict[str, Any] = {
            "probabilities": {c: round(float(p), 6) for c, p in zip(names, mean, strict=True)},
            "predicted": names[int(mean.argmax())],
        }
        if ctx.study.is_volume:
            entry["note"] = "volume probabilities are the mean over its slices"
            entry["per_slice_predicted"] = [names[int(k)] for k in value.argmax(axis=1)]
        return entry

    def one_line(self, head: str, entry: dict) -> str | None:
        probability = entry["probabilities"][entry["predicted"]]
        return f"{head}={entry['predicted']} (p {probability:.2f})"

    def evaluation(self, head: str, cfg: Any, classes: list[str]) -> Evaluation:
        return ClassificationEvaluation(head, cfg, classes)


class ClassificationEvaluation(Evaluation):
    """Logits and labels of every sample, for intervals, tables and curves."""

    def __init__(self, head: str, cfg: Any, classes: list[str]) -> None:
        super().__init__(head, cfg, classes)
        self.logits: list[torch.Tensor] = []
        self.cls: list[torch.Tensor] = []
        self.has_cls: list[torch.Tensor] = []

    def add(self, output: Any, batch: dict[str, Any]) -> None:
        self.logits.append(output.float().cpu())
        if "cls" in batch:
            self.cls.append(batch["cls"])
            self.has_cls.append(batch["has"]["cls"])

    def _data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.logits), torch.cat(self.cls), torch.cat(self.has_cls)

    def report(self, run: EvalRun, report: dict[str, Any], per_sample: dict[str, list]) -> None:
        head, classes = self.head, self.classes
        multilabel = getattr(self.cfg, "multilabel", False)
        report["ci95"] |= self._intervals(run.patient, run.counts)
        rows, matrix = self._per_class(run.figures)
        report["per_class"][head] = rows
        probs = _probabilities(torch.cat(self.logits), multilabel).numpy()
        per_sample[f"{head}_predicted"] = [classes[int(k)] for k in probs.argmax(axis=1)]
        per_sample[f"{head}_prob_max"] = probs.max(axis=1).round(4).tolist()
        patient_probs = np.zeros((len(run.patients), probs.shape[1]))
        np.add.at(patient_probs, run.patient, probs)
        patient_probs /= np.bincount(run.patient, minlength=len(run.patients))[:, None]
        report["per_patient"][head] = {
            n: classes[int(p.argmax())] for n, p in zip(run.patients, patient_probs, strict=True)
        }
        if matrix is not None:
            report["plots"][f"{head}_confusion"] = str(
                _plots.confusion_matrix_png(
                    matrix, classes, f"{head} ({run.split})", run.out / f"{head}_confusion.png"
                )
            )
        curves = self._curves(multilabel)
        if curves:
            aurocs = {
                c: run.figures.get(f"{head}/auroc_{i}", math.nan) for i, c in enumerate(classes)
            }
            report["plots"][f"{head}_roc_pr"] = str(
                _plots.roc_pr_png(curves, aurocs, head, run.out / f"{head}_roc_pr.png")
            )

    def _intervals(self, patient: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
        """Accuracy / balanced accuracy / AUROC intervals: the head's metric on resampled data."""
        logits, target, has = self._data()
        with warnings.catch_warnings():
            # A replicate may draw patients of one class only: its AUROC is NaN, which the
            # percentile interval skips; torchmetrics' warning about it is noise here.
            warnings.simplefilter("ignore", UserWarning)
            figures = self._replicates(logits, target, has, patient, counts)
        return {f"{self.head}/{k}": interval(np.array(v, dtype=float)) for k, v in figures.items()}

    def _replicates(self, logits, target, has, patient, counts) -> dict[str, list[float]]:
        cfg = self.cfg
        figures: dict[str, list[float]] = {}
        for row in counts:
            index = torch.from_numpy(np.repeat(np.arange(len(patient)), row[patient]))
            metric = ClassificationMetrics(self.head, cfg)
            metric.update(
                logits[index], {cfg.target: target[index], "has": {cfg.target: has[index]}}
            )
            computed = metric.compute()
            for name in ("accuracy", "balanced_accuracy", "auroc"):
                figures.setdefault(name, []).append(computed[name])
        return figures

    def _per_class(self, figures: dict) -> tuple[list[dict], np.ndarray | None]:
        logits, target, has = self._data()
        keep = has & (target >= 0) if target.ndim == 1 else has
        rows, matrix = [], None
        if target.ndim == 1:
            pred = logits[keep].argmax(dim=1).numpy()
            truth = target[keep].numpy()
            k = len(self.classes)
            matrix = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
            for c, name in enumerate(self.classes):
                support, predicted = int(matrix[c].sum()), int(matrix[:, c].sum())
                rows.append(
                    {
                        "class": name,
                        "support": support,
                        "sensitivity": matrix[c, c] / support if support else math.nan,
                        "precision": matrix[c, c] / predicted if predicted else math.nan,
                        "auroc": figures.get(f"{self.head}/auroc_{c}", math.nan),
                    }
                )
        return rows, matrix

    def _curves(self, multilabel: bool) -> dict:
        """One-vs-rest ROC and PR curves per class (torchmetrics' binary curves)."""
        logits, target, has = self._data()
        probs = logits.sigmoid() if multilabel else logits.softmax(dim=1)
        curves = {}
        for c, name in enumerate(self.classes):
            truth = target[:, c] if multilabel else (target == c).long()
            keep = has & (truth >= 0) & ((target >= 0) if target.ndim == 1 else True)
            truth, score = truth[keep], probs[keep, c]
            if truth.numel() == 0 or truth.min() == truth.max():
                continue  # one class only: no curve
            fpr, tpr, _ = binary_roc(score, truth)
            precision, recall, _ = binary_precision_recall_curve(score, truth)
            curves[name] = {
                "fpr": fpr.numpy(),
                "tpr": tpr.numpy(),
                "precision": precision.numpy(),
                "recall": recall.numpy(),
                "ap": float(binary_average_precision(score, truth)),
            }
        return curves
