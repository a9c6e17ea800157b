"""``bigmodel-shard verify``: prove a shard folder is intact and usable before a GPU job starts.

Checks checksums and sizes, that every sample decodes (numpy/PIL/json only, no torch) and
matches the manifest, that no patient is in two splits, and that each split has enough shards for
the planned ``world_size x loader_workers`` (a DDP rank whose worker gets no shard stops early
and the others wait for it forever).

``root`` may be an object-store prefix (``s3://bucket/prefix``): the prefix is listed once for
the sizes, and each shard is streamed once (``sharding.storage``), hashed and read as a tar in
the same pass, as for a local folder.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharding import format as fmt
from sharding import storage
from sharding.records import SourceError


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``root/dataset.json`` and check it against the schema; return the parsed JSON.

    Raises:
        ManifestFormatError: (a :class:`SourceError`) the file is missing, not JSON, or a field
            does not fit ``sharding.format.DatasetManifest``; the message is the one
            ``bigmodel.data.load_manifest`` gives.
    """
    path = storage.join(root, fmt.MANIFEST_NAME)
    raw = fmt.read_manifest_json(path)
    fmt.DatasetManifest.from_dict(raw, path)
    return raw


def shards_needed(world_size: int, loader_workers: int) -> int:
    """Shards a split needs so every rank's every loader worker gets at least one."""
    return max(1, world_size) * max(1, loader_workers)


@dataclass
class VerifyReport:
    """What ``verify_shards`` found; ``ok`` when there are no errors."""

    root: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per split: ``shards``, ``samples`` (decoded), ``groups``."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        """Human-readable summary, one line per split, then warnings and errors."""
        lines = [f"{self.root}: " + ("OK" if self.ok else f"{len(self.errors)} error(s)")]
        for split, row in self.splits.items():
            lines.append(
                f"  {split:<6} {row['samples']:>8} samples decoded  {row['shards']:>5} shards  "
                f"{row['groups']:>6} patients"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


def verify_shards(root: str | Path, world_size: int = 1, loader_workers: int = 0) -> VerifyReport:
    """Check every shard of ``root`` against its manifest; see the module docstring."""
    root = str(root).rstrip("/") if storage.is_remote(root) else Path(root)
    raw = load_manifest(root)
    manifest = fmt.DatasetManifest.from_dict(raw, storage.join(root, fmt.MANIFEST_NAME))
    report = VerifyReport(str(root))
    sizes = storage.list_sizes(root)  # one listing: which shards exist, and their sizes
    keys: set[str] = set()
    groups_by_split: dict[str, set[str]] = {}
    listed: set[str] = set()
    needed = shards_needed(world_size, loader_workers)
    for split, info in manifest.splits.items():
        groups: set[str] = set()
        decoded = 0
        for shard in info.shards:
            listed.add(shard.name)
            decoded += _check_shard(root, shard, sizes, raw, keys, groups, report)
        groups_by_split[split] = groups
        report.splits[split] = {
            "shards": len(info.shards),
            "samples": decoded,
            "groups": len(groups),
        }
        if decoded != info.total:
            report.errors.append(
                f"{split}: manifest says {info.total} samples, shards hold {decoded}"
            )
        _check_shard_count(split, info, needed, world_size, loader_workers, report)
    for name in sorted(sizes):
        if name.endswith(".tar") and not name.startswith(".") and name not in listed:
            report.warnings.append(f"{name} is not in {fmt.MANIFEST_NAME} (left over? delete it)")
    _check_disjoint(groups_by_split, report)
    return report


def _check_shard_count(
    split: str, info: fmt.SplitSpec, needed: int, world_size, loader_workers, report
) -> None:
    count, samples = len(info.shards), info.total
    if samples == 0:
        report.warnings.append(f"{split}: empty split")
        return
    if count >= needed:
        return
    why = (
        f"{split}: {count} shard(s), but --world-size {world_size} x --loader-workers "
        f"{max(1, loader_workers)} needs at least {needed} (a rank or loader worker without a "
        "shard hangs DDP)"
    )
    if samples >= needed:
        fix = f"rebuild with --max-shard-samples {samples // needed}"
    else:
        fix = f"the split has only {samples} samples: use fewer ranks/loader workers"
    report.errors.append(f"{why}; {fix}")


def _check_disjoint(groups_by_split: dict[str, set[str]], report: VerifyReport) -> None:
    names = list(groups_by_split)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = groups_by_split[a] & groups_by_split[b]
            if shared:
                report.errors.append(
                    f"{len(shared)} patient(s) in both {a} and {b} (e.g. {sorted(shared)[:3]}): "
                    "splits leak; rebuild (splits are assigned per patient)"
                )


def _check_shard(
    root: Path | str,
    shard: fmt.ShardSpec,
    sizes: dict[str, int],
    manifest: dict,
    keys: set,
    groups: set,
    report,
) -> int:
    """Check one shard's size, hash and samples; return the number of samples decoded."""
    name = shard.name
    if name not in sizes:
        report.errors.append(f"{name}: missing; rebuild the shards")
        return 0
    size = sizes[name]
    if shard.bytes is not None and size != shard.bytes:
        report.errors.append(f"{name}: {size} bytes, manifest says {shard.bytes}")
    count = 0
    try:
        with storage.open_read(storage.join(root, name)) as raw:
            stream = storage.HashingReader(raw)  # one pass: hashed while the tar is read
            try:
                for key, members in _samples(stream):
                    if key in keys:
                        report.errors.append(f"{name}: duplicate sample key {key}")
                    keys.add(key)
                    problem = _check_sample(members, manifest)
                    if problem:
                        report.errors.append(f"{name}: sample {key}: {problem}")
                    if fmt.GROUP in members:
                        groups.add(members[fmt.GROUP].decode())
                    count += 1
            except (tarfile.TarError, OSError, EOFError) as err:
                report.errors.append(f"{name}: unreadable tar ({err}); rebuild the shards")
            stream.drain()  # what the tar reader left: end blocks, padding
    except SourceError as err:  # the object store: named by storage, after its retries
        report.errors.append(f"{name}: {err}")
    else:
        digest = stream.sha256.hexdigest()
        if digest != shard.sha256:
            report.errors.append(
                f"{name}: sha256 mismatch (manifest {str(shard.sha256)[:12]}..., file "
                f"{digest[:12]}...): corrupt or modified; delete the folder and rerun the build "
                f"command"
            )
    if count != shard.num_samples:
        report.errors.append(f"{name}: {count} samples, manifest says {shard.num_samples}")
    return count


