"""What a sweep leaves behind: the table, ``trials.csv``, ``best.yaml`` and the plots.

Read from Ray Tune's ``ResultGrid`` (each trial's reported history and sampled values) and from
the trials' run folders (a finished run has ``model/``), so a resumed sweep reports every trial,
including those that ran before the interruption.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import ResultGrid
from tabulate import tabulate

from sharding.helpers import atomic_write, atomic_write_text
from tune.spec import LogUniform, Sweep
from tune.trainable import completed, run_dir_of, trial_config_dict

__all__ = ["TrialRow", "best_trial", "collect", "write_all"]


@dataclass
class TrialRow:
    """One trial as the reports show it."""

    number: int
    """Order of creation, from 0."""
    trial_id: str
    values: dict[str, Any]
    """The searched values, by dotted key."""
    metric: float
    """Last reported value of the sweep's metric (NaN when it never reported)."""
    steps: int
    """Optimizer steps the run took."""
    evaluations: int
    """Reports carrying the metric (the schedulers' clock)."""
    status: str
    """``completed``, ``stopped`` (by the scheduler), ``failed`` or ``interrupted``."""
    why: str
    """Why it stopped, in words."""
    run_dir: Path
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, metric) of every evaluation."""


def _params(trial_dir: Path) -> dict[str, Any]:
    """A trial's sampled values from Tune's ``params.json`` (a trial with no result has no
    config in the result grid)."""
    try:
        return json.loads((trial_dir / "params.json").read_text())
    except (OSError, ValueError):
        return {}


def collect(grid: ResultGrid, sweep: Sweep) -> list[TrialRow]:
    """One row per trial, in creation order."""
    metric = sweep.spec.metric
    scheduler = sweep.spec.scheduler.type
    rows = []
    # The grid lists trials in the order Tune created them (ids of model-based searchers such
    # as Optuna's carry no counter).
    for number, result in enumerate(grid):
        trial_id = Path(result.path).name
        last = result.metrics or {}
        frame = result.metrics_dataframe
        history: list[tuple[int, float]] = []
        if frame is not None and metric in frame and "step" in frame:
            history = [
                (int(s), float(m)) for s, m in zip(frame["step"], frame[metric], strict=True)
            ]
        value = float(last.get(metric, math.nan))
        run_dir = run_dir_of(sweep.sweep_dir, trial_id)
        evaluations = int(last.get("training_iteration", len(history)))
        if result.error is not None:
            lines = str(result.error).strip().splitlines() or [type(result.error).__name__]
            named = [line for line in lines if "Error" in line.split(":", 1)[0]]  # "XError: ..."
            status, why = "failed", f"failed: {(named or lines)[-1].strip()[:120]}"
        elif completed(run_dir):
            status, why = "completed", "completed"
        elif not last.get("done"):  # Tune marks the last result of a stopped trial done
            status, why = "interrupted", "interrupted (continue with --resume)"
        else:
            status = "stopped"
            why = f"stopped by {scheduler} after {evaluations} evaluation(s)"
        config = result.config or _params(Path(result.path))
        rows.append(
            TrialRow(
                number=number,
                trial_id=trial_id,
                values={k: config.get(k) for k in sweep.spec.space},
                metric=value,
                steps=int(last.get("step", 0)),
                evaluations=evaluations,
                status=status,
                why=why,
                run_dir=run_dir,
                history=history,
            )
        )
    return sorted(rows, key=lambda r: r.number)


def best_trial(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best completed trial (its figure is what ``best.yaml`` reproduces), else the best."""
    finite = [r for r in rows if math.isfinite(r.metric)]
    completed = [r for r in finite if r.status == "completed"] or finite
    if not completed:
        return None
    pick = max if mode == "max" else min
    return pick(completed, key=lambda r: r.metric)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(rows: list[TrialRow], sweep: Sweep, best: TrialRow | None) -> str:
    """The terminal table: trial, searched values, metric, steps, why it stopped."""
    keys = list(sweep.spec.space)
    headers = ["trial", *keys, sweep.spec.metric, "steps", "why stopped"]
    body = [
        [
            f"{r.run_dir.name}{' *' if best is not None and r is best else ''}",
            *(_fmt(r.values[k]) for k in keys),
            _fmt(r.metric),
            r.steps,
            r.why,
        ]
        for r in rows
    ]
    return tabulate(body, headers=headers, tablefmt="simple")


def write_csv(rows: list[TrialRow], sweep: Sweep, path: Path) -> None:
    """``trials.csv``: one line per trial (values by dotted key, metric, steps, status)."""
    keys = list(sweep.spec.space)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                ["trial", *keys, sweep.spec.metric, "steps", "evaluations", "status", "why"]
            )
            for r in rows:
                writer.writerow(
                    [r.run_dir.name, *(r.values[k] for k in keys), r.metric, r.steps]
                    + [r.evaluations, r.status, r.why]
                )

    atomic_write(path, write)


