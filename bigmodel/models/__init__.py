"""Backbones (timm, features_only), task heads, the multi-task model and the task table.

The names below are imported on first use (PEP 562 ``__getattr__``) rather than here: the task
table (:mod:`bigmodel.models.tasks`) is read by ``bigmodel.config`` when a config is loaded, and
importing it must not pull in torch and timm (or import ``bigmodel.config`` back while it is
still loading). ``from bigmodel.models import build_model`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigmodel.models.backbone import (
        Backbone,
        check_pretrained,
        create_backbone,
        resolve_pretrained_file,
    )
    from bigmodel.models.build import build_model
    from bigmodel.models.heads import RetrievalIndex
    from bigmodel.models.multitask import MultiTaskModel
    from bigmodel.models.tasks import TASKS, Task

_EXPORTS = {
    "Backbone": "bigmodel.models.backbone",
    "check_pretrained": "bigmodel.models.backbone",
    "create_backbone": "bigmodel.models.backbone",
    "resolve_pretrained_file": "bigmodel.models.backbone",
    "build_model": "bigmodel.models.build",
    "RetrievalIndex": "bigmodel.models.heads",
    "MultiTaskModel": "bigmodel.models.multitask",
    "TASKS": "bigmodel.models.tasks",
    "Task": "bigmodel.models.tasks",
}

__all__ = [
    "TASKS",
    "Backbone",
    "MultiTaskModel",
    "RetrievalIndex",
    "Task",
    "build_model",
    "check_pretrained",
    "create_backbone",
    "resolve_pretrained_file",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bigmodel.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
