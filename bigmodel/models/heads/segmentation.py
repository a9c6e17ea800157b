"""Segmentation head: an FPN decoder over every feature level, logits at input resolution."""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

from bigmodel.config import SegmentationHeadConfig


class SegmentationHead(nn.Module):
    """torchvision's FPN, then a Panoptic-FPN-style merge (upsample every level, sum, conv).

    Every level takes part, so fine detail (stride 2-4) and context (stride 32) both reach the
    classifier. Levels of equal stride (ViTs) pass through the FPN unchanged in size.
    """

    needs_targets = False

    def __init__(
        self, channels: list[int], reductions: list[int], cfg: SegmentationHeadConfig
    ) -> None:
        super().__init__()
        width = cfg.decoder_channels
        self.fpn = FeaturePyramidNetwork(in_channels_list=list(channels), out_channels=width)
        self.fuse = Conv2dNormActivation(width, width, kernel_size=3)
        self.classifier = nn.Conv2d(width, cfg.num_classes, kernel_size=1)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """Per-pixel logits ``[B, num_classes, H, W]`` at ``image_size``."""
        levels = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        maps = list(levels.values())
        finest = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        merged = sum(
            m
            if m.shape[-2:] == finest
            else F.interpolate(m, size=finest, mode="bilinear", align_corners=False)
            for m in maps
        )
        logits = self.classifier(self.fuse(merged))
        return F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
