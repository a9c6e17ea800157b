"""Worker-side failures: one line plus the log path; deterministic errors are never retried."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from bigmodel.config import load_config
from bigmodel.data import ManifestError
from launch._worker import (
    DeterministicError,
    StopOnDeterministicError,
    failure_summary,
    worker_log,
)

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path):
    return load_config(
        ROOT / "configs" / "demo.yaml",
        [f"train.output_dir={tmp_path}", "name=r", "cluster.max_failures=3"],
    )


def test_deterministic_error_crosses_processes_and_stops_the_controller():
    error = DeterministicError("ManifestError: shard x is damaged", "/runs/r/logs/rank0.log")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.log_path) == (error.message, error.log_path)
    callback = StopOnDeterministicError()
    callback.after_exception(None, {0: RuntimeError("transient")})  # others: Ray's policy decides
    with pytest.raises(DeterministicError):
        callback.after_exception(None, {1: RuntimeError("collateral"), 0: copy})


def test_failure_summary_is_one_line_with_the_log(tmp_path):
    cfg = _cfg(tmp_path)
    det = ControllerError(DeterministicError("SampleError: bad pixels", "/x/rank1.log"))
    line = failure_summary(det, cfg)
    assert "\n" not in line and "not retried" in line and "/x/rank1.log" in line
    group = WorkerGroupError(
        "two ranks failed", {1: RuntimeError("NCCL timeout\nafter 1800 s"), 0: OSError("disk")}
    )
    line = failure_summary(group, cfg)
    assert "\n" not in line and "rank 0 (and 1 more" in line and "OSError: disk" in line
    assert str(worker_log(cfg, 0).parent) in line and "3 restart(s)" in line


@pytest.mark.ray
@pytest.mark.slow
def test_data_error_on_the_worker_is_not_retried(tmp_path, demo_shards, subprocess_env):
    """A ManifestError raised on the worker: exit 2 at once, one attempt, traceback in the log."""
    cmd = [
        str(Path(sys.executable).parent / "bigmodel-train"),
        str(ROOT / "configs" / "demo.yaml"),
        f"data.shards={demo_shards}",
        f"train.output_dir={tmp_path / 'runs'}",
        "name=det",
        "cluster.num_workers=1",
        "cluster.max_failures=2",
        "data.loader_workers=50",  # more loader workers than shards: refused on the worker
    ]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("bigmodel-train: training failed: ManifestError:"), done.stderr[-3000:]
    assert "not retried" in last and "loader_workers" in last
    assert "Traceback" not in done.stdout + done.stderr
    assert "restarting" not in done.stdout  # ProgressPrinter's retry line never came
    log = tmp_path / "runs" / "det" / "logs" / "rank0.log"
    assert str(log) in last
    assert log.read_text().count(" failed:\n") == 1  # one attempt only
    assert "ManifestError" in log.read_text()
    assert issubclass(ManifestError, ValueError)
