"""Backbones (timm, features_only), the multi-task model, its build, and the sliding window.

The heads, losses and metrics of each task type are in :mod:`bigmodel.tasks` (below this
package); :func:`build_model` reads them from the task table.
"""

from bigmodel.models.backbone import (
    Backbone,
    check_pretrained,
    create_backbone,
    resolve_pretrained_file,
)
from bigmodel.models.build import build_model
from bigmodel.models.multitask import MultiTaskModel

__all__ = [
    "Backbone",
    "MultiTaskModel",
    "build_model",
    "check_pretrained",
    "create_backbone",
    "resolve_pretrained_file",
]
