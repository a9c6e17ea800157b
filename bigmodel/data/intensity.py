"""Intensity preprocessing chosen per modality: the same function in training and prediction.

Schemes (``data.intensity``):

* ``ct``: nnU-Net's CT normalisation: clip to the 0.5/99.5 percentiles of the *foreground*
  (labelled) pixels of the training split, then z-score with the foreground mean/std, all from
  ``dataset.json``. Air (-1000 HU) and the table no longer set the scale, as they do with a plain
  z-score over every pixel. Without masks the percentiles of all pixels stand in.
* ``ct_window``: clip to the DICOM window that sharding recorded per sample (``meta.json``
  ``window``), then map it to [-1, 1]; ``ct_window:NAME`` uses a named preset
  (``sharding.format.CT_WINDOWS``: lung, mediastinum, brain, bone, abdomen) and
  ``ct_window:C,W`` any center/width in HU.
* ``mr``: per-image z-score per channel (MR intensities have no absolute unit, so dataset-wide
  statistics mean little; nnU-Net does the same).
* ``dataset``: z-score with the manifest's per-channel mean/std (any modality; the old default).
* ``none``: raw values.
* ``auto``: ``ct`` for CT, ``mr`` for MR, else ``dataset`` (modality from ``dataset.json``).

:func:`intensity_spec` resolves the scheme against a manifest once, up front (an unfit scheme is
a :class:`~bigmodel.config.ConfigError` before any worker starts); the resulting
:class:`IntensitySpec` is plain data, saved with a model so that prediction repeats it exactly;
:func:`apply_intensity` is the per-image function both sides call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from bigmodel.config import ConfigError
from sharding.format import CT_WINDOWS, default_intensity

__all__ = ["SCHEMES", "IntensitySpec", "apply_intensity", "intensity_spec"]

SCHEMES = ("auto", "ct", "ct_window", "mr", "dataset", "none")
_CT_ONLY = ("ct", "ct_window")
# Values below this (HU) exist in every CT with air in the field of view; a "CT" whose 0.5th
# percentile is far above it is probably already rescaled (e.g. 0-255), and HU windows would
# clip it to nothing.
_AIR_HU = -500.0
_EPS = 1e-6


@dataclass(frozen=True)
class IntensitySpec:
    """A resolved intensity scheme with the numbers it needs (JSON-able via :meth:`to_dict`)."""

    scheme: str
    """``ct``, ``ct_window``, ``mr``, ``dataset`` or ``none`` (never ``auto``)."""
    low: tuple[float, ...] | None = None
    """``ct``: per-channel clip floor; ``ct_window`` with a fixed window: the window floor."""
    high: tuple[float, ...] | None = None
    """Per-channel clip ceiling (as ``low``)."""
    mean: tuple[float, ...] | None = None
    """``ct`` / ``dataset``: per-channel mean subtracted."""
    std: tuple[float, ...] | None = None
    """``ct`` / ``dataset``: per-channel std divided by."""
    window: str = ""
    """``ct_window``: the preset name or ``C,W``; empty means the sample's own DICOM window."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for ``config``/model-folder JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensitySpec:
        """Inverse of :meth:`to_dict`."""
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **tuples})


def _parse_window(text: str) -> tuple[float, float]:
    if text in CT_WINDOWS:
        return CT_WINDOWS[text]
    parts = text.split(",")
    try:
        center, width = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"data.intensity=ct_window:{text}: unknown window; use a preset "
            f"({', '.join(CT_WINDOWS)}) or CENTER,WIDTH in HU, e.g. ct_window:40,400"
        ) from None
    if width <= 0:
        raise ConfigError(f"data.intensity=ct_window:{text}: the width must be > 0")
    return center, width


