"""3D backbones: MONAI's encoders behind the feature contract of the 2D (timm) backbones.

| ``backbone.name`` | network (MONAI) | levels: reductions | widths (``base_channels`` = w) |
| --- | --- | --- | --- |
| ``resenc3d`` | DynUNet's residual encoder (``res_block=True``): one ``UnetResBlock`` per level, nnU-Net's 3d_fullres layout (3x3x3 kernels, instance norm, leaky ReLU) | 1, 2, 4, 8, 16, 32 | w x 2^i, at most 320 (w = 32) |
| ``swinunetr3d`` | SwinUNETR's Swin transformer encoder (``swinViT``), its five normalised maps | 2, 4, 8, 16, 32 | w x 2^i (w = 48) |
| ``resnetN_3d`` (N = 10, 18, 34, 50) | ``monai.networks.nets.ResNet`` in MedicalNet's layout: stem, layer1-4 | 2, 4, 8, 16, 32 | w, then w x 2^i x expansion (w = 64) |

Each encoder keeps timm's ``features_only`` contract, so :class:`bigmodel.models.backbone.Backbone`
wraps it as it wraps a timm model: ``forward`` returns the list of feature maps, finest first;
``feature_info`` is timm's ``FeatureInfo`` (channels, reduction and module of each level);
``set_grad_checkpointing`` switches activation checkpointing on. Input sides must be multiples of
the coarsest reduction built.

The state-dict keys are those of the whole MONAI network (``DynUNet``, ``SwinUNETR``, ``ResNet``),
so a file saved from that network loads into the encoder key by key; its decoder (or classifier)
keys, :attr:`decoder_prefixes`, are left out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.blocks import UnetResBlock
from monai.networks.nets.resnet import ResNet, resnet_params
from monai.networks.nets.swin_unetr import SwinTransformer, SwinTransformerBlock
from timm.models import FeatureInfo
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bigmodel.config import BackboneConfig, ConfigError

__all__ = ["ENCODERS_3D", "ResEncoder3d", "ResNetEncoder3d", "SwinEncoder3d", "create_encoder_3d"]

# nnU-Net's 3d_fullres defaults (UNet_base_num_features, unet_max_num_features, the normalisation
# and non-linearity its plans use and DynUNet copies).
RESENC_LEVELS = 6
RESENC_MAX_CHANNELS = 320
NNUNET_NORM = ("INSTANCE", {"affine": True})
NNUNET_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
# SwinUNETR's encoder: patch 2, window 7, four stages of two blocks.
SWIN_DEPTHS = (2, 2, 2, 2)
SWIN_HEADS = (3, 6, 12, 24)


def _run(stage: nn.Module, x: Tensor, checkpointing: bool) -> Tensor:
    # Memory for compute: only the stage's input is kept; its activations are recomputed in the
    # backward pass.
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(stage, x, use_reentrant=False)
    return stage(x)


def _levels(out_indices: list[int] | None, count: int, name: str) -> tuple[int, ...]:
    """``backbone.out_indices`` as sorted level indices in ``range(count)``."""
    if out_indices is None:
        return tuple(range(count))
    levels = sorted({i % count for i in out_indices if -count <= i < count})
    if len(levels) != len(set(out_indices)):
        raise ConfigError(
            f"model.backbone.out_indices={out_indices}: {name} has {count} feature levels "
            f"(0 to {count - 1}, or negative from the end)"
        )
    return tuple(levels)


class ResEncoder3d(nn.Module):
    """The residual encoder of MONAI's ``DynUNet(res_block=True)``; its keys are DynUNet's."""

    decoder_prefixes = ("upsamples.", "output_block.", "deep_supervision_heads.", "skip_layers.")
    """Keys of a whole DynUNet's file that are not the encoder's."""

    def __init__(self, in_chans: int, widths: list[int], out_indices: tuple[int, ...]) -> None:
        super().__init__()
        block = dict(spatial_dims=3, kernel_size=3, norm_name=NNUNET_NORM, act_name=NNUNET_ACT)
        self.input_block = UnetResBlock(
            in_channels=in_chans, out_channels=widths[0], stride=1, **block
        )
        self.downsamples = nn.ModuleList(
            UnetResBlock(in_channels=widths[i], out_channels=widths[i + 1], stride=2, **block)
            for i in range(len(widths) - 2)
        )
        self.bottleneck = UnetResBlock(
            in_channels=widths[-2], out_channels=widths[-1], stride=2, **block
        )
        names = ["input_block", *(f"downsamples.{i}" for i in range(len(widths) - 2)), "bottleneck"]
        reductions = [2**i for i in range(len(widths))]  # strides 1, 2, 2, ...
        self.feature_info = FeatureInfo(
            [
                {"num_chs": c, "reduction": r, "module": m}
                for c, r, m in zip(widths, reductions, names, strict=True)
            ],
            out_indices,
        )
        self.out_indices = out_indices
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every level's activations in the backward pass (timm's switch)."""
        self.grad_checkpointing = enable

    def forward(self, x: Tensor) -> list[Tensor]:
        """The maps of the levels in ``out_indices``, finest first."""
        features = []
        for i, stage in enumerate([self.input_block, *self.downsamples, self.bottleneck]):
            x = _run(stage, x, self.grad_checkpointing)
            if i in self.out_indices:
                features.append(x)
        return features


