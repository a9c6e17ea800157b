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
* ``mr``: nnU-Net's ``ZScoreNormalization``: a z-score per channel with the statistics of the
  sample's whole *volume* (its patient's scan), which ``bigmodel-shard build`` recorded in every
  sample's ``meta.json`` (``intensity``) and ``bigmodel-predict`` computes from the whole input.
  MR has no absolute unit, so each scan gets its own scale, and every slice of one scan the same
  one: a slice through the top of the head, mostly background, is not stretched differently from
  one through the middle. Within the non-zero region (``mr:nonzero``; voxels outside it become
  0) when the manifest's median non-zero bounding box holds under 75 % of a volume (nnU-Net's
  ``use_mask_for_norm``: skull-stripped or registered scans), else over every voxel
  (``mr:all``); ``mr`` picks, ``mr:nonzero`` / ``mr:all`` force either.
* ``image``: a z-score per channel over each 2D sample alone (what ``mr`` meant before per-volume
  statistics; right only when a sample is a whole image, never for slices of a volume).
* ``dataset``: z-score with the manifest's per-channel mean/std (any modality).
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

SCHEMES = ("auto", "ct", "ct_window", "mr", "image", "dataset", "none")
MR_REGIONS = ("nonzero", "all")
# nnU-Net's planner z-scores within the non-zero mask when cropping to it shrinks the median
# case to under 3/4 of its size (ExperimentPlanner.determine_normalization_scheme_and_whether_
# mask_is_used_for_norm).
NONZERO_CROP_FOR_MASK = 0.75
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
    """``ct``, ``ct_window``, ``mr``, ``image``, ``dataset`` or ``none`` (never ``auto``)."""
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
    region: str = ""
    """``mr``: ``nonzero`` or ``all``, the voxels the volume's statistics are over. Empty only in
    records saved before per-volume statistics, whose ``mr`` was a per-image z-score."""

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
    if (
        name not in SCHEMES
        or (window and name not in ("ct_window", "mr"))
        or (name == "mr" and window and window not in MR_REGIONS)
    ):
        raise ConfigError(
            f"data.intensity is {scheme!r}; allowed: {', '.join(SCHEMES)}, ct_window:NAME, "
            f"ct_window:CENTER,WIDTH, mr:nonzero or mr:all"
        )
    modality = str((manifest.get("image") or {}).get("modality", "") or "").upper()
    stats = manifest.get("stats") or {}
    if name == "auto":
        name = default_intensity(modality)
    if name in _CT_ONLY and modality and modality != "CT":
        raise ConfigError(
            f"data.intensity={scheme} clips Hounsfield units but {where} holds {modality} "
            f"images; use data.intensity={default_intensity(modality)} (or auto)"
        )
    if name in ("mr", "image") and modality == "CT":
        raise ConfigError(
            f"data.intensity={name} z-scores each scan alone but {where} holds CT, whose HU "
            f"are absolute; use data.intensity=ct or ct_window (or auto)"
        )
    if name == "mr":
        crop = stats.get("nonzero_crop")
        if crop is None:
            raise ConfigError(
                f"data.intensity={scheme} normalises each volume with its own statistics, but "
                f"{where} has none (stats.nonzero_crop; shards built before per-volume "
                f"statistics): rebuild the shards with this version of bigmodel-shard build, or "
                f"set data.intensity=dataset"
            )
        region = window or ("nonzero" if float(crop) < NONZERO_CROP_FOR_MASK else "all")
        return IntensitySpec("mr", region=region)
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


def _channel_view(
    values: tuple[float, ...], image: torch.Tensor, spatial_dims: int
) -> torch.Tensor:
    view = torch.tensor(values, dtype=torch.float32, device=image.device)
    ones = (1,) * spatial_dims
    if view.numel() == 1:
        return view.view(1, *ones)
    if view.numel() != image.shape[-1 - spatial_dims]:
        raise ValueError(f"intensity statistics have {view.numel()} channels, image {image.shape}")
    return view.view(-1, *ones)


def _volume_view(values: list[float], image: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Per-source-channel volume statistics as a ``[C, 1, 1(, 1)]`` view; a 2.5D sample stacks
    ``2k + 1`` slices of each source channel (channel-major), which share that channel's value."""
    view = torch.tensor(values, dtype=torch.float32, device=image.device)
    channels = image.shape[-1 - spatial_dims]
    if channels != view.numel():
        if channels % view.numel():
            raise ValueError(
                f"volume statistics have {view.numel()} channels, image {list(image.shape)}"
            )
        view = view.repeat_interleave(channels // view.numel())
    return view.view(-1, *(1,) * spatial_dims)


def apply_intensity(
    image: torch.Tensor,
    spec: IntensitySpec,
    window: dict[str, Any] | None = None,
    volume: dict[str, Any] | None = None,
    spatial_dims: int = 2,
) -> torch.Tensor:
    """The preprocessed float32 image ``[..., C, *spatial]`` (one image or a batch of one volume).

    Args:
        image: raw intensities (HU for CT) as sharding stored them.
        spec: from :func:`intensity_spec`.
        window: the sample's DICOM window (``{"center", "width"}`` from ``meta.json``), used by
            ``ct_window`` without a fixed window.
        volume: the statistics of the volume the image belongs to (``meta.json`` ``intensity``,
            :func:`sharding._stats.volume_intensity`), used by ``mr``.
        spatial_dims: 2 for images ``[..., C, H, W]``, 3 for volumes ``[..., C, D, H, W]``
            (the same statistics: a 3D sample carries its volume's ``intensity`` as a slice does).

    Raises:
        ValueError: ``ct_window`` needs the sample's window and it has none; ``mr`` needs the
            volume's statistics and they are missing.
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
    if scheme == "image" or (scheme == "mr" and not spec.region):
        dims = tuple(range(-spatial_dims, 0))
        mean = image.mean(dim=dims, keepdim=True)
        std = image.std(dim=dims, keepdim=True, unbiased=False)
        return (image - mean) / std.clamp_min(_EPS)
    if scheme == "mr":
        if not volume:
            raise ValueError(
                "data.intensity=mr normalises with the statistics of the sample's volume, and "
                "this sample has none in meta.json (intensity): rebuild the shards with this "
                "version of bigmodel-shard build"
            )
        prefix = "nonzero_" if spec.region == "nonzero" else ""
        mean = _volume_view(volume[prefix + "mean"], image, spatial_dims)
        std = _volume_view(volume[prefix + "std"], image, spatial_dims).clamp_min(_EPS)
        out = (image - mean) / std
        if spec.region == "nonzero":
            # nnU-Net sets the voxels outside the non-zero mask (any channel) to 0 after the
            # z-score, so background reads as the region's mean, not as a large negative value
            inside = (image != 0).any(dim=-1 - spatial_dims, keepdim=True)
            out = torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out
    if scheme == "ct":
        image = torch.maximum(image, _channel_view(spec.low, image, spatial_dims))
        image = torch.minimum(image, _channel_view(spec.high, image, spatial_dims))
    # ct and dataset: z-score; a constant channel has std 0, dividing by 1 keeps it finite
    std = tuple(s if s > 0 else 1.0 for s in spec.std)
    mean = _channel_view(spec.mean, image, spatial_dims)
    return (image - mean) / _channel_view(std, image, spatial_dims)
