"""The statistics of an evaluation report: Dice from confusion matrices, patient bootstrap.

Kept as numpy so that a thousand bootstrap replicates take milliseconds.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["bootstrap_counts", "dice", "foreground_mean", "interval"]


def dice(confusion: np.ndarray) -> np.ndarray:
    """Per-class Dice of one or many ``[..., K, K]`` confusion matrices (NaN where unseen).

    The same definition as ``bigmodel.tasks.metrics.SegmentationMetrics`` (2TP / (2TP + FP + FN)
    over all pixels); kept as numpy here so a thousand bootstrap replicates take milliseconds.
    """
    confusion = confusion.astype(np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    fp = confusion.sum(axis=-2) - tp
    fn = confusion.sum(axis=-1) - tp
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def foreground_mean(dice: np.ndarray) -> np.ndarray:
    part = dice[..., 1:] if dice.shape[-1] > 1 else dice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN, as intended
        return np.nanmean(part, axis=-1)


def interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if len(values) < 10:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 4), round(float(high), 4)]


def bootstrap_counts(patients: int, replicates: int, seed: int = 0) -> np.ndarray:
    """``[B, P]``: how often each patient is drawn in each replicate (patients with replacement).

    ``replicates=0`` gives ``[0, P]``: no replicates, so every interval is None.
    """
    if replicates <= 0:
        return np.zeros((0, patients), dtype=np.int64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, patients, size=(replicates, patients))
    return np.stack([np.bincount(d, minlength=patients) for d in draws])
