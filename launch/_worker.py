"""What every Ray Train worker runs: rebuild the config, record who it is, call the engine.

Failures: every worker writes its full traceback to ``{output_dir}/{name}/logs/rank{R}.log``, and
the driver prints one line naming the error and that file (:func:`failure_summary`). Errors that a
restart would only repeat (a config the data contradicts, a damaged shard, an undecodable sample)
are raised as :class:`DeterministicError`, which :class:`StopOnDeterministicError` turns into a
controller error on the Ray Train controller: Ray Train V2's failure policy retries worker-group
errors up to ``FailureConfig.max_failures`` whatever the exception, and has no per-exception
setting, but it never retries a controller error raised by a callback, so these runs stop at once
without consuming ``cluster.max_failures``.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import UserCallback

from bigmodel.config import Config, ConfigError, config_from_dict
from bigmodel.data import ManifestError, SampleError
from bigmodel.engine.session import Session
from bigmodel.registry.tracking import tracked
from launch import _ray_hooks
from launch.session import RaySession
from sharding.helpers import atomic_write_json, one_line

# When this process first wrote its worker file (Unix time), by pid.
_STARTED: dict[int, float] = {}


def worker_file(cfg: Config, rank: int) -> Path:
    """``{output_dir}/{name}/workers/rank{rank}.json``: pid and host of the process serving ``rank``."""
    return Path(cfg.train.output_dir) / cfg.name / "workers" / f"rank{rank}.json"


def write_worker_file(cfg: Config, session: Session, **extra: Any) -> Path:
    """Record this worker's pid and host, so operators (and tests) can find and signal it.

    Rewritten by each attempt: after a restart the file names the new process. ``extra``
    entries (e.g. ``finished``, a Unix time) are added; ``started`` is kept from the first write
    of this process.
    """
    path = worker_file(cfg, session.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "rank": session.rank,
        "local_rank": session.local_rank,
        "world_size": session.world_size,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),  # the Ray node (several per host)
        "started": _STARTED.setdefault(os.getpid(), time.time()),
        **extra,
    }
    return atomic_write_json(path, info, indent=None)


def quiet_worker_logs(level: int = logging.WARNING) -> list[str]:
    """Keep each worker's console to our own progress lines; returns the loggers quieted.

    Ray Train V2 logs every report (with all its metrics) at INFO from loggers named after their
    source file (``logging.getLogger(__file__)``, e.g. its worker context module).
    ``LoggingConfig(log_level=...)`` only filters loggers named ``ray.train*``, and no public
    API names these, so instead of importing Ray's private module this sets ``level`` on every
    registered logger whose name is a file inside the installed ``ray.train`` package.
    """
    package = os.path.dirname(ray.train.__file__) + os.sep
    quieted = [name for name in logging.root.manager.loggerDict if name.startswith(package)]
    for name in quieted:
        logging.getLogger(name).setLevel(level)
    return quieted


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one call per worker per attempt.

    ``loop_config`` holds the resolved config as a dict, validated again here so a worker never
    runs a config the schema rejects.
    """
    # Imported here, not at the top: the engine loads DeepSpeed (seconds, and it probes the
    # accelerator), which only the workers need; the driver just pickles this function.
    from bigmodel.engine import quiet_deprecated_collectives, train

    quiet_worker_logs()
    cfg = config_from_dict(loop_config["config"], source="bigmodel-train driver")
    session = RaySession()
    write_worker_file(cfg, session)
    try:
        # MLflow on rank 0 when tracking.enabled; torch's deprecation line on every ZeRO
        # collective kept out of the worker's log for this run
        with tracked(cfg, session) as session, quiet_deprecated_collectives():
            train(cfg, session)
    except DETERMINISTIC_ERRORS as err:
        log = _write_traceback(cfg, session.rank)
        raise DeterministicError(
            f"{type(err).__name__}: {one_line(err, limit=500)}", str(log)
        ) from None
    except BaseException:
        _write_traceback(cfg, session.rank)
        raise
    # resumed_from: the checkpoint this attempt started from (None: from scratch)
    write_worker_file(cfg, session, finished=time.time(), resumed_from=session.latest_checkpoint())


# Errors a restart would repeat: the config or the data is wrong, not the machine.
DETERMINISTIC_ERRORS = (ConfigError, ManifestError, SampleError)


