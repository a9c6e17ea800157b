"""One line per trial event on the sweep's terminal, instead of Tune's full metric tables.

Tune's own reporter prints every reported figure of every trial (dozens of per-class numbers
per evaluation); a person following a sweep wants: which trial started with which values, its
metric at each evaluation, and whether it completed, was stopped early or failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune import Callback

from tune.trainable import completed, run_dir_of, run_name


class TrialLines(Callback):
    """Print ``bigmodel-tune: trial_00002 eval 1 step 6 | val/organs/dice_mean 0.41`` lines."""

    def __init__(self, sweep_dir: Path, metric: str, keys: list[str], scheduler: str) -> None:
        self.sweep_dir = sweep_dir
        self.metric = metric
        self.keys = keys
        self.scheduler = scheduler

    def _say(self, trial: Any, text: str) -> None:
        print(f"bigmodel-tune: {run_name(trial.trial_id)} {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        values = ", ".join(f"{k}={trial.config.get(k)!r}" for k in self.keys)
        self._say(trial, f"started: {values}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        value = result.get(self.metric)
        shown = f"{value:.4g}" if isinstance(value, float | int) else str(value)
        self._say(
            trial,
            f"eval {result.get('training_iteration')} step {int(result.get('step', 0))} | "
            f"{self.metric} {shown}",
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if completed(run_dir_of(self.sweep_dir, trial.trial_id)):
            self._say(trial, "completed")
        else:
            self._say(trial, f"stopped early by {self.scheduler}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._say(trial, f"failed (see {run_dir_of(self.sweep_dir, trial.trial_id)})")
