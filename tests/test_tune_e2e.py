"""End to end on CPU: 4-trial ASHA sweeps of tiny 1-worker Ray Train runs.

1. ``submitted``: ``ray job submit -- bigmodel-tune`` against the session's real head (token
   auth). The grid is two useful learning rates then two useless ones, two trials at a time, ASHA
   with grace period 1 and reduction factor 2 over 2 evaluations: the useless trials start only
   after a useful one has recorded its first evaluation (Dice > 0), and score 0 there, below the
   rung's median, so ASHA must stop them. ``best.yaml`` then trains with ``bigmodel-train`` (an
   embedded Ray) and reaches the figure the sweep reported (same seed, same numbers).
2. ``resumed``: the same sweep with an embedded Ray; the driver is SIGKILLed once the first
   trial has finished, then ``bigmodel-tune --resume`` finishes the sweep without training that
   trial again: no worker starts for it (its worker record and metrics.csv are untouched), whether
   Tune's saved state already knew it was finished or the trial recognises its finished run.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from launch._demo_data import TINY_DEMO

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
METRIC = "val/organs/dice_mean"
TIMEOUT_S = 540  # a bound for a hung sweep, not a timing check

# The demo config shrunk to a tiny timm ResNet at 32 px, 1 DDP worker, 2 epochs of 6 steps.
TINY = [
    *TINY_DEMO,
    "data.loader_workers=0",
    "distributed.strategy=ddp",
    "distributed.zero_stage=0",
    "train.epochs=2",
    "train.log_every=100",
    "cluster.num_workers=1",
    "cluster.max_failures=0",
    # a 12-step trial is shorter than any weight average's warm-up: ASHA's first rung (6 steps)
    # would compare averages still close to the shared initial weights
    "train.ema_decay=null",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune-e2e")


@pytest.fixture(scope="module")
def shards(demo_shards) -> Path:
    """The session's demo shards (conftest.py)."""
    return demo_shards


def _sweep_file(
    workdir: Path,
    shards: Path,
    name: str,
    rates: tuple[float, ...] = (3e-3, 1e-2, 1e-6, 1e-7),
    concurrent: int = 2,
) -> Path:
    spec = {
        "name": name,
        "base": str(ROOT / "configs" / "demo.yaml"),
        "overrides": [*TINY, f"data.shards={shards}", f"train.output_dir={workdir / 'runs'}"],
        "metric": METRIC,
        "mode": "max",
        "searcher": "grid",
        "num_samples": 1,
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "space": {"optim.lr": {"type": "grid", "values": list(rates)}},
        "max_concurrent_trials": concurrent,
        "output_dir": str(workdir / "sweeps"),
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _trials(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "trials.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _last_figure(run_dir: Path, name: str) -> float:
    rows = [r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["name"] == name]
    return float(rows[-1]["value"])


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def submitted(ray_head, workdir, shards):
    """The sweep as a Ray job on the session's head; returns its sweep folder and logs."""
    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.headers())
    sweep = _sweep_file(workdir, shards, "submitted")
    job_id = client.submit_job(
        entrypoint=f"bigmodel-tune {sweep}",
        runtime_env={"working_dir": str(ROOT), "env_vars": {"DS_ACCELERATOR": "cpu"}},
    )
    try:
        _wait_for(lambda: client.get_job_status(job_id).is_terminal(), TIMEOUT_S, "the sweep job")
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]
    finally:
        if not client.get_job_status(job_id).is_terminal():
            client.stop_job(job_id)
    return workdir / "sweeps" / "submitted", logs


def test_submitted_sweep_stops_the_useless_trials_early(submitted):
    sweep_dir, logs = submitted
    assert "bigmodel-tune: 2 trial(s) at a time: max_concurrent_trials=2" in logs
    trials = _trials(sweep_dir)
    assert [float(t["optim.lr"]) for t in trials] == [3e-3, 1e-2, 1e-6, 1e-7]
    status = {float(t["optim.lr"]): t["status"] for t in trials}
    assert status[1e-6] == "stopped" and status[1e-7] == "stopped", trials
    assert status[1e-2] == "completed" or status[3e-3] == "completed", trials
    stopped = [t for t in trials if t["status"] == "stopped"]
    assert all(t["why"].startswith("stopped by asha after") for t in stopped)
    assert all(int(t["steps"]) < 12 for t in stopped)  # a full trial runs 2 x 6 steps
    for name in ("metric_vs_step", "best_so_far", "parameters"):
        assert (sweep_dir / "plots" / f"{name}.png").stat().st_size > 1000
    assert "why stopped" in logs and "best: trial_" in logs  # the table reached the job log


def test_best_yaml_trains_with_bigmodel_train_to_the_reported_figure(
    submitted, workdir, subprocess_env
):
    sweep_dir, _ = submitted
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    trials = _trials(sweep_dir)
    winner = max((t for t in trials if t["status"] == "completed"), key=lambda t: float(t[METRIC]))
    assert best["optim"]["lr"] == pytest.approx(float(winner["optim.lr"]))
    assert best["tracking"]["tags"]["sweep"] == sweep_dir.name  # lineage names the sweep
    done = subprocess.run(
        ["bigmodel-train", str(sweep_dir / "best.yaml")],
        cwd=ROOT,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = Path(best["train"]["output_dir"]) / best["name"]
    assert _last_figure(run_dir, METRIC) == pytest.approx(float(winner[METRIC]), abs=1e-6)


def _stop_tree(proc: subprocess.Popen, children: list[psutil.Process]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(children, timeout=15)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=15)


def test_killed_sweep_resumes_without_rerunning_finished_trials(workdir, shards, subprocess_env):
    # two trials, one at a time: the first finishes before the kill, the second only after
    # the resume (the smallest sweep that proves finished trials are not rerun)
    sweep = _sweep_file(workdir, shards, "resumed", rates=(3e-3, 1e-2), concurrent=1)
    sweep_dir = workdir / "sweeps" / "resumed"
    log = (workdir / "resumed-1.log").open("w")
    proc = subprocess.Popen(
        ["bigmodel-tune", str(sweep)],
        cwd=ROOT,
        env=subprocess_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    children: list[psutil.Process] = []

    def first_finished():
        children.extend(c for c in psutil.Process(proc.pid).children(recursive=True))
        output = (workdir / "resumed-1.log").read_text()
        assert proc.poll() is None, output[-4000:]
        return " completed" in output

    try:
        _wait_for(first_finished, TIMEOUT_S, "a finished trial")
        time.sleep(3)  # Tune saves its state every second; a later kill may still beat it
    finally:
        _stop_tree(proc, children)  # the driver dies mid-sweep, its embedded Ray with it
    assert not (sweep_dir / "trials.csv").exists()
    finished = sorted((sweep_dir / "trials").glob("trial_*/tune_trial.json"))
    assert finished
    before = {
        record.parent.name: (
            (record.parent / "workers" / "rank0.json").read_text(),
            (record.parent / "metrics.csv").read_text(),
        )
        for record in finished
    }

    done = subprocess.run(
        ["bigmodel-tune", str(sweep), "--resume"],
        cwd=ROOT,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    trials = _trials(sweep_dir)
    assert len(trials) == 2 and all(t["status"] in ("completed", "stopped") for t in trials)
    assert len(before) < 2, "both trials finished before the kill: the resume proved nothing"
    for name, (worker, metrics) in before.items():
        run_dir = sweep_dir / "trials" / name
        assert (run_dir / "workers" / "rank0.json").read_text() == worker, f"{name} ran again"
        assert (run_dir / "metrics.csv").read_text() == metrics
    assert (sweep_dir / "best.yaml").is_file()
