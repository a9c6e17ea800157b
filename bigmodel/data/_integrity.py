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

Remote shards (``s3://...``) are streamed through ``sharding.storage`` (fsspec, ranged reads,
retried), never downloaded whole first. With ``data.cache_dir`` set, the bytes of a remote shard
are also written to a node-local file as they stream (no second read); the file is renamed
into the cache only when the whole shard was read and its sha256 matched, so a later epoch on
the same node reads the local copy (hashed again, as any shard) and a half-read or damaged shard
is never cached.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds
from webdataset.gopen import gopen_schemes

from bigmodel.data.manifest import ManifestError
from sharding import storage

__all__ = ["DAMAGED_KEY", "DamagedShardError", "ShardCheck"]

DAMAGED_KEY = "__damaged_shard__"


class DamagedShardError(ManifestError):
    """A shard's bytes differ from its sha256 in ``dataset.json``: a data error, not transient."""


def _gopen_storage(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> BinaryIO:
    """webdataset ``gopen`` handler for object-store URLs: a stream from ``sharding.storage``."""
    if mode != "rb":
        raise ValueError(f"{url}: shards in object storage are read-only here (mode {mode!r})")
    return storage.open_read(url)


# webdataset opens URLs through its public dispatch table ``gopen_schemes``; s3:// (and gs://
# when gcsfs is installed, instead of shelling out to gsutil) go through fsspec, so any
# webdataset reader of a shard URL (``wds.tarfile_to_samples``, ``wds.WebDataset``) streams it
# with the same credentials, endpoint and retries as the loaders here.
for _scheme in ("s3", "s3a", *(("gs", "gcs") if importlib.util.find_spec("gcsfs") else ())):
    gopen_schemes[_scheme] = _gopen_storage


class _CachingStream:
    """A read-only file object that also writes every byte read to a temporary cache file."""

    def __init__(self, stream: BinaryIO, target: Path) -> None:
        self.stream = stream
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.file.write(data)
        return data

    def close(self) -> None:
        self.stream.close()
        if not self.file.closed:
            self.file.close()

    def keep(self, keep: bool) -> None:
        """Rename the complete copy into the cache (``keep``), or drop it."""
        self.close()
        if keep:
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)


@dataclass
class ShardCheck:
    """Per-loader integrity state; each loader worker gets its own copy (pickled).

    Args:
        digests: expected sha256 by shard path; shards without one are read unchecked.
        mode: ``stop`` or ``skip`` (``data.on_damaged_shard``).
    """

    digests: dict[str, str]
    mode: str = "stop"
    cache_dir: str | None = None
    """Node-local folder keeping copies of remote shards (``data.cache_dir``); None: no cache."""
    damaged: set[str] = field(default_factory=set)
    """Shards found damaged by this worker (``skip``: never drawn again)."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """Reports not yet passed downstream."""

    def samples(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``wds.tarfile_to_samples`` with every shard hashed as it is read.

        The same stages (url_opener, tar_file_expander, group_by_keys), but one shard at a time,
        so that the digest can be checked at each shard's end.
        """
        for source in src:
            url = source["url"]
            if url in self.damaged:
                continue
            expected = self.digests.get(url)
            raw, caching = self._open(url)
            stream = storage.HashingReader(raw) if expected or caching else raw
            complete = False
            try:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                yield from wds.tariterators.group_by_keys(files)
                if expected or caching:
                    stream.drain()
                complete = True
            finally:
                stream.close()
                if caching is not None:  # only a whole shard that hashed right is kept
                    good = not expected or stream.sha256.hexdigest() == expected
                    caching.keep(complete and good)
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

    def _open(self, url: str) -> tuple[BinaryIO, _CachingStream | None]:
        """The shard's byte stream: local file, cached copy, or remote stream (teed to the cache)."""
        if self.cache_dir is None or not storage.is_remote(url):
            return storage.open_read(url), None
        target = storage.cache_path(self.cache_dir, url)
        if target.is_file():
            return open(target, "rb"), None  # noqa: SIM115 - closed by samples()
        caching = _CachingStream(storage.open_read(url), target)
        return caching, caching

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


def damaged_message(report: dict[str, Any], steps: list[int], root: Path | str, mode: str) -> str:
    """One paragraph naming the shard, what is known, and the fix."""
    name = str(report["shard"]).rsplit("/", 1)[-1]
    head = (
        f"{name}: its {report['bytes']} bytes hash to sha256 {report['got'][:12]}... but "
        f"{storage.join(root, 'dataset.json')} records {report['expected'][:12]}... (damaged after the build); "
        f"the hash is known at the shard's end, so {_span(steps)}"
    )
    if mode == "skip":
        return f"{head}; dropped for the rest of the run (data.on_damaged_shard=skip)"
    first = f" before step {steps[0]}" if steps else ""
    return (
        f"{head}. Run `bigmodel-shard verify {root}`, rerun the build command to rewrite the "
        f"shard, and resume from the checkpoint{first}; or set data.on_damaged_shard=skip"
    )
