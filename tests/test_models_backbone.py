"""Backbone: timm feature extractors over several families, local weights, freezing, switches."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers.norm_act import FrozenBatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from bigmodel.config import BackboneConfig, ConfigError
from bigmodel.models import create_backbone, resolve_pretrained_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> BackboneConfig:
    kw.setdefault("in_chans", 1)
    return BackboneConfig(**kw)


@pytest.mark.parametrize(
    "name,size",
    [
        ("test_resnet", 64),
        ("resnet18", 32),
        ("test_convnext", 64),
        ("convnext_atto", 32),
        ("test_efficientnet", 64),
        ("hrnet_w18_small", 32),
        ("test_vit", 64),
    ],
)
def test_feature_shapes_follow_feature_info(name, size):
    backbone = create_backbone(_cfg(name=name, in_chans=2))
    images = torch.randn(2, 2, size, size)
    with torch.no_grad():
        features = backbone(images)
    assert len(features) == len(backbone.channels) == len(backbone.reductions) >= 3
    for f, c, r in zip(features, backbone.channels, backbone.reductions, strict=True):
        assert f.shape == (2, c, size // r, size // r), (name, f.shape, c, r)
    assert backbone.pool(features).shape == (2, backbone.num_features)


def test_out_indices_select_levels():
    backbone = create_backbone(_cfg(name="test_resnet", out_indices=[2, 3, 4]))
    assert backbone.reductions == [8, 16, 32]
    with pytest.raises(ConfigError, match=r"model.backbone \(test_resnet\)"):
        create_backbone(_cfg(name="test_resnet", out_indices=[9]))


def test_vit_levels_share_one_stride():
    backbone = create_backbone(_cfg(name="test_vit"))
    assert len(set(backbone.reductions)) == 1  # heads must accept equal reductions


def _first_conv(model_name: str) -> str:
    return timm.models.get_pretrained_cfg(model_name).first_conv + ".weight"


@pytest.fixture(scope="module")
def rgb_weights(tmp_path_factory):
    """A 3-channel test_resnet saved locally with safetensors, plus its state dict."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file(state, str(path))
    return path, state


def test_one_channel_stem_is_adapted_from_rgb_weights(rgb_weights):
    path, state = rgb_weights
    backbone = create_backbone(_cfg(name="test_resnet", in_chans=1, pretrained=str(path)))
    loaded = backbone.model.state_dict()
    stem = _first_conv("test_resnet")
    # timm's adapt_input_conv sums the RGB filters for one channel.
    torch.testing.assert_close(loaded[stem], state[stem].sum(dim=1, keepdim=True))
    for key in ("layer1.0.conv1.weight", "layer4.0.bn1.running_var"):
        torch.testing.assert_close(loaded[key], state[key])


@pytest.mark.parametrize(
    "name,wrapped_prefix",
    [("test_efficientnet", ""), ("test_vit", "model."), ("test_convnext", "")],
)
def test_stem_adaptation_across_families(tmp_path, name, wrapped_prefix):
    """EfficientNet's file holds head weights its feature extractor lacks: still accepted."""
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    backbone = create_backbone(_cfg(name=name, pretrained=str(tmp_path / "w.safetensors")))
    stem = _first_conv(name)
    loaded = dict(backbone.model.named_parameters())
    # FeatureListNet flattens the first module level ("stem.0" -> "stem_0").
    candidates = [wrapped_prefix + stem, stem.replace(".", "_", 1)]
    key = next(k for k in candidates if k in loaded)
    torch.testing.assert_close(loaded[key], state[stem].sum(dim=1, keepdim=True))


def test_multi_channel_stem_repeats_rgb_filters(rgb_weights):
    path, state = rgb_weights
    # A folder works too: the file is found by its conventional name.
    backbone = create_backbone(_cfg(name="test_resnet", in_chans=4, pretrained=str(path.parent)))
    stem = _first_conv("test_resnet")
    rgb = state[stem]
    expected = rgb.repeat(1, 2, 1, 1)[:, :4] * (3 / 4)
    torch.testing.assert_close(backbone.model.state_dict()[stem], expected)


def test_weights_of_another_architecture_are_refused(rgb_weights):
    path, _ = rgb_weights
    with pytest.raises(ConfigError, match="does not fit timm model 'resnet18'"):
        create_backbone(_cfg(name="resnet18", pretrained=str(path)))


