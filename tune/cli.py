"""``bigmodel-tune SWEEP.yaml [key=value ...]``: a Ray Tune sweep of distributed training runs.

The sweep file is loaded and checked first (``tune.spec``); nothing starts when it is wrong.
Then Ray is joined like ``bigmodel-train`` does (``--address``, ``RAY_ADDRESS``, under
``ray job submit``; otherwise an embedded Ray), the resources of one trial are checked against
the cluster, the number of trials at once is derived from its free resources, and the Tuner
runs. Everything lands in ``{output_dir}/{name}/``:

- ``tune/``: Ray Tune's experiment state (what ``--resume`` restores) and per-trial results;
- ``trials/<trial>/``: each trial's training run folder (config.yaml, metrics.csv, model/);
- ``trials/ray_results/<trial>/``: each trial's Ray Train checkpoints;
- ``trials.csv``, ``best.yaml``, ``plots/*.png`` at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ray
import yaml
from ray import tune
from ray.tune.search import Searcher

from bigmodel.config import ConfigError
from launch import _ray_config
from launch.train import connect, resolve_paths
from tune import results
from tune._progress import TrialLines
from tune.search import DRIVER_RESOURCES, concurrency, make_scheduler, make_searcher, param_space
from tune.spec import Sweep, load_sweep
from tune.trainable import run_trial, trial_dirname

__all__ = ["main", "run_sweep"]

EXPERIMENT = "tune"
"""Folder of Ray Tune's own state inside the sweep folder."""


def _trainable(sweep: Sweep):
    fn = tune.with_parameters(
        run_trial, base=sweep.base, sweep_dir=str(sweep.sweep_dir), metric=sweep.spec.metric
    )
    return tune.with_resources(fn, DRIVER_RESOURCES)


def _tuner(sweep: Sweep, max_concurrent: int) -> tune.Tuner:
    spec = sweep.spec
    searcher = make_searcher(sweep, max_concurrent)
    return tune.Tuner(
        _trainable(sweep),
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            search_alg=searcher,
            scheduler=make_scheduler(sweep),
            # Tune wraps a Searcher (Optuna) in a concurrency limiter; the variant generator of
            # random/grid search got the limit itself (make_searcher).
            max_concurrent_trials=max_concurrent if isinstance(searcher, Searcher) else None,
            trial_dirname_creator=trial_dirname,
            # No actor reuse: Tune would keep a stopped trial's process (and so its Ray Train
            # workers, which it owns) alive in its cache until another trial takes it over.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(sweep.sweep_dir),
            # MLflow tracking of sweeps is not wired yet: a Tune callback that logs each trial
            # as a child run of one sweep run belongs in this list (see docs/tune.md).
            callbacks=[
                TrialLines(sweep.sweep_dir, spec.metric, list(spec.space), spec.scheduler.type)
            ],
            verbose=0,  # TrialLines prints one line per event instead of Tune's tables
        ),
    )


def run_sweep(sweep: Sweep, max_concurrent: int, resume: bool) -> tune.ResultGrid:
    """Run (or, with ``resume``, continue) the sweep on the connected Ray cluster."""
    path = str(sweep.sweep_dir / EXPERIMENT)
    if resume:
        # Finished trials keep their results; unfinished ones restart and their Ray Train runs
        # resume from their last checkpoints (same run names and storage).
        tuner = tune.Tuner.restore(
            path,
            trainable=_trainable(sweep),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            param_space=param_space(sweep),
        )
    else:
        tuner = _tuner(sweep, max_concurrent)
    return tuner.fit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel-tune",
        description="Hyperparameter sweep where every trial is a bigmodel-train run (Ray Tune).",
        epilog="example: bigmodel-tune configs/sweeps/classification.yaml sweep.num_samples=8 "
        "train.epochs=5   |   key=value sets the training config, sweep.key=value the sweep "
        "file   |   on a cluster: ray job submit --working-dir . -- bigmodel-tune ...",
    )
    parser.add_argument("sweep", help="sweep YAML (see configs/sweeps/ and docs/tune.md)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: cluster.address, RAY_ADDRESS, else embedded Ray)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep in the sweep folder; finished trials are kept",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the sweep file, print the resolved sweep as YAML and exit",
    )
    return parser


def _fail(message: str) -> int:
    print(f"bigmodel-tune: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``bigmodel-tune``; returns the process exit status."""
    args = _parser().parse_intermixed_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.overrides)
    except ConfigError as err:
        return _fail(str(err))
    if args.check:
        print(yaml.safe_dump({"sweep": sweep.spec.model_dump(mode="json")}, sort_keys=False))
        return 0
    state = sweep.sweep_dir / EXPERIMENT
    restorable = tune.Tuner.can_restore(str(state)) if state.is_dir() else False
    if args.resume and not restorable:
        return _fail(f"--resume: {sweep.sweep_dir} holds no sweep to continue; run without it")
    if not args.resume and state.exists():
        return _fail(
            f"{sweep.sweep_dir} already holds a sweep: pass --resume to continue it, or set "
            f"sweep.name=OTHER / remove the folder to start over"
        )
    # Tune saves its experiment state every second (not its adaptive default), so a killed
    # driver loses at most the last second; a finished trial is also recognised by its run
    # folder (tune.trainable), so --resume never trains it again.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    cfg = resolve_paths(sweep.config)
    start = time.perf_counter()
    try:
        started = connect(cfg, args.address)
    except ConfigError as err:
        return _fail(str(err))
    try:
        try:
            _ray_config.check_storage(cfg, ray.nodes())
            nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            n, why = concurrency(sweep, ray.cluster_resources(), ray.available_resources(), nodes)
        except ConfigError as err:
            return _fail(str(err))
        print(f"bigmodel-tune: {n} trial(s) at a time: {why}", flush=True)
        print(
            f"bigmodel-tune: sweep folder {sweep.sweep_dir} (after an interruption: "
            f"bigmodel-tune {args.sweep} --resume)",
            flush=True,
        )
        sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            grid = run_sweep(sweep, n, args.resume)
        except KeyboardInterrupt:
            print("bigmodel-tune: interrupted; continue with --resume", file=sys.stderr)
            return 130
        summary, rows, best = results.write_all(grid, sweep)
    finally:
        if started:
            ray.shutdown()
    print(summary)
    print(f"bigmodel-tune: sweep {sweep.spec.name!r} took {time.perf_counter() - start:.1f} s")
    # Tune turns Ctrl-C into a clean stop and returns; the trials it cut never reported done.
    unfinished = sum(r.status == "interrupted" for r in rows)
    if unfinished:
        print(
            f"bigmodel-tune: interrupted with {unfinished} trial(s) unfinished; continue with: "
            f"bigmodel-tune {args.sweep} --resume",
            file=sys.stderr,
        )
        return 130
    return 0 if any(r.status != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