def write_best_yaml(best: TrialRow, sweep: Sweep, path: Path) -> None:
    """``best.yaml``: the best trial's full training config, ready for ``bigmodel-train``.

    Same seed, values and worker count as the trial, so training it again reproduces the figure;
    it writes to the base config's ``train.output_dir`` under the name ``{sweep}-best``.
    """
    base_output = str(Path(sweep.config.train.output_dir).expanduser().resolve())
    data = trial_config_dict(
        sweep.base, best.values, f"{sweep.spec.name}-best", base_output, sweep.spec.name
    )
    if data["data"]["shards"] and "://" not in data["data"]["shards"]:
        data["data"]["shards"] = str(Path(data["data"]["shards"]).expanduser().resolve())
    header = (
        f"# best trial of sweep {sweep.spec.name!r}: {best.run_dir.name} "
        f"({sweep.spec.metric} = {best.metric:.6g}, {best.steps} steps, {best.status})\n"
        f"# searched values: "
        + ", ".join(f"{k}={v}" for k, v in best.values.items())
        + f"\n# train it: bigmodel-train {path}\n"
    )
    atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))


def plot(rows: list[TrialRow], sweep: Sweep, folder: Path) -> list[Path]:
    """PNG plots: metric over steps, best so far over trials, one panel per searched value."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder.mkdir(parents=True, exist_ok=True)
    metric, mode = sweep.spec.metric, sweep.spec.mode
    paths = []

    # 1. metric against optimizer steps; early-stopped trials end in a red cross
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r.history:
            continue
        xs, ys = zip(*r.history, strict=True)
        (line,) = ax.plot(xs, ys, marker=".", label=r.run_dir.name)
        if r.status == "stopped":
            ax.plot(xs[-1], ys[-1], "x", color="red", markersize=10, markeredgewidth=2)
    ax.plot([], [], "x", color="red", label="stopped early")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(f"{sweep.spec.name}: {metric} per trial")
    ax.legend(fontsize=7)
    paths.append(_save(fig, folder / "metric_vs_step.png", plt))

    # 2. each trial's final metric and the best so far, in trial order
    fig, ax = plt.subplots(figsize=(7, 4.5))
    numbers = [r.number for r in rows]
    values = [r.metric for r in rows]
    best, running = math.nan, []
    for v in values:
        if math.isfinite(v) and (
            not math.isfinite(best) or (v > best if mode == "max" else v < best)
        ):
            best = v
        running.append(best)
    colors = ["red" if r.status == "stopped" else "C0" for r in rows]
    ax.scatter(numbers, values, c=colors, label="trial (red: stopped early)")
    ax.step(numbers, running, where="post", color="black", label="best so far")
    ax.set_xlabel("trial number")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title(f"{sweep.spec.name}: best so far ({mode})")
    ax.legend(fontsize=7)
    paths.append(_save(fig, folder / "best_so_far.png", plt))

    # 3. one panel per searched parameter: value against metric (log axis for log spaces)
    keys = list(sweep.spec.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.0, 4.5 * len(keys)), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        raw = [r.values[key] for r in rows]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw)
        if numeric:
            xs = raw
        else:  # categorical: one position per distinct value
            labels = sorted({str(v) for v in raw})
            xs = [labels.index(str(v)) for v in raw]
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(xs, values, c=colors)
        if isinstance(sweep.spec.space[key], LogUniform):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    fig.suptitle(f"{sweep.spec.name}: {metric} by searched value (red: stopped early)", fontsize=10)
    paths.append(_save(fig, folder / "parameters.png", plt))
    return paths


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def write_all(grid: ResultGrid, sweep: Sweep) -> tuple[str, list[TrialRow], TrialRow | None]:
    """Write trials.csv, best.yaml and plots into the sweep folder; return the summary text."""
    folder = sweep.sweep_dir
    rows = collect(grid, sweep)
    best = best_trial(rows, sweep.spec.mode)
    write_csv(rows, sweep, folder / "trials.csv")
    lines = [table(rows, sweep, best), ""]
    if best is not None:
        write_best_yaml(best, sweep, folder / "best.yaml")
        lines.append(
            f"best: {best.run_dir.name} {sweep.spec.metric} = {best.metric:.6g} "
            f"({best.status}); train it with: bigmodel-train {folder / 'best.yaml'}"
        )
    else:
        lines.append("best: no trial reported a finite metric; no best.yaml written")
    plots = plot(rows, sweep, folder / "plots")
    lines.append(f"trials: {folder / 'trials.csv'}")
    lines.append("plots:  " + ", ".join(str(p) for p in plots))
    return "\n".join(lines), rows, best
