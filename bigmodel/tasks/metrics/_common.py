"""Helpers shared by the per-head metric groups: which samples carry a label, and device moves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

NAN = float("nan")


def labelled_mask(batch: Mapping[str, Any], target: str, batch_size: int) -> torch.Tensor:
    """Boolean ``[B]`` of the samples whose ``target`` label is present (``batch["has"]``).

    A batch without a ``has`` entry for ``target`` (e.g. ``group``, which every sample carries)
    counts every sample as labelled; the per-head code then drops unknown values (``-1``, ``255``).
    """
    if target not in batch:
        raise KeyError(
            f"batch has no {target!r} entry, but a metric head reads it "
            f"(keys: {sorted(batch)}); set the head's `target` to a field the dataset provides"
        )
    has = batch.get("has", {}).get(target)
    if has is None:
        return torch.ones(batch_size, dtype=torch.bool)
    has = torch.as_tensor(has, dtype=torch.bool).flatten()
    if has.numel() != batch_size:
        raise ValueError(
            f"batch['has'][{target!r}] holds {has.numel()} flags for {batch_size} samples; "
            "it needs one flag per sample"
        )
    return has


def to_float(value: torch.Tensor | float) -> float:
    """A Python float from a 0-d tensor or a number."""
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def require_num_classes(name: str, num_classes: int | None) -> int:
    """``num_classes`` of head ``name``, or an error saying how to fill it."""
    if num_classes is None:
        raise ValueError(
            f"model.heads.{name}.num_classes is unset: fill it from the dataset manifest "
            "(bigmodel.data.resolve_config) or set it in the config"
        )
    return num_classes
