"""Retrieval figures: Recall@K and mAP@R of L2-normalised embeddings, every sample a query.

Embeddings and labels of the whole evaluation set are gathered from all ranks (torchmetrics ``cat``
states), then each sample queries all the others by cosine similarity (pytorch-metric-learning's
``AccuracyCalculator`` with an exact torch k-NN). A query whose label no other sample shares has
no right answer and is left out, as pytorch-metric-learning does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from bigmodel.config import RetrievalHeadConfig
from bigmodel.tasks.metrics._common import NAN, labelled_mask

RECALL_AT = (1, 5, 10)
"""The K of the reported Recall@K figures."""
KNN_BATCH = 4096
"""Queries per block of the similarity matrix, so a large gallery never needs N x N memory."""


class EmbeddingStore(Metric):
    """Every embedding and its integer label, concatenated across ranks on compute()."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep a batch (an empty one too: it fixes the state's shape for the gather)."""
        self.embeddings.append(embeddings)
        self.labels.append(labels)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All embeddings ``[N, D]`` and labels ``[N]``."""
        # a list before the cross-rank sync, one concatenated tensor after it
        return dim_zero_cat(self.embeddings), dim_zero_cat(self.labels)


class _RecallCalculator(AccuracyCalculator):
    """pytorch-metric-learning's calculator plus Recall@K (any of the K nearest shares the label).

    PML reports precision@1 (= Recall@1) but not Recall@K for K > 1; custom ``calculate_*``
    methods are its documented extension point and reuse its k-NN and lone-query handling.
    """

    def requires_knn(self) -> list[str]:
        return [*super().requires_knn(), *(f"recall_at_{k}" for k in RECALL_AT)]

    def determine_k(
        self, bin_counts: torch.Tensor, num_reference_embeddings: int, ref_includes_query: bool
    ) -> int:
        # mAP@R needs R = (largest class - 1) neighbours, Recall@K needs max(K); no more.
        self_count = int(ref_includes_query)
        needed = max(int(bin_counts.max()) - self_count, max(RECALL_AT))
        return min(needed, num_reference_embeddings - self_count)

    @staticmethod
    def _recall(
        knn_labels: torch.Tensor,
        query_labels: torch.Tensor,
        not_lone_query_mask: torch.Tensor,
        k: int,
    ) -> float:
        if not not_lone_query_mask.any():
            return NAN
        hit = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
        return float(hit[not_lone_query_mask].float().mean())

    def calculate_recall_at_1(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(knn_labels, query_labels, not_lone_query_mask, 1)

    def calculate_recall_at_5(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(knn_labels, query_labels, not_lone_query_mask, 5)

    def calculate_recall_at_10(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        return self._recall(knn_labels, query_labels, not_lone_query_mask, 10)


def group_ids(groups: Sequence[str]) -> torch.Tensor:
    """Stable int64 ids of string labels (patient ids): the same on every rank and every run."""
    return torch.tensor(
        [
            int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "big", signed=True)
            for g in groups
        ],
        dtype=torch.long,
    )


class RetrievalMetrics(nn.Module):
    """Recall@1/5/10 and mAP@R of one retrieval head over the gathered evaluation set."""

    def __init__(self, name: str, cfg: RetrievalHeadConfig) -> None:
        super().__init__()
        self.name = name
        self.target = cfg.target
        self.embed_dim = cfg.embed_dim
        self.store = EmbeddingStore()

    def update(self, embeddings: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Add one batch of embeddings ``[B, D]`` and the batch's labels (class or group)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(
                f"head {self.name!r}: retrieval embeddings must be [B, {self.embed_dim}], "
                f"got {list(embeddings.shape)}"
            )
        device = self.store.device
        raw = batch[self.target]
        if isinstance(raw, (list, tuple)) and (not raw or isinstance(raw[0], str)):
            labels = group_ids(raw)
            known = torch.tensor([bool(g) for g in raw], dtype=torch.bool)
        else:
            labels = torch.as_tensor(raw).long()
            if labels.ndim != 1:
                raise ValueError(
                    f"head {self.name!r}: batch[{self.target!r}] must be one label per sample "
                    f"(int64 [B] or list[str]), got shape {list(labels.shape)}; retrieval needs "
                    "a multi-class label or the patient group"
                )
            known = labels != -1
        if len(labels) != embeddings.shape[0]:
            raise ValueError(
                f"head {self.name!r}: {len(labels)} labels for {embeddings.shape[0]} embeddings"
            )
        keep = labelled_mask(batch, self.target, len(labels)) & known
        self.store.update(
            embeddings.detach().float()[keep.to(embeddings.device)].to(device),
            labels[keep].to(device),
        )

    def compute(self) -> dict[str, float]:
        """Figures with every gathered sample as a query against all the others."""
        if self.store.update_count == 0:  # this rank saw no batch: give the gather a [0, D] part
            self.update(torch.zeros(0, self.embed_dim), {self.target: torch.zeros(0)})
        embeddings, labels = self.store.compute()
        out = {"count": float(len(labels))}
        names = [f"recall@{k}" for k in RECALL_AT] + ["map@r"]
        if len(labels) < 2:
            return out | dict.fromkeys(names, NAN)
        # Dense ids: PML casts labels to float, which would merge distinct 64-bit group hashes.
        labels = labels.unique(return_inverse=True)[1]
        calculator = _RecallCalculator(
            include=("mean_average_precision_at_r", *(f"recall_at_{k}" for k in RECALL_AT)),
            device=embeddings.device,
            knn_func=CustomKNN(CosineSimilarity(), batch_size=KNN_BATCH),
        )
        figures = calculator.get_accuracy(embeddings, labels)
        out |= {f"recall@{k}": float(figures[f"recall_at_{k}"]) for k in RECALL_AT}
        out["map@r"] = float(figures["mean_average_precision_at_r"])
        return out

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.store.reset()
