"""Shard integrity on read: each shard's bytes are hashed as webdataset streams them.

``dataset.json`` holds every shard's sha256. Hashing a shard separately before training would
read every byte twice; here the file object webdataset reads the tar from is wrapped, so the hash
grows with the one read that feeds the samples, and the digest is compared when the shard's end
is reached (the few trailing bytes tarfile leaves unread are drained first). Only then is a
damaged shard known: its samples have already gone downstream. So the check names the shard and
the steps that used it, and either stops the run (``data.on_damaged_shard=stop``: rebuild the
shard, resume from the checkpoint before those steps) or drops the shard from the rest of the
run with a warning (``skip``; counted as ``data/damaged_shards``).

Loader workers cannot raise cleanly into the training loop (the DataLoader re-raises a worker's
exception with its traceback as text), so a worker reports a damaged shard as a marker batch
``{DAMAGED_KEY: report}``, which the loader classes in ``pipeline.py`` intercept in the main
process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds

from bigmodel.data.manifest import ManifestError

__all__ = ["DAMAGED_KEY", "DamagedShardError", "ShardCheck"]

DAMAGED_KEY = "__damaged_shard__"
_DRAIN_CHUNK = 1 << 20


class DamagedShardError(ManifestError):
    """A shard's bytes differ from its sha256 in ``dataset.json``: a data error, not transient."""


class _HashingStream:
    """A read-only file object that hashes every byte read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        """Read what the tar reader left (end-of-archive blocks, record padding)."""
        while self.read(_DRAIN_CHUNK):
            pass

    def close(self) -> None:
        self.stream.close()


@dataclass
class ShardCheck:
    """Per-loader integrity state; each loader worker gets its own copy (pickled).

    Args:
        digests: expected sha256 by shard path; shards without one are read unchecked.
        mode: ``stop`` or ``skip`` (``data.on_damaged_shard``).
    """

    digests: dict[str, str]
    mode: str = "stop"
    damaged: set[str] = field(default_factory=set)
    """Shards found damaged by this worker (``skip``: never drawn again)."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """Reports not yet passed downstream."""

    def samples(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``wds.tarfile_to_samples`` with every shard hashed as it is read.

        The same stages (url_opener, tar_file_expander, group_by_keys), but one shard at a time,
        so that the digest can be checked at each shard's end.
        """
        for source in wds.tariterators.url_opener(src):
            url = source["url"]
            if url in self.damaged:
                source["stream"].close()
                continue
            expected = self.digests.get(url)
            stream = _HashingStream(source["stream"]) if expected else source["stream"]
            try:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                yield from wds.tariterators.group_by_keys(files)
                if expected:
                    stream.drain()
            finally:
                stream.close()
            if expected and stream.sha256.hexdigest() != expected:
                self.damaged.add(url)
                self.pending.append(
                    {
                        "shard": url,
                        "got": stream.sha256.hexdigest(),
                        "expected": expected,
                        "bytes": stream.bytes,
                    }
                )

    def reports(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Pass batches through, inserting a marker batch after a shard is found damaged."""
        for batch in batches:
            while self.pending:
                yield {DAMAGED_KEY: self.pending.pop(0)}
            yield batch
        while self.pending:
            yield {DAMAGED_KEY: self.pending.pop(0)}

    def usable(self, urls: list[str]) -> list[str]:
        """``urls`` less the shards this worker found damaged."""
        return [u for u in urls if u not in self.damaged]


def _span(steps: list[int]) -> str:
    if not steps:
        return "no optimizer step has used its samples yet"
    return (
        f"steps {steps[0]}-{steps[-1]} used its samples"
        if len(steps) > 1
        else (f"step {steps[0]} used its samples")
    )


def damaged_message(report: dict[str, Any], steps: list[int], root: Path, mode: str) -> str:
    """One paragraph naming the shard, what is known, and the fix."""
    name = Path(report["shard"]).name
    head = (
        f"{name}: its {report['bytes']} bytes hash to sha256 {report['got'][:12]}... but "
        f"{root / 'dataset.json'} records {report['expected'][:12]}... (damaged after the build); "
        f"the hash is known at the shard's end, so {_span(steps)}"
    )
    if mode == "skip":
        return f"{head}; dropped for the rest of the run (data.on_damaged_shard=skip)"
    first = f" before step {steps[0]}" if steps else ""
    return (
        f"{head}. Run `bigmodel-shard verify {root}`, rerun the build command to rewrite the "
        f"shard, and resume from the checkpoint{first}; or set data.on_damaged_shard=skip"
    )
