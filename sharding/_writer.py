"""Writing shards: capped tar files written under a temporary name, hashed, then renamed.

Members are written as ``KEY.EXT`` (the layout webdataset's readers expect) with the standard
library's ``tarfile``, not webdataset's ``TarWriter``: samples are already encoded to bytes, and
``import webdataset`` pulls in torch (seconds of start-up, and DESIGN.md keeps sharding free of
it). A fixed mtime makes the same input give byte-identical shards and the same sha256.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from sharding import format as fmt
from sharding.helpers import atomic_write_text, file_sha256

FIXED_MTIME = 0
"""Member mtime: constant so that shards are reproducible byte for byte (an int: a float
mtime makes tarfile add a PAX header to every member, doubling small members)."""


def atomic_write_json(path: Path, data: Any) -> None:
    """The manifest and build journals: JSON indented by 1 with a final newline, fsynced."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n", fsync=True)


def sample_tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes ``sample`` takes in a tar: a 512-byte header plus data padded to 512 per member."""
    total = 0
    for name, value in sample.items():
        if not name.startswith("_"):
            total += tarfile.BLOCKSIZE + -(-len(value) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return total


def tar_file_bytes(member_bytes: int) -> int:
    """Final file size for members totalling ``member_bytes`` (end blocks, record padding)."""
    raw = member_bytes + 2 * tarfile.BLOCKSIZE
    return -(-raw // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardSink:
    """One split's stream of samples, cut into shards of at most ``max_bytes`` / ``max_samples``."""

    def __init__(
        self, out_dir: Path, split: str, max_bytes: int, max_samples: int, next_index: int = 0
    ) -> None:
        self.out_dir = out_dir
        self.split = split
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.next_index = next_index
        self._writer: Any = None
        self._tmp: Path | None = None
        self._name = ""
        self._count = 0
        self._bytes = 0

    def add(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """Write ``sample``; return the info of a shard completed to make room for it, if any."""
        size = sample_tar_bytes(sample)
        finished = None
        full = self._count >= self.max_samples or (
            tar_file_bytes(self._bytes + size) > self.max_bytes
        )
        if self._writer is not None and self._count and full:
            finished = self.finish()
        if self._writer is None:
            self._open()
        self._write(sample)
        self._count += 1
        self._bytes += size
        return finished

    def finish(self) -> dict[str, Any] | None:
        """Close the open shard, hash it and rename it into place; None if nothing was open."""
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.out_dir / self._name
        digest = file_sha256(self._tmp)
        size = self._tmp.stat().st_size
        os.replace(self._tmp, final)
        info = {"name": self._name, "num_samples": self._count, "bytes": size, "sha256": digest}
        self._count = self._bytes = 0
        return info

    def abort(self) -> None:
        """Drop the open shard (its temporary file); finished shards stay."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()

    def _open(self) -> None:
        self._name = fmt.shard_name(self.split, self.next_index)
        self.next_index += 1
        self._tmp = self.out_dir / f".{self._name}.tmp"
        # kept open across add() calls until the shard is full; closed in finish()/abort()
        self._writer = tarfile.open(self._tmp, "w")  # noqa: SIM115

    def _write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for ext, value in sample.items():
            if ext.startswith("_"):
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(value)
            info.mtime = FIXED_MTIME
            info.mode = 0o444
            info.uname = info.gname = "bigmodel"
            self._writer.addfile(info, io.BytesIO(value))
