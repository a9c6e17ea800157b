"""Ray Tune objects from a sweep spec: search space, searcher, scheduler, concurrency.

Nothing here is re-implemented: the space is Ray Tune's sampling functions, the model-based
searcher is Ray Tune's ``OptunaSearch`` (TPE), the schedulers are Ray Tune's ASHA, median
stopping and asynchronous HyperBand. Population based training is refused in ``tune.spec``.
"""

from __future__ import annotations

import math
from typing import Any

from ray import tune
from ray.tune.schedulers import (
    AsyncHyperBandScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    TrialScheduler,
)
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from bigmodel.config import Config
from tune.spec import Choice, Grid, LogUniform, QUniform, RandInt, Sweep, SweepError, Uniform

__all__ = [
    "DRIVER_RESOURCES",
    "TIME_ATTR",
    "concurrency",
    "make_scheduler",
    "make_searcher",
    "param_space",
    "trial_resources",
]

DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}
"""What a trial's own process reserves: it only drives its Ray Train run, so it takes no CPU the
workers need; Tune refuses an empty request, hence a token MiB of Ray's logical memory."""

TIME_ATTR = "training_iteration"
"""A trial's clock for the schedulers: its number of reports carrying the metric (evaluations)."""


def param_space(sweep: Sweep) -> dict[str, Any]:
    """``{dotted key: Ray Tune domain}``, flat (Optuna and the CSV columns use these names)."""
    space: dict[str, Any] = {}
    for key, dist in sweep.spec.space.items():
        if isinstance(dist, Uniform):
            space[key] = tune.uniform(dist.low, dist.high)
        elif isinstance(dist, LogUniform):
            space[key] = tune.loguniform(dist.low, dist.high)
        elif isinstance(dist, QUniform):
            space[key] = tune.quniform(dist.low, dist.high, dist.q)
        elif isinstance(dist, RandInt):
            space[key] = tune.randint(dist.low, dist.high)
        elif isinstance(dist, Choice):
            space[key] = tune.choice(dist.values)
        elif isinstance(dist, Grid):
            space[key] = tune.grid_search(dist.values)
    return space


def make_searcher(sweep: Sweep, max_concurrent: int) -> Searcher | BasicVariantGenerator:
    """Optuna TPE (seeded), or Tune's variant generator for random and grid search.

    ``max_concurrent`` goes to the variant generator itself: Tune applies
    ``TuneConfig.max_concurrent_trials`` only to ``Searcher``s (such as Optuna's).
    """
    spec = sweep.spec
    if spec.searcher == "optuna":
        import optuna

        # TPE starts model-based proposals after n_startup_trials random ones (Optuna's default
        # 10 would make a short sweep purely random); seeded for a reproducible sweep.
        sampler = optuna.samplers.TPESampler(
            seed=spec.seed, n_startup_trials=max(2, min(10, spec.num_samples // 3))
        )
        return OptunaSearch(sampler=sampler)
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=max_concurrent)


def make_scheduler(sweep: Sweep) -> TrialScheduler:
    """ASHA (one bracket), asynchronous HyperBand (several), median stopping, or FIFO."""
    spec = sweep.spec.scheduler
    max_t = spec.max_t or sweep.max_evaluations()
    if spec.type in ("asha", "hyperband"):
        # Tune's ASHA stops a trial once it reaches max_t; one more than the evaluations of a
        # full run lets a trial that is never cut finish by itself (and save its model).
        if spec.grace_period >= max_t:
            raise SweepError(
                f"scheduler.grace_period={spec.grace_period} leaves no room to stop a trial "
                f"that runs {max_t} evaluations (max_t); lower it, or raise train.epochs"
            )
        return AsyncHyperBandScheduler(
            time_attr=TIME_ATTR,
            max_t=max_t + 1,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
            brackets=1 if spec.type == "asha" else spec.brackets,
        )
    if spec.type == "median":
        return MedianStoppingRule(
            time_attr=TIME_ATTR,
            grace_period=spec.grace_period,
            min_samples_required=spec.min_samples_required,
        )
    return FIFOScheduler()


def trial_resources(cfg: Config) -> dict[str, float]:
    """Logical resources of one trial's workers (its own process reserves no CPU or GPU)."""
    need = {"CPU": cfg.cluster.num_workers * cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        need["GPU"] = cfg.cluster.num_workers * cfg.cluster.gpus_per_worker
    return need


def concurrency(
    sweep: Sweep,
    total: dict[str, float],
    free: dict[str, float],
    nodes: list[dict[str, float]],
) -> tuple[int, str]:
    """How many trials run at once, and why; raises when one trial cannot fit at all.

    Args:
        sweep: the checked sweep.
        total: ``ray.cluster_resources()``.
        free: ``ray.available_resources()``.
        nodes: each alive node's resources (the largest one bounds a single worker).
    """
    cfg = sweep.config
    need = trial_resources(cfg)
    per_worker = {"CPU": cfg.cluster.cpus_per_worker, "GPU": cfg.cluster.gpus_per_worker}
    for name, amount in need.items():
        if amount > total.get(name, 0.0) + 1e-9:
            raise SweepError(
                f"one trial needs {amount:g} {name} ({cfg.cluster.num_workers} workers x "
                f"{per_worker[name]:g}) but the cluster has {total.get(name, 0.0):g}; lower "
                "resources.num_workers / cpus_per_worker / gpus_per_worker or add nodes"
            )
        biggest = max((n.get(name, 0.0) for n in nodes), default=0.0)
        if per_worker[name] > biggest + 1e-9:
            raise SweepError(
                f"one worker needs {per_worker[name]:g} {name} but the largest node has "
                f"{biggest:g}; lower resources.cpus_per_worker / gpus_per_worker"
            )
    trials = sweep.spec.num_samples * _grid_size(sweep)
    if sweep.spec.max_concurrent_trials:
        n = min(sweep.spec.max_concurrent_trials, trials)
        return n, f"max_concurrent_trials={sweep.spec.max_concurrent_trials} in the sweep file"
    limits = {
        name: math.floor(free.get(name, 0.0) / amount + 1e-9) for name, amount in need.items()
    }
    limiting = min(limits, key=lambda name: limits[name])
    fit = limits[limiting]
    detail = (
        f"{free.get(limiting, 0.0):g} free {limiting} / {need[limiting]:g} per trial "
        f"({cfg.cluster.num_workers} workers x {per_worker[limiting]:g})"
    )
    if fit < 1:
        return 1, f"the cluster is busy ({detail}): one trial at a time, it waits for resources"
    if fit >= trials:
        return trials, f"all {trials} trials fit at once ({detail})"
    return fit, detail


def _grid_size(sweep: Sweep) -> int:
    size = 1
    for dist in sweep.spec.space.values():
        if isinstance(dist, Grid):
            size *= len(dist.values)
    return size
