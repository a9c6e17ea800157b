"""What a new input needs to look like the model's training samples: the preprocessing record.

A model folder carries ``preprocessing.json`` next to its weights: the channel layout and 2.5D
context the shards were cut with, the intensity normalisation (scheme and statistics from the
dataset manifest), the training image size and resize policy, the class names of every head and
the spacing. It is written by :func:`bigmodel.model_folder.save_model` from the run's
resolved config and the shards' ``dataset.json``, so prediction never needs the shards.

The functions here apply it to numpy arrays: :func:`slice_volume` cuts a ``[C, D, H, W]`` volume
into 2D / 2.5D samples exactly as ``bigmodel-shard build`` did, and :func:`normalize` applies
the training-time intensity transform.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.config import Config
from bigmodel.data.intensity import IntensitySpec, apply_intensity
from bigmodel.data.manifest import Manifest, data_intensity
from sharding.helpers import atomic_write_text

__all__ = [
    "PREPROCESSING",
    "InputError",
    "Preprocessing",
    "check_channels",
    "normalize",
    "preprocessing_from",
    "slice_volume",
]

PREPROCESSING = "preprocessing.json"
RECORD_VERSION = 1
AXES = {"z": 0, "y": 1, "x": 2}
"""Spatial dimension of ``[D, H, W]`` each slicing axis cuts along (as in ``sharding/``)."""


class InputError(ValueError):
    """An input that does not fit the model; the message names the file and what differs."""


@dataclass(frozen=True)
class Preprocessing:
    """How training samples were made from source images, and what the outputs mean."""

    in_chans: int
    """Channels the model takes (after 2.5D stacking)."""
    source_channels: int
    """Channels of one source slice (``in_chans // (2 * context + 1)``)."""
    layout: str
    """``2d`` or ``2.5d``: how volumes were cut into samples."""
    axis: str
    """Slicing axis of volumes (``z``, ``y`` or ``x``; z is the first array axis)."""
    context: int
    """2.5D: neighbouring slices stacked on each side (0 for 2D)."""
    image_size: int
    """Side of the square crop the model was trained on (the sliding-window size)."""
    normalize: str
    """``manifest`` (per-channel z-score with the manifest's mean/std) or ``none``."""
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    classes: dict[str, list[str]]
    """Class names per head (retrieval trained on patient groups: empty)."""
    head_types: dict[str, str]
    channel_names: tuple[str, ...] = ()
    intensity: dict[str, Any] | None = None
    """``data.intensity`` resolved against the manifest (``IntensitySpec``: CT percentile clip +
    z-score, CT window, MR per-image z-score, dataset z-score) with the statistics it needs."""
    resize: str = "none"
    """``data.resize``: ``none`` (native resolution, sliding windows) or ``fit`` (longer side
    scaled to ``image_size``, padded to a square)."""
    spacing: list[float] | None = None
    """In-plane spacing the data was resampled to, when it was (None: native spacing)."""
    dataset: str = ""
    """Name of the training dataset."""
    image_encoding: str = "npy"
    """``png`` (8-bit sources) or ``npy``."""
    version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slices_per_sample(self) -> int:
        """Slices per sample along the slicing axis (``2 * context + 1``)."""
        return 2 * self.context + 1

    def to_json(self) -> str:
        """The record as indented JSON."""
        return json.dumps(asdict(self), indent=2)

    def save(self, path: str | Path) -> None:
        """Write the record (temporary name, then rename)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Preprocessing:
        """Read a record; ``ValueError`` naming the file when it is not one."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != RECORD_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, expected {RECORD_VERSION}")
            raw["mean"] = tuple(raw["mean"]) if raw.get("mean") is not None else None
            raw["std"] = tuple(raw["std"]) if raw.get("std") is not None else None
            raw["channel_names"] = tuple(raw.get("channel_names", ()))
            return cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: not a preprocessing record ({err})") from None