def intensity_spec(
    scheme: str, manifest: dict[str, Any], where: str = "dataset.json"
) -> IntensitySpec:
    """Resolve ``data.intensity`` against a manifest's ``image``/``stats``; refuse unfit schemes.

    Args:
        scheme: one of :data:`SCHEMES`, ``ct_window:NAME`` or ``ct_window:C,W``.
        manifest: the parsed ``dataset.json`` (``Manifest.raw``).
        where: the manifest's path, for messages.

    Raises:
        ConfigError: unknown scheme; a CT scheme on a non-CT (or rescaled) dataset, ``mr`` on CT;
            statistics the scheme needs are missing from the manifest.
    """
    name, _, window = scheme.partition(":")
    if name not in SCHEMES or (window and name != "ct_window"):
        raise ConfigError(
            f"data.intensity is {scheme!r}; allowed: {', '.join(SCHEMES)}, ct_window:NAME or "
            f"ct_window:CENTER,WIDTH"
        )
    modality = str((manifest.get("image") or {}).get("modality", "") or "").upper()
    stats = manifest.get("stats") or {}
    if name == "auto":
        name = default_intensity(modality)
    if name in _CT_ONLY and modality and modality != "CT":
        raise ConfigError(
            f"data.intensity={scheme} clips Hounsfield units but {where} holds {modality} "
            f"images; use data.intensity={'mr' if modality == 'MR' else 'dataset'} (or auto)"
        )
    if name == "mr" and modality == "CT":
        raise ConfigError(
            f"data.intensity=mr z-scores each image alone but {where} holds CT, whose HU are "
            f"absolute; use data.intensity=ct or ct_window (or auto)"
        )
    low = stats.get("p0_5")
    if name in _CT_ONLY and low is not None and min(low) > _AIR_HU:
        raise ConfigError(
            f"data.intensity={scheme} expects Hounsfield units but {where} has a 0.5th "
            f"percentile of {min(low):g} (no air at -1000): the images look rescaled; use "
            f"data.intensity=dataset"
        )
    if name == "ct_window":
        if not window:
            return IntensitySpec("ct_window")
        center, width = _parse_window(window)
        return IntensitySpec(
            "ct_window", (center - width / 2,), (center + width / 2,), window=window
        )
    if name in ("ct", "dataset"):
        source = stats.get("foreground") or stats if name == "ct" else stats
        needed = ("p0_5", "p99_5", "mean", "std") if name == "ct" else ("mean", "std")
        missing = [k for k in needed if source.get(k) is None]
        if missing:
            raise ConfigError(
                f"data.intensity={name} needs stats.{'/'.join(missing)} in {where}; rebuild "
                f"the shards with this version of bigmodel-shard build or set data.intensity=none"
            )
        spec = {k: tuple(float(v) for v in source[k]) for k in needed}
        if name == "ct":
            return IntensitySpec("ct", spec["p0_5"], spec["p99_5"], spec["mean"], spec["std"])
        return IntensitySpec("dataset", mean=spec["mean"], std=spec["std"])
    return IntensitySpec(name)


def _channel_view(values: tuple[float, ...], image: torch.Tensor) -> torch.Tensor:
    view = torch.tensor(values, dtype=torch.float32, device=image.device)
    if view.numel() == 1:
        return view.view(1, 1, 1)
    if view.numel() != image.shape[-3]:
        raise ValueError(f"intensity statistics have {view.numel()} channels, image {image.shape}")
    return view.view(-1, 1, 1)


def apply_intensity(
    image: torch.Tensor, spec: IntensitySpec, window: dict[str, Any] | None = None
) -> torch.Tensor:
    """The preprocessed float32 image ``[..., C, H, W]`` (one image or a batch).

    Args:
        image: raw intensities (HU for CT) as sharding stored them.
        spec: from :func:`intensity_spec`.
        window: the sample's DICOM window (``{"center", "width"}`` from ``meta.json``), used by
            ``ct_window`` without a fixed window.

    Raises:
        ValueError: ``ct_window`` needs the sample's window and it has none.
    """
    image = image.float()
    scheme = spec.scheme
    if scheme == "none":
        return image
    if scheme == "ct_window":
        if spec.low is not None:
            low, high = spec.low[0], spec.high[0]
        elif window:
            low = float(window["center"]) - float(window["width"]) / 2
            high = float(window["center"]) + float(window["width"]) / 2
        else:
            raise ValueError(
                "data.intensity=ct_window uses each sample's DICOM window but this sample has "
                "none; name one (ct_window:abdomen) or use data.intensity=ct"
            )
        center, half = (low + high) / 2, max((high - low) / 2, _EPS)
        return (image.clamp(low, high) - center) / half
    if scheme == "mr":
        dims = (-2, -1)
        mean = image.mean(dim=dims, keepdim=True)
        std = image.std(dim=dims, keepdim=True, unbiased=False)
        return (image - mean) / std.clamp_min(_EPS)
    if scheme == "ct":
        image = torch.maximum(image, _channel_view(spec.low, image))
        image = torch.minimum(image, _channel_view(spec.high, image))
    # ct and dataset: z-score; a constant channel has std 0, dividing by 1 keeps it finite
    std = tuple(s if s > 0 else 1.0 for s in spec.std)
    return (image - _channel_view(spec.mean, image)) / _channel_view(std, image)