class DeterministicError(RuntimeError):
    """A worker failure that a restart would repeat; carries the worker's log file."""

    def __init__(self, message: str, log_path: str) -> None:
        super().__init__(message)
        self.message = message
        self.log_path = log_path

    def __reduce__(self):  # crosses process boundaries (worker -> controller -> driver)
        return (self.__class__, (self.message, self.log_path))


class StopOnDeterministicError(UserCallback):
    """On the controller: end the run at the first :class:`DeterministicError` (no restart).

    Raising from a callback makes the controller fail with a ``ControllerError`` that the
    default failure policy does not retry; the driver's ``fit()`` raises it.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for _, error in sorted(worker_exceptions.items()):
            if isinstance(error, DeterministicError):
                raise error


def worker_log(cfg: Config, rank: int) -> Path:
    """``{output_dir}/{name}/logs/rank{rank}.log``: the full traceback of a failed worker."""
    return Path(cfg.train.output_dir) / cfg.name / "logs" / f"rank{rank}.log"


def _write_traceback(cfg: Config, rank: int) -> Path:
    """Append the exception being handled, with a timestamp and pid, to this rank's log."""
    path = worker_log(cfg, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"--- {stamp} rank {rank} pid {os.getpid()} failed:\n{traceback.format_exc()}\n")
    return path


def failure_summary(error: Exception, cfg: Config) -> str:
    """One line for the driver: what failed, on which rank, whether it was retried, the log."""
    cause = getattr(error, "controller_failure", None)
    if isinstance(cause, DeterministicError):
        return (
            f"training failed: {cause.message} (not retried: a restart would fail the same "
            f"way; fix the input and rerun); full traceback: {cause.log_path}"
        )
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank, first = min(failures.items())
        others = f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
        what = _innermost_error(first)
        if "out of memory" in str(first).lower():
            what = "the worker was killed by Ray's memory monitor (the node ran out of memory)"
        logs = worker_log(cfg, rank).parent
        return (
            f"training failed on rank {rank}{others}: {what} (after "
            f"{cfg.cluster.max_failures} restart(s) allowed by cluster.max_failures); "
            f"tracebacks and Ray's messages: {logs}"
        )
    return (
        f"training failed: {_innermost_error(cause or error)}; Ray's messages and the workers' "
        f"tracebacks: {worker_log(cfg, 0).parent}"
    )


def _innermost_error(error: BaseException) -> str:
    """The last ``SomeError: message`` line of an error's text (Ray nests tracebacks in it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", line)]
    return (named[-1] if named else f"{type(error).__name__}: {lines[0] if lines else ''}")[:400]


# Lines from Ray's processes (controller, workers) that the driver's console shows; the rest
# (Ray's own tracebacks and warnings, third-party import chatter) go to logs/ray_console.log.
CONSOLE_PREFIXES = ("bigmodel",)


def route_ray_console(log_dir: Path) -> Path | None:
    """Show only bigmodel's own lines from Ray's processes on this console; log every line.

    Ray forwards every worker's and the controller's stdout/stderr to the driver, so one failing
    worker prints pages (its traceback, Ray's actor errors, faiss and DeepSpeed loading
    messages). Ray has no public filter for that stream: this wraps the handler ``ray.init``
    registers for it (:mod:`launch._ray_hooks`). Set ``BIGMODEL_RAY_CONSOLE=all`` to see
    everything. Returns the log file (None: unchanged).
    """
    if os.environ.get("BIGMODEL_RAY_CONSOLE", "").lower() == "all":
        return None
    original = _ray_hooks.console_handler()
    if original is None or getattr(original, "_bigmodel_log", None):
        return getattr(original, "_bigmodel_log", None)
    path = log_dir / "ray_console.log"
    path.parent.mkdir(parents=True, exist_ok=True)

    def handler(data: dict[str, Any]) -> None:
        source = data.get("actor_name") or data.get("task_name") or f"pid={data.get('pid')}"
        with path.open("a") as f:
            f.writelines(f"({source}) {line}\n" for line in data.get("lines", ()))
        keep = [line for line in data.get("lines", ()) if line.startswith(CONSOLE_PREFIXES)]
        if keep:
            original({**data, "lines": keep})

    handler._bigmodel_log = path
    _ray_hooks.replace_console_handler(handler)
    return path
