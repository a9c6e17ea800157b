"""One short progress line per report, printed by the Ray Train controller.

Ray Train's own INFO log repeats every rank's full metric dict; this callback (run on the
controller, whose output Ray forwards to the driver and to ``ray job logs``) prints rank 0's
headline figures and names checkpoints and worker failures, so a terminal shows what happens.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from ray.train import Checkpoint, UserCallback

# Figures shown per line, in this order, when a report has them.
HEADLINE = ("loss/total", "lr", "samples_per_s_total", "data_wait_fraction")


def format_report(metrics: dict[str, Any], checkpoint_name: str | None) -> str:
    """``step 14 epoch 1 | loss/total 1.947 | lr 0.0005 | ... | checkpoint step_0000014``."""
    parts = []
    if "step" in metrics:
        parts.append(f"step {int(metrics['step'])} epoch {int(metrics.get('epoch', 0))}")
    for key in HEADLINE:
        if isinstance(metrics.get(key), int | float):
            parts.append(f"{key} {metrics[key]:.4g}")
    val = {
        k: v
        for k, v in metrics.items()
        if k.startswith("val/") and isinstance(v, int | float) and not k.endswith("/count")
    }
    headline_val = [k for k in val if k.endswith(("accuracy", "dice_mean", "map_50", "recall@1"))]
    parts.extend(f"{k} {val[k]:.4g}" for k in headline_val)
    if checkpoint_name:
        parts.append(f"checkpoint {checkpoint_name}")
    return "bigmodel: " + " | ".join(parts)


class ProgressPrinter(UserCallback):
    """Print a line per report and a line per worker failure."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures = 0

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: Checkpoint | None,
    ) -> None:
        name = Path(checkpoint.path).name if checkpoint is not None else None
        print(format_report(metrics[0] if metrics else {}, name), flush=True)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        budget = "unlimited" if self.max_failures < 0 else str(self.max_failures)
        for rank, error in sorted(worker_exceptions.items()):
            first_line = str(error).strip().splitlines()[-1:] or [type(error).__name__]
            print(
                f"bigmodel: worker rank {rank} failed ({first_line[0][:200]}); failure "
                f"{self.failures} of {budget} allowed by cluster.max_failures, restarting from "
                "the last checkpoint if any are left",
                flush=True,
            )


HEADLINE_FIGURES = ("dice_mean", "balanced_accuracy", "accuracy", "auroc", "map", "recall_at_1")
"""The figure the steadiness note follows when ``train.best_metric`` is unset, in this order."""


def steadiness_note(evaluations: list[dict[str, float]], best_metric: str | None) -> str | None:
    """One line on how the validation figure moved over a run's evaluations, or None.

    Names the figure (``train.best_metric`` or the first headline figure), the spread of the
    last five evaluations and how often an evaluation was worse than the one before: a spread
    as large as the differences between checkpoints means ranking them picks noise.
    """
    if len(evaluations) < 2:
        return None
    name = best_metric[4:] if best_metric and best_metric.startswith("val/") else None
    if name is None:
        names = [k for k in evaluations[-1] if k.rsplit("/", 1)[-1] in HEADLINE_FIGURES]
        names.sort(key=lambda k: HEADLINE_FIGURES.index(k.rsplit("/", 1)[-1]))
        name = names[0] if names else None
    values = [e[name] for e in evaluations if name is not None and name in e]
    if len(values) < 2:
        return None
    last = values[-5:]
    drops = [b - a for a, b in zip(values, values[1:], strict=False) if b < a]
    worst = f", the largest by {-min(drops):.3f}" if drops else ""
    return (
        f"{name} over the last {len(last)} evaluations {statistics.fmean(last):.3f} +- "
        f"{statistics.pstdev(last):.3f} (min {min(last):.3f}, max {max(last):.3f}); "
        f"{len(drops)} of {len(values) - 1} evaluations worse than the one before{worst}"
    )


def read_evaluations(csv_path: Path) -> list[dict[str, float]]:
    """The ``val/*`` figures of ``metrics.csv``, one dict per evaluated step (prefix dropped)."""
    by_step: dict[int, dict[str, float]] = {}
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["name"].startswith("val/"):
                by_step.setdefault(int(row["step"]), {})[row["name"][4:]] = float(row["value"])
    return [by_step[step] for step in sorted(by_step)]
