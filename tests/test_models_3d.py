"""3D models: MONAI encoders behind the backbone contract, 3D heads, a 3D model that trains.

Tiny networks on 32^3 volumes, one thread: the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet, SwinUNETR
from monai.networks.nets.resnet import ResNet
from monai.networks.nets.swin_unetr import WindowAttention
from safetensors.torch import save_file

from bigmodel.config import BackboneConfig, ConfigError, ModelConfig, load_config
from bigmodel.models import build_model, create_backbone
from bigmodel.models.backbone3d import ENCODERS_3D

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 32
# The smallest widths each architecture allows, few levels where the architecture has a choice.
TINY = {
    "resenc3d": {"base_channels": 4, "out_indices": [0, 1, 2, 3]},
    "swinunetr3d": {"base_channels": 12},
    "resnet18_3d": {"base_channels": 4},
    "resnet50_3d": {"base_channels": 2},
}


def _cfg(name: str, **kw) -> BackboneConfig:
    return BackboneConfig(**{"name": name, "spatial_dims": 3, "in_chans": 1, **TINY[name], **kw})


def _volumes(batch: int = 2, chans: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, SIDE, SIDE, SIDE, generator=torch.Generator().manual_seed(0))


def test_every_3d_name_has_a_builder():
    assert set(ENCODERS_3D) == set(BackboneConfig.BACKBONES_3D)


@pytest.mark.parametrize("name", list(TINY))
def test_feature_maps_match_channels_and_reductions(name):
    backbone = create_backbone(_cfg(name, in_chans=2))
    with torch.no_grad():
        features = backbone(_volumes(chans=2))
    assert backbone.spatial_dims == 3
    assert len(features) == len(backbone.channels) == len(backbone.reductions) >= 4
    for f, c, r in zip(features, backbone.channels, backbone.reductions, strict=True):
        assert f.shape == (2, c, SIDE // r, SIDE // r, SIDE // r), (name, f.shape, c, r)
    pooled = backbone.pool(features)
    assert pooled.shape == (2, backbone.num_features)
    torch.testing.assert_close(pooled, features[-1].mean(dim=(2, 3, 4)))


def test_out_indices_choose_levels_and_resenc_depth():
    backbone = create_backbone(_cfg("resnet18_3d", out_indices=[2, 4]))
    assert backbone.reductions == [8, 32]
    resenc = BackboneConfig(name="resenc3d", spatial_dims=3, in_chans=1, out_indices=[1, 2])
    assert create_backbone(resenc).reductions == [2, 4]  # levels up to the deepest asked for
    with pytest.raises(ConfigError, match="out_indices=.*5 feature levels"):
        create_backbone(_cfg("swinunetr3d", out_indices=[5]))
    with pytest.raises(ConfigError, match="multiple of 12"):
        create_backbone(
            BackboneConfig(name="swinunetr3d", spatial_dims=3, in_chans=1, base_channels=8)
        )


def test_channels_last_uses_the_3d_format():
    backbone = create_backbone(_cfg("resenc3d", channels_last=True))
    assert backbone.model.input_block.conv1.conv.weight.is_contiguous(
        memory_format=torch.channels_last_3d
    )
    with torch.no_grad():
        assert backbone(_volumes())[0].shape == (2, 4, SIDE, SIDE, SIDE)


# ---------------------------------------------------------------- pretrained files


def test_pretrained_file_loads_key_by_key(tmp_path):
    torch.manual_seed(1)
    source = create_backbone(_cfg("resnet18_3d"))
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = create_backbone(_cfg("resnet18_3d", pretrained=str(tmp_path)))  # the folder
    for key, value in source.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, msg=key)


def test_mismatched_pretrained_file_is_refused_naming_keys(tmp_path):
    state = create_backbone(_cfg("resenc3d")).model.state_dict()
    wider = create_backbone(_cfg("resenc3d", base_channels=8)).model.state_dict()
    reshaped = tmp_path / "wider.safetensors"
    save_file(wider, str(reshaped))
    with pytest.raises(ConfigError, match=r"does not fit 3D backbone 'resenc3d'.*another shape"):
        create_backbone(_cfg("resenc3d", pretrained=str(reshaped)))
    odd = dict(state)
    odd.pop("bottleneck.conv2.conv.weight")
    odd["bogus.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    save_file(odd, str(broken))
    with pytest.raises(ConfigError) as caught:
        create_backbone(_cfg("resenc3d", pretrained=str(broken)))
    message = str(caught.value)
    assert "1 missing from the file (bottleneck.conv2.conv.weight)" in message
    assert "1 not in the model (bogus.weight)" in message
    with pytest.raises(ConfigError, match="never downloads"):
        create_backbone(_cfg("resenc3d", pretrained="swinunetr_btcv"))


def _whole_networks():
    yield (
        "resenc3d",
        DynUNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            kernel_size=[3] * 4,
            strides=[1, 2, 2, 2],
            upsample_kernel_size=[2] * 3,
            filters=[4, 8, 16, 32],
            res_block=True,
            deep_supervision=True,
            deep_supr_num=1,
        ),
    )
    yield "swinunetr3d", SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    yield (
        "resnet18_3d",
        ResNet(
            "basic",
            [2, 2, 2, 2],
            [4, 8, 16, 32],
            n_input_channels=1,
            conv1_t_stride=2,
            shortcut_type="A",
            num_classes=3,
        ),
    )


@pytest.mark.parametrize(
    "name,network", list(_whole_networks()), ids=["DynUNet", "SwinUNETR", "ResNet"]
)
def test_whole_monai_network_file_loads_its_encoder(tmp_path, name, network, caplog):
    """A DynUNet, SwinUNETR or ResNet saved whole: the encoder's keys load, the rest is named."""
    path = tmp_path / "network.pt"
    torch.save(network.state_dict(), path)
    backbone = create_backbone(_cfg(name, pretrained=str(path)))
    whole = network.state_dict()
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, whole[key]), key
    assert "weights not loaded" in caplog.text


