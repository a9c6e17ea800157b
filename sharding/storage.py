"""Where shards live: a local folder or an object-store prefix (``s3://``, ``gs://``, any fsspec URL).

Every read and write of a shard location outside a plain local folder goes through here, so the
writer, ``verify``, the training loaders and the driver's pre-flight checks agree on what a
location is, retry the same transient errors and give the same one-line messages.

* A *location* is a string: a local path (``shards/liver``, ``file:///data/liver``) or a URL
  with a scheme fsspec knows (``s3://bucket/prefix``; ``gs://`` with ``gcsfs`` installed).
  Local paths keep using the standard library; URLs use fsspec (s3fs for ``s3://``).
* Credentials and endpoints come from the usual environment of each filesystem, never from
  here: for S3 ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` or
  ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) for an S3-compatible server,
  ``AWS_MAX_ATTEMPTS`` for botocore's own retries; for GCS ``GOOGLE_APPLICATION_CREDENTIALS``.
  Nothing here logs or prints their values; messages name the variables only.
* Transient errors (connection refused or reset, timeouts, throttling, 5xx) are retried
  ``BIGMODEL_STORAGE_RETRIES`` times (default 4) with exponential backoff from
  ``BIGMODEL_STORAGE_BACKOFF_S`` (default 0.5 s, doubling, with jitter), then raised as
  :class:`StorageError` naming the URL and the fix. Permanent ones (no such bucket or object,
  no credentials, access denied) are raised at once.

No torch and no ``bigmodel`` here (import-linter: ``sharding`` stays importable on its own).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from sharding.records import SourceError

__all__ = [
    "HashingReader",
    "StorageError",
    "cache_path",
    "filesystem",
    "is_remote",
    "join",
    "list_sizes",
    "open_read",
    "put_file",
    "read_bytes",
    "retrying",
    "unfold",
]

T = TypeVar("T")

READ_BLOCK = 8 << 20
"""Bytes per ranged GET when streaming an object (a 256 MB shard is ~32 requests, never one
whole download before the first sample)."""

_TRANSIENT_NAMES = {
    # botocore / aiobotocore
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
    # aiohttp / fsspec
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientPayloadError",
    "FSTimeoutError",
}
_TRANSIENT_WORDS = (
    # what s3fs/gcsfs put in the OSError of a 5xx or throttling answer
    "slow down",
    "slowdown",
    "throttl",
    "service unavailable",
    "internal error",
    "internalerror",
    "bad gateway",
    "gateway timeout",
    "timed out",
    "timeout",
)
_CREDENTIAL_NAMES = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "DefaultCredentialsError",  # google-auth
}


class StorageError(SourceError):
    """An object-store location that cannot be used; one line naming the URL and the fix."""


def is_remote(location: str | Path) -> bool:
    """True for a URL fsspec must open (``s3://...``); False for local paths and ``file://``."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def unfold(location: str | Path) -> str | Path:
    """``location`` with the ``//`` of its URL restored when ``pathlib`` folded it.

    ``Path("s3://bucket/key")`` prints as ``s3:/bucket/key``; a location that reached a
    ``Path`` on its way here (``Path(cfg.data.shards) / "dataset.json"``) is read as the URL it
    was, when its first part is a scheme fsspec knows and no such local folder exists.
    """
    text = str(location)
    scheme, sep, rest = text.partition(":/")
    if sep and not rest.startswith("/") and scheme.isidentifier() and scheme != "file":
        import fsspec

        if scheme in fsspec.available_protocols() and not Path(f"{scheme}:").exists():
            return f"{scheme}://{rest}"
    return location


def local_path(location: str | Path) -> Path:
    """The local path of a non-remote location (``file://`` stripped, ``~`` expanded)."""
    return Path(str(location).removeprefix("file://")).expanduser()


def join(location: str | Path, name: str) -> str:
    """``location/name`` as a string (URLs keep their ``//``, which ``pathlib`` would fold)."""
    if is_remote(location):
        return f"{str(location).rstrip('/')}/{name}"
    return str(local_path(location) / name)


def _scheme(url: str) -> str:
    return url.partition("://")[0]


def _credentials_fix(url: str) -> str:
    if _scheme(url) in ("s3", "s3a"):
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment "
            "of the driver and every node, and AWS_ENDPOINT_URL_S3 for an S3-compatible server"
        )
    if _scheme(url) in ("gs", "gcs"):
        return "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file on every node"
    return f"give the credentials {_scheme(url)}:// reads from the environment"


def _endpoint_fix(url: str) -> str:
    if _scheme(url) in ("s3", "s3a"):
        return (
            "check that the object store is up and reachable from this machine "
            "(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for an S3-compatible server), then rerun"
        )
    return "check that the object store is up and reachable from this machine, then rerun"


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    if names & _TRANSIENT_NAMES:
        return True
    if isinstance(err, (FileNotFoundError, PermissionError)) or names & _CREDENTIAL_NAMES:
        return False
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, OSError) and any(word in text for word in _TRANSIENT_WORDS)


