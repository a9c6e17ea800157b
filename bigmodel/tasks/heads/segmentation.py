"""Segmentation head: a U-Net or a light FPN decoder over the backbone's levels.

Both decoders are written against the backbone contract only (a list of feature maps, finest
first, with ``channels`` and ``reductions``), so a ResNet, ConvNeXt or ViT works unchanged.

* ``unet`` (default) is segmentation_models_pytorch's ``UnetDecoder``: every level is a skip
  connection, and the last block reaches full resolution, which is what thin structures in
  medical images (vessels, cortex, small lesions) need.
* ``fpn`` is torchvision's ``FeaturePyramidNetwork`` over the levels of stride >= 4 only, merged
  Panoptic-FPN style at stride 4. smp's ``FPNDecoder`` is not used: it hard-codes four levels
  that halve in size (``scale_factor=2``), which a ViT's equal-stride levels do not.

With ``spatial_dims=3`` (volumes) ``unet`` is :class:`MonaiUNetDecoder`, MONAI's DynUNet
decoder blocks (``UnetUpBlock``: transposed convolution, skip concatenation, two convolutions
with instance norm and leaky ReLU, as nnU-Net), since smp's decoder is 2D only; ``fpn`` has no
3D form and is refused. The decoder has no deep-supervision outputs yet: the losses, metrics and
sliding window take one logit map per head.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import pairwise

import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from segmentation_models_pytorch.base import SegmentationHead as SmpClassifier
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import Conv2dNormActivation

from bigmodel.config import ConfigError, SegmentationHeadConfig

__all__ = [
    "FPNDecoder",
    "MonaiUNetDecoder",
    "SegmentationHead",
    "UNetDecoder",
    "unet_block_channels",
]

# Narrowest U-Net block: the full-resolution blocks are the expensive ones per channel.
MIN_UNET_CHANNELS = 16
# The FPN leaves out finer levels (ResNet's stride-2 stem): a 3x3 conv at half resolution
# costs as much as the rest of the decoder together, for little Dice.
FPN_MIN_STRIDE = 4
# DynUNet's (and nnU-Net's) normalisation of the decoder blocks; their activation is
# UnetUpBlock's default, nnU-Net's leaky ReLU (slope 0.01).
DYNUNET_NORM = ("INSTANCE", {"affine": True})


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


class MonaiUNetDecoder(nn.Module):
    """A U-Net decoder of MONAI's DynUNet blocks over any backbone's levels, in 2D or 3D.

    One ``UnetUpBlock`` per level below the coarsest, coarsest first: a transposed convolution
    up by the levels' stride ratio (1 for equal strides), the level's skip concatenated, two
    convolutions. Block widths follow ``decoder_channels`` as in 2D (:func:`unet_block_channels`);
    a skip of another width goes through a 1x1 convolution first. A backbone whose finest level
    is coarser than the input (a Swin or ResNet stem, stride 2) gets one more block, a transposed
    convolution to the input resolution and two convolutions, so the logits are voxel-sharp.
    """

    def __init__(
        self, channels: list[int], reductions: list[int], width: int, spatial_dims: int
    ) -> None:
        super().__init__()
        for finer, coarser in pairwise(reductions):
            if coarser % finer:
                raise ConfigError(
                    f"the U-Net decoder needs each level's stride to be a multiple of the finer "
                    f"one's; the backbone's strides are {reductions}"
                )
        to_input = reductions[0] > 1
        widths = unet_block_channels(width, len(channels) - 1 + int(to_input))
        self.skips = nn.ModuleList()
        self.blocks = nn.ModuleList()
        previous = channels[-1]
        # widths has one more entry when there is a block to the input resolution
        for level, out in zip(range(len(channels) - 2, -1, -1), widths, strict=False):
            skip = channels[level]
            self.skips.append(
                nn.Identity()
                if skip == out
                else get_conv_layer(spatial_dims, skip, out, kernel_size=1, conv_only=True)
            )
            self.blocks.append(
                UnetUpBlock(
                    spatial_dims,
                    previous,
                    out,
                    kernel_size=3,
                    stride=1,
                    upsample_kernel_size=reductions[level + 1] // reductions[level],
                    norm_name=DYNUNET_NORM,
                )
            )
            previous = out
        self.to_input: nn.Module = nn.Identity()
        if to_input:
            self.to_input = nn.Sequential(
                get_conv_layer(
                    spatial_dims,
                    previous,
                    widths[-1],
                    kernel_size=reductions[0],
                    stride=reductions[0],
                    conv_only=True,
                    is_transposed=True,
                ),
                UnetBasicBlock(spatial_dims, widths[-1], widths[-1], 3, 1, norm_name=DYNUNET_NORM),
            )
            previous = widths[-1]
        self.out_channels = previous

    def forward(self, features: list[Tensor], image_size: tuple[int, ...]) -> Tensor:
        x = features[-1]
        for level, skip, block in zip(
            range(len(features) - 2, -1, -1), self.skips, self.blocks, strict=True
        ):
            x = block(x, skip(features[level]))
        return self.to_input(x)


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
    """Decoder (``cfg.decoder``) then a per-pixel (per-voxel) classifier; logits at input size."""

    needs_targets = False

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        cfg: SegmentationHeadConfig,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        width = cfg.decoder_channels
        if spatial_dims == 3:
            if cfg.decoder != "unet":
                raise ConfigError(
                    f"segmentation decoder={cfg.decoder} is 2D only (torchvision's FPN); with "
                    "model.backbone.spatial_dims=3 use decoder=unet"
                )
            self.decoder = MonaiUNetDecoder(list(channels), list(reductions), width, spatial_dims)
            # nnU-Net's and DynUNet's output layer: a 1x1x1 convolution to the classes
            self.classifier = UnetOutBlock(spatial_dims, self.decoder.out_channels, cfg.num_classes)
        elif cfg.decoder == "unet":
            self.decoder = UNetDecoder(list(channels), width)
            # smp's head: a 3x3 conv to the classes (no activation: the loss takes logits)
            self.classifier = SmpClassifier(self.decoder.out_channels, cfg.num_classes)
        else:
            self.decoder = FPNDecoder(list(channels), list(reductions), width)
            self.classifier = nn.Conv2d(width, cfg.num_classes, kernel_size=1)

    def forward(self, features: list[Tensor], image_size: tuple[int, ...]) -> Tensor:
        """Logits ``[B, num_classes, *image_size]`` (``H, W`` or ``D, H, W``)."""
        image_size = tuple(image_size)
        logits = self.classifier(self.decoder(features, image_size))
        if tuple(logits.shape[2:]) != image_size:
            mode = "bilinear" if len(image_size) == 2 else "trilinear"
            logits = F.interpolate(logits, size=image_size, mode=mode, align_corners=False)
        return logits
