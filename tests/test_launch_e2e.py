"""End to end on CPU: shards -> 2-worker Ray Train run -> checkpoint -> worker killed -> resume.

One real Ray head (``ray start --head`` with token auth, from conftest.py) serves the job runs:

1. ``killed``: a 2-worker job submitted with the job SDK; once its first checkpoint is in
   storage the test SIGKILLs rank 1's process (found through the pid file the worker writes).
   Ray Train restarts the worker group (``cluster.max_failures=1``), it resumes from that
   checkpoint and the job succeeds.
2. ``reference``: the same config run uninterrupted by ``bigmodel-train`` with no address, i.e.
   an embedded Ray started (and stopped) by the command itself. Its final weights must equal
   the killed run's.
3. The killed run is resumed with ``ray job submit ... -- bigmodel-train`` on ONE worker for one
   more epoch: the step count continues from the last checkpoint instead of starting over.

The embedded run is a second, short-lived Ray on this machine next to the fixture's head: the
only honest test of "no address -> embedded Ray" is to run the command exactly so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from ray.job_submission import JobStatus, JobSubmissionClient
from safetensors.torch import load_file

from launch._demo_data import TINY_DEMO

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]

# The demo config, shrunk: a tiny timm ResNet at 32 px, DeepSpeed ZeRO-2 as in `make demo` (the
# harder path: sharded optimizer state saved by every rank, and the 1-worker resume goes through
# DeepSpeed's universal checkpoint, AdamW moments included), a checkpoint every 3 steps. DDP is covered by the engine tests.
TINY = [
    *TINY_DEMO,
    "data.loader_workers=1",
    "distributed.strategy=deepspeed",
    "distributed.zero_stage=2",
    "distributed.timeout_s=120",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.eval_every=2",
    "cluster.num_workers=2",
    "cluster.max_failures=1",
]
JOB_TIMEOUT_S = 420  # a bound for a hung job, not a timing check


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch-e2e")


@pytest.fixture(scope="module")
def shards(demo_shards) -> Path:
    """The session's demo shards (conftest.py), small shards for 2 ranks."""
    return demo_shards


def _overrides(workdir: Path, shards: Path, name: str, *extra: str) -> list[str]:
    return [
        *TINY,
        f"name={name}",
        f"data.shards={shards}",
        f"train.output_dir={workdir / 'runs'}",
        *extra,
    ]


def _storage(workdir: Path, name: str) -> Path:
    return workdir / "runs" / "ray_results" / name


def _checkpoint_steps(workdir: Path, name: str) -> list[int]:
    folder = _storage(workdir, name)
    return (
        sorted(int(p.name.split("_")[1]) for p in folder.glob("step_*")) if folder.is_dir() else []
    )


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _registered(job_logs: str) -> list[int]:
    """Steps of the checkpoints Ray Train registered: ``launch._progress`` prints
    ``bigmodel: step N ... | checkpoint step_000000N`` after the checkpoint manager took it."""
    return sorted({int(m) for m in re.findall(r"\| checkpoint step_(\d+)", job_logs)})


def _worker_info(workdir: Path, name: str, rank: int) -> dict:
    path = workdir / "runs" / name / "workers" / f"rank{rank}.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _worker_pid(workdir: Path, name: str, rank: int) -> int | None:
    return _worker_info(workdir, name, rank).get("pid")


def _weights(workdir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "runs" / name / "model" / "model.safetensors"))


def _metric_steps(workdir: Path, name: str) -> list[int]:
    """Optimizer steps logged to the run's metrics.csv (one entry per logged step)."""
    lines = (workdir / "runs" / name / "metrics.csv").read_text().splitlines()[1:]
    steps = {int(line.split(",")[0]) for line in lines if line.split(",")[2] == "loss/total"}
    return sorted(steps)