class SwinEncoder3d(nn.Module):
    """SwinUNETR's encoder, held as ``swinViT`` like SwinUNETR does, so its keys are SwinUNETR's."""

    decoder_prefixes = (
        "encoder1.",
        "encoder2.",
        "encoder3.",
        "encoder4.",
        "encoder10.",
        "decoder1.",
        "decoder2.",
        "decoder3.",
        "decoder4.",
        "decoder5.",
        "out.",
    )
    """Keys of a whole SwinUNETR's file that are not the encoder's."""

    def __init__(
        self, in_chans: int, width: int, drop_path_rate: float, out_indices: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.swinViT = SwinTransformer(
            in_chans=in_chans,
            embed_dim=width,
            window_size=(7, 7, 7),
            patch_size=(2, 2, 2),
            depths=SWIN_DEPTHS,
            num_heads=SWIN_HEADS,
            drop_path_rate=drop_path_rate,
            spatial_dims=3,
            downsample="merging",
        )
        # Level 0 is the patch embedding; level i the output of stage i (merged at its end).
        names = ["swinViT.patch_embed", *(f"swinViT.layers{i}.0" for i in range(1, 5))]
        self.feature_info = FeatureInfo(
            [
                {"num_chs": width * 2**i, "reduction": 2 ** (i + 1), "module": m}
                for i, m in enumerate(names)
            ],
            out_indices,
        )
        self.out_indices = out_indices

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """MONAI's ``use_checkpoint``: every Swin block recomputes attention and MLP in backward."""
        for module in self.swinViT.modules():
            if isinstance(module, SwinTransformerBlock):
                module.use_checkpoint = enable

    def forward(self, x: Tensor) -> list[Tensor]:
        """The layer-normalised maps of the levels in ``out_indices`` (SwinUNETR's ``normalize``)."""
        maps = self.swinViT(x, normalize=True)
        return [maps[i] for i in self.out_indices]


class ResNetEncoder3d(ResNet):
    """MONAI's 3D ResNet (MedicalNet's layout, as ``ResNetFeatures``) returning its five levels.

    A subclass rather than a wrapper so that its keys are the ResNet's own (``conv1.weight``,
    ``layer1.0.conv1.weight``): MedicalNet's and MONAI's ResNet files load unchanged.
    """

    decoder_prefixes = ("fc.",)
    """The classifier of a whole ResNet's file."""

    def __init__(
        self, variant: str, in_chans: int, width: int, out_indices: tuple[int, ...]
    ) -> None:
        block, layers, shortcut_type, bias_downsample, _ = resnet_params[variant]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=[width * 2**i for i in range(4)],
            spatial_dims=3,
            n_input_channels=in_chans,
            conv1_t_stride=2,
            shortcut_type=shortcut_type,
            feed_forward=False,
            bias_downsample=bias_downsample,
        )
        expansion = 4 if block == "bottleneck" else 1
        channels = [width, *(width * 2**i * expansion for i in range(4))]
        # The stem's level ends at bn1 (its activation has no parameters to freeze).
        names = ["bn1", "layer1", "layer2", "layer3", "layer4"]
        self.feature_info = FeatureInfo(
            [
                {"num_chs": c, "reduction": 2 ** (i + 1), "module": m}
                for i, (c, m) in enumerate(zip(channels, names, strict=True))
            ],
            out_indices,
        )
        self.out_indices = out_indices
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each of layer1-4's activations in the backward pass (timm's switch)."""
        self.grad_checkpointing = enable

    def _stem(self, x: Tensor) -> Tensor:
        return self.act(self.bn1(self.conv1(x)))

    def forward(self, x: Tensor) -> list[Tensor]:
        """The maps of the levels in ``out_indices``, finest first."""
        x = _run(self._stem, x, self.grad_checkpointing)
        features = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = _run(layer, x, self.grad_checkpointing)
            features.append(x)
        return [features[i] for i in self.out_indices]


def _resenc(cfg: BackboneConfig, in_chans: int) -> nn.Module:
    count = RESENC_LEVELS
    if cfg.out_indices and all(i >= 0 for i in cfg.out_indices):
        count = max(cfg.out_indices) + 1  # only the levels asked for are built
    if count < 2:
        raise ConfigError(
            f"model.backbone.out_indices={cfg.out_indices}: resenc3d needs at least 2 levels "
            "(the input block and the bottleneck)"
        )
    base = cfg.base_channels or 32
    widths = [min(base * 2**i, max(RESENC_MAX_CHANNELS, base)) for i in range(count)]
    return ResEncoder3d(in_chans, widths, _levels(cfg.out_indices, count, cfg.name))


def _swin(cfg: BackboneConfig, in_chans: int) -> nn.Module:
    width = cfg.base_channels or 48
    if width % 12:
        raise ConfigError(
            f"model.backbone.base_channels={width}: swinunetr3d needs a multiple of 12 "
            "(SwinUNETR's feature_size rule: 3, 6, 12 and 24 attention heads), e.g. 24 or 48"
        )
    return SwinEncoder3d(in_chans, width, cfg.drop_path_rate, _levels(cfg.out_indices, 5, cfg.name))


def _resnet(variant: str) -> Callable[[BackboneConfig, int], nn.Module]:
    def build(cfg: BackboneConfig, in_chans: int) -> nn.Module:
        levels = _levels(cfg.out_indices, 5, cfg.name)
        return ResNetEncoder3d(variant, in_chans, cfg.base_channels or 64, levels)

    return build


ENCODERS_3D: dict[str, Callable[[BackboneConfig, int], nn.Module]] = {
    "resenc3d": _resenc,
    "swinunetr3d": _swin,
    **{
        f"{variant}_3d": _resnet(variant)
        for variant in ("resnet10", "resnet18", "resnet34", "resnet50")
    },
}
"""The builders of :attr:`BackboneConfig.BACKBONES_3D`, by name: ``build(cfg, in_chans)``."""


def create_encoder_3d(cfg: BackboneConfig) -> nn.Module:
    """The 3D encoder named in ``cfg`` (``in_chans`` set), randomly initialised."""
    if cfg.name not in ENCODERS_3D:  # BackboneConfig refuses this; a table out of step is a bug
        raise ConfigError(
            f"model.backbone.name={cfg.name!r} is not a 3D backbone; one of "
            f"{', '.join(ENCODERS_3D)}"
        )
    if cfg.drop_path_rate and cfg.name != "swinunetr3d":
        raise ConfigError(
            f"model.backbone.drop_path_rate: {cfg.name} has no stochastic depth (swinunetr3d "
            "has); set it to 0"
        )
    return ENCODERS_3D[cfg.name](cfg, cfg.in_chans)
