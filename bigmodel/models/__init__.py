"""Backbones (timm, features_only), task heads and the multi-task model."""

from bigmodel.models.backbone import Backbone, create_backbone, resolve_pretrained_file
from bigmodel.models.build import HEADS, build_model
from bigmodel.models.heads import RetrievalIndex
from bigmodel.models.multitask import MultiTaskModel

__all__ = [
    "HEADS",
    "Backbone",
    "MultiTaskModel",
    "RetrievalIndex",
    "build_model",
    "create_backbone",
    "resolve_pretrained_file",
]
