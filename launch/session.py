"""The engine's :class:`~bigmodel.engine.session.Session`, implemented with Ray Train (V2).

Rank and world size come from ``ray.train.get_context()``; metrics and checkpoint folders go to
``ray.train.report`` (called on every rank: in Ray Train V2 reporting is a barrier, and every
rank's checkpoint files are merged into one folder in storage); the checkpoint to resume from is
``ray.train.get_checkpoint()``, made available as a local folder: read in place on a local or
shared mount, otherwise (s3://, gs://...) only the files this rank loads are downloaded
(:func:`download_for_rank`).
"""

from __future__ import annotations

import fnmatch
import json
import numbers
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
from ray.train import Checkpoint


class RaySession:
    """Session for one Ray Train worker; build it inside the per-worker function.

    Args:
        download_root: where checkpoints on remote storage (s3://, gs://) are copied before the
            engine reads them; a temporary folder when unset. Checkpoints on a local or NFS path
            are read in place.
    """

    def __init__(self, download_root: str | None = None) -> None:
        self._context = ray.train.get_context()
        self._download_root = download_root
        self._resume_dir: str | None = None
        self._resolved = False

    @property
    def rank(self) -> int:
        return self._context.get_world_rank()

    @property
    def local_rank(self) -> int:
        return self._context.get_local_rank()

    @property
    def world_size(self) -> int:
        return self._context.get_world_size()

    @property
    def experiment_name(self) -> str:
        """The Ray Train run name (``RunConfig.name``)."""
        return self._context.get_experiment_name()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report metrics, and the checkpoint folder this rank just wrote (if any).

        Every rank must call this the same number of times. The folder's name (``step_0000100``)
        becomes the checkpoint's name in storage; rank 0's name wins, so ranks that wrote ZeRO
        shards into differently named folders still land in one checkpoint.
        """
        checkpoint = None
        name = None
        if checkpoint_dir is not None:
            path = Path(checkpoint_dir)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"checkpoint folder {path} reported by rank {self.rank} does not exist"
                )
            checkpoint = Checkpoint.from_directory(str(path.resolve()))
            name = path.name
        ray.train.report(plain_metrics(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)

    def latest_checkpoint(self) -> str | None:
        """Local folder of the last reported checkpoint of this run (after a restart or rerun)."""
        if self._resolved:
            return self._resume_dir
        self._resolved = True
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        if _is_local(checkpoint):
            self._resume_dir = checkpoint.path
        else:
            root = Path(self._download_root or tempfile.mkdtemp(prefix="bigmodel-resume-"))
            target = root / f"rank{self.rank}" / Path(checkpoint.path).name
            self._resume_dir = str(
                download_for_rank(checkpoint, target, self.rank, self.world_size)
            )
        return self._resume_dir


def _is_local(checkpoint: Checkpoint) -> bool:
    return isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem)


def download_for_rank(checkpoint: Checkpoint, target: Path, rank: int, world_size: int) -> Path:
    """Copy into ``target`` the files of ``checkpoint`` that ``rank`` loads to resume.

    ``Checkpoint.to_directory`` would copy every rank's ZeRO partitions to every rank: with N
    ranks that is N times the optimizer state over the network. The checkpoint's ``meta.json``
    (read through its own pyarrow filesystem) says what it holds, and
    :func:`bigmodel.engine.checkpoint.files_for_rank` which files this rank reads; everything is
    copied when it says so (a ZeRO resume on another world size reshards from all partitions)
    or when ``meta.json`` is missing (the engine then refuses the incomplete checkpoint).
    Files land under a temporary name first, so ``target`` is complete or absent.
    """
    # Imported here: bigmodel.engine loads torch and DeepSpeed (seconds), which the driver
    # importing this module does not need; only a worker resuming from remote storage gets here.
    from bigmodel.engine.checkpoint import META, files_for_rank

    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    try:
        with fs.open_input_stream(f"{root}/{META}") as stream:
            meta = json.loads(stream.read())
        patterns = files_for_rank(meta, rank, world_size)
    except FileNotFoundError:
        patterns = None
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for relative in checkpoint_files(fs, root):
        if patterns is None or any(fnmatch.fnmatchcase(relative, p) for p in patterns):
            (partial / relative).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(
                f"{root}/{relative}",
                str(partial / relative),
                source_filesystem=fs,
                destination_filesystem=pyarrow.fs.LocalFileSystem(),
            )
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def checkpoint_files(fs: pyarrow.fs.FileSystem, root: str) -> list[str]:
    """Paths (relative to ``root``, ``/``-separated) of every file under ``root`` on ``fs``."""
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    prefix = root + "/"
    return sorted(
        info.path.removeprefix(prefix) for info in infos if info.type == pyarrow.fs.FileType.File
    )


def plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as plain Python values: Ray refuses tensors, numpy scalars become floats/ints."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
            value = value.item()
        elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)
        elif hasattr(value, "tolist"):
            value = value.tolist()
        out[str(key)] = value
    return out
