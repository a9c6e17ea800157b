"""Sweep benchmark: where the time of a 4-trial ``bigmodel-tune`` sweep goes, in one run.

Runs the real command (embedded Ray, a subprocess) on a 4-trial grid of tiny 1-worker runs
(demo shards, a tiny timm ResNet at 32 px, 2 epochs), one trial at a time and no early stopping
so every trial does the same work, then splits the time from the files the sweep writes:

- training: each trial's own time inside its worker, from the worker's start (after the engine
  import) to the end of ``train`` (``workers/rank0.json``: ``started`` .. ``finished``);
- trainer start + worker group: from the trial calling ``TorchTrainer.fit`` to its worker
  starting: the Train controller actor, the placement group, the worker process and its imports
  of torch, Ray Train and the engine (DeepSpeed included);
- checkpoint hand-over + shutdown: from the end of ``train`` to ``fit`` returning: the last
  report and its checkpoint reaching storage, then the worker group and controller shutting down;
- Tune between trials: from one trial's end to the next trial's function starting;
- sweep fixed cost: everything else (Ray start, Tune setup, the results table, CSV and plots).

Usage: ``python benchmarks/bench_tune.py [--trials 4]``. Target: overhead < 10 s per trial on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch._demo_data import MASK_CLASSES, TINY_DEMO, write_demo_source  # noqa: E402
from sharding.build import BuildOptions, build_shards  # noqa: E402
from sharding.readers.nifti import NiftiCsvReader  # noqa: E402

TINY = [
    *TINY_DEMO,
    "data.loader_workers=0",
    "distributed.strategy=ddp",
    "distributed.zero_stage=0",
    "train.epochs=2",
    "train.log_every=100",
    "cluster.num_workers=1",
]


def _sweep(work: Path, shards: Path, trials: int) -> Path:
    lrs = [1e-2 / 2**i for i in range(trials)]
    spec = {
        "name": "bench",
        "base": str(ROOT / "configs" / "demo.yaml"),
        "overrides": [*TINY, f"data.shards={shards}", f"train.output_dir={work / 'runs'}"],
        "metric": "val/organs/dice_mean",
        "mode": "max",
        "searcher": "grid",
        "num_samples": 1,
        "scheduler": {"type": "fifo"},
        "space": {"optim.lr": {"type": "grid", "values": lrs}},
        "max_concurrent_trials": 1,
        "output_dir": str(work / "sweeps"),
    }
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    csv_path = write_demo_source(work / "source", patients=6)
    reader = NiftiCsvReader(str(csv_path), mask_classes=",".join(MASK_CLASSES))
    shards = work / "shards"
    build_shards(
        reader, shards, BuildOptions(max_shard_samples=6, use_source_split=True, progress=False)
    )
    sweep = _sweep(work, shards, args.trials)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "tune.cli", str(sweep)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.time() - start
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return 1

    rows = []
    for run_dir in sorted((work / "sweeps" / "bench" / "trials").glob("trial_*")):
        if not (run_dir / "tune_trial.json").is_file():
            continue  # did not finish (e.g. a worker killed by the machine's OOM killer)
        record = json.loads((run_dir / "tune_trial.json").read_text())
        worker = json.loads((run_dir / "workers" / "rank0.json").read_text())
        rows.append(
            {
                "trial": run_dir.name,
                "trial_start": record["trial_start"],
                "fit_start": record["fit_start"],
                "fit_end": record["fit_end"],
                "worker_start": worker["started"],
                "worker_end": worker["finished"],
            }
        )
    rows.sort(key=lambda r: r["trial_start"])
    training = [r["worker_end"] - r["worker_start"] for r in rows]
    startup = [r["worker_start"] - r["fit_start"] for r in rows]
    handover = [r["fit_end"] - r["worker_end"] for r in rows]
    gaps = [b["trial_start"] - a["fit_end"] for a, b in zip(rows, rows[1:], strict=False)]
    trial_walls = [r["fit_end"] - r["trial_start"] for r in rows]
    fixed = wall - sum(trial_walls) - sum(gaps)
    overhead = [w - t for w, t in zip(trial_walls, training, strict=True)]
    per_trial_tune = statistics.mean(gaps) if gaps else 0.0

    load = os.getloadavg()[0]
    print(
        f"bigmodel-tune, {args.trials} trials of a tiny 1-worker run, one at a time, CPU; "
        f"{len(rows)} finished (only those are timed)"
    )
    print(f"(load average {load:.1f} on {os.cpu_count()} cores while it ran)\n")
    print(f"{'':34}{'seconds':>10}")
    print(f"{'sweep wall time':34}{wall:10.1f}")
    print(f"{'sum of trials training time':34}{sum(training):10.1f}")
    print(f"{'ratio wall / training':34}{wall / sum(training):10.2f}\n")
    print(f"{'per trial (mean)':34}{'seconds':>10}{'share of overhead':>20}")
    total_overhead = statistics.mean(overhead) + per_trial_tune
    for name, values in (
        ("training (in the worker)", training),
        ("trainer start + worker group", startup),
        ("checkpoint hand-over + shutdown", handover),
    ):
        share = "" if values is training else f"{statistics.mean(values) / total_overhead:19.0%}"
        print(f"{name:34}{statistics.mean(values):10.1f}{share:>20}")
    print(
        f"{'Tune between trials':34}{per_trial_tune:10.1f}{per_trial_tune / total_overhead:19.0%}"
    )
    print(f"{'overhead per trial':34}{total_overhead:10.1f}   (target < 10 s)")
    print(f"{'sweep fixed cost (Ray, Tune, plots)':34}{fixed:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
