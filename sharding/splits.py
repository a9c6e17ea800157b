"""Patient-level train/val/test assignment: every item of a patient lands in the same split.

Groups are ordered by a seeded hash of their id (not by their position in the source), then cut
at the ratios' cumulative counts. The same groups, seed and ratios always give the same
assignment, whatever order the reader lists items in, and the counts match the ratios as closely
as whole patients allow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from sharding.format import SPLITS
from sharding.records import SourceError, SourceItem


def parse_ratios(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> train/val/test ratios that sum to 1."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise SourceError(
            f"--split-ratios {text}", "needs three non-negative numbers", "e.g. 0.8,0.1,0.1"
        )
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Whole-group counts per split: largest remainder, and at least one for every ratio > 0
    while there are groups to spare (a tiny dataset still gets a val and a test patient)."""
    exact = [n * r for r in ratios]
    counts = [int(e) for e in exact]
    order = sorted(range(len(ratios)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i, r in enumerate(ratios):
        if r > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] = 1
    return counts


def assign_splits(
    items: Sequence[SourceItem],
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    use_source_split: bool = False,
) -> dict[str, str]:
    """Map each item's ``source_id`` to ``train``/``val``/``test``, keeping patients together.

    With ``use_source_split``, items whose source names a split keep it; the remaining groups
    are divided by ``ratios``. A patient found in two source splits is an error.
    """
    fixed: dict[str, str] = {}
    if use_source_split:
        for item in items:
            if item.split is None:
                continue
            if item.split not in SPLITS:
                raise SourceError(
                    item.paths.get("image", item.source_id), f"unknown split {item.split!r}", ""
                )
            seen = fixed.setdefault(item.group, item.split)
            if seen != item.split:
                raise SourceError(
                    item.paths.get("image", item.source_id),
                    f"patient {item.group!r} is in the source's {seen!r} and {item.split!r} splits",
                    "fix the source's split column, or build without --use-source-split",
                )
    free = sorted({it.group for it in items} - set(fixed), key=lambda g: (_rank(seed, g), g))
    counts = split_counts(len(free), ratios)
    by_group = dict(fixed)
    start = 0
    for split, count in zip(SPLITS, counts, strict=True):
        for group in free[start : start + count]:
            by_group[group] = split
        start += count
    assignment = {it.source_id: by_group[it.group] for it in items}
    check_disjoint(items, assignment)
    return assignment


def check_disjoint(items: Sequence[SourceItem], assignment: dict[str, str]) -> None:
    """Raise if any patient appears in more than one split (the leak splits exist to prevent)."""
    seen: dict[str, str] = {}
    for item in items:
        split = assignment[item.source_id]
        if seen.setdefault(item.group, split) != split:
            raise AssertionError(f"patient {item.group!r} in splits {seen[item.group]} and {split}")


POOL = ("train", "val")
"""Splits whose patients are dealt into cross-validation folds; ``test`` stays held out."""


def assign_folds(
    items: Sequence[SourceItem], assignment: dict[str, str], k: int, seed: int = 0
) -> dict[str, int]:
    """Deal the patients of the train and val splits into ``k`` folds: ``{patient: fold}``.

    Patients are ordered by the same seeded hash as the splits and dealt round-robin, so fold
    sizes differ by at most one patient, every item of a patient is in one fold, and the same
    patients and seed always give the same folds. Test patients get no fold.
    """
    groups = sorted(
        {it.group for it in items if assignment[it.source_id] in POOL},
        key=lambda g: (_rank(seed, f"fold:{g}"), g),
    )
    if k < 2 or k > len(groups):
        raise SourceError(
            f"--folds {k}",
            f"needs 2 <= K <= the {len(groups)} patients of the train and val splits",
            "lower --folds, or put more patients in train/val with --split-ratios",
        )
    return {group: i % k for i, group in enumerate(groups)}