@pytest.mark.parametrize("request_", ["resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k", "true"])
def test_hub_download_is_refused_with_instructions(request_):
    with pytest.raises(ConfigError) as err:
        create_backbone(_cfg(name="resnet18", pretrained=request_))
    message = str(err.value)
    assert "asks for a download" in message
    assert "huggingface-cli download timm/resnet18" in message
    assert "backbone.pretrained=weights/resnet18/model.safetensors" in message


def test_missing_weights_file_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve_pretrained_file(str(tmp_path / "nope.safetensors"), "resnet18")
    with pytest.raises(ConfigError, match="folder without a weights file"):
        resolve_pretrained_file(str(tmp_path), "resnet18")
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.pth").write_bytes(b"")
    with pytest.raises(ConfigError, match="several weights files"):
        resolve_pretrained_file(str(tmp_path), "resnet18")


def test_bad_names_and_missing_in_chans_name_the_field():
    with pytest.raises(ConfigError, match="model.backbone.name='resnet_nope'"):
        create_backbone(_cfg(name="resnet_nope"))
    with pytest.raises(ConfigError, match="model.backbone.in_chans"):
        create_backbone(BackboneConfig(name="test_resnet"))


def test_freeze_all_freezes_weights_and_batchnorm_statistics():
    backbone = create_backbone(_cfg(name="test_resnet", freeze="all"))
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    norms = [
        m for m in backbone.modules() if isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d))
    ]
    assert norms
    before = norms[0].running_mean.clone()
    backbone.train()
    backbone(torch.randn(2, 1, 32, 32) * 5 + 3)
    torch.testing.assert_close(norms[0].running_mean, before)


@pytest.mark.parametrize(
    "name,frozen_prefix,trainable_prefix",
    [
        ("test_resnet", "layer1.", "layer2."),
        ("test_convnext", "stages_1.", "stages_2."),
        ("test_efficientnet", "blocks.1.", "blocks.2."),
        ("test_vit", "model.blocks.4.", "model.blocks.5."),  # levels: blocks 3, 4, 5
    ],
)
def test_freeze_first_stages(name, frozen_prefix, trainable_prefix):
    backbone = create_backbone(_cfg(name=name, freeze="stages", freeze_stages=2))
    params = dict(backbone.model.named_parameters())
    frozen = [
        n for n in params if n.startswith(frozen_prefix) and not n.startswith(trainable_prefix)
    ]
    trainable = [n for n in params if n.startswith(trainable_prefix)]
    assert frozen and trainable
    assert not any(params[n].requires_grad for n in frozen)
    assert all(params[n].requires_grad for n in trainable)
    # The stem runs before every stage: frozen too.
    assert not next(iter(params.values())).requires_grad


def test_freeze_stages_out_of_range_is_an_error():
    with pytest.raises(ConfigError, match="freeze_stages=9"):
        create_backbone(_cfg(name="test_resnet", freeze="stages", freeze_stages=9))
    with pytest.raises(ConfigError, match="freeze_stages >= 1"):
        create_backbone(_cfg(name="test_resnet", freeze="stages"))


def _grads(backbone, images):
    backbone.zero_grad()
    sum(f.square().mean() for f in backbone(images)).backward()
    return [p.grad.clone() for p in backbone.parameters()]


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    plain = create_backbone(_cfg(name=name))
    checkpointed = create_backbone(_cfg(name=name, grad_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    assert any(getattr(m, "grad_checkpointing", False) for m in checkpointed.modules())
    assert not any(getattr(m, "grad_checkpointing", False) for m in plain.modules())
    images = torch.randn(2, 1, 64, 64)
    for a, b in zip(_grads(plain, images), _grads(checkpointed, images), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_unsupported_names_the_switch():
    with pytest.raises(ConfigError, match="backbone.grad_checkpointing=false"):
        create_backbone(_cfg(name="hrnet_w18_small", grad_checkpointing=True))


def test_channels_last_matches_default_layout():
    torch.manual_seed(0)
    plain = create_backbone(_cfg(name="test_resnet")).eval()
    nhwc = create_backbone(_cfg(name="test_resnet", channels_last=True)).eval()
    nhwc.load_state_dict(plain.state_dict())
    conv = next(m for m in nhwc.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(images), nhwc(images), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