@pytest.fixture(scope="module")
def killed_run(ray_head, workdir, shards):
    """Submit a 2-worker job, kill rank 1 after the first checkpoint, wait for success."""
    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.headers())
    name = "killed"
    entrypoint = "bigmodel-train configs/demo.yaml " + " ".join(
        _overrides(workdir, shards, name, "train.epochs=2")
    )
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(ROOT), "env_vars": {"DS_ACCELERATOR": "cpu"}},
    )
    try:
        # A folder in storage is not yet a checkpoint Ray Train resumes from (killed before the
        # controller registers it, the run restarts from step 0 and still ends with the same
        # weights): wait for the progress line printed once the checkpoint is registered.
        first = _wait_for(
            lambda: (
                _registered(client.get_job_logs(job_id))
                or (client.get_job_status(job_id).is_terminal() and ["terminal"])
            ),
            JOB_TIMEOUT_S,
            "the first registered checkpoint",
            poll=0.5,
        )
        assert first != ["terminal"], client.get_job_logs(job_id)[-4000:]
        pid = _worker_pid(workdir, name, rank=1)
        assert pid is not None, "rank 1 wrote no pid file"
        victim = psutil.Process(pid)
        assert "RayTrainWorker" in " ".join(victim.cmdline()) or "ray::" in victim.name(), (
            f"pid {pid} from rank1.json is not a Ray Train worker: {victim.cmdline()}"
        )
        os.kill(pid, signal.SIGKILL)
        _wait_for(
            lambda: client.get_job_status(job_id).is_terminal(), JOB_TIMEOUT_S, "the job to end"
        )
        logs = client.get_job_logs(job_id)
        status = client.get_job_status(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-6000:]
    finally:
        if not client.get_job_status(job_id).is_terminal():
            client.stop_job(job_id)
    return {"name": name, "killed_pid": pid, "first_checkpoint": first[0], "logs": logs}


def test_killed_worker_restarts_from_checkpoint_and_finishes(killed_run, workdir):
    name = killed_run["name"]
    new_pid = _worker_pid(workdir, name, rank=1)
    assert new_pid is not None and new_pid != killed_run["killed_pid"], "no second attempt ran"
    assert not psutil.pid_exists(killed_run["killed_pid"]) or (
        psutil.Process(killed_run["killed_pid"]).status() == psutil.STATUS_ZOMBIE
    )
    steps = _checkpoint_steps(workdir, name)
    assert steps[0] == killed_run["first_checkpoint"] and len(steps) >= 2
    # the second attempt started from a checkpoint registered before the kill, not from step 0
    resumed = _worker_info(workdir, name, rank=1).get("resumed_from")
    assert resumed is not None, "the restarted attempt trained from scratch"
    assert int(Path(resumed).name.split("_")[1]) >= killed_run["first_checkpoint"]
    assert (workdir / "runs" / name / "model" / "model.safetensors").is_file()
    assert "bigmodel: step" in killed_run["logs"]  # the controller's progress lines reach the job


def test_embedded_ray_run_equals_the_killed_run(killed_run, workdir, shards, subprocess_env):
    """`bigmodel-train` without an address starts its own Ray; same weights as the killed run."""
    env = subprocess_env
    cmd = [
        "bigmodel-train",
        "configs/demo.yaml",
        *_overrides(workdir, shards, "reference", "train.epochs=2"),
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run 'reference' finished" in done.stdout
    reference = _weights(workdir, "reference")
    resumed = _weights(workdir, killed_run["name"])
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


def test_job_submit_resumes_on_one_worker(ray_head, killed_run, workdir, shards):
    """`ray job submit -- bigmodel-train` with the same name continues the run on 1 worker."""
    name = killed_run["name"]
    before = _checkpoint_steps(workdir, name)[-1]
    cmd = [
        "ray",
        "job",
        "submit",
        "--working-dir",
        str(ROOT),
        "--",
        "bigmodel-train",
        "configs/demo.yaml",
        *_overrides(workdir, shards, name, "train.epochs=3", "cluster.num_workers=1"),
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=ray_head.job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "succeeded" in out
    after = _checkpoint_steps(workdir, name)
    assert after[-1] > before
    logged = _metric_steps(workdir, name)
    resumed = [s for s in logged if s > before]
    assert resumed and resumed[0] == before + 1, f"did not continue from step {before}: {logged}"


def test_run_too_big_for_the_only_node_is_refused_before_training(ray_head, workdir, shards):
    """Joining the head: 8 workers do not fit its 4 CPUs, so it is multi-node; no storage -> exit 2."""
    cmd = [
        "bigmodel-train",
        "configs/demo.yaml",
        "--address",
        ray_head.gcs_address,
        *_overrides(workdir, shards, "too-big", "cluster.num_workers=8"),
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "cluster.storage_path is unset" in done.stderr
    assert not (workdir / "runs" / "too-big").exists(), "a worker started anyway"


def test_embedded_ray_refuses_gpu_workers_on_a_cpu_machine(workdir, shards, subprocess_env):
    """No address and no GPU here: the embedded Ray sees 0 GPUs, the command says how to fix it."""
    cmd = [
        "bigmodel-train",
        "configs/demo.yaml",
        *_overrides(workdir, shards, "gpu", "cluster.use_gpu=true"),
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "cluster.use_gpu=true needs 2 x 1 GPUs but this machine has 0" in done.stderr
