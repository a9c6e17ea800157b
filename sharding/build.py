"""Build WebDataset shards and ``dataset.json`` from a reader: the engine of ``bigmodel-shard build``.

Flow: scan the source (cheap, validates everything) -> assign patient-level splits -> check the
output folder (fresh, resumable, or another dataset) -> load + cut + encode items in parallel ->
one ordered writer per split caps shards by bytes and samples -> journal after every finished
shard -> manifest. A rerun of the same command resumes from the journals; a finished build is a
no-op. The same command always gives byte-identical shards.

``--out`` may be an object-store prefix (``s3://bucket/prefix``, any fsspec URL): the build
runs as above in a local staging folder (``--stage``, default under the temp dir, keyed by the
URL, so a rerun resumes there), then every shard is uploaded, the uploads are listed back and
checked against their sizes, and ``dataset.json`` is uploaded last. A prefix therefore never
holds a manifest that names a missing or partial shard; a prefix without ``dataset.json`` is an
unfinished upload (rerun the command) and readers refuse it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sharding import __version__, storage
from sharding import format as fmt
from sharding._parallel import run_ordered
from sharding._samples import AXES, ItemResult, SamplePlan, process_item, resolve_slice_labels
from sharding._stats import ChannelStats
from sharding._writer import ShardSink, atomic_write_json
from sharding.records import Reader, SourceError, SourceItem
from sharding.splits import POOL, assign_folds, assign_splits

STATE_DIR = ".bigmodel-shard"
"""Hidden folder inside the output holding the build state and per-split journals until done."""

LAYOUTS = fmt.LAYOUTS


@dataclass
class BuildOptions:
    """How to cut, split and shard a source (the ``bigmodel-shard build`` flags)."""

    layout: str = "2d"
    """``2d`` slices, ``2.5d`` slices with neighbours as channels, ``3d`` volumes or patches."""
    axis: str = "z"
    """Slicing axis of volumes (``z``, ``y`` or ``x``; readers put z first)."""
    context: int = 1
    """2.5D: neighbouring slices on each side stacked as channels."""
    patch: tuple[int, int, int] | None = None
    """3D: cut volumes into tiles of this ``(D, H, W)`` size; None writes whole volumes."""
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    """Seeds the patient-to-split assignment."""
    use_source_split: bool = False
    """Keep the split the source names for an item (others are split by ``split_ratios``)."""
    folds: int = 0
    """Deal the train and val patients into this many cross-validation folds (0: none)."""
    max_shard_bytes: int = 256 << 20
    max_shard_samples: int = 1000
    workers: int = 1
    """Processes loading and encoding items (writing stays one ordered stream)."""
    use_ray: bool = False
    """Load and encode items as Ray tasks (``ray_address`` or a local Ray)."""
    ray_address: str | None = None
    skip_bad: bool = False
    """Record bad items in ``dataset.json["skipped"]`` instead of stopping."""
    name: str = ""
    dtype: str | None = None
    """Cast every image to this dtype; default keeps the source's (float64 becomes float32)."""
    command: str = ""
    """The command line, recorded in the manifest."""
    progress: bool = True
    slice_labels: str = "auto"
    """How a volume's cls label reaches its slices (``-o slice_labels=``; see
    ``sharding._samples.SLICE_LABEL_POLICIES``)."""
    stage_dir: str | None = None
    """``--out`` is a URL: the local folder the shards are built in before the upload (kept
    after it); None: a folder under the temp dir keyed by the URL (removed after the upload)."""

    def validate(self) -> None:
        """Raise :class:`SourceError` naming the flag and its allowed values."""
        if self.layout not in LAYOUTS:
            raise SourceError(f"--layout {self.layout}", "unknown layout", f"use one of {LAYOUTS}")
        if self.axis not in AXES:
            raise SourceError(f"--axis {self.axis}", "unknown axis", f"use one of {tuple(AXES)}")
        if self.context < 0:
            raise SourceError(f"--context {self.context}", "must be >= 0", "")
        if self.patch is not None and (len(self.patch) != 3 or min(self.patch) < 1):
            raise SourceError(
                f"--patch {self.patch}", "needs three positive sizes", "e.g. 32,64,64"
            )
        if self.patch is not None and self.layout != "3d":
            raise SourceError("--patch", "only applies to --layout 3d", "add --layout 3d")
        if self.max_shard_samples < 1 or self.max_shard_bytes < 1:
            raise SourceError("--max-shard-samples/--max-shard-bytes", "must be positive", "")
        if self.workers < 1:
            raise SourceError(f"--workers {self.workers}", "must be >= 1", "")
        if self.folds < 0 or self.folds == 1:
            raise SourceError(f"--folds {self.folds}", "must be 0 (none) or >= 2", "e.g. 5")


