"""What every Ray Train worker runs: rebuild the config, record who it is, call the engine."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from bigmodel.config import Config, config_from_dict
from bigmodel.engine.session import Session
from bigmodel.tracking import tracked
from launch.session import RaySession


def worker_file(cfg: Config, rank: int) -> Path:
    """``{output_dir}/{name}/workers/rank{rank}.json``: pid and host of the process serving ``rank``."""
    return Path(cfg.train.output_dir) / cfg.name / "workers" / f"rank{rank}.json"


def write_worker_file(cfg: Config, session: Session) -> Path:
    """Record this worker's pid and host, so operators (and tests) can find and signal it.

    Rewritten by each attempt: after a restart the file names the new process.
    """
    path = worker_file(cfg, session.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "rank": session.rank,
        "local_rank": session.local_rank,
        "world_size": session.world_size,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
    return path


def _quiet_worker_logs() -> None:
    """Keep each worker's console to our own progress lines.

    Ray Train V2 logs every report (with all its metrics) at INFO from a logger named after its
    source file, which ``LoggingConfig`` does not reach.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one call per worker per attempt.

    ``loop_config`` holds the resolved config as a dict, validated again here so a worker never
    runs a config the schema rejects.
    """
    # Imported here, not at the top: the engine loads DeepSpeed (seconds, and it probes the
    # accelerator), which only the workers need; the driver just pickles this function.
    from bigmodel.engine import train

    _quiet_worker_logs()
    cfg = config_from_dict(loop_config["config"], source="bigmodel-train driver")
    session = RaySession()
    write_worker_file(cfg, session)
    with tracked(cfg, session) as session:  # MLflow on rank 0 when tracking.enabled
        train(cfg, session)
