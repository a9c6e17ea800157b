"""Ray Train settings derived from our config: resources, storage, failures, collectives.

Pure functions of :class:`bigmodel.config.Config` (and, for the storage check, of the cluster's
node list and a probe of what each node sees), so they are tested without starting Ray, except
:func:`blind_nodes`, the probe itself, which runs one Ray task per node. ``launch.train``
assembles the trainer from them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    UserCallback,
)
from ray.train.torch import TorchConfig

from bigmodel.config import Config, ConfigError
from launch._progress import ProgressPrinter
from launch._worker import StopOnDeterministicError
from sharding.helpers import atomic_write_text

# URI schemes that every node of a cluster reaches the same way (pyarrow / fsspec filesystems).
SHARED_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs")

# Environment variables forwarded to every training worker when the driver has them set: the
# accelerator choice of DeepSpeed and the usual determinism / threading knobs.
FORWARDED_ENV = (
    "DS_ACCELERATOR",
    "CUBLAS_WORKSPACE_CONFIG",
    "OMP_NUM_THREADS",
    "NCCL_DEBUG",
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "PYTHONHASHSEED",
)

# Ray Train's controller takes each worker's report off a one-slot queue when it polls the
# worker group, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s); a worker that
# reports again before that poll waits for it. Epochs of a few seconds then wait at every
# evaluation: on the MR quality guard's 12-step epochs (bf16), 40 s of a 163 s run. Ray reads
# the variable on the driver and passes it to the controller and the workers.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.5"


def set_poll_interval() -> None:
    """Poll the workers every :data:`POLL_INTERVAL_S` unless the user set the variable."""
    os.environ.setdefault(POLL_ENV, POLL_INTERVAL_S)


def backend(cfg: Config) -> str:
    """Collective backend: the configured one, or nccl on GPU and gloo on CPU for ``auto``."""
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if cfg.cluster.use_gpu else "gloo"


def scaling_config(cfg: Config) -> ScalingConfig:
    """Workers, the resources each one reserves and how they are placed (``cluster.*``)."""
    resources: dict[str, float] = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    return ScalingConfig(
        num_workers=cfg.cluster.num_workers,
        use_gpu=cfg.cluster.use_gpu,
        resources_per_worker=resources,
        placement_strategy=cfg.cluster.placement_strategy,
    )


def torch_config(cfg: Config) -> TorchConfig:
    """Process-group settings: backend and collective timeout come from ``distributed.*``.

    The timeout is never left at torch's default: a hung all-reduce should fail the attempt (and
    let ``FailureConfig`` restart it from the last checkpoint) after ``distributed.timeout_s``.
    """
    return TorchConfig(backend=backend(cfg), timeout_s=cfg.distributed.timeout_s)


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` storage locations (as opposed to local/NFS paths)."""
    return "://" in path and not path.startswith("file://")


def storage_path(cfg: Config) -> str:
    """Where Ray Train persists checkpoints: ``cluster.storage_path`` or ``{output_dir}/ray_results``."""
    if cfg.cluster.storage_path:
        if is_uri(cfg.cluster.storage_path):
            return cfg.cluster.storage_path
        return str(Path(cfg.cluster.storage_path.removeprefix("file://")).resolve())
    return str(Path(cfg.train.output_dir).resolve() / "ray_results")


def run_config(cfg: Config, callbacks: list[UserCallback] | None = None) -> RunConfig:
    """Run name, storage, failure handling and checkpoint retention.

    Reusing ``name`` and storage makes Ray Train restore its checkpoint list, so running the same
    command again resumes from the last checkpoint (with any number of workers). ``callbacks``
    are added after the progress printer (``bigmodel-tune`` passes its Tune report callback).
    """
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    return RunConfig(
        name=cfg.name,
        storage_path=storage_path(cfg),
        failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        # train.keep_checkpoints: Ray keeps the newest K in storage (no score attribute, so the
        # latest, which a restarting attempt reads, is always among them); None keeps all.
        # The engine prunes its local copies the same way (bigmodel.engine.prune_checkpoints).
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        worker_runtime_env={"env_vars": env} if env else None,
        # One compact line per report from ProgressPrinter instead of Ray's per-rank INFO dumps.
        # StopOnDeterministicError first: a config/data error ends the run without a restart.
        callbacks=[
            StopOnDeterministicError(),
            ProgressPrinter(cfg.cluster.max_failures),
            *(callbacks or []),
        ],
        logging_config=LoggingConfig(log_level="WARNING"),
    )


