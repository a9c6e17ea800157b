"""Shared fixtures: one real Ray head per test session, with token auth, on its own ports.

Several engineers (and their Ray clusters) share this machine, so the head never uses Ray's
default ports or temp dir, generates its token under a private HOME (``ray get-auth-token
--generate``) instead of touching ``~/.ray/auth_token``, and is stopped by killing exactly the
process group it was started in (never ``ray stop``, which would stop every Ray on the machine).

The pytest process itself never calls ``ray.init``: tests talk to the head through
``ray job submit`` and the job SDK, as a user would, so no Ray state leaks between tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# What every Ray-using subprocess of the tests gets: CPU DeepSpeed, no usage stats, quiet logs.
BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "DS_ACCELERATOR": "cpu",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "RAY_DEDUP_LOGS": "0",
}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Ray address/auth, plus ``BASE_ENV`` and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
    }
    env.update(BASE_ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@dataclass
class RayHead:
    """A running ``ray start --head`` with token auth."""

    gcs_address: str
    dashboard_url: str
    token: str
    temp_dir: Path
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def job_env(self, **extra: str) -> dict[str, str]:
        """Environment for ``ray job ...`` commands against this head."""
        return {**self.env, "RAY_ADDRESS": self.dashboard_url, **extra}

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _generate_token(home: Path) -> str:
    env = clean_env(HOME=str(home))
    out = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    token = out.stdout.strip()
    assert len(token) >= 32, f"unexpected token output: {out.stdout!r} {out.stderr!r}"
    return token


def _wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    request = urllib.request.Request(
        f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"Ray dashboard at {url} did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two, and the CI machine is shared."""
    import torch  # only the model tests need it; the Ray fixtures do not

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository (the ``--working-dir`` of submitted jobs)."""
    return ROOT


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The demo's shards, built once per session: nibabel's real MR volume + 6 generated
    patients, the source's own split, at most 6 samples per shard (enough shards for 2 ranks).

    Shared by the end-to-end modules, so treat it as read-only: a test that damages or rebuilds
    shards works on its own copy.
    """
    from launch._demo_data import MASK_CLASSES, write_demo_source
    from sharding.build import BuildOptions, build_shards
    from sharding.readers.nifti import NiftiCsvReader

    work = tmp_path_factory.mktemp("demo-shards")
    csv_path = write_demo_source(work / "source", patients=6)
    reader = NiftiCsvReader(str(csv_path), mask_classes=",".join(MASK_CLASSES))
    options = BuildOptions(max_shard_samples=6, use_source_split=True, progress=False)
    build_shards(reader, work / "shards", options)
    return work / "shards"


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for a Ray-using subprocess that must NOT join any cluster (embedded Ray)."""
    return clean_env()


@pytest.fixture(scope="session")
def ray_head():
    """Start one Ray head (token auth, free ports, private temp dir) for the whole session."""
    root = Path(tempfile.mkdtemp(prefix="bmray-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    token = _generate_token(home)
    ports = {name: free_port() for name in ("gcs", "dash", "client", "nm", "om", "agent", "rte")}
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    log = root / "head.log"
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        f"--dashboard-port={ports['dash']}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--ray-client-server-port={ports['client']}",
        f"--node-manager-port={ports['nm']}",
        f"--object-manager-port={ports['om']}",
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--runtime-env-agent-port={ports['rte']}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        # Logical CPUs: a 2-worker run (1 CPU each) plus a job driver fit on this 2-core box.
        "--num-cpus=4",
        "--num-gpus=0",
        "--object-store-memory=300000000",
        f"--temp-dir={root / 'ray'}",
        "--disable-usage-stats",
    ]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(
        gcs_address=f"127.0.0.1:{ports['gcs']}",
        dashboard_url=f"http://127.0.0.1:{ports['dash']}",
        token=token,
        temp_dir=root,
        process=proc,
        log=log,
        env=env,
    )
    try:
        _wait_for_dashboard(head.dashboard_url, token, proc, log)
        yield head
    finally:
        _stop_group(proc)
        shutil.rmtree(root, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop what ``ray start`` started: its process group, then any descendant that left it.

    Ray workers run in their own sessions, so killing the group alone can leave them behind;
    they are found as descendants of our ``ray start`` before anything is signalled.
    """
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(descendants, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=10)


def pytest_collection_modifyitems(config, items):
    """A test that uses the Ray head must say so with ``@pytest.mark.ray``, so that
    ``-m 'not ray'`` really runs without Ray; an unmarked one fails at collection."""
    unmarked = [
        item.nodeid
        for item in items
        if "ray_head" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("ray") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests using the ray_head fixture need @pytest.mark.ray: " + ", ".join(unmarked)
        )


@dataclass
class S3Server:
    """moto's S3-compatible server on loopback (``ThreadedMotoServer``), for object-storage tests.

    ``env`` is what a process needs to reach it the usual way: credentials (dummy: moto accepts
    any), ``AWS_ENDPOINT_URL_S3``, a region, and no instance-metadata lookup (botocore would
    otherwise ask 169.254.169.254 for credentials) or ``~/.aws`` files.
    """

    endpoint: str
    env: dict[str, str]

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` (if new) and return ``s3://name``."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_DEFAULT_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server on 127.0.0.1 (a free port) for the session; its env is exported in
    this process too (fsspec/s3fs read it), and restored afterwards."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "bigmodel-test-key",
        "AWS_SECRET_ACCESS_KEY": "bigmodel-test-secret-do-not-log",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
