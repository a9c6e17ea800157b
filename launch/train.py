"""``bigmodel-train CONFIG.yaml key=value ...``: one distributed training run on Ray Train.

With an address (``cluster.address``, ``--address`` or ``RAY_ADDRESS``, which ``ray job submit``
sets) it joins that cluster; without, it starts an embedded local Ray and stops it at the end.
Workers, CPUs and GPUs per worker come from ``cluster.*``; the collective backend and timeout
from ``distributed.*``; restarts from ``cluster.max_failures``. Running the same command again
with the same ``name`` resumes from the last checkpoint, with any number of workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import ray
import yaml
from ray.train import Result, UserCallback
from ray.train.torch import TorchTrainer

from bigmodel.config import Config, ConfigError, load_config
from bigmodel.registry.tracking import RUN_RECORD, check_tracking
from launch import _folds, _preflight, _progress, _ray_config
from launch._worker import (
    DeterministicError,
    failure_summary,
    route_ray_console,
    train_loop_per_worker,
)

__all__ = ["connect", "main", "resolve_paths", "run"]


def resolve_paths(cfg: Config) -> Config:
    """Make local paths absolute on the driver, so workers (other cwd, other node) agree."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.output_dir = str(Path(cfg.train.output_dir).expanduser().resolve())
    if cfg.data.shards and not _ray_config.is_uri(cfg.data.shards):
        cfg.data.shards = str(Path(cfg.data.shards).expanduser().resolve())
    if cfg.data.cache_dir:  # a worker's working directory is Ray's, not the user's
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    return cfg


def connect(cfg: Config, address: str | None = None) -> bool:
    """Join the cluster at ``address`` / ``cluster.address`` / ``RAY_ADDRESS``, or start Ray here.

    Returns True when this call started an embedded Ray (the caller shuts it down). An already
    initialised Ray (e.g. a test or notebook driver) is reused as it is.
    """
    if ray.is_initialized():
        return False
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level="WARNING")
        return False
    need = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    # The embedded Ray may oversubscribe the CPUs (a laptop running a 2-worker config); it is
    # logical reservation only, the workers then share cores. GPUs are detected by Ray. The
    # dashboard process serves Ray's state API, which Ray Train uses to clean up after a
    # crashed controller (without it, the controller's helpers warn every few seconds).
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=True,
        logging_level="WARNING",
    )
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if cfg.cluster.use_gpu and gpus < cfg.cluster.num_workers * cfg.cluster.gpus_per_worker:
        ray.shutdown()
        raise ConfigError(
            f"cluster.use_gpu=true needs {cfg.cluster.num_workers} x "
            f"{cfg.cluster.gpus_per_worker:g} GPUs but this machine has {gpus:g}; set "
            "cluster.use_gpu=false, lower cluster.num_workers, or pass a cluster address"
        )
    return True


