"""Ray Train settings derived from our config: resources, storage, failures, collectives.

Pure functions of :class:`bigmodel.config.Config` (and, for the storage check, of the cluster's
node list), so they are tested without starting Ray. ``launch.train`` assembles the trainer from
them.
"""

from __future__ import annotations

import os
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

# URI schemes that every node of a cluster reaches the same way (pyarrow / fsspec filesystems).
SHARED_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs")

# Filesystem types (``/proc/mounts``) that are shared between machines.
NETWORK_FS_TYPES = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "9p",
    "wekafs",
    "efs",
)

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


def backend(cfg: Config) -> str:
    """Collective backend: the configured one, or nccl on GPU and gloo on CPU for ``auto``."""
    if cfg.distributed.backend != "auto":
        return cfg.distributed.backend
    return "nccl" if cfg.cluster.use_gpu else "gloo"


def scaling_config(cfg: Config) -> ScalingConfig:
    """Workers and the resources each one reserves (``cluster.*``)."""
    resources: dict[str, float] = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    return ScalingConfig(
        num_workers=cfg.cluster.num_workers,
        use_gpu=cfg.cluster.use_gpu,
        resources_per_worker=resources,
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
        # Keep every checkpoint: the engine decides the cadence, and deleting a ZeRO checkpoint
        # that a restarting attempt is about to read would lose the run.
        checkpoint_config=CheckpointConfig(),
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


def mount_type(path: str, mounts: str = "/proc/mounts") -> str:
    """Filesystem type of the mount holding ``path`` (longest matching mount point)."""
    target = Path(path).resolve()
    best, fs_type = "", "unknown"
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return fs_type
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == Path(mount_point) or Path(mount_point) in target.parents
        if inside and len(mount_point) > len(best):
            best, fs_type = mount_point, fields[2]
    return fs_type


def is_shared_filesystem(path: str, mounts: str = "/proc/mounts") -> bool:
    """True when ``path`` lives on a network filesystem every node can mount (NFS, Lustre, ...)."""
    fs_type = mount_type(path, mounts)
    return fs_type in NETWORK_FS_TYPES or fs_type.startswith("fuse.")


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


def check_storage(cfg: Config, nodes: list[dict[str, Any]], mounts: str = "/proc/mounts") -> None:
    """Reject multi-node runs whose checkpoints would land on one machine's local disk.

    Ray Train writes every rank's checkpoint shards to ``storage_path`` and reads them back on
    restart, possibly on another node: without shared storage a restart finds nothing (or half a
    ZeRO checkpoint). Single-node runs may use a local folder.
    """
    if not is_multi_node(cfg, nodes):
        return
    alive = sum(1 for n in nodes if _alive(n))
    where = f"this cluster has {alive} nodes" if alive > 1 else "the request spans several nodes"
    path = cfg.cluster.storage_path
    if not path:
        raise ConfigError(
            f"cluster.storage_path is unset but {where}: checkpoints must go to storage every "
            "node can reach. Set cluster.storage_path=s3://BUCKET/PATH, gs://BUCKET/PATH or a "
            "path on an NFS/Lustre mount present on all nodes."
        )
    if is_uri(path):
        scheme = path.split("://", 1)[0].lower()
        if scheme not in SHARED_SCHEMES:
            raise ConfigError(
                f"cluster.storage_path={path!r}: scheme {scheme!r} is not a shared store; use "
                f"one of {', '.join(s + '://' for s in SHARED_SCHEMES)} or an NFS path"
            )
        return
    local = path.removeprefix("file://")
    if not is_shared_filesystem(local, mounts):
        raise ConfigError(
            f"cluster.storage_path={path!r} is on a local {mount_type(local, mounts)!r} filesystem "
            f"but {where}: other nodes cannot read its checkpoints. Use s3://, gs:// or a path "
            "on an NFS/Lustre mount present on all nodes."
        )