def preprocessing_from(cfg: Config, manifest: Manifest) -> Preprocessing:
    """The record of a run: ``cfg`` resolved against ``manifest`` (see ``resolve_config``)."""
    raw = manifest.raw
    layout = str(raw.get("layout", "2d"))
    context = int(raw.get("context", 0) or 0) if layout == "2.5d" else 0
    in_chans = int(cfg.model.backbone.in_chans or manifest.image.channels)
    classes: dict[str, list[str]] = {}
    for name, head in cfg.model.heads.items():
        task = manifest.tasks.get(head.target)
        classes[name] = list(task.classes) if task is not None else []
    data = cfg.data
    use_stats = data.normalize == "manifest"
    # The scheme resolved against this manifest, exactly as the training loader resolves it.
    intensity = data_intensity(cfg, manifest)
    return Preprocessing(
        in_chans=in_chans,
        source_channels=in_chans // (2 * context + 1),
        layout=layout,
        axis=str(raw.get("axis", "z")),
        context=context,
        image_size=data.image_size,
        normalize=data.normalize,
        mean=manifest.mean if use_stats else None,
        std=manifest.std if use_stats else None,
        classes=classes,
        head_types={name: head.type for name, head in cfg.model.heads.items()},
        channel_names=manifest.image.channel_names,
        intensity=intensity.to_dict() if intensity is not None else None,
        resize=data.resize,
        spacing=raw.get("spacing"),
        dataset=manifest.name,
        image_encoding=manifest.image.encoding,
    )


def check_channels(image: np.ndarray, prep: Preprocessing, file: str) -> None:
    """Refuse an image ``[C, ...]`` whose channel count the model cannot take."""
    if image.shape[0] != prep.source_channels:
        names = f" ({', '.join(prep.channel_names)})" if prep.channel_names else ""
        raise InputError(
            f"{file}: has {image.shape[0]} channel(s) but the model was trained on "
            f"{prep.source_channels}{names}; give it images with the same channels"
        )


def slice_volume(volume: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Cut ``[C, D, H, W]`` into ``[N, C * (2k + 1), h, w]`` samples along ``prep.axis``.

    The same cut as ``sharding/_samples.py``: for slice ``i`` the neighbours ``i-k..i+k`` (clamped
    at the edges) are stacked channel-major (``c * (2k + 1) + offset``). Vectorised with one
    ``np.take`` instead of a Python loop over slices.
    """
    dim = AXES[prep.axis]
    k = prep.context
    n = volume.shape[dim + 1]
    index = np.clip(np.arange(n)[:, None] + np.arange(-k, k + 1)[None, :], 0, n - 1)  # [N, 2k+1]
    stacked = np.take(volume, index, axis=dim + 1)  # [C, ..., N, 2k+1, ...] at dim+1, dim+2
    stacked = np.moveaxis(stacked, (dim + 1, dim + 2), (0, 2))  # [N, C, 2k+1, a, b]
    return np.ascontiguousarray(stacked.reshape(n, -1, *stacked.shape[3:]))


def normalize(
    images: torch.Tensor,
    prep: Preprocessing,
    window: dict[str, Any] | None = None,
    volume: dict[str, Any] | None = None,
) -> torch.Tensor:
    """The training-time intensity transform of raw images ``[..., C, H, W]``.

    With an intensity scheme in the record (CT clip + z-score, CT window, MR per-image z-score,
    dataset z-score) it is ``bigmodel.data.intensity.apply_intensity``, the function the training
    loader calls; ``window`` is the image's DICOM window (for ``ct_window`` without a fixed one)
    and ``volume`` the statistics of the whole volume the images come from (for ``mr``;
    :func:`sharding._stats.volume_intensity` of the input, as sharding computed them).
    Model folders written before intensity schemes existed get the manifest z-score they were
    trained with (a zero std divides by 1).
    """
    images = images.float()
    if prep.intensity is not None:
        return apply_intensity(images, IntensitySpec.from_dict(prep.intensity), window, volume)
    if prep.normalize != "manifest" or prep.mean is None or prep.std is None:
        return images
    mean = torch.tensor(prep.mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.tensor(
        [s if s > 0 else 1.0 for s in prep.std], dtype=images.dtype, device=images.device
    ).view(-1, 1, 1)
    return (images - mean) / std
