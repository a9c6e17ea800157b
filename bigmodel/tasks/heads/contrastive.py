"""SimCLR projection head: pooled coarsest features -> MLP -> unit-length embedding."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from bigmodel.config import ContrastiveHeadConfig

__all__ = ["ContrastiveHead"]


class ContrastiveHead(nn.Module):
    """``Linear -> BatchNorm -> ReLU -> Linear`` over the pooled features (SimCLR v1/v2).

    The projection is thrown away after pretraining: the loss shapes its output, and the
    backbone features below it are what transfers (SimCLR's finding that the layer before the
    projection represents better than its output).
    """

    needs_targets = False

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        cfg: ContrastiveHeadConfig,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        width = channels[-1]
        hidden = cfg.hidden_dim or width
        self.projection = nn.Sequential(
            nn.Linear(width, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, cfg.projection_dim),
        )

    def forward(self, features: list[Tensor], image_size: tuple[int, ...]) -> Tensor:
        """L2-normalised projections ``[B, projection_dim]``."""
        last = features[-1]
        pooled = last.mean(dim=tuple(range(2, last.dim())))
        return F.normalize(self.projection(pooled), dim=-1)
