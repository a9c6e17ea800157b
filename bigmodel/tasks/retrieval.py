"""Retrieval: an L2-normalised embedding per image, trained with a metric-learning loss.

Outputs are embeddings ``[B, D]`` of the whole image (the sliding window reads the image shrunk
to fit one window). The summary of a volume is the mean of its slices' embeddings. The
evaluation report adds a bootstrap interval of recall@1 over patients and query/neighbour strips
(cosine nearest neighbours of a few samples among the others).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from bigmodel.tasks import _plots
from bigmodel.tasks._base import SHOW, EvalRun, Evaluation, SummaryContext, Task
from bigmodel.tasks._stats import interval
from bigmodel.tasks.heads.retrieval import RetrievalHead
from bigmodel.tasks.losses import RetrievalLoss
from bigmodel.tasks.metrics import RetrievalMetrics

__all__ = ["RetrievalTask"]


class RetrievalTask(Task):
    name = "retrieval"
    head = RetrievalHead
    loss = RetrievalLoss
    metrics = RetrievalMetrics

    def to_numpy(self, output: Any, cfg: Any) -> Any:
        """Embeddings ``[N, D]``."""
        return output.float().cpu().numpy()

    def summary(self, head: str, value: Any, classes: list[str], ctx: SummaryContext) -> dict:
        entry: dict[str, Any] = {"embedding": value.mean(axis=0).round(6).tolist()}
        if ctx.study.is_volume:
            entry["note"] = "mean of the per-slice embeddings"
        return entry

    def one_line(self, head: str, entry: dict) -> str | None:
        return f"{head}: {len(entry['embedding'])}-d embedding"

    def evaluation(self, head: str, cfg: Any, classes: list[str]) -> Evaluation:
        return RetrievalEvaluation(head, cfg, classes)


class RetrievalEvaluation(Evaluation):
    """Every sample's embedding (and class label), for recall@1 and the neighbour strips."""

    def __init__(self, head: str, cfg: Any, classes: list[str]) -> None:
        super().__init__(head, cfg, classes)
        self.embeddings: list[torch.Tensor] = []
        self.cls: list[torch.Tensor] = []

    def add(self, output: Any, batch: dict[str, Any]) -> None:
        self.embeddings.append(output.float().cpu())
        if "cls" in batch:
            self.cls.append(batch["cls"])

    def report(self, run: EvalRun, report: dict[str, Any], per_sample: dict[str, list]) -> None:
        head = self.head
        hit, order, labels = self._hits(run)
        weights = run.counts[:, run.patient]
        known = np.isfinite(hit)
        replicate = (weights[:, known] * hit[known]).sum(1) / np.maximum(
            weights[:, known].sum(1), 1
        )
        report["ci95"][f"{head}/recall@1"] = interval(replicate)
        per_sample[f"{head}_hit@1"] = [None if not np.isfinite(h) else bool(h) for h in hit]
        report["plots"][f"{head}_neighbours"] = str(self._strips(run, order, labels))

    def _hits(self, run: EvalRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cosine nearest neighbours of every sample among the others, and whether rank 1 is right.

        Labels are what the head was trained on (the class, or the patient for ``target:
        group``); a sample whose label no other sample shares cannot be answered and gets NaN,
        as in ``bigmodel.metrics`` (pytorch-metric-learning).
        """
        emb = torch.nn.functional.normalize(torch.cat(self.embeddings), dim=1)
        if self.cfg.target == "group":
            labels = np.unique(np.array(run.groups), return_inverse=True)[1]
        else:
            labels = torch.cat(self.cls).numpy()
        sims = emb @ emb.T
        sims.fill_diagonal_(-math.inf)
        order = sims.argsort(dim=1, descending=True)[:, : min(5, len(emb) - 1)].numpy()
        shared = np.array([(labels == label).sum() > 1 for label in labels])
        hit = (
            np.where(shared, labels[order[:, 0]] == labels, np.nan)
            if len(order[0])
            else shared * np.nan
        )
        return hit.astype(float), order, labels

    def _strips(self, run: EvalRun, order: np.ndarray, labels: np.ndarray) -> Any:
        keys = run.keys
        queries = [i for i in range(len(keys)) if (labels == labels[i]).sum() > 1][:SHOW]
        if not queries or order.shape[1] == 0:
            return None
        samples = run.samples_of({keys[j] for q in queries for j in (q, *order[q])})
        emb = torch.nn.functional.normalize(torch.cat(self.embeddings), dim=1)
        strips = []
        for q in queries:
            neighbours = [
                (
                    keys[j],
                    samples[keys[j]]["image"].numpy(),
                    float(emb[q] @ emb[j]),
                    bool(labels[j] == labels[q]),
                )
                for j in order[q]
            ]
            strips.append((keys[q], samples[keys[q]]["image"].numpy(), neighbours))
        return _plots.retrieval_png(strips, self.head, run.out / f"{self.head}_neighbours.png")