@dataclass
class _SplitState:
    """One split's journal: what is finished and where to resume."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    item: int = 0
    """Index (into the split's sorted items) of the first item not fully in finished shards."""
    sample: int = 0
    """Samples of that item already in finished shards."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    label_counts: dict[str, list[int]] = field(default_factory=dict)
    stats: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path) -> _SplitState:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()


def build_shards(reader: Reader, out_dir: str | Path, options: BuildOptions) -> dict[str, Any]:
    """Write ``reader``'s items as shards plus ``dataset.json`` into ``out_dir``.

    Returns:
        The manifest as written (``DatasetManifest.to_dict()``).
    """
    options.validate()
    started = time.perf_counter()
    remote = str(out_dir).rstrip("/") if storage.is_remote(out_dir) else None
    out = _staging_dir(remote, options) if remote else Path(out_dir)
    items, schema = reader.scan()
    items = sorted(items, key=lambda it: it.source_id)
    source_path = str(getattr(reader, "path", ""))
    _check_items(items, source_path)
    assignment = assign_splits(items, options.split_ratios, options.seed, options.use_source_split)
    folds = assign_folds(items, assignment, options.folds, options.seed) if options.folds else {}
    tasks_json = schema.to_json()
    slice_labels = resolve_slice_labels(options.slice_labels, tasks_json, options.layout)
    if "cls" in tasks_json and options.layout != "3d":  # so readers know what a slice's cls is
        tasks_json["cls"]["slice_labels"] = slice_labels
    fingerprint = _fingerprint(reader, items, assignment, tasks_json, options)
    if remote:
        published = _check_remote_out(remote, fingerprint)
        if published is not None:
            _log(options, f"{remote}: already complete (same source and options); nothing to do")
            return published
    done = _prepare_out_dir(out, fingerprint)
    if done is not None:
        if remote:  # built before, the upload did not finish
            _publish(out, remote, done, options)
            return done
        _log(options, f"{out}: already complete (same source and options); nothing to do")
        return done

    state_dir = out / STATE_DIR
    state = json.loads((state_dir / "state.json").read_text())
    by_split = {s: [it for it in items if assignment[it.source_id] == s] for s in fmt.SPLITS}
    if folds:  # each fold's items together, so a shard never spans two folds (stable sort)
        by_split = {
            s: sorted(v, key=lambda it: folds.get(it.group, -1)) for s, v in by_split.items()
        }
    open_fold: dict[str, int | None] = {}
    journals = {s: _SplitState.load(state_dir / f"{s}.json") for s in fmt.SPLITS}
    _drop_unjournaled(out, journals)

    plan = SamplePlan(
        layout=options.layout,
        axis=options.axis,
        context=options.context if options.layout == "2.5d" else 0,
        patch=tuple(options.patch) if options.patch else None,
        dtype=options.dtype or state.get("image", {}).get("dtype"),
        force_dtype=options.dtype is not None,
        tasks=tasks_json,
        source_root=source_path,
        slice_labels=slice_labels,
    )
    todo = [
        (split, idx, item)
        for split in fmt.SPLITS
        for idx, item in enumerate(by_split[split])
        if idx >= journals[split].item
    ]
    sinks = {
        s: ShardSink(out, s, options.max_shard_bytes, options.max_shard_samples, len(j.shards))
        for s, j in journals.items()
    }
    stats = {s: _stats_of(j) for s, j in journals.items()}
    written = {"samples": 0, "bytes": 0}
    from tqdm import tqdm

    bar = tqdm(
        total=len(items), initial=len(items) - len(todo), unit="item", disable=not options.progress
    )
    results = _results(reader, todo, plan, options, state, out)
    try:
        for (split, idx, item), result in zip(todo, results, strict=True):
            journal = journals[split]
            bar.update(1)
            if result.error is not None:
                if not options.skip_bad:
                    raise result.error
                err = result.error
                journal.skipped.append(
                    {"file": err.file, "reason": err.problem, "source_id": item.source_id}
                )
                continue
            _check_consistent(state, result, item, out)
            first = journal.sample if idx == journal.item else 0
            fold = folds.get(item.group)
            if open_fold.setdefault(split, fold) != fold:
                # cut the shard at a fold boundary: a fold is a set of whole shards
                finished = sinks[split].finish()
                if finished:
                    written["bytes"] += finished["bytes"]
                    journal.shards.append({**finished, "fold": open_fold[split]})
                    journal.item, journal.sample = idx, first
                    journal.stats = stats[split].to_state()
                    atomic_write_json(state_dir / f"{split}.json", vars(journal))
                open_fold[split] = fold
            for j, sample in enumerate(result.samples[first:], start=first):
                finished = sinks[split].add(sample)
                written["samples"] += 1
                if finished:
                    if fold is not None:
                        finished["fold"] = fold
                    written["bytes"] += finished["bytes"]
                    journal.shards.append(finished)
                    journal.item, journal.sample = idx, j
                    journal.stats = stats[split].to_state()
                    atomic_write_json(state_dir / f"{split}.json", vars(journal))
            stats[split].merge(result.stats)
            for task, counts in result.label_counts.items():
                row = journal.label_counts.setdefault(task, [0] * len(counts))
                journal.label_counts[task] = [a + b for a, b in zip(row, counts, strict=True)]
            bar.set_postfix(samples=written["samples"], refresh=False)
        for split, sink in sinks.items():
            finished = sink.finish()
            journal = journals[split]
            if finished and open_fold.get(split) is not None:
                finished["fold"] = open_fold[split]
            if finished:
                written["bytes"] += finished["bytes"]
                journal.shards.append(finished)
            journal.item, journal.sample = len(by_split[split]), 0
            journal.stats = stats[split].to_state()
            atomic_write_json(state_dir / f"{split}.json", vars(journal))
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        results.close()  # stops the pool or Ray tasks now, not when the traceback is collected
        bar.close()

    if not any(j.shards for j in journals.values()):
        skipped = [s for j in journals.values() for s in j.skipped]
        first = f"; first: {skipped[0]['file']}: {skipped[0]['reason']}" if skipped else ""
        raise SourceError(
            source_path or "source",
            f"no samples written ({len(skipped)} of {len(items)} items skipped{first})",
            "fix the source; an empty dataset cannot be trained on",
        )
    if "cls" in tasks_json and options.layout != "3d" and not state["image"].get("sliced"):
        # No volume was cut into slices (image folders, CSV of PNGs, COCO, 2D npz): every sample
        # is a whole source image and carries that image's own label.
        tasks_json["cls"]["slice_labels"] = "copy"
    manifest = _manifest(reader, options, state, fingerprint, tasks_json, by_split, journals, stats)
    if folds:
        manifest.folds = _folds_record(folds, journals, options)
    manifest = manifest.to_dict()
    fmt.DatasetManifest.from_dict(manifest, out / fmt.MANIFEST_NAME)  # held to the readers' checks
    atomic_write_json(out / fmt.MANIFEST_NAME, manifest)
    shutil.rmtree(state_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    mb = written["bytes"] / 1e6
    _log(
        options,
        f"wrote {written['samples']} samples, {sum(len(j.shards) for j in journals.values())} "
        f"shards ({sum(s['bytes'] for j in journals.values() for s in j.shards) / 1e6:.1f} MB in "
        f"all) in {seconds:.1f} s, {mb / max(seconds, 1e-9):.1f} MB/s; "
        f"{len(manifest['skipped'])} skipped -> {out / fmt.MANIFEST_NAME}",
    )
    if remote:
        _publish(out, remote, manifest, options)
    return manifest


_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+-\d{6}\.tar$")


def _staging_dir(url: str, options: BuildOptions) -> Path:
    if options.stage_dir:
        return Path(options.stage_dir).expanduser()
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "bigmodel-shard-stage" / key


def _check_remote_out(url: str, fingerprint: str) -> dict[str, Any] | None:
    """Refuse a prefix holding another dataset; return the manifest of this finished build.

    Runs before anything is built, so a missing bucket or absent credentials stop the command
    at once (StorageError names the URL and the fix). Shard objects without a manifest are an
    interrupted upload of some build and are overwritten; anything else is refused.
    """
    fix = "choose a new --out prefix, or delete the objects under it to rebuild there"
    sizes = storage.list_sizes(url)
    if fmt.MANIFEST_NAME in sizes:
        try:
            manifest = fmt.read_manifest(storage.join(url, fmt.MANIFEST_NAME))
        except fmt.ManifestFormatError as err:
            raise SourceError(url, err.problem, fix) from None
        created = manifest.created_by or fmt.CreatedBy()
        if created.fingerprint == fingerprint:
            return manifest.to_dict()
        raise SourceError(
            url,
            f"holds another dataset ({manifest.name!r}, built by {created.command or '?'!r})",
            fix,
        )
    foreign = sorted(name for name in sizes if not _SHARD_NAME.match(name))
    if foreign:
        raise SourceError(
            url, f"is not empty and holds no bigmodel-shard build ({foreign[:3]})", fix
        )
    return None


def _publish(stage: Path, url: str, manifest: dict[str, Any], options: BuildOptions) -> None:
    """Upload the shards, check them by listing, then upload ``dataset.json`` last."""
    started = time.perf_counter()
    shards = [shard for split in manifest["splits"].values() for shard in split["shards"]]
    for shard in shards:
        storage.put_file(stage / shard["name"], storage.join(url, shard["name"]))
    sizes = storage.list_sizes(url)
    wrong = [s["name"] for s in shards if sizes.get(s["name"]) != s["bytes"]]
    if wrong:
        raise storage.StorageError(
            url,
            f"uploaded shard(s) {wrong[:3]} are missing or of another size when listed back",
            "rerun the same command to upload them again",
        )
    storage.put_file(stage / fmt.MANIFEST_NAME, storage.join(url, fmt.MANIFEST_NAME))
    total = sum(s["bytes"] for s in shards)
    seconds = time.perf_counter() - started
    _log(
        options,
        f"uploaded {len(shards)} shards ({total / 1e6:.1f} MB) in {seconds:.1f} s, then "
        f"{fmt.MANIFEST_NAME} -> {storage.join(url, fmt.MANIFEST_NAME)}",
    )
    if not options.stage_dir:
        shutil.rmtree(stage, ignore_errors=True)


def _results(reader, todo, plan: SamplePlan, options: BuildOptions, state, out: Path):
    """Item results in ``todo`` order; the first is done here to fix the dataset's dtype."""
    rest = iter(todo)
    if plan.dtype is None:
        for _, _, item in rest:
            result = process_item(reader, item, plan)
            yield result
            if result.error is None:
                plan = replace(plan, dtype=result.dtype)
                break
    tasks = ((item, plan) for _, _, item in rest)
    yield from run_ordered(reader, tasks, options.workers, options.ray_address, options.use_ray)


def _check_items(items: list[SourceItem], source_path: str) -> None:
    if not items:
        raise SourceError(
            source_path or "source", "no items found", "check --input and --source (and --option)"
        )
    seen: set[str] = set()
    for item in items:
        file = item.paths.get("image", item.source_id)
        if not item.group or not str(item.group).strip():
            raise SourceError(
                file, "missing patient id", "fill in the patient/group id for every item"
            )
        if not fmt.is_valid_key(fmt.sample_key(item.source_id)):
            raise SourceError(file, f"source id {item.source_id!r} is not key-safe", "")
        if item.source_id in seen:
            raise SourceError(file, f"duplicate source id {item.source_id!r}", "ids must be unique")
        seen.add(item.source_id)


def _fingerprint(reader, items, assignment, tasks_json, options: BuildOptions) -> str:
    """Hash of everything that decides the shards' content (not workers, Ray or progress)."""
    relevant = {
        k: v
        for k, v in asdict(options).items()
        if k not in ("workers", "use_ray", "ray_address", "command", "progress", "stage_dir")
    }
    payload = {
        "format": fmt.FORMAT_VERSION,
        "kind": getattr(reader, "kind", type(reader).__name__),
        "path": str(getattr(reader, "path", "")),
        "options": relevant,
        "tasks": tasks_json,
        "items": [
            [it.source_id, it.group, assignment[it.source_id], it.paths, it.cls, it.boxes]
            for it in items
        ],
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _prepare_out_dir(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """Make ``out`` ready; return the manifest when this exact build is already complete."""
    manifest_path = out / fmt.MANIFEST_NAME
    state_path = out / STATE_DIR / "state.json"
    fix = "choose a new --out, or delete the folder to rebuild there"
    if manifest_path.exists():
        try:
            manifest = fmt.read_manifest(manifest_path)
        except fmt.ManifestFormatError as err:
            raise SourceError(str(manifest_path), err.problem, fix) from None
        created = manifest.created_by or fmt.CreatedBy()
        if created.fingerprint == fingerprint:
            return manifest.to_dict()
        raise SourceError(
            str(out),
            f"holds another dataset ({manifest.name!r}, built by {created.command or '?'!r})",
            fix,
        )
    if state_path.exists():
        if json.loads(state_path.read_text()).get("fingerprint") != fingerprint:
            raise SourceError(
                str(out), "holds an unfinished build of another dataset or other options", fix
            )
        return None
    if out.exists() and any(out.iterdir()):
        raise SourceError(str(out), "is not empty and holds no bigmodel-shard build", fix)
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, {"fingerprint": fingerprint, "image": {}})
    return None


def _drop_unjournaled(out: Path, journals: dict[str, _SplitState]) -> None:
    """Remove temporary files and shards a crash left behind after the last journal entry."""
    for path in out.glob(".*.tar.tmp"):
        path.unlink()
    for split, journal in journals.items():
        keep = {s["name"] for s in journal.shards}
        for path in out.glob(f"{split}-*.tar"):
            if path.name not in keep:
                path.unlink()


def _stats_of(journal: _SplitState) -> ChannelStats:
    return ChannelStats.from_state(journal.stats) if journal.stats else ChannelStats(0)


def _check_consistent(
    state: dict[str, Any], result: ItemResult, item: SourceItem, out: Path
) -> None:
    """Every sample of a dataset has the same channels, dtype and encoding (fixed by the first)."""
    if not result.samples:
        return
    seen = {
        "dtype": result.dtype,
        "channels": result.channels,
        "encoding": result.encoding,
        "channel_names": result.channel_names,
        "sample_ndim": result.sample_ndim,
    }
    image = state["image"]
    if result.sliced and not image.get("sliced"):  # the manifest's slice-label policy applies
        image["sliced"] = True
        atomic_write_json(out / STATE_DIR / "state.json", state)
    if result.modality and not image.get("modality"):  # the first item that names one
        image["modality"] = result.modality
        atomic_write_json(out / STATE_DIR / "state.json", state)
    if not image.get("channels"):
        image.update(seen)
        atomic_write_json(out / STATE_DIR / "state.json", state)
        return
    for key in ("channels", "dtype", "encoding", "sample_ndim"):
        if image.get(key) != seen[key]:
            raise SourceError(
                item.paths.get("image", item.source_id),
                f"{key} is {seen[key]}, but earlier items have {image.get(key)}",
                "make the source uniform (same channels/modalities), or pass --dtype float32 "
                "for mixed dtypes",
            )


def _manifest(
    reader, options, state, fingerprint, tasks_json, by_split, journals, stats
) -> fmt.DatasetManifest:
    """The ``dataset.json`` of a finished build (folds are added by the caller)."""
    splits, skipped = {}, []
    for split, items in by_split.items():
        journal = journals[split]
        skipped.extend(fmt.SkippedItem(**s) for s in journal.skipped)
        skipped_ids = {s["source_id"] for s in journal.skipped}
        splits[split] = fmt.SplitSpec(
            num_samples=sum(s["num_samples"] for s in journal.shards),
            num_groups=len({it.group for it in items if it.source_id not in skipped_ids}),
            shards=[fmt.ShardSpec(**s) for s in journal.shards],
            label_counts=journal.label_counts,
            stats=_intensity_stats(stats[split].summary()),
        )
    overall = stats["train"]
    if overall.count == 0:  # no train split: describe whatever was written
        for s in stats.values():
            overall.merge(s)
    image = dict(state["image"])
    source_path = str(getattr(reader, "path", ""))
    return fmt.DatasetManifest(
        format_version=fmt.FORMAT_VERSION,
        name=options.name or Path(str(getattr(reader, "path", "dataset"))).name,
        created_by=fmt.CreatedBy(
            command=options.command or "sharding.build_shards(...)",
            version=__version__,
            time=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            fingerprint=fingerprint,
        ),
        source=fmt.SourceInfo(
            kind=getattr(reader, "kind", type(reader).__name__), path=source_path
        ),
        layout=options.layout,
        axis=options.axis,
        context=options.context if options.layout == "2.5d" else 0,
        patch=list(options.patch) if options.patch else None,
        split=fmt.SplitPolicy(
            ratios=list(options.split_ratios),
            seed=options.seed,
            use_source_split=options.use_source_split,
            by="patient (group)",
        ),
        image=fmt.ImageSpec(
            encoding=image.get("encoding", "npy"),
            dtype=image.get("dtype", ""),
            channels=image.get("channels", 0),
            channel_names=image.get("channel_names", []),
            modality=image.get("modality", ""),
        ),
        tasks={name: fmt.TaskSpec(**spec) for name, spec in tasks_json.items()},
        stats=_intensity_stats(overall.summary()),
        splits=splits,
        skipped=skipped,
    )


def _intensity_stats(summary: dict[str, Any]) -> fmt.IntensityStats:
    """``ChannelStats.summary()`` as the schema's type (empty for a split with no samples)."""
    size, foreground = summary.pop("image_size", None), summary.pop("foreground", None)
    return fmt.IntensityStats(
        **summary,
        image_size=fmt.ImageSize(**size) if size else None,
        foreground=_intensity_stats(foreground) if foreground else None,
    )


def _folds_record(
    folds: dict[str, int], journals: dict[str, _SplitState], options: BuildOptions
) -> fmt.FoldsSpec:
    """``dataset.json["folds"]``: which patient is in which fold, and each fold's size.

    Every shard of the pool splits also carries its ``fold``; ``bigmodel/data`` builds fold i's
    training and validation sets from whole shards.
    """
    k = options.folds
    samples = [0] * k
    for split in POOL:
        for shard in journals[split].shards:
            samples[shard["fold"]] += shard["num_samples"]
    return fmt.FoldsSpec(
        k=k,
        seed=options.seed,
        pool=list(POOL),
        by="patient (group)",
        num_groups=[sum(1 for f in folds.values() if f == i) for i in range(k)],
        num_samples=samples,
        groups=dict(sorted(folds.items())),
    )


def _log(options: BuildOptions, message: str) -> None:
    if options.progress:
        print(message, file=sys.stderr)