# ---------------------------------------------------------------- activation checkpointing


def _counted_module(backbone) -> torch.nn.Module:
    model = backbone.model
    if backbone.name == "swinunetr3d":
        return next(m for m in model.modules() if isinstance(m, WindowAttention))
    return model.downsamples[0] if backbone.name == "resenc3d" else model.layer2


@pytest.mark.parametrize("name", ["resenc3d", "swinunetr3d", "resnet18_3d"])
def test_activation_checkpointing_same_gradients_and_recomputes(name):
    torch.manual_seed(0)
    plain = create_backbone(_cfg(name))
    checkpointed = create_backbone(_cfg(name, activation_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    images = _volumes()
    calls = {}
    for label, backbone in (("plain", plain), ("checkpointed", checkpointed)):
        count = [0]
        _counted_module(backbone).register_forward_pre_hook(
            lambda *_, c=count: c.__setitem__(0, c[0] + 1)
        )
        features = backbone(images)
        sum(f.square().mean() for f in features).backward()
        calls[label] = count[0]
    # Checkpointed: the module runs again in the backward pass to recompute its activations.
    assert calls["checkpointed"] == 2 * calls["plain"] > 0
    grads = dict(plain.named_parameters())
    for key, param in checkpointed.named_parameters():
        torch.testing.assert_close(param.grad, grads[key].grad, rtol=1e-4, atol=1e-6, msg=key)


def test_grad_checkpointing_is_read_as_activation_checkpointing():
    assert BackboneConfig(grad_checkpointing=True).activation_checkpointing
    with pytest.raises(ValueError, match="one switch"):
        BackboneConfig(grad_checkpointing=True, activation_checkpointing=False)


def test_frozen_3d_batchnorm_keeps_its_statistics():
    backbone = create_backbone(_cfg("resnet18_3d", freeze="all"))
    backbone.train()
    before = backbone.model.bn1.running_mean.clone()
    backbone(_volumes())
    assert not backbone.model.bn1.training
    assert torch.equal(backbone.model.bn1.running_mean, before)
    assert not any(p.requires_grad for p in backbone.parameters())


# ---------------------------------------------------------------- the 3D model


def _model_cfg(backbone: dict, **heads) -> ModelConfig:
    return ModelConfig.model_validate(
        {"backbone": {"spatial_dims": 3, "in_chans": 1, **backbone}, "heads": heads}
    )


SEG_AND_CLS = {
    "organ": {"type": "segmentation", "num_classes": 2, "decoder_channels": 16},
    "finding": {"type": "classification", "num_classes": 2},
}


def _cube_task() -> dict:
    """Two volumes, each with a bright cube (the mask); class 1 when the cube is large."""
    images = torch.randn(2, 1, SIDE, SIDE, SIDE, generator=torch.Generator().manual_seed(3)) * 0.3
    mask = torch.zeros(2, SIDE, SIDE, SIDE, dtype=torch.int64)
    mask[0, 8:16, 8:16, 8:16] = 1
    mask[1, 4:28, 6:26, 10:30] = 1
    images = images + mask[:, None].float()
    return {"image": images, "mask": mask, "cls": torch.tensor([0, 1])}


@pytest.mark.parametrize("backbone", ["resnet18_3d"])
def test_3d_model_outputs_have_the_volume_shapes(backbone):
    """A backbone whose finest level is at stride 2: the decoder's last block reaches the input."""
    model = build_model(_model_cfg({"name": backbone, **TINY[backbone]}, **SEG_AND_CLS))
    task = _cube_task()
    out = model(task["image"], task)
    assert out["outputs"]["organ"].shape == (2, 2, SIDE, SIDE, SIDE)
    assert out["outputs"]["finding"].shape == (2, 2)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.heads.parameters())


def test_3d_model_trains():
    torch.manual_seed(0)
    model = build_model(_model_cfg({"name": "resenc3d", **TINY["resenc3d"]}, **SEG_AND_CLS))
    task = _cube_task()
    out = model(task["image"], task)
    assert out["outputs"]["organ"].shape == (2, 2, SIDE, SIDE, SIDE)
    assert out["outputs"]["finding"].shape == (2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = model(task["image"], task)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_detection_and_fpn_are_refused_in_3d():
    tiny = {"name": "resenc3d", **TINY["resenc3d"]}
    with pytest.raises(ConfigError, match=r"model.heads.boxes \(detection\).*2D only"):
        build_model(_model_cfg(tiny, boxes={"type": "detection", "num_classes": 2}))
    with pytest.raises(ConfigError, match=r"model.heads.organ .*decoder=fpn is 2D only"):
        build_model(
            _model_cfg(tiny, organ={"type": "segmentation", "num_classes": 2, "decoder": "fpn"})
        )


def test_spatial_dims_must_fit_the_backbone_name():
    heads = ["model.heads.organ.type=segmentation"]
    with pytest.raises(ConfigError, match=r"resenc3d is a 3D backbone.*spatial_dims=3"):
        load_config(None, [*heads, "model.backbone.name=resenc3d"])
    with pytest.raises(ConfigError, match=r"resnet50 is not a 3D backbone.*resenc3d, swinunetr3d"):
        load_config(None, [*heads, "model.backbone.spatial_dims=3"])
    with pytest.raises(ConfigError, match="base_channels is for the 3D backbones"):
        load_config(None, [*heads, "model.backbone.base_channels=8"])
    cfg = load_config(
        None, [*heads, "model.backbone.name=swinunetr3d", "model.backbone.spatial_dims=3"]
    )
    assert cfg.model.backbone.spatial_dims == 3