def _samples(stream: Any):
    """Yield ``(key, {ext: bytes})`` per sample of the tar read front to back from ``stream``
    (a file object, or a local path), requiring each key's members to be contiguous
    (webdataset groups consecutive members; a key seen again would become a second sample)."""
    done: set[str] = set()
    key, members = None, {}
    opened = {"name": str(stream)} if isinstance(stream, (str, Path)) else {"fileobj": stream}
    with tarfile.open(**opened, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key:
                if key is not None:
                    yield key, members
                    done.add(key)
                if k in done:
                    raise tarfile.TarError(f"members of sample {k} are not contiguous")
                key, members = k, {}
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def _check_sample(members: dict[str, bytes], manifest: dict) -> str:
    """Decode every member; return what is wrong (empty when the sample is fine).

    ``manifest`` is the parsed ``dataset.json`` (already checked against the schema by
    :func:`verify_shards`); only its ``image`` and ``tasks`` are read.
    """
    image_info, tasks = manifest["image"], manifest["tasks"]
    try:
        if fmt.IMAGE_NPY in members:
            image = np.load(io.BytesIO(members[fmt.IMAGE_NPY]), allow_pickle=False)
            channels = image.shape[0]
            spatial = image.shape[1:]
        elif fmt.IMAGE_PNG in members:
            image = _png(members[fmt.IMAGE_PNG])
            channels = 1 if image.ndim == 2 else image.shape[2]
            spatial = image.shape[:2]
        else:
            return "no image member"
        if image_info.get("channels") and channels != image_info["channels"]:
            return f"{channels} channels, manifest says {image_info['channels']}"
        if image_info.get("dtype") and str(image.dtype) != image_info["dtype"]:
            return f"dtype {image.dtype}, manifest says {image_info['dtype']}"
        mask = None
        if fmt.MASK_NPY in members:
            mask = np.load(io.BytesIO(members[fmt.MASK_NPY]), allow_pickle=False)
        elif fmt.MASK_PNG in members:
            mask = _png(members[fmt.MASK_PNG])
        if mask is not None:
            if tuple(mask.shape) != tuple(spatial):
                return f"mask shape {mask.shape} != image {tuple(spatial)}"
            n = len(tasks.get("mask", {}).get("classes", []))
            values = np.unique(mask)
            if n and any(v >= n and v != fmt.MASK_IGNORE for v in values):
                return f"mask values {values.tolist()} outside 0..{n - 1}"
        if fmt.CLS in members:
            n = len(tasks.get("cls", {}).get("classes", []))
            value = int(members[fmt.CLS].decode())
            if not 0 <= value < n:
                return f"class {value} outside 0..{n - 1}"
        if fmt.CLS_MULTI in members:
            vec = json.loads(members[fmt.CLS_MULTI])
            if len(vec) != len(tasks.get("cls", {}).get("classes", [])):
                return f"multi-label vector of length {len(vec)}"
        if fmt.BOXES in members:
            boxes = json.loads(members[fmt.BOXES])
            if len(boxes["boxes"]) != len(boxes["labels"]):
                return "boxes and labels differ in length"
        if fmt.GROUP not in members or not members[fmt.GROUP]:
            return "no patient id (group)"
        if fmt.META in members:
            json.loads(members[fmt.META])
    except Exception as err:  # any decode failure is a finding, not a crash
        return f"does not decode: {type(err).__name__}: {err}"
    return ""


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


__all__ = ["VerifyReport", "load_manifest", "shards_needed", "verify_shards"]
