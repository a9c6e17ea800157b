"""Multi-node on one machine: two raylets, workers on different nodes, a node's worker lost.

The session's head (conftest.py) gets a second Ray node for this module: ``ray start
--address=HEAD`` with its own ports, its own temp dir and a custom resource. Where the machine
allows it (root: ``unshare --mount``), that node runs in its own mount namespace with an empty
tmpfs over one folder, ``private/``: the same machine, but a path the two nodes see differently,
as two hosts with local disks would.

1. ``bigmodel-train`` submitted through the head with ``cluster.placement_strategy=STRICT_SPREAD``
   puts rank 0 and rank 1 on different nodes; the storage check reads its sentinel back on both.
   Once a checkpoint is in storage, the test SIGKILLs the worker on the second node (a process
   under that node's raylet). Ray Train restarts the worker group (``cluster.max_failures=1``),
   every rank resumes from the checkpoint and the run saves its model.
2. ``cluster.storage_path`` under ``private/`` is refused before training, naming the second node
   (the one that cannot read the driver's sentinel) and not the head.

The second node is stopped by killing the processes its own ``ray start`` started; the head is
left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import BIN, _stop_group, free_port
from ray.job_submission import JobStatus, JobSubmissionClient

from bigmodel.config import load_config
from bigmodel.model_folder import MODEL_CARD, WEIGHTS
from launch import _ray_config
from launch._demo_data import TINY_DEMO

ROOT = Path(__file__).resolve().parents[1]
RESOURCE = "bigmodel_second_node"  # the custom resource only the second node has
JOB_TIMEOUT_S = 300  # a bound for a hung job, not a timing check

# The e2e test's tiny demo config (DeepSpeed ZeRO-2: each rank writes its own optimizer
# partition into the shared storage from its own node), one worker per node.
TINY = [
    *TINY_DEMO,
    "data.loader_workers=1",
    "distributed.strategy=deepspeed",
    "distributed.zero_stage=2",
    "distributed.timeout_s=120",
    "train.epochs=2",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.eval_every=2",
    "cluster.num_workers=2",
    "cluster.max_failures=1",
    "cluster.placement_strategy=STRICT_SPREAD",
]


def test_placement_strategy_reaches_the_scaling_config():
    minimal = ["model.heads={diag: {type: classification}}"]
    assert _ray_config.scaling_config(load_config(None, minimal)).placement_strategy == "PACK"
    spread = load_config(None, [*minimal, "cluster.placement_strategy=STRICT_SPREAD"])
    assert _ray_config.scaling_config(spread).placement_strategy == "STRICT_SPREAD"


@dataclass
class SecondNode:
    node_id: str
    head_id: str
    process: subprocess.Popen
    private: Path | None  # a folder this node sees as an empty tmpfs (None: no mount namespace)


def _nodes(ray_head) -> list[dict]:
    """Alive nodes from the head's state API (what ``ray list nodes`` prints)."""
    request = urllib.request.Request(
        f"{ray_head.dashboard_url}/api/v0/nodes?detail=1&limit=100", headers=ray_head.headers()
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        rows = json.loads(response.read())["data"]["result"]["result"]
    return [row for row in rows if row["state"] == "ALIVE"]


# Run a command in its own mount namespace with an empty tmpfs over the folder "$0".
PRIVATE_MOUNT = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
MOUNT_AND_RUN = 'mount -t tmpfs bigmodel-private "$0" && exec "$@"'


def _can_hide(folder: Path) -> bool:
    """True when this process may give a child its own view of ``folder`` (root, unshare)."""
    try:
        done = subprocess.run(
            [*PRIVATE_MOUNT, MOUNT_AND_RUN, str(folder), "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def second_node(ray_head):
    """A second raylet joined to the session's head; stopped by the pids it started."""
    # short: Ray's socket paths under the temp dir must stay within 107 bytes
    root = Path(tempfile.mkdtemp(prefix="bm2n-", dir="/tmp"))
    ports = {name: free_port() for name in ("nm", "om", "agent", "grpc", "rte", "metrics")}
    cmd = [
        str(BIN / "ray"),
        "start",
        f"--address={ray_head.gcs_address}",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--node-manager-port={ports['nm']}",
        f"--object-manager-port={ports['om']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--dashboard-agent-grpc-port={ports['grpc']}",
        f"--runtime-env-agent-port={ports['rte']}",
        f"--metrics-export-port={ports['metrics']}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--resources={json.dumps({RESOURCE: 1})}",
        "--object-store-memory=200000000",
        f"--temp-dir={root / 'ray'}",
        "--disable-usage-stats",
    ]
    private = root / "private"
    private.mkdir()
    if _can_hide(private):  # this node (and every process it starts) sees an empty tmpfs there
        cmd = [*PRIVATE_MOUNT, MOUNT_AND_RUN, str(private), *cmd]
    else:
        private = None
    with open(root / "node.log", "w") as log:
        proc = subprocess.Popen(
            cmd, env=ray_head.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            alive = _nodes(ray_head)
            joined = [row for row in alive if RESOURCE in row.get("resources_total", {})]
            if joined and len(alive) == 2:  # the head is listed too
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"second node did not join:\n{(root / 'node.log').read_text()[-3000:]}")
            time.sleep(1.0)
        (head,) = [row for row in alive if row not in joined]
        yield SecondNode(joined[0]["node_id"], head["node_id"], proc, private)
    finally:
        _stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(demo_shards) -> Path:
    """The session's demo shards (conftest.py), small shards for 2 ranks."""
    return demo_shards


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _workers(run_dir: Path) -> dict[int, dict]:
    """The worker files (``launch._worker.write_worker_file``) of both ranks, once both exist."""
    out = {}
    for rank in (0, 1):
        try:
            out[rank] = json.loads((run_dir / "workers" / f"rank{rank}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
    return out


def _registered(job_logs: str) -> list[int]:
    """Steps of the checkpoints Ray Train registered: ``launch._progress`` prints
    ``bigmodel: step N ... | checkpoint step_000000N`` after the checkpoint manager took it."""
    return sorted({int(m) for m in re.findall(r"\| checkpoint step_(\d+)", job_logs)})


def _checkpoint_steps(storage: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in storage.glob("step_*"))


@pytest.mark.ray
@pytest.mark.slow
def test_two_node_run_loses_the_second_nodes_worker_and_resumes(
    ray_head, second_node, shards, tmp_path
):
    name = "two-nodes"
    run_dir, storage = tmp_path / "runs" / name, tmp_path / "storage"
    overrides = [
        *TINY,
        f"name={name}",
        f"data.shards={shards}",
        f"train.output_dir={tmp_path / 'runs'}",
        f"cluster.storage_path={storage}",
    ]
    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.headers())
    job_id = client.submit_job(
        entrypoint="bigmodel-train configs/demo.yaml " + " ".join(overrides),
        runtime_env={"working_dir": str(ROOT), "env_vars": {"DS_ACCELERATOR": "cpu"}},
    )
    try:
        # --- first attempt: one rank per node, found through the files the workers write
        # A folder in storage is not yet a checkpoint Ray Train resumes from: wait for the
        # progress line the controller prints once it has registered one.
        before = _wait_for(
            lambda: (
                (_registered(client.get_job_logs(job_id)) and _workers(run_dir))
                or (client.get_job_status(job_id).is_terminal() and {"terminal": True})
            ),
            JOB_TIMEOUT_S,
            "a registered checkpoint",
            poll=0.5,
        )
        assert "terminal" not in before, client.get_job_logs(job_id)[-4000:]
        registered_before_kill = _registered(client.get_job_logs(job_id))
        nodes = {rank: info["node_id"] for rank, info in before.items()}
        assert nodes[0] != nodes[1], f"STRICT_SPREAD put both ranks on one node: {nodes}"
        assert set(nodes.values()) == {second_node.head_id, second_node.node_id}
        (victim_rank,) = [r for r, n in nodes.items() if n == second_node.node_id]
        victim = psutil.Process(before[victim_rank]["pid"])
        # the process tree agrees with Ray: the victim runs under the second node's raylet
        under_second = {p.pid for p in psutil.Process(second_node.process.pid).children(True)}
        assert victim.pid in under_second, f"rank {victim_rank} is not under the second node"
        os.kill(victim.pid, signal.SIGKILL)
        _wait_for(
            lambda: client.get_job_status(job_id).is_terminal(), JOB_TIMEOUT_S, "the job to end"
        )
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]
    finally:
        if not client.get_job_status(job_id).is_terminal():
            client.stop_job(job_id)

    # Ray Train's per-report INFO dump is silenced on the workers (launch._worker's
    # quiet_worker_logs); ray_console.log keeps every line Ray forwarded to the driver
    console = (run_dir / "logs" / "ray_console.log").read_text()
    assert "bigmodel: step" in console and "Reporting training result" not in console
    # the storage check ran on both nodes before any worker started
    assert "read back on all 2 nodes" in logs, logs[-3000:]
    # --- the second attempt: new processes, again one per node, resumed from storage
    after = _workers(run_dir)
    assert after[victim_rank]["pid"] != victim.pid, "no second attempt ran"
    again = [info["node_id"] for info in after.values()]
    assert sorted(again) == sorted(nodes.values()), f"not one rank per node again: {again}"
    resumed = {r: info.get("resumed_from") for r, info in after.items()}
    assert all(resumed.values()), f"a rank of the second attempt started from scratch: {resumed}"
    steps = {int(Path(path).name.split("_")[1]) for path in resumed.values()}
    assert len(steps) == 1, f"ranks resumed from different checkpoints: {resumed}"
    (resumed_step,) = steps
    # the newest checkpoint registered when the worker died (or a later one registered while
    # the kill was on its way), never step 0
    assert resumed_step >= registered_before_kill[-1] > 0, (resumed, registered_before_kill)
    assert resumed_step in _registered(logs), (resumed, logs[-3000:])
    assert all(Path(path).parent == storage / name for path in resumed.values()), resumed
    # --- the model folder holds the last step's weights
    final = _checkpoint_steps(storage / name)[-1]
    assert final > resumed_step
    card = json.loads((run_dir / "model" / MODEL_CARD).read_text())
    assert card["metrics"]["step"] == final
    assert (run_dir / "model" / WEIGHTS).is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_storage_one_node_cannot_see_is_refused_naming_that_node(
    ray_head, second_node, shards, tmp_path
):
    """The driver (host namespace) writes its sentinel under private/; the second node sees an
    empty tmpfs there, so the run is refused before training and the refusal names that node."""
    if second_node.private is None:
        pytest.skip("no mount namespace here (unshare --mount needs root): no node can be blind")
    name = "blind"
    cmd = [
        "bigmodel-train",
        "configs/demo.yaml",
        "--address",
        ray_head.gcs_address,
        *TINY,
        f"name={name}",
        f"data.shards={shards}",
        f"train.output_dir={tmp_path / 'runs'}",
        f"cluster.storage_path={second_node.private / 'storage'}",
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "is not shared" in done.stderr, done.stderr[-2000:]
    assert f"(node {second_node.node_id[:8]})" in done.stderr
    assert second_node.head_id[:8] not in done.stderr  # the head read the sentinel
    assert not (tmp_path / "runs" / name).exists(), "a worker started anyway"
    assert not list((second_node.private / "storage").glob(".bigmodel-storage-check-*"))
