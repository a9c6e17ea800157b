"""Cross-validation by patient: ``bigmodel-train CONFIG --fold i`` and ``--folds``.

``bigmodel-shard build --folds K`` deals the patients of the train and val splits into K folds
and cuts shards at fold boundaries. Fold ``i`` validates on fold ``i`` and trains on the other
folds (``data.train_split=fold{i}-train``, ``data.val_split=fold{i}-val``); its run is named
``{name}-fold{i}``. ``--folds`` trains every fold in turn on one Ray and writes
``{output_dir}/{name}-cv/summary.json`` with each fold's final validation figures and their
mean and sample standard deviation (ddof=1) across folds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigmodel.config import Config, ConfigError
from bigmodel.data.manifest import ManifestError, fold_split_names, load_manifest
from bigmodel.registry.tracking import log_summary_run
from sharding.helpers import atomic_write_json

__all__ = ["cross_validate", "fold_config", "format_summary", "num_folds"]


def num_folds(cfg: Config) -> int:
    """K of the shards at ``data.shards``; an error naming the fix when they have no folds."""
    try:
        manifest = load_manifest(cfg.data.shards)
    except ManifestError as err:
        raise ConfigError(str(err)) from None
    if manifest.num_folds < 2:
        raise ConfigError(
            f"--fold/--folds: {manifest.path} has no cross-validation folds; rebuild the shards "
            f"with bigmodel-shard build ... --folds K"
        )
    return manifest.num_folds


def fold_config(cfg: Config, fold: int, k: int | None = None) -> Config:
    """``cfg`` for fold ``fold``: its splits, run name ``{name}-fold{i}``, MLflow tags."""
    k = k or num_folds(cfg)
    if not 0 <= fold < k:
        raise ConfigError(f"--fold {fold}: {cfg.data.shards} has folds 0..{k - 1}")
    train_split, val_split = fold_split_names(fold)
    tracking = cfg.tracking.model_copy(
        update={"tags": {**cfg.tracking.tags, "cv": cfg.name, "fold": str(fold)}}
    )
    data = cfg.data.model_copy(update={"train_split": train_split, "val_split": val_split})
    return cfg.model_copy(
        update={"name": f"{cfg.name}-fold{fold}", "data": data, "tracking": tracking}
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def cross_validate(cfg: Config, run_fold: Callable[[Config], dict[str, Any]]) -> dict[str, Any]:
    """Train every fold with ``run_fold`` (returns the final figures) and write the summary."""
    k = num_folds(cfg)
    folds = []
    for fold in range(k):
        fold_cfg = fold_config(cfg, fold, k)
        metrics = run_fold(fold_cfg)
        folds.append(
            {
                "fold": fold,
                "run": fold_cfg.name,
                "metrics": {
                    name: float(value)
                    for name, value in sorted(metrics.items())
                    if name.startswith("val/") and isinstance(value, int | float)
                },
            }
        )
    names = sorted(set.intersection(*(set(f["metrics"]) for f in folds)))
    summary = {
        "name": cfg.name,
        "k": k,
        "shards": cfg.data.shards,
        "std": "sample standard deviation across folds (ddof=1)",
        "folds": folds,
        "mean": {},
        "stdev": {},
    }
    for name in names:
        mean, std = _mean_std([f["metrics"][name] for f in folds])
        summary["mean"][name], summary["stdev"][name] = mean, std
    path = Path(cfg.train.output_dir) / f"{cfg.name}-cv" / "summary.json"
    atomic_write_json(path, summary)
    summary["path"] = str(path)
    if cfg.tracking.enabled:  # one MLflow run for the whole cross-validation, beside the folds'
        figures = {f"mean/{k}": v for k, v in summary["mean"].items()}
        figures |= {f"std/{k}": v for k, v in summary["stdev"].items()}
        tags = {"cv": cfg.name, "bigmodel.folds": str(k)}
        summary["mlflow_run"] = log_summary_run(cfg, f"{cfg.name}-cv", figures, [path], tags)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A table: one row per validation figure, one column per fold, then mean ± std."""
    # scores only: counts and per-class entries (``auroc_0``) stay in summary.json
    names = [
        n
        for n in summary["mean"]
        if n.rsplit("/", 1)[-1] not in ("count", "num_samples") and not re.search(r"_\d+$", n)
    ]
    header = ["figure", *[f"fold {f['fold']}" for f in summary["folds"]], "mean ± std"]
    rows = [
        [
            name[4:],
            *[f"{f['metrics'][name]:.4f}" for f in summary["folds"]],
            f"{summary['mean'][name]:.4f} ± {summary['stdev'][name]:.4f}",
        ]
        for name in names
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"bigmodel-train: {summary['k']}-fold cross-validation of {summary['name']!r}",
        *(
            ("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))).rstrip()
            for r in [header, *rows]
        ),
        f"  summary: {summary['path']}",
    ]
    if "mlflow_run" in summary:
        lines.append(f"  mlflow run: {summary['mlflow_run']}")
    return "\n".join(lines)