def is_multi_node(cfg: Config, nodes: list[dict[str, Any]]) -> bool:
    """True when the workers can land on more than one machine.

    ``nodes`` is ``ray.nodes()``. More than one alive node means Ray may place workers (and the
    controller) apart; a request larger than the biggest node needs several nodes anyway.
    """
    alive = [n for n in nodes if _alive(n)]
    if len(alive) != 1:
        return len(alive) > 1
    # One node up: still multi-node if the request does not fit on it (an autoscaler must add
    # nodes, e.g. a cluster-launcher head started with --num-cpus=0).
    have = alive[0].get("Resources", {})
    need_cpu = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    need_gpu = cfg.cluster.num_workers * cfg.cluster.gpus_per_worker if cfg.cluster.use_gpu else 0.0
    return need_cpu > have.get("CPU", 0.0) + 1e-9 or need_gpu > have.get("GPU", 0.0) + 1e-9


def _alive(node: dict[str, Any]) -> bool:
    return bool(node.get("Alive", node.get("alive", False)))


def check_storage(
    cfg: Config,
    nodes: list[dict[str, Any]],
    probe: Callable[[str, list[dict[str, Any]]], list[str]] | None = None,
) -> str | None:
    """Reject multi-node runs whose checkpoints some node cannot read back.

    Ray Train writes every rank's checkpoint shards to ``storage_path`` and reads them back on
    restart, possibly on another node: without shared storage a restart finds nothing (or half a
    ZeRO checkpoint). Single-node runs may use a local folder. For a path, what matters is what
    each node sees, not the driver's filesystem type (FUSE mounts such as JuiceFS, gcsfuse or
    mountpoint-s3 are as good as NFS): ``probe`` (default :func:`blind_nodes`) returns the
    alive nodes that cannot read a sentinel the driver writes there. Nodes an autoscaler adds
    later are not probed.

    Returns:
        What was checked, one line for the console (None on a single node: nothing to check).
    """
    if not is_multi_node(cfg, nodes):
        return None
    alive = [n for n in nodes if _alive(n)]
    where = (
        f"this cluster has {len(alive)} nodes"
        if len(alive) > 1
        else "the request spans several nodes"
    )
    path = cfg.cluster.storage_path
    if not path:
        raise ConfigError(
            f"cluster.storage_path is unset but {where}: checkpoints must go to storage every "
            "node can reach. Set cluster.storage_path=s3://BUCKET/PATH, gs://BUCKET/PATH or a "
            "path on a shared mount (NFS, Lustre, JuiceFS, gcsfuse...) present on all nodes."
        )
    if is_uri(path):
        scheme = path.split("://", 1)[0].lower()
        if scheme not in SHARED_SCHEMES:
            raise ConfigError(
                f"cluster.storage_path={path!r}: scheme {scheme!r} is not a shared store; use "
                f"one of {', '.join(s + '://' for s in SHARED_SCHEMES)} or a shared mount"
            )
        return f"storage {path} ({scheme}://, reached by every node through its own client)"
    local = str(Path(path.removeprefix("file://")).resolve())
    blind = (probe or blind_nodes)(local, alive)
    if blind:
        raise ConfigError(
            f"cluster.storage_path={path!r} is not shared: a file the driver wrote there could "
            f"not be read back on node(s) {', '.join(blind)} ({where}), so they could not "
            "resume from its checkpoints. Mount the same shared filesystem at that path on every "
            "node, or use s3:// / gs://."
        )
    return (
        f"storage {local} is shared: a sentinel the driver wrote there was read back on all "
        f"{len(alive)} nodes"
    )


def blind_nodes(path: str, nodes: list[dict[str, Any]]) -> list[str]:
    """The nodes (``ray.nodes()`` entries) that cannot read a sentinel written under ``path``.

    The driver writes a random token to ``path/.bigmodel-storage-check-TOKEN``; one zero-CPU Ray
    task pinned to each node (``NodeAffinitySchedulingStrategy``, not soft) reads it back. A
    node whose read fails or returns another content does not share the folder. Needs a
    connected Ray (``ray.init``); the sentinel is removed afterwards.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    sentinel = folder / f".bigmodel-storage-check-{token}"
    atomic_write_text(sentinel, token)  # readers never see a half-written token
    try:
        return nodes_not_reading(str(sentinel), token, nodes)
    finally:
        sentinel.unlink(missing_ok=True)


def nodes_not_reading(file: str, token: str, nodes: list[dict[str, Any]]) -> list[str]:
    """Names of the nodes on which ``file`` does not hold ``token`` (one Ray task per node)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read = ray.remote(num_cpus=0, max_retries=0)(_read_text)
    refs = [
        read.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(file)
        for node in nodes
    ]
    seen = ray.get(refs, timeout=120)
    return [_node_name(n) for n, text in zip(nodes, seen, strict=True) if text != token]


def _read_text(file: str) -> str | None:
    try:
        return Path(file).read_text()
    except OSError:
        return None


def _node_name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} (node {str(node.get('NodeID', '?'))[:8]})"
