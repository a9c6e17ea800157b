"""The saved-model folder: what a finished run hands to evaluation, export and inference.

``{run}/model/`` holds ``model.safetensors`` (full weights, no pickle), the resolved
``config.yaml`` that rebuilds the architecture (``bigmodel.models.build_model``), and
``model_card.json``: the dataset manifest's sha256, the git commit of the code, the final
metrics, and when it was written. The folder is written under a temporary name and renamed, so a
reader never sees half a model.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from bigmodel import __version__
from bigmodel.config import Config

__all__ = ["MODEL_CARD", "WEIGHTS", "file_sha256", "git_commit", "save_model"]

WEIGHTS = "model.safetensors"
MODEL_CARD = "model_card.json"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the dataset manifest identifies the data a model saw)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(cwd: str | Path | None = None) -> str | None:
    """Commit of the code that trained the model; None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_model(
    state_dict: dict[str, torch.Tensor],
    cfg: Config,
    directory: str | Path,
    metrics: dict[str, float] | None = None,
    manifest_path: str | Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``directory`` (weights + config + model card) atomically; returns it."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    cfg.save(tmp / "config.yaml")
    card = {
        "name": cfg.name,
        "bigmodel_version": __version__,
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset_manifest_sha256": file_sha256(manifest_path) if manifest_path else None,
        "dataset_manifest": str(manifest_path) if manifest_path else None,
        "backbone": cfg.model.backbone.name,
        "heads": {name: head.type for name, head in cfg.model.heads.items()},
        "num_parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
        "metrics": dict(metrics or {}),
        **(extra or {}),
    }
    (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory
