"""Build a :class:`MultiTaskModel` from a :class:`ModelConfig`: the one place mapping names to code.

Each head's ``type`` picks its entry in the task table (:data:`bigmodel.tasks.TASKS`):
the head module and its loss come from there; the backbone is any timm model by name.
"""

from __future__ import annotations

import torch

from bigmodel.config import ModelConfig, check_heads
from bigmodel.models.backbone import create_backbone
from bigmodel.models.multitask import MultiTaskModel
from bigmodel.tasks import TASKS

__all__ = ["build_model"]


def build_model(model_cfg: ModelConfig) -> MultiTaskModel:
    """One timm backbone and the configured heads and losses; errors name the config field.

    The heads' checks run again here with ``resolved=True``: by now every head that needs
    ``num_classes`` must have it (``bigmodel.data.resolve_config`` fills it from the manifest).
    """
    check_heads(model_cfg, resolved=True)
    backbone = create_backbone(model_cfg.backbone)
    heads = {
        name: TASKS[cfg.type].head(backbone.channels, backbone.reductions, cfg)
        for name, cfg in model_cfg.heads.items()
    }
    criteria = {name: TASKS[cfg.type].loss(cfg) for name, cfg in model_cfg.heads.items()}
    model = MultiTaskModel(backbone, heads, criteria, dict(model_cfg.heads))
    if model_cfg.backbone.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
