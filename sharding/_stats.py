"""Per-channel intensity statistics in one pass: mean/std exactly, percentiles from a sample.

Mean and variance use Chan et al.'s pairwise merge of (count, mean, M2), so partial results from
worker processes combine exactly and in any order. Percentiles come from a *bottom-k sample*:
every pixel gets a pseudo-random priority derived from its sample key and position, and the
``RESERVOIR`` pixels with the smallest priorities are kept. Unlike a classic reservoir, the kept
set depends only on which pixels exist, not on the order they arrive in, so parallel builds and
resumed builds give the same numbers as a straight run.

When a sample has a label map, its foreground pixels (label > 0, not ignore) are also counted
apart (``foreground``): nnU-Net's CT normalisation clips to the foreground's 0.5/99.5 percentiles
and z-scores with its mean/std, so that air and the table do not set the scale. The smallest and
largest image sides are kept too, so a reader can refuse a resize that would change the spacing
too much before it reads any pixel.

:func:`volume_intensity` is the per-*volume* record (nnU-Net's per-case statistics): mean and std
per channel over the whole volume and over its non-zero region, written into every sample's
``meta.json`` at shard time and computed the same way by ``bigmodel-predict`` from a whole input
volume, so that every slice of one patient is normalised with the same numbers. The fraction of
the volume that its non-zero bounding box holds is collected per volume
(:attr:`ChannelStats.nonzero_crops`); its median decides, as in nnU-Net's planner, whether the
z-score is taken within the non-zero region (``use_mask_for_norm``).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RESERVOIR = 8192
"""Pixels kept per channel for the percentiles (0.5/99.5 % are the ~41st from each end)."""


def _priorities(key: str, n: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).random(n)


@dataclass
class ChannelStats:
    """Running statistics of ``channels`` image channels."""

    channels: int
    count: float = 0.0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]
    values: np.ndarray = field(default=None)  # type: ignore[assignment]
    """``[channels, <=RESERVOIR]`` kept pixel values."""
    priority: np.ndarray = field(default=None)  # type: ignore[assignment]
    """Priorities of the kept pixels (same for every channel)."""
    foreground: ChannelStats | None = None
    """The same statistics over pixels whose label is foreground (samples with a mask)."""
    side_min: list[int] | None = None
    """Smallest spatial size seen per dimension (``[H, W]`` for 2D samples)."""
    side_max: list[int] | None = None
    """Largest spatial size seen per dimension."""
    nonzero_crops: list[float] = field(default_factory=list)
    """Per volume: its non-zero bounding box's share of the volume (:func:`volume_intensity`)."""

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.channels)
            self.m2 = np.zeros(self.channels)
            self.values = np.zeros((self.channels, 0))
            self.priority = np.zeros(0)

    def add_image(self, key: str, image: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add one sample's image ``[C, ...]``; ``key`` seeds its pixels' priorities.

        ``mask`` (the sample's label map, same spatial shape) adds its foreground pixels to
        :attr:`foreground` as well.
        """
        flat = image.reshape(image.shape[0], -1).astype(np.float64)
        n = flat.shape[1]
        if n == 0:
            return
        self._add_shape(list(image.shape[1:]), list(image.shape[1:]))
        if mask is not None and mask.shape == image.shape[1:]:
            inside = (mask > 0) & (mask != 255)  # 255: not annotated (format.MASK_IGNORE)
            if inside.any():
                if self.foreground is None:
                    self.foreground = ChannelStats(image.shape[0])
                self.foreground.add_image(key, image[:, inside][:, :, None])
        self._add_pixels(key, flat)

    def _add_shape(self, low: list[int], high: list[int]) -> None:
        if self.side_min is None or len(self.side_min) != len(low):
            self.side_min, self.side_max = list(low), list(high)
            return
        self.side_min = [min(a, b) for a, b in zip(self.side_min, low, strict=True)]
        self.side_max = [max(a, b) for a, b in zip(self.side_max, high, strict=True)]

    def _add_pixels(self, key: str, flat: np.ndarray) -> None:
        n = flat.shape[1]
        part = ChannelStats(self.channels, float(n), flat.mean(axis=1))
        part.m2 = ((flat - part.mean[:, None]) ** 2).sum(axis=1)
        prio = _priorities(key, n)
        if self.priority.size >= RESERVOIR:
            # only pixels below the current k-th priority can enter the sample: a cheap filter
            # instead of a partition (same result, and most slices contribute a handful)
            keep = np.flatnonzero(prio < self.priority.max())
            part.values, part.priority = flat[:, keep], prio[keep]
        elif n > RESERVOIR:
            keep = np.argpartition(prio, RESERVOIR)[:RESERVOIR]
            part.values, part.priority = flat[:, keep], prio[keep]
        else:
            part.values, part.priority = flat, prio
        self.merge(part)

    def merge(self, other: ChannelStats) -> None:
        """Fold ``other`` into this one (exact for mean/std; bottom-k union for the sample)."""
        self.nonzero_crops = self.nonzero_crops + list(other.nonzero_crops)
        if other.count == 0:
            return
        if other.side_min is not None:
            self._add_shape(other.side_min, other.side_max)
        if other.foreground is not None:
            if self.foreground is None:
                self.foreground = ChannelStats(other.foreground.channels)
            self.foreground.merge(other.foreground)
        if self.count == 0:  # empty (possibly channel-less) accumulator: adopt the other's shape
            self.channels = other.channels
            self.mean, self.m2 = np.zeros(other.channels), np.zeros(other.channels)
            self.values, self.priority = np.zeros((other.channels, 0)), np.zeros(0)
        if other.channels != self.channels:
            raise ValueError(f"channel count {other.channels} != {self.channels}")
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total
        values = np.concatenate([self.values, other.values], axis=1)
        prio = np.concatenate([self.priority, other.priority])
        if prio.size > RESERVOIR:
            keep = np.argpartition(prio, RESERVOIR)[:RESERVOIR]
            keep.sort()
            values, prio = values[:, keep], prio[keep]
        self.values, self.priority = values, prio

    def summary(self) -> dict[str, list[float]]:
        """``{"mean", "std", "p0_5", "p99_5"}`` per channel, as written to ``dataset.json``."""
        if self.count == 0:
            return {}
        std = np.sqrt(self.m2 / self.count)
        lo, hi = np.percentile(self.values, [0.5, 99.5], axis=1)
        summary: dict[str, Any] = {
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in std],
            "p0_5": [float(v) for v in lo],
            "p99_5": [float(v) for v in hi],
            "count": int(self.count),
            "percentiles_from": f"bottom-k sample of {self.priority.size} pixels per channel",
        }
        if self.side_min is not None:
            summary["image_size"] = {"min": self.side_min, "max": self.side_max}
        if self.nonzero_crops:
            summary["nonzero_crop"] = float(np.median(self.nonzero_crops))
        if self.foreground is not None and self.foreground.count:
            foreground = self.foreground.summary()
            foreground.pop("image_size", None)
            summary["foreground"] = foreground
        return summary

    def to_state(self) -> dict[str, Any]:
        """A JSON-able snapshot; arrays as base64 float64 (exact, and 50x faster than lists)."""
        return {
            "channels": self.channels,
            "count": self.count,
            "mean": self.mean.tolist(),
            "m2": self.m2.tolist(),
            "values": _b64(self.values),
            "priority": _b64(self.priority),
            "foreground": self.foreground.to_state() if self.foreground is not None else None,
            "side_min": self.side_min,
            "side_max": self.side_max,
            "nonzero_crops": list(self.nonzero_crops),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ChannelStats:
        """Inverse of :meth:`to_state`."""
        channels = int(state["channels"])
        foreground = state.get("foreground")
        return cls(
            channels,
            float(state["count"]),
            np.asarray(state["mean"], dtype=np.float64),
            np.asarray(state["m2"], dtype=np.float64),
            _unb64(state["values"]).reshape(channels, -1),
            _unb64(state["priority"]),
            cls.from_state(foreground) if foreground else None,
            state.get("side_min"),
            state.get("side_max"),
            list(state.get("nonzero_crops") or []),
        )


def volume_intensity(image: np.ndarray) -> dict[str, Any]:
    """Per-channel statistics of one whole volume (or 2D image) ``[C, ...]``, for ``meta.json``.

    ``mean``/``std`` are over every voxel; ``nonzero_mean``/``nonzero_std`` over the voxels where
    any channel is non-zero (nnU-Net's ``create_nonzero_mask``: skull-stripped MR, or the field
    of view of a registered scan); ``nonzero_crop`` is the share of the volume that the non-zero
    region's bounding box holds.
    """
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    nonzero = (image != 0).any(axis=0)
    inside = flat[:, nonzero.ravel()] if nonzero.any() else flat
    crop = 1.0
    if nonzero.any():
        extent = [
            np.flatnonzero(nonzero.any(axis=tuple(a for a in range(nonzero.ndim) if a != d)))
            for d in range(nonzero.ndim)
        ]
        crop = float(
            np.prod([(e[-1] - e[0] + 1) / n for e, n in zip(extent, nonzero.shape, strict=True)])
        )
    return {
        "mean": [float(v) for v in flat.mean(axis=1)],
        "std": [float(v) for v in flat.std(axis=1)],
        "nonzero_mean": [float(v) for v in inside.mean(axis=1)],
        "nonzero_std": [float(v) for v in inside.std(axis=1)],
        "nonzero_crop": crop,
    }


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<f8").tobytes()).decode()


def _unb64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f8").astype(np.float64)
