"""Classification figures: accuracy, balanced accuracy, AUROC per class and macro.

Multi-class heads get softmax probabilities and ``int64 [B]`` labels (``-1`` unknown); multi-label
heads get per-class sigmoid probabilities and ``[B, K]`` labels with ``-1`` where a label is
unknown. Unknown labels and samples without the task's label are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics.classification import (
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MultilabelAUROC,
    MultilabelStatScores,
)

from bigmodel.config import ClassificationHeadConfig
from bigmodel.tasks.metrics._common import NAN, labelled_mask, require_num_classes

UNKNOWN = -1  # batch contract: a class label of -1 is unknown


class ClassificationMetrics(nn.Module):
    """Accuracy, balanced accuracy and AUROC (per class and macro) of one classification head."""

    def __init__(self, name: str, cfg: ClassificationHeadConfig) -> None:
        super().__init__()
        require_num_classes(name, cfg.num_classes)
        self.name = name
        self.target = cfg.target
        self.num_classes = cfg.num_classes
        self.multilabel = cfg.multilabel
        # Inputs are validated in update() with messages naming the head; torchmetrics' own checks
        # would also reject the empty updates that keep list states well-shaped on every rank.
        if self.multilabel:
            self.stats = MultilabelStatScores(
                num_labels=cfg.num_classes, average=None, ignore_index=UNKNOWN, validate_args=False
            )
            self.auroc = MultilabelAUROC(
                num_labels=cfg.num_classes, average=None, ignore_index=UNKNOWN, validate_args=False
            )
        else:
            # A confusion matrix gives accuracy and balanced accuracy in the sklearn sense (mean
            # recall over the classes present in the targets); MulticlassRecall(average="macro")
            # would also average in classes that are only predicted, never present.
            self.confmat = MulticlassConfusionMatrix(
                num_classes=cfg.num_classes, validate_args=False
            )
            self.auroc = MulticlassAUROC(
                num_classes=cfg.num_classes, average=None, validate_args=False
            )

    def update(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Add one batch of logits ``[B, K]`` and the batch's labels."""
        logits = logits.detach().float()
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"head {self.name!r}: classification logits must be [B, {self.num_classes}], "
                f"got {list(logits.shape)}"
            )
        device = self.auroc.device
        target = torch.as_tensor(batch[self.target]).to(device)
        keep = labelled_mask(batch, self.target, logits.shape[0]).to(device)
        logits = logits.to(device)
        if self.multilabel:
            self._update_multilabel(logits, target, keep)
        else:
            self._update_multiclass(logits, target, keep)

    def _update_multiclass(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
    ) -> None:
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"head {self.name!r}: batch[{self.target!r}] must be int64 [B] for a multi-class "
                f"head, got {list(target.shape)} (multi-label data needs multilabel: true)"
            )
        target = target.long()
        bad = (target < UNKNOWN) | (target >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"head {self.name!r}: batch[{self.target!r}] holds {target[bad][0].item()}, "
                f"outside 0..{self.num_classes - 1} (or -1 for unknown); check num_classes"
            )
        keep = keep & (target != UNKNOWN)
        probs = logits[keep].softmax(dim=1)
        if keep.any():
            self.confmat.update(probs, target[keep])
        # Always updated (even with no rows), so its list states have the right shape when ranks
        # gather them; an empty update adds nothing.
        self.auroc.update(probs, target[keep])

    def _update_multilabel(
        self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor
    ) -> None:
        if target.shape != logits.shape:
            raise ValueError(
                f"head {self.name!r}: batch[{self.target!r}] must be [B, {self.num_classes}] "
                f"(0/1, -1 unknown) for a multi-label head, got {list(target.shape)}"
            )
        target = target.long()
        bad = (target != 0) & (target != 1) & (target != UNKNOWN)
        if bad.any():
            raise ValueError(
                f"head {self.name!r}: batch[{self.target!r}] holds {target[bad][0].item()}; "
                "multi-label targets are 0, 1 or -1 (unknown)"
            )
        keep = keep & (target != UNKNOWN).any(dim=1)
        probs = logits[keep].sigmoid()
        if keep.any():
            self.stats.update(probs, target[keep])
        self.auroc.update(probs, target[keep])  # always, see _update_multiclass

    def compute(self) -> dict[str, float]:
        """Figures over everything seen since reset, gathered from all ranks."""
        if self.auroc.update_count == 0:  # this rank saw no batch: give the gather a [0, K] part
            empty = torch.zeros(0, self.num_classes, device=self.auroc.device)
            self.auroc.update(empty, empty.long() if self.multilabel else empty[:, 0].long())
        if self.multilabel:
            return self._compute_multilabel()
        return self._compute_multiclass()

    def _compute_multiclass(self) -> dict[str, float]:
        confmat = self.confmat.compute().double()  # rows: true class, columns: predicted
        support = confmat.sum(dim=1)
        count = support.sum()
        out = {"count": float(count)}
        if count == 0:  # the same on every rank after the sync, so no rank waits on another
            out |= {"accuracy": NAN, "balanced_accuracy": NAN, "auroc": NAN}
            out |= {f"auroc_{k}": NAN for k in range(self.num_classes)}
            return out
        present = support > 0
        recall = confmat.diagonal()[present] / support[present]
        out["accuracy"] = float(confmat.diagonal().sum() / count)
        out["balanced_accuracy"] = float(recall.mean())
        # One-vs-rest AUROC is undefined for a class with no positives or no negatives.
        defined = present & (support < count)
        out |= self._auroc_figures(defined)
        return out

    def _compute_multilabel(self) -> dict[str, float]:
        tp, fp, tn, fn, _ = self.stats.compute().double().unbind(dim=-1)
        positives, negatives = tp + fn, tn + fp
        count = (positives + negatives).sum()
        out = {"count": float(count)}  # known (sample, label) pairs
        if count == 0:
            out |= {"accuracy": NAN, "balanced_accuracy": NAN, "auroc": NAN}
            out |= {f"auroc_{k}": NAN for k in range(self.num_classes)}
            return out
        out["accuracy"] = float((tp + tn).sum() / count)
        # Per label (sensitivity + specificity) / 2, as sklearn's balanced_accuracy_score on that
        # label's binary problem; a side with no samples is left out of that label's mean.
        sens = torch.where(positives > 0, tp / positives.clamp(min=1), torch.nan)
        spec = torch.where(negatives > 0, tn / negatives.clamp(min=1), torch.nan)
        out["balanced_accuracy"] = float(torch.stack([sens, spec]).nanmean(dim=0).nanmean())
        out |= self._auroc_figures((positives > 0) & (negatives > 0))
        return out

    def _auroc_figures(self, defined: torch.Tensor) -> dict[str, float]:
        per_class = self.auroc.compute().double()
        per_class = torch.where(defined.to(per_class.device), per_class, torch.nan)
        out = {"auroc": float(per_class.nanmean()) if defined.any() else NAN}
        out |= {f"auroc_{k}": float(v) for k, v in enumerate(per_class)}
        return out

    def reset(self) -> None:
        """Forget everything seen so far."""
        for metric in self.children():
            metric.reset()
