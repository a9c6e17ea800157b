"""The saved-model folder: what a finished run hands to evaluation, export and inference.

``{run}/model/`` holds ``model.safetensors`` (full fp32 weights, no pickle), the resolved
``config.yaml`` that rebuilds the architecture (``bigmodel.models.build_model``),
``preprocessing.json`` (how to turn a new image into what the model saw in training, see
:mod:`bigmodel.preprocessing`) and ``model_card.json``: the dataset manifest's sha256, the
git commit of the code, the final metrics, and when it was written. The folder is written under a
temporary name and renamed, so a reader never sees half a model. The same folder is what the
MLflow registry stores and what ``bigmodel-predict`` loads.

A run with a self-supervised head (``pretrains_backbone``: contrastive) also writes
``backbone.safetensors``: the backbone alone, under the keys of the whole timm model it was
built from, which is what ``model.backbone.pretrained`` reads and checks key by key
(:func:`backbone_state`). Other runs do not: the file would double the folder of every large
model for a use (starting another run from a supervised one) that the full weights can serve.

:func:`load_model` reads it back without unpickling anything (safetensors, YAML, JSON) and
names the file at fault when one is missing or does not fit.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bigmodel import __version__
from bigmodel.config import BackboneConfig, Config, ConfigError, load_config
from bigmodel.preprocessing import PREPROCESSING, Preprocessing, preprocessing_from
from sharding import storage
from sharding.helpers import atomic_write_json, stream_sha256

__all__ = [
    "BACKBONE_WEIGHTS",
    "CONFIG",
    "MODEL_CARD",
    "PREPROCESSING",
    "WEIGHTS",
    "LoadedModel",
    "backbone_state",
    "ModelFolderError",
    "file_sha256",
    "git_commit",
    "load_model",
    "load_weights",
    "save_model",
    "update_card",
]

WEIGHTS = "model.safetensors"
BACKBONE_WEIGHTS = "backbone.safetensors"
MODEL_CARD = "model_card.json"
CONFIG = "config.yaml"


class ModelFolderError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the fix."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the dataset manifest identifies the data a model saw)."""
    with storage.open_read(storage.unfold(path)) as f:  # a local file or an object-store URL
        return stream_sha256(f)


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


def _whole_timm_model(cfg: BackboneConfig) -> torch.nn.Module:
    """The whole timm model (no classifier) ``features_only`` cut down: shapes only, on the
    meta device where the architecture allows."""
    import timm  # only when a backbone file is written

    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": cfg.in_chans}
    try:
        with torch.device("meta"):
            return timm.create_model(cfg.name, **kwargs)
    except (RuntimeError, NotImplementedError, ValueError):  # e.g. .item() during init
        return timm.create_model(cfg.name, **kwargs)


def _whole_model_key(key: str, whole: dict[str, Any]) -> str | None:
    """The whole model's name of a ``features_only`` key.

    timm's feature wrappers keep a module's name, nest it under ``model.`` (FeatureGetterNet,
    ViTs) or flatten the first level of a Sequential (FeatureListNet: ``stages.0`` becomes
    ``stages_0``); the candidates are tried in that order.
    """
    candidates = [key, key.removeprefix("model.")]
    head, _, rest = key.partition(".")
    candidates += [
        f"{head[:i]}.{head[i + 1 :]}.{rest}" for i, ch in enumerate(head) if ch == "_" and rest
    ]
    return next((c for c in candidates if c in whole), None)


def backbone_state(
    state_dict: dict[str, torch.Tensor], backbone: BackboneConfig
) -> dict[str, torch.Tensor]:
    """The backbone's tensors of a model state dict, keyed as ``model.backbone.pretrained``
    expects: the whole timm model's keys (2D), the encoder's own (3D).

    Layers the feature extractor never had (a 2D model's classifier-side tail, e.g.
    EfficientNet's last convolution) are written as zeros: a ``features_only`` backbone built
    from the file drops them again.

    Raises:
        ModelFolderError: a backbone tensor has no place in the whole model (a timm wrapper
            this mapping does not know).
    """
    prefix = "backbone.model."
    features = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if backbone.spatial_dims == 3:
        return features
    whole = _whole_timm_model(backbone).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in features.items():
        name = _whole_model_key(key, whole)
        if name is None:
            raise ModelFolderError(
                f"{BACKBONE_WEIGHTS}: backbone tensor {key!r} has no place in timm model "
                f"{backbone.name!r}; the backbone cannot be saved for model.backbone.pretrained"
            )
        out[name] = value
    for key, ref in whole.items():
        if key not in out:
            out[key] = torch.zeros(ref.shape, dtype=ref.dtype)
    return out


