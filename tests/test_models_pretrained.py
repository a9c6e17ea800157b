"""Local pretrained weights: read explicitly, adapted as timm does, compared key by key."""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from safetensors.torch import save_file

from bigmodel.config import BackboneConfig, ConfigError
from bigmodel.models import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "test_resnet"


class Opaque:
    """Any class: unpickling it would run code, which weights_only refuses."""


@pytest.fixture(scope="module")
def state():
    """The state dict of a timm model, classifier included, as a user would save it."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _backbone(path, in_chans: int = 1):
    return create_backbone(BackboneConfig(name=NAME, in_chans=in_chans, pretrained=str(path)))


def test_weights_load_with_the_classifier_left_out_and_said(tmp_path, state, caplog):
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with caplog.at_level(logging.WARNING, logger="bigmodel.models.backbone"):
        backbone = _backbone(path, in_chans=3)
    loaded = backbone.model.state_dict()
    assert loaded.keys() <= state.keys()
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], msg=key)
    warned = [r.getMessage() for r in caplog.records if "classifier" in r.getMessage()]
    assert len(warned) == 1 and "fc.weight" in warned[0] and str(path) in warned[0]


def test_torch_checkpoint_in_a_container_reads_with_weights_only(tmp_path, state):
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    loaded = _backbone(path).model.state_dict()
    torch.testing.assert_close(loaded["layer4.0.conv2.weight"], state["layer4.0.conv2.weight"])


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path, state):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": state, "extra": Opaque()}, path)
    with pytest.raises(ConfigError, match=r"model\.pth' cannot be read as a state dict"):
        _backbone(path)


def test_mismatching_keys_are_named_in_one_line_whatever_timm_logs(tmp_path, state):
    bad = dict(state)
    bad.pop("layer1.0.conv1.weight")
    bad["extra.weight"] = torch.zeros(3)
    bad["layer2.0.bn1.weight"] = torch.zeros(5)
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    logging.disable(logging.CRITICAL)  # the check reads the keys, not timm's log lines
    try:
        with pytest.raises(ConfigError) as err:
            _backbone(path)
    finally:
        logging.disable(logging.NOTSET)
    message = str(err.value)
    assert "\n" not in message
    assert f"backbone.pretrained='{path}' does not fit timm model '{NAME}'" in message
    assert "1 missing from the file (layer1.0.conv1.weight)" in message
    assert "1 not in the model (extra.weight)" in message
    assert "1 with another shape (layer2.0.bn1.weight [5] vs [48])" in message


def test_parts_the_feature_extractor_drops_are_accepted_without_warnings(tmp_path, caplog):
    """EfficientNet's features lack conv_head/bn2: checked against the whole model, no noise."""
    torch.manual_seed(0)
    state = {
        k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()
    }
    path = tmp_path / "effnet.safetensors"
    save_file(state, str(path))
    with caplog.at_level(logging.INFO):
        backbone = create_backbone(
            BackboneConfig(name="test_efficientnet", in_chans=3, pretrained=str(path))
        )
    loaded = backbone.model.state_dict()
    assert "conv_head.weight" in state and "conv_head.weight" not in loaded
    torch.testing.assert_close(
        loaded["blocks.1.0.conv_exp.weight"], state["blocks.1.0.conv_exp.weight"]
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "classifier.weight" in warnings[0], warnings
