"""Contrastive pretraining figures: whether the embedding is collapsing.

An evaluation image has one view, so there is no positive pair to score; what can go wrong
without labels is collapse (every image mapped to nearly one point). ``spread`` is the standard
deviation of the L2-normalised embeddings per dimension, averaged over dimensions and scaled by
``sqrt(projection_dim)`` (SimSiam's collapse monitor): about 1 for embeddings spread over the
sphere, 0 for a collapsed one. Sums are reduced across ranks (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

from bigmodel.config import ContrastiveHeadConfig
from bigmodel.tasks.metrics._common import NAN


class _Moments(Metric):
    """Count, sum and sum of squares of the embeddings, per dimension."""

    full_state_update = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, embeddings: torch.Tensor) -> None:
        e = embeddings.detach().double()
        self.count += len(e)
        self.total += e.sum(0)
        self.squares += (e * e).sum(0)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.count, self.total, self.squares


class ContrastiveMetrics(nn.Module):
    """``count`` and ``spread`` (see the module docstring) of one contrastive head."""

    def __init__(self, name: str, cfg: ContrastiveHeadConfig) -> None:
        super().__init__()
        self.name = name
        self.dim = cfg.projection_dim
        self.moments = _Moments(cfg.projection_dim)

    def update(self, embeddings: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Add one batch of embeddings ``[B, projection_dim]``."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"head {self.name!r}: contrastive embeddings must be [B, {self.dim}], "
                f"got {list(embeddings.shape)}"
            )
        embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)
        self.moments.update(embeddings.to(self.moments.total.device))

    def compute(self) -> dict[str, float]:
        """Figures over every rank's embeddings since the last reset."""
        count, total, squares = self.moments.compute()
        n = float(count)
        if n < 2:
            return {"count": n, "spread": NAN}
        variance = (squares - total * total / n) / (n - 1)
        spread = variance.clamp(min=0).sqrt().mean() * self.dim**0.5
        return {"count": n, "spread": float(spread)}

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.moments.reset()
