"""Build a :class:`MultiTaskModel` from a :class:`ModelConfig`: the one place mapping names to code.

The lookups are plain dictionaries (STYLE.md rule 4): a head ``type`` names its module in
``HEADS`` and its loss in ``bigmodel.losses.LOSSES``; the backbone is any timm model by name.
"""

from __future__ import annotations

import torch

from bigmodel.config import ConfigError, ModelConfig
from bigmodel.losses import LOSSES
from bigmodel.models.backbone import create_backbone
from bigmodel.models.heads import ClassificationHead, DetectionHead, RetrievalHead, SegmentationHead
from bigmodel.models.multitask import MultiTaskModel

__all__ = ["HEADS", "HEAD_TARGETS", "build_model"]

HEADS = {
    "classification": ClassificationHead,
    "segmentation": SegmentationHead,
    "detection": DetectionHead,
    "retrieval": RetrievalHead,
}

# Batch fields (docs/contracts.md) each head type can learn from.
HEAD_TARGETS = {
    "classification": ("cls",),
    "segmentation": ("mask",),
    "detection": ("boxes",),
    "retrieval": ("cls", "group"),
}

# Smallest sensible num_classes per head type (segmentation counts the background class).
MIN_CLASSES = {"classification": 1, "segmentation": 2, "detection": 1, "retrieval": 1}


def _check_head(name: str, cfg) -> None:
    field = f"model.heads.{name}"
    if cfg.target not in HEAD_TARGETS[cfg.type]:
        raise ConfigError(
            f"{field}.target={cfg.target!r} cannot train a {cfg.type} head; allowed: "
            f"{', '.join(HEAD_TARGETS[cfg.type])}"
        )
    # Retrieval trained on patient groups has no class list; only ArcFace needs one.
    needs_classes = cfg.type != "retrieval" or cfg.metric_loss == "arcface"
    if needs_classes and cfg.num_classes is None:
        raise ConfigError(
            f"{field}.num_classes is not set: fill it from the dataset manifest with "
            f"bigmodel.data.resolve_config(cfg, manifest) or set {field}.num_classes=N"
        )
    if cfg.num_classes is not None and cfg.num_classes < MIN_CLASSES[cfg.type]:
        raise ConfigError(
            f"{field}.num_classes={cfg.num_classes}: a {cfg.type} head needs at least "
            f"{MIN_CLASSES[cfg.type]} (segmentation counts background as class 0)"
        )
    weights = getattr(cfg, "class_weights", None)
    if weights is not None and len(weights) != cfg.num_classes:
        raise ConfigError(
            f"{field}.class_weights has {len(weights)} entries for num_classes={cfg.num_classes}"
        )


def build_model(model_cfg: ModelConfig) -> MultiTaskModel:
    """One timm backbone and the configured heads and losses; errors name the config field."""
    for name, head_cfg in model_cfg.heads.items():
        _check_head(name, head_cfg)
    backbone = create_backbone(model_cfg.backbone)
    heads = {
        name: HEADS[cfg.type](backbone.channels, backbone.reductions, cfg)
        for name, cfg in model_cfg.heads.items()
    }
    criteria = {name: LOSSES[cfg.type](cfg) for name, cfg in model_cfg.heads.items()}
    model = MultiTaskModel(backbone, heads, criteria, dict(model_cfg.heads))
    if model_cfg.backbone.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
