"""Classification head: pooled last feature level -> dropout -> linear logits."""

from __future__ import annotations

from torch import Tensor, nn

from bigmodel.config import ClassificationHeadConfig


class ClassificationHead(nn.Module):
    """Logits ``[B, num_classes]`` from the globally averaged coarsest feature map.

    Multi-class and multi-label share this head; they differ only in the loss
    (:class:`bigmodel.tasks.losses.ClassificationLoss`) and in how metrics read the logits.
    """

    needs_targets = False

    def __init__(
        self, channels: list[int], reductions: list[int], cfg: ClassificationHeadConfig
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(channels[-1], cfg.num_classes)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """Class logits (before softmax / sigmoid)."""
        pooled = features[-1].mean(dim=(-2, -1))
        return self.fc(self.dropout(pooled))
