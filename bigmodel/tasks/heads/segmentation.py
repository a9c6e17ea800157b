"""Segmentation head: a U-Net or a light FPN decoder over the backbone's levels.

Both decoders are written against the backbone contract only (a list of feature maps, finest
first, with ``channels`` and ``reductions``), so a ResNet, ConvNeXt or ViT works unchanged.

* ``unet`` (default) is segmentation_models_pytorch's ``UnetDecoder``: every level is a skip
  connection, and the last block reaches full resolution, which is what thin structures in
  medical images (vessels, cortex, small lesions) need.
* ``fpn`` is torchvision's ``FeaturePyramidNetwork`` over the levels of stride >= 4 only, merged
  Panoptic-FPN style at stride 4. smp's ``FPNDecoder`` is not used: it hard-codes four levels
  that halve in size (``scale_factor=2``), which a ViT's equal-stride levels do not.
"""

from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from segmentation_models_pytorch.base import SegmentationHead as SmpClassifier
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

from bigmodel.config import SegmentationHeadConfig

__all__ = ["FPNDecoder", "SegmentationHead", "UNetDecoder", "unet_block_channels"]

# Narrowest U-Net block: the full-resolution blocks are the expensive ones per channel.
MIN_UNET_CHANNELS = 16
# The FPN leaves out finer levels (ResNet's stride-2 stem): a 3x3 conv at half resolution
# costs as much as the rest of the decoder together, for little Dice.
FPN_MIN_STRIDE = 4


def unet_block_channels(width: int, blocks: int) -> list[int]:
    """Output channels of each U-Net block, coarsest first: ``width`` halved per block."""
    return [max(MIN_UNET_CHANNELS, width >> i) for i in range(blocks)]


class UNetDecoder(nn.Module):
    """smp's ``UnetDecoder`` over timm features; returns full-resolution decoder features.

    smp expects the encoder's list to start with the input itself (stride 1, dropped as a skip
    but used for its size); a zero-channel placeholder of the image size stands in for it, so
    the last block upsamples to the input resolution whatever the backbone's finest stride.
    """

    def __init__(self, channels: list[int], width: int) -> None:
        super().__init__()
        self.out_channels = unet_block_channels(width, len(channels))
        self.decoder = UnetDecoder(
            encoder_channels=[0, *channels],
            decoder_channels=self.out_channels,
            n_blocks=len(channels),
        )
        self.out_channels = self.out_channels[-1]

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        first = features[0]
        placeholder = first.new_empty((first.shape[0], 0, *image_size))  # size only, no memory
        return self.decoder([placeholder, *features])


class FPNDecoder(nn.Module):
    """torchvision's FPN on the levels of stride >= 4, upsampled to the finest one, summed, conv."""

    def __init__(self, channels: list[int], reductions: list[int], width: int) -> None:
        super().__init__()
        levels = [i for i, r in enumerate(reductions) if r >= FPN_MIN_STRIDE]
        self.levels = levels or list(range(len(channels)))
        self.fpn = FeaturePyramidNetwork([channels[i] for i in self.levels], out_channels=width)
        self.fuse = Conv2dNormActivation(width, width, kernel_size=3)
        self.out_channels = width

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        pyramid = self.fpn(OrderedDict((str(j), features[i]) for j, i in enumerate(self.levels)))
        maps = list(pyramid.values())
        finest = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        merged = sum(
            m
            if m.shape[-2:] == finest
            else F.interpolate(m, size=finest, mode="bilinear", align_corners=False)
            for m in maps
        )
        return self.fuse(merged)


class SegmentationHead(nn.Module):
    """Decoder (``cfg.decoder``) then a per-pixel classifier; logits at input resolution."""

    needs_targets = False

    def __init__(
        self, channels: list[int], reductions: list[int], cfg: SegmentationHeadConfig
    ) -> None:
        super().__init__()
        width = cfg.decoder_channels
        if cfg.decoder == "unet":
            self.decoder = UNetDecoder(list(channels), width)
            # smp's head: a 3x3 conv to the classes (no activation: the loss takes logits)
            self.classifier = SmpClassifier(self.decoder.out_channels, cfg.num_classes)
        else:
            self.decoder = FPNDecoder(list(channels), list(reductions), width)
            self.classifier = nn.Conv2d(width, cfg.num_classes, kernel_size=1)

    def forward(self, features: list[Tensor], image_size: tuple[int, int]) -> Tensor:
        """Per-pixel logits ``[B, num_classes, H, W]`` at ``image_size``."""
        logits = self.classifier(self.decoder(features, tuple(image_size)))
        if tuple(logits.shape[-2:]) != tuple(image_size):
            logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)
        return logits
