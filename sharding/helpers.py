"""The lowest-level helpers every part of the project uses: atomic writes, file hashes, one-line
errors. Here, in ``sharding`` (which imports neither torch nor ``bigmodel``), so the shard
builder, the library, ``launch/`` and ``tune/`` share one of each.

* :func:`atomic_write` (and :func:`atomic_write_text`, :func:`atomic_write_json`): write to a
  temporary name in the target's folder, then rename it over the target. A reader (another
  rank, a resumed run, the driver polling a file) sees the old file or the whole new one, never
  half of one; concurrent writers each use their own temporary name, and the temporary file is
  removed when writing fails. The temporary name ends with the target's suffixes
  (``.x.nii.gz.k2j9.tmp.nii.gz``): nibabel, Pillow and matplotlib choose the format from them.
* :func:`file_sha256`: the hex sha256 of a file, read in blocks.
* :func:`one_line`: an error's message folded onto one line (pydantic, manifest and Ray errors
  span several), for messages that must stay one line on a console.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "file_sha256",
    "one_line",
    "stream_sha256",
]

BLOCK = 4 << 20
"""Bytes read at a time when hashing."""


def atomic_write(path: str | Path, write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Args:
        path: the file to create or replace; its folder is created when missing.
        write: writes the whole content to the path it is given (``tmp.write_text``,
            ``torch.save``, ``fig.savefig``, ...).
        fsync: flush the content to disk before the rename (manifests, build journals: files a
            crash must not leave empty).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per process and call; created by ``write`` with the usual permissions (mkstemp
    # would leave the file readable by its owner only)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.name}.{tag}.tmp{''.join(path.suffixes[-2:])}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> Path:
    """Replace ``path`` with ``text`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text), fsync=fsync)


def atomic_write_json(
    path: str | Path, data: Any, indent: int | None = 2, fsync: bool = False, **dumps: Any
) -> Path:
    """Replace ``path`` with ``data`` as JSON atomically; ``dumps`` go to ``json.dumps``."""
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps), fsync=fsync)


def stream_sha256(f: BinaryIO) -> str:
    """Hex sha256 of what is left to read in a binary stream (a file, an object-store stream)."""
    digest = hashlib.sha256()
    while block := f.read(BLOCK):
        digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return stream_sha256(f)


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """The message of ``error`` with its lines stripped and joined by spaces (cut at ``limit``)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text[:limit] if limit is not None else text