def build_trainer(cfg: Config, callbacks: list[UserCallback] | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` running ``bigmodel.engine.train`` on every worker for ``cfg``.

    ``callbacks`` (Ray Train ``UserCallback``s) are added to the run config; ``bigmodel-tune``
    passes the one that forwards every report to its Tune trial.
    """
    _ray_config.set_poll_interval()  # before the trainer: Ray reads it when the run starts
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict()},
        scaling_config=_ray_config.scaling_config(cfg),
        run_config=_ray_config.run_config(cfg, callbacks),
        torch_config=_ray_config.torch_config(cfg),
    )


def run(cfg: Config, address: str | None = None) -> Result:
    """Run ``cfg`` on Ray Train and return its result (``metrics``, ``checkpoint``, ``path``).

    Raises:
        ConfigError: the run cannot be placed safely (e.g. multi-node without shared storage).
        ray.train.TrainingFailedError: a worker failed more than ``cluster.max_failures`` times.
    """
    cfg = resolve_paths(cfg)
    if cfg.tracking.enabled:
        check_tracking(cfg)  # a down MLflow server fails here, before any Ray or GPU time
    started = connect(cfg, address)
    try:
        # refused runs leave no run folder behind: check before anything is written for it
        checked = _ray_config.check_storage(cfg, ray.nodes())
        if checked:  # multi-node: say what was verified before any worker starts
            print(f"bigmodel-train: {checked}", flush=True)
        route_ray_console(Path(cfg.train.output_dir) / cfg.name / "logs")  # bigmodel lines only
        return build_trainer(cfg).fit()
    finally:
        if started:
            ray.shutdown()


def _cross_validate(cfg: Config, address: str | None) -> dict:
    """Every fold of ``cfg``'s shards in turn, on one Ray (embedded Ray starts once)."""
    started = connect(resolve_paths(cfg), address)
    try:
        return _folds.cross_validate(cfg, lambda fold_cfg: run(fold_cfg, address).metrics or {})
    finally:
        if started:
            ray.shutdown()


def _summary(cfg: Config, result: Result, seconds: float) -> str:
    run_dir = Path(cfg.train.output_dir) / cfg.name
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    lines = [
        f"bigmodel-train: run {cfg.name!r} finished in {seconds:.1f} s "
        f"({cfg.cluster.num_workers} workers, {cfg.distributed.strategy}"
        + (f" ZeRO-{cfg.distributed.zero_stage}" if cfg.distributed.strategy == "deepspeed" else "")
        + ")",
        f"  run folder:        {run_dir}",
        f"  ray storage:       {result.path}",
    ]
    if result.checkpoint is not None:
        lines.append(f"  last checkpoint:   {result.checkpoint.path}")
    if (run_dir / "model").is_dir():
        lines.append(f"  saved model:       {run_dir / 'model'}")
    if metrics:
        lines.append("  final metrics:     " + json.dumps(metrics, sort_keys=True))
    # how the validation figure moved: as wide a spread as the gaps between checkpoints means
    # best_metric and ASHA rank noise (metrics.csv is rank 0's, on this machine when local)
    note = _progress.steadiness_note(
        _progress.read_evaluations(run_dir / "metrics.csv"), cfg.train.best_metric
    )
    if note:
        lines.append(f"  validation:        {note}")
    if cfg.tracking.enabled and (run_dir / RUN_RECORD).is_file():
        record = json.loads((run_dir / RUN_RECORD).read_text())
        lines.append(f"  mlflow run:        {record.get('run_id')} at {record.get('uri')}")
        for key in ("registered", "error"):
            if key in record:
                lines.append(f"  mlflow {key + ':':<12}{record[key]}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigmodel-train",
        description="Train a multi-task model on shards with Ray Train (DDP or DeepSpeed ZeRO).",
        epilog="example: bigmodel-train configs/classification.yaml cluster.num_workers=2 "
        "train.epochs=3   |   on a cluster: ray job submit --working-dir . -- bigmodel-train ...",
    )
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: cluster.address, RAY_ADDRESS, else embedded Ray)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="validate, print the resolved config as YAML and exit without training",
    )
    folds = parser.add_mutually_exclusive_group()
    folds.add_argument(
        "--fold",
        type=int,
        default=None,
        help="train cross-validation fold I (shards built with --folds K): val = fold I",
    )
    folds.add_argument(
        "--folds",
        action="store_true",
        help="train every fold in turn and write per-fold and mean ± std metrics",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``bigmodel-train``; returns the process exit status."""
    args = _parser().parse_intermixed_args(argv)  # options may follow the overrides
    try:
        cfg = load_config(args.config, args.overrides)
        if args.fold is not None:
            cfg = _folds.fold_config(cfg, args.fold)
    except ConfigError as err:
        print(f"bigmodel-train: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(resolve_paths(cfg).to_dict(), sort_keys=False), end="")
        return 0
    try:  # input mistakes: one line each and exit 2, before Ray starts
        first = _folds.fold_config(cfg, 0) if args.folds else cfg
        _preflight.check(resolve_paths(first), args.address)
    except ConfigError as err:
        print("\n".join(f"bigmodel-train: {ln}" for ln in str(err).splitlines()), file=sys.stderr)
        return 2
    for note in _preflight.notes(resolve_paths(first)):
        print(f"bigmodel-train: warning: {note}", file=sys.stderr)
    start = time.perf_counter()
    try:
        if args.folds:
            print(_folds.format_summary(_cross_validate(cfg, args.address)))
            return 0
        result = run(cfg, address=args.address)
    except ConfigError as err:
        print(f"bigmodel-train: {err}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as err:
        print(f"bigmodel-train: {failure_summary(err, resolve_paths(cfg))}", file=sys.stderr)
        return 2 if isinstance(getattr(err, "controller_failure", None), DeterministicError) else 1
    print(_summary(resolve_paths(cfg), result, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
