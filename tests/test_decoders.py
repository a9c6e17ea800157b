"""Segmentation decoders (U-Net, light FPN) over ResNet, ConvNeXt and ViT features."""

from __future__ import annotations

import pytest
import torch

from bigmodel.config import ConfigError, ModelConfig, SegmentationHeadConfig, load_config
from bigmodel.models import build_model
from bigmodel.tasks.heads.segmentation import FPNDecoder, UNetDecoder, unet_block_channels

pytestmark = pytest.mark.usefixtures("one_thread")

# (timm name, input side): tiny timm test models; the ViT has a fixed patch grid.
BACKBONES = [("test_resnet", 64), ("test_convnext", 64), ("test_vit", 160)]


def _model(backbone: str, decoder: str, num_classes: int = 3) -> torch.nn.Module:
    cfg = ModelConfig.model_validate(
        {
            "backbone": {"name": backbone, "in_chans": 1},
            "heads": {
                "seg": {
                    "type": "segmentation",
                    "num_classes": num_classes,
                    "decoder": decoder,
                    "decoder_channels": 32,
                }
            },
        }
    )
    return build_model(cfg)


@pytest.mark.parametrize("decoder", ["unet", "fpn"])
@pytest.mark.parametrize(("backbone", "size"), BACKBONES, ids=[b for b, _ in BACKBONES])
def test_logits_at_input_size_and_every_parameter_gets_a_gradient(backbone, size, decoder):
    torch.manual_seed(0)
    model = _model(backbone, decoder)
    images = torch.randn(2, 1, size, size)
    masks = torch.randint(0, 3, (2, size, size))
    out = model(images, {"mask": masks})
    assert out["outputs"]["seg"].shape == (2, 3, size, size)
    out["loss"].backward()
    head = model.heads["seg"]
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"{decoder} on {backbone}: no gradient for {missing}"
    assert any(p.grad is not None and p.grad.any() for p in model.backbone.parameters())


def test_unet_is_smp_decoder_reaching_full_resolution_from_every_level():
    torch.manual_seed(0)
    model = _model("test_resnet", "unet")
    decoder = model.heads["seg"].decoder
    assert isinstance(decoder, UNetDecoder)
    channels = model.backbone.channels
    # one smp block per backbone level, the last one at the input resolution
    assert len(decoder.decoder.blocks) == len(channels)
    features = model.backbone(torch.randn(1, 1, 64, 64))
    assert decoder(features, (64, 64)).shape[-2:] == (64, 64)


def test_fpn_leaves_out_the_stride_2_level():
    model = _model("test_resnet", "fpn")
    reductions = model.backbone.reductions
    assert min(reductions) == 2  # the ResNet stem level exists ...
    decoder = model.heads["seg"].decoder
    assert isinstance(decoder, FPNDecoder)
    assert [reductions[i] for i in decoder.levels] == [r for r in reductions if r >= 4]


def test_unet_block_widths_halve_down_to_16():
    assert unet_block_channels(128, 5) == [128, 64, 32, 16, 16]
    assert unet_block_channels(32, 3) == [32, 16, 16]


def test_decoder_learns_a_disc():
    """A few steps on one disc image: the U-Net's foreground Dice rises well above chance."""
    torch.manual_seed(0)
    model = _model("test_resnet", "unet", num_classes=2)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    mask = (((yy - 14) ** 2 + (xx - 18) ** 2) < 64).long()[None].repeat(4, 1, 1)
    images = mask[:, None].float() * 2 + 0.3 * torch.randn(4, 1, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(25):
        loss = model(images, {"mask": mask})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        pred = model(images)["outputs"]["seg"].argmax(1)
    dice = 2 * ((pred == 1) & (mask == 1)).sum() / ((pred == 1).sum() + (mask == 1).sum())
    assert dice > 0.8, float(dice)


def test_unknown_decoder_is_a_config_error_naming_the_field(tmp_path):
    assert SegmentationHeadConfig(num_classes=2).decoder == "unet"
    path = tmp_path / "c.yaml"
    path.write_text("model: {heads: {seg: {type: segmentation}}}\n")
    with pytest.raises(ConfigError, match="model.heads.seg.segmentation.decoder"):
        load_config(path, ["model.heads.seg.decoder=deeplab"])
