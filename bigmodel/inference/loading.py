"""The model an inference command is pointed at: a model folder or a ``models:/`` reference.

:func:`bigmodel.model_folder.load_model` reads a folder; a registry reference
(``models:/name@alias``, ``models:/name/3``) is first resolved to a local folder by
:func:`bigmodel.registry.versions.resolve_model_uri` (downloaded once per version, an alias looked
up every time). MLflow is imported only for a reference, so importing ``bigmodel.inference``
never loads it.
"""

from __future__ import annotations

from pathlib import Path

from bigmodel import model_folder
from bigmodel.model_folder import LoadedModel

__all__ = ["load_model"]


def load_model(model: str | Path) -> LoadedModel:
    """Load a model folder, or the registered version ``models:/...`` points at, for inference.

    Raises:
        ModelFolderError: a file of the folder is missing, unreadable or does not fit.
        RegistryError: the registry is unreachable, or the model/version/alias does not exist.
    """
    if str(model).startswith("models:/"):
        from bigmodel.registry.versions import resolve_model_uri  # MLflow: only for a reference

        model = resolve_model_uri(str(model))
    return model_folder.load_model(model)
