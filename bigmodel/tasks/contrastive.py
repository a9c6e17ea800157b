"""Contrastive self-supervised pretraining (SimCLR) of the backbone.

The head projects the pooled features of each view and NT-Xent pulls the two views of a sample
together against every other view of the global batch (gathered across ranks with gradients,
as retrieval does). No shard label is read. What the run is for is the backbone: the model
folder holds ``backbone.safetensors`` (:mod:`bigmodel.model_folder`), which a later run names
in ``model.backbone.pretrained``. Outputs are embeddings ``[B, projection_dim]``; evaluation
reports their spread (a collapse monitor).
"""

from __future__ import annotations

from typing import Any

from bigmodel.tasks._base import SummaryContext, Task
from bigmodel.tasks.heads.contrastive import ContrastiveHead
from bigmodel.tasks.losses import ContrastiveLoss
from bigmodel.tasks.metrics import ContrastiveMetrics

__all__ = ["ContrastiveTask"]


class ContrastiveTask(Task):
    name = "contrastive"
    head = ContrastiveHead
    loss = ContrastiveLoss
    metrics = ContrastiveMetrics

    def summary(self, head: str, value: Any, classes: list[str], ctx: SummaryContext) -> dict:
        entry: dict[str, Any] = {"embedding": value.mean(axis=0).round(6).tolist()}
        if ctx.study.is_volume:
            entry["note"] = "mean of the per-slice projections"
        return entry

    def one_line(self, head: str, entry: dict) -> str | None:
        return f"{head}: {len(entry['embedding'])}-d projection (pretraining head)"