def _fp32_copies(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    # Floating-point weights are stored fp32 whatever the training precision.
    return {
        k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
        for k, v in state_dict.items()
    }


def save_model(
    state_dict: dict[str, torch.Tensor],
    cfg: Config,
    directory: str | Path,
    metrics: dict[str, float] | None = None,
    manifest_path: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Write ``directory`` (weights, config, preprocessing record, model card) atomically.

    A run with a pretraining head also gets ``backbone.safetensors`` (:func:`backbone_state`),
    inside the same atomic folder rename.

    ``preprocessing`` defaults to the record made from ``cfg`` and the manifest at
    ``manifest_path``; without either the folder has no ``preprocessing.json`` and
    :func:`load_model` refuses it.
    """
    if preprocessing is None and manifest_path is not None:
        from bigmodel.data import load_manifest

        preprocessing = preprocessing_from(cfg, load_manifest(Path(manifest_path).parent))
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = _fp32_copies(state_dict)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    pretraining = [name for name, head in cfg.model.heads.items() if head.pretrains_backbone]
    if pretraining:
        backbone = _fp32_copies(backbone_state(tensors, cfg.model.backbone))
        save_file(backbone, str(tmp / BACKBONE_WEIGHTS), metadata={"format": "pt"})
    cfg.save(tmp / CONFIG)
    if preprocessing is not None:
        preprocessing.save(tmp / PREPROCESSING)
    card = {
        "name": cfg.name,
        "bigmodel_version": __version__,
        "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset_manifest_sha256": file_sha256(manifest_path) if manifest_path else None,
        "dataset_manifest": str(storage.unfold(manifest_path)) if manifest_path else None,
        "backbone": cfg.model.backbone.name,
        "heads": {name: head.type for name, head in cfg.model.heads.items()},
        "num_parameters": sum(t.numel() for t in tensors.values() if t.is_floating_point()),
        "metrics": dict(metrics or {}),
        **(
            {"backbone_weights": BACKBONE_WEIGHTS, "pretrained_by": pretraining}
            if pretraining
            else {}
        ),
        **(extra or {}),
    }
    (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def update_card(directory: str | Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Add ``fields`` to the folder's model card (rewritten atomically); returns the card.

    What is added after the folder was saved: ``bigmodel-export --int8`` records its int8 graph
    and that graph's agreement with fp32 here.
    """
    path = Path(directory) / MODEL_CARD
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{path}: not readable JSON ({err})") from None
    card.update(fields)
    atomic_write_json(path, card)
    return card


@dataclass
class LoadedModel:
    """A model folder in memory: the model in eval mode and everything that describes it."""

    model: torch.nn.Module
    """``MultiTaskModel`` with the saved weights, in eval mode, on the CPU."""
    config: Config
    """The resolved run config (channels and class counts filled in)."""
    preprocessing: Preprocessing
    """How to turn a new input into what the model saw in training."""
    card: dict[str, Any]
    """The model card (dataset manifest hash, git commit, metrics, ...)."""
    path: Path
    """The folder it came from."""


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelFolderError(
            f"{path}: missing ({what}); a model folder holds {WEIGHTS}, {CONFIG}, "
            f"{PREPROCESSING} and {MODEL_CARD}: point at a run's model/ folder or rewrite it with "
            f"bigmodel-export RUN --out DIR"
        )
    return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never unpickles); one-line error naming the file."""
    path = Path(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFolderError(f"{path}: not a readable safetensors file ({err})") from None


def load_model(path: str | Path) -> LoadedModel:
    """Load a model folder for inference (``bigmodel.inference.loading`` also takes ``models:/``).

    Raises:
        ModelFolderError: a file is missing, unreadable, or the weights do not fit the config;
            the message names the file.
    """
    from bigmodel.models import build_model  # timm and the heads: only when a model is built

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(
            f"{folder}: no such model folder (a run writes it as RUN/model; "
            f"bigmodel-export writes one from a checkpoint)"
        )
    config_file = _need(folder / CONFIG, "the resolved run config")
    weights_file = _need(folder / WEIGHTS, "the weights")
    prep_file = _need(folder / PREPROCESSING, "how inputs are preprocessed")
    card_file = _need(folder / MODEL_CARD, "the model card")
    try:
        cfg = load_config(config_file)
    except ConfigError as err:
        raise ModelFolderError(f"{config_file}: {' '.join(str(err).split())}") from None
    try:
        prep = Preprocessing.load(prep_file)
    except ValueError as err:
        raise ModelFolderError(str(err)) from None
    try:
        card = json.loads(card_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelFolderError(f"{card_file}: not readable JSON ({err})") from None
    if cfg.model.backbone.in_chans != prep.in_chans:
        raise ModelFolderError(
            f"{prep_file}: in_chans={prep.in_chans} but {CONFIG} has "
            f"model.backbone.in_chans={cfg.model.backbone.in_chans}; the files come from "
            f"different runs"
        )
    # Weights files are loaded by the folder, never downloaded (and never unpickled).
    cfg.model.backbone.pretrained = None
    try:
        model = build_model(cfg.model)
    except ConfigError as err:
        raise ModelFolderError(f"{config_file}: {' '.join(str(err).split())}") from None
    state = load_weights(weights_file)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{k} is {list(state[k].shape)}, the config builds {list(expected[k].shape)}"
            )
        raise ModelFolderError(
            f"{weights_file}: weights do not fit {CONFIG} ({'; '.join(parts)}); the files come "
            f"from different runs"
        )
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model=model, config=cfg, preprocessing=prep, card=card, path=folder)
