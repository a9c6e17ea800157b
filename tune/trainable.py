"""The trial function: one Tune trial is one ``bigmodel-train`` run on Ray Train.

Each trial builds the training config (base + its sampled values), builds the very
``TorchTrainer`` that ``bigmodel-train`` uses (``launch.train.build_trainer``) and fits it. The
trainer's callbacks include :class:`MetricReportCallback`, Ray Tune's ``TuneReportCallback``
for Train V2, so every evaluation reaches the scheduler while the run trains; when the
scheduler stops the trial, Tune ends this function's actor and with it the Train controller
and its workers (they are owned by it).

Folders: the run of trial ``t`` is ``{sweep}/trials/{t}`` (config.yaml, metrics.csv, curves,
``model/``), and its Ray Train storage ``{sweep}/trials/ray_results/{t}`` (checkpoints), unless
``cluster.storage_path`` points elsewhere (multi-node). A restarted trial (``--resume``) has
the same name and storage, so Ray Train resumes it from its last checkpoint.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from bigmodel.config import config_from_dict
from launch.train import build_trainer, resolve_paths
from sharding.helpers import atomic_write_json
from tune.spec import with_values

__all__ = [
    "MetricReportCallback",
    "TRIAL_RECORD",
    "completed",
    "run_dir_of",
    "run_name",
    "run_trial",
    "trial_config_dict",
    "trial_dirname",
]

TRIAL_RECORD = "tune_trial.json"
"""Written in a run folder when its trial finished by itself (not stopped): when the trial
started, and when its trainer started and returned. Its presence is what "completed" means."""


class MetricReportCallback(TuneReportCallback):
    """Ray Tune's Train-to-Tune callback, forwarding only the reports that carry the metric.

    The engine also reports at log steps and checkpoints without evaluating; Tune rejects a
    result that lacks the sweep's metric, and a scheduler must compare trials at the same
    number of evaluations, so those reports stay in the run's own logs.
    """

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id (``2c1a5_00003``), short and stable across resumes."""
    return trial.trial_id


def run_name(trial_id: str) -> str:
    """The training run name of a trial (``trial_00003_2c1a5``): sortable by trial number."""
    prefix, _, number = trial_id.rpartition("_")
    return f"trial_{number}_{prefix}" if number.isdigit() else f"trial_{trial_id}"


def run_dir_of(sweep_dir: Path, trial_id: str) -> Path:
    """The run folder of a trial (what ``bigmodel-train`` would call ``{output_dir}/{name}``)."""
    return sweep_dir / "trials" / run_name(trial_id)


def trial_config_dict(
    base: dict[str, Any], values: dict[str, Any], name: str, output_dir: str, sweep_name: str
) -> dict[str, Any]:
    """The training config of one trial: base + searched values, its own name and folder.

    ``tracking.tags.sweep`` names the sweep, so an MLflow run (and a model registered from it)
    records which sweep it came from when the base config has tracking on.
    """
    data = with_values(base, values)
    data = with_values(
        data, {"name": name, "train.output_dir": output_dir, "tracking.tags.sweep": sweep_name}
    )
    return config_from_dict(data, f"trial {name}").to_dict()


def completed(run_dir: Path) -> bool:
    """True when the trial of this run folder trained to its end (its trainer returned)."""
    return (run_dir / TRIAL_RECORD).is_file()


def _last_report(run_dir: Path, metric: str) -> dict[str, float]:
    """The last evaluation of a finished run, read back from its ``metrics.csv``."""
    rows: dict[int, dict[str, float]] = {}
    with (run_dir / "metrics.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            rows.setdefault(step, {"step": float(step), "epoch": float(row["epoch"])})
            rows[step][row["name"]] = float(row["value"])
    steps = [s for s, figures in rows.items() if metric in figures]
    return rows[max(steps)] if steps else {}


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, metric: str):
    """Tune's trainable: train one sampled config with Ray Train (see the module docstring)."""
    started = time.time()
    trial_id = tune.get_context().get_trial_id()
    sweep = Path(sweep_dir)
    data = trial_config_dict(base, params, run_name(trial_id), str(sweep / "trials"), sweep.name)
    cfg = resolve_paths(config_from_dict(data, f"trial {trial_id}"))
    run_dir = Path(cfg.train.output_dir) / cfg.name
    if completed(run_dir):
        # Finished before the driver was killed, but Tune's saved state predates that: report
        # the recorded result instead of training it again.
        last = _last_report(run_dir, metric)
        if last:
            tune.report(last)
            return
    fit_start = time.time()
    build_trainer(cfg, callbacks=[MetricReportCallback(metric)]).fit()
    record = {"trial_start": started, "fit_start": fit_start, "fit_end": time.time()}
    atomic_write_json(run_dir / TRIAL_RECORD, record, indent=None)
