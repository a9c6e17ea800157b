"""Classification head: pooled last feature level -> dropout -> linear logits (2D or 3D)."""

from __future__ import annotations

from torch import Tensor, nn

from bigmodel.config import ClassificationHeadConfig


class ClassificationHead(nn.Module):
    """Logits ``[B, num_classes]`` from the coarsest feature map averaged over all its spatial
    dimensions (an image's or a volume's: the same head for ``spatial_dims`` 2 and 3).

    Multi-class and multi-label share this head; they differ only in the loss
    (:class:`bigmodel.tasks.losses.ClassificationLoss`) and in how metrics read the logits.
    """

    needs_targets = False

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        cfg: ClassificationHeadConfig,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(channels[-1], cfg.num_classes)

    def forward(self, features: list[Tensor], image_size: tuple[int, ...]) -> Tensor:
        """Class logits (before softmax / sigmoid)."""
        last = features[-1]
        pooled = last.mean(dim=tuple(range(2, last.dim())))
        return self.fc(self.dropout(pooled))