def _named(err: BaseException, url: str, what: str) -> StorageError:
    """The one-line :class:`StorageError` for a failed ``what`` (reading, listing...) of ``url``."""
    names = {cls.__name__ for cls in type(err).__mro__}
    detail = " ".join(str(err).split())[:200]
    if names & _CREDENTIAL_NAMES:
        return StorageError(
            url, f"no credentials for {_scheme(url)}:// ({detail})", _credentials_fix(url)
        )
    if isinstance(err, PermissionError):
        return StorageError(
            url,
            f"access denied while {what} ({detail})",
            f"grant read/list on it, or {_credentials_fix(url)}",
        )
    if isinstance(err, FileNotFoundError):
        if "bucket" in detail.lower():
            bucket = url.partition("://")[2].split("/", 1)[0]
            return StorageError(
                url,
                f"bucket {bucket!r} does not exist",
                "create it, or fix the bucket name in the URL",
            )
        return StorageError(url, "not found", "check the URL (the prefix and the object's name)")
    if isinstance(err, ImportError):
        return StorageError(
            url,
            f"no filesystem for {_scheme(url)}:// ({detail})",
            "install its fsspec package (s3fs for s3://, gcsfs for gs://: pip install 'bigmodel[gcs]')",
        )
    return StorageError(url, f"{what} failed ({type(err).__name__}: {detail})", _endpoint_fix(url))


def _attempts() -> int:
    return max(1, int(os.environ.get("BIGMODEL_STORAGE_RETRIES", "4")))


def _backoff_s() -> float:
    return float(os.environ.get("BIGMODEL_STORAGE_BACKOFF_S", "0.5"))


def retrying(call: Callable[[], T], url: str, what: str = "reading") -> T:
    """``call()``, retried with exponential backoff on transient errors, else a StorageError.

    Raises:
        StorageError: a permanent error at once, or a transient one after the last attempt
            (the message says how many were made).
    """
    attempts = _attempts()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - classified and named below
            if not _is_transient(err):
                raise _named(err, url, what) from None
            if attempt == attempts:
                named = _named(err, url, what)
                raise StorageError(
                    url, f"{named.problem}, after {attempts} attempt(s)", named.fix
                ) from None
            delay = _backoff_s() * 2 ** (attempt - 1)
            time.sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it (credentials from the env)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise _named(err, url, "opening") from None


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a (small) file or object: ``dataset.json``, a journal."""
    if not is_remote(location):
        return local_path(location).read_bytes()
    url = str(location)
    fs, path = filesystem(url)
    return retrying(lambda: fs.cat_file(path), url)


def exists(location: str | Path) -> bool:
    """Whether the file or object exists (a missing bucket is an error, not False)."""
    if not is_remote(location):
        return local_path(location).exists()
    url = str(location)
    fs, path = filesystem(url)

    def found() -> bool:
        # not fs.exists(): it answers False for a missing bucket, absent credentials or a
        # dead endpoint alike; info() raises what happened
        try:
            fs.info(path, refresh=True) if _takes_refresh(fs.info) else fs.info(path)
        except FileNotFoundError as err:
            if "bucket" in str(err).lower():
                raise
            return False
        return True

    return retrying(found, url, "checking")


def _takes_refresh(method: Any) -> bool:
    import inspect

    try:
        return "refresh" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def list_sizes(location: str | Path) -> dict[str, int]:
    """Size in bytes of each file directly under ``location``, by name (one listing request).

    A missing folder or prefix gives an empty dict; a missing bucket, absent credentials or an
    unreachable endpoint raise :class:`StorageError`.
    """
    if not is_remote(location):
        root = local_path(location)
        if not root.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in root.iterdir() if p.is_file()}
    url = str(location).rstrip("/")
    fs, path = filesystem(url)

    def listing() -> list[dict[str, Any]]:
        try:
            if _takes_refresh(fs.ls):
                return fs.ls(path, detail=True, refresh=True)
            return fs.ls(path, detail=True)
        except FileNotFoundError as err:
            if "bucket" in str(err).lower():  # a missing prefix lists empty, a bucket does not
                raise
            return []

    entries = retrying(listing, url, "listing")
    return {
        entry["name"].rstrip("/").rsplit("/", 1)[-1]: int(entry.get("size") or 0)
        for entry in entries
        if entry.get("type") == "file"
    }


def open_read(location: str | Path) -> BinaryIO:
    """A file object streaming ``location`` front to back (ranged reads of ``READ_BLOCK``)."""
    if not is_remote(location):
        return open(local_path(location), "rb")  # noqa: SIM115 - the caller closes it
    url = str(location)
    fs, path = filesystem(url)
    return retrying(
        lambda: fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead"), url, "opening"
    )


def put_file(local: str | Path, location: str) -> None:
    """Upload one local file to ``location`` (one object, whole or not at all)."""
    fs, path = filesystem(location)
    retrying(lambda: fs.put_file(str(local), path), location, "uploading")


def cache_path(cache_dir: str | Path, url: str) -> Path:
    """Where the node-local cache keeps a copy of ``url``: ``CACHE/<sha of the folder>/<name>``.

    Keyed by the object's folder URL so two datasets with the same shard names never collide.
    """
    folder, _, name = url.rstrip("/").rpartition("/")
    digest = hashlib.sha256(folder.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / digest / name


class HashingReader:
    """A read-only file object that hashes every byte read through it: a shard is checked in
    the same pass that reads its tar (``verify``, the training loaders), never read twice."""

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
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()
