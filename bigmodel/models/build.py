"""Build a :class:`MultiTaskModel` from a :class:`ModelConfig`: the one place mapping names to code.

Each head's ``type`` picks its entry in the task table (:data:`bigmodel.tasks.TASKS`):
the head module and its loss come from there; the backbone is a timm model (2D) or a 3D encoder
by name, and its ``spatial_dims`` flows into every head.
"""

from __future__ import annotations

from bigmodel.config import ConfigError, ModelConfig, check_heads
from bigmodel.models.backbone import create_backbone
from bigmodel.models.multitask import MultiTaskModel
from bigmodel.tasks import TASKS

__all__ = ["build_model"]


def build_model(model_cfg: ModelConfig) -> MultiTaskModel:
    """One backbone and the configured heads and losses; errors name the config field.

    The heads' checks run again here with ``resolved=True``: by now every head that needs
    ``num_classes`` must have it (``bigmodel.data.resolve_config`` fills it from the manifest).
    A head that cannot be built for the backbone's ``spatial_dims`` (detection in 3D) says so
    when it is built; the error is prefixed with the head's name.
    """
    check_heads(model_cfg, resolved=True)
    backbone = create_backbone(model_cfg.backbone)
    heads = {}
    for name, cfg in model_cfg.heads.items():
        try:
            heads[name] = TASKS[cfg.type].head(
                backbone.channels, backbone.reductions, cfg, spatial_dims=backbone.spatial_dims
            )
        except ConfigError as err:
            raise ConfigError(f"model.heads.{name} ({cfg.type}): {err}") from None
    criteria = {name: TASKS[cfg.type].loss(cfg) for name, cfg in model_cfg.heads.items()}
    model = MultiTaskModel(backbone, heads, criteria, dict(model_cfg.heads))
    if model_cfg.backbone.channels_last:
        model = model.to(memory_format=backbone.memory_format)
    return model
