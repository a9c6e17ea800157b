"""The shard format: sample keys, file names inside a sample, and the ``dataset.json`` schema.

This module is the contract between ``sharding/`` (the writer) and ``bigmodel/data`` (the
reader). It imports nothing heavy so that both sides can use it.

A shard is a POSIX tar named ``{split}-{index:06d}.tar``. Each sample is a group of members
sharing a key (webdataset convention: ``KEY.EXT``):

==================  ==========================================================================
member              content
==================  ==========================================================================
``image.npy``       numpy array ``[C, H, W]`` (2D/2.5D) or ``[C, D, H, W]`` (3D), dtype kept
``image.png``       8-bit sources only: ``H x W`` (gray) or ``H x W x 3`` (RGB)
``cls``             ASCII integer class index (multi-class tasks)
``cls.json``        JSON list of 0/1 per class, -1 where the label is unknown (multi-label)
``mask.png``        uint8 label map ``H x W`` (2D, fewer than 256 classes)
``mask.npy``        integer label map ``[H, W]`` or ``[D, H, W]``
``boxes.json``      ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [int, ...]}`` in pixels
``group``           ASCII patient id (a salted hash for DICOM); never the patient's name
``meta.json``       modality, spacing, orientation, source, slice index, axis, window, and
                    ``intensity``: the statistics of the sample's whole volume
                    (:func:`volume_intensity`), the same on every slice of it
==================  ==========================================================================

A sample carries only the task members it has labels for (partial labels are normal).

``dataset.json`` is :class:`DatasetManifest` (below): the writer builds one, ``bigmodel-shard
verify``/``inspect`` and ``bigmodel.data.load_manifest`` read through its ``from_dict``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sharding import storage
from sharding._schema import REBUILD, ManifestFormatError, _Fields, _maybe, _Record
from sharding._stats import volume_intensity  # noqa: F401  (meta.json "intensity" is its output)

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
SPLITS = ("train", "val", "test")

# member extensions (the part after ``KEY.``)
IMAGE_NPY = "image.npy"
IMAGE_PNG = "image.png"
CLS = "cls"
CLS_MULTI = "cls.json"
MASK_PNG = "mask.png"
MASK_NPY = "mask.npy"
BOXES = "boxes.json"
GROUP = "group"
META = "meta.json"

# task names in ``dataset.json["tasks"]``; each is backed by the members listed
TASK_MEMBERS = {
    "cls": (CLS, CLS_MULTI),
    "mask": (MASK_PNG, MASK_NPY),
    "boxes": (BOXES,),
}

# (center, width) in HU: the common radiology window presets. The DICOM reader records one per
# sample in meta.json ("window"); bigmodel.data.intensity clips CT to a named one or to that.
CT_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "abdomen": (40.0, 400.0),
}

_MR_SEQUENCES = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "SWI", "DIFFUSION")


def default_intensity(modality: str) -> str:
    """The intensity scheme ``data.intensity=auto`` picks for a manifest's ``image.modality``.

    ``ct`` for CT, ``mr`` for MR (or MR sequence names, as nnU-Net channel names give them),
    ``dataset`` (z-score with the manifest's mean/std) for anything else or unknown.
    """
    modality = modality.upper()
    if modality == "CT":
        return "ct"
    tokens = [t for t in modality.replace(",", "+").split("+") if t]
    if tokens and all(t.startswith(_MR_SEQUENCES) for t in tokens):
        return "mr"
    return "dataset"


UNKNOWN_LABEL = -1  # in multi-label vectors
MASK_IGNORE = 255  # in label maps: not annotated

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def sample_key(source_id: str, index: int | None = None, axis: str | None = None) -> str:
    """Stable, unique sample key: the source id plus slice index (no dots; webdataset splits on them).

    ``sample_key("case_001", 42, "z") == "case_001_z0042"``.
    """
    safe = re.sub(r"[^A-Za-z0-9_\-]", "-", source_id)
    if index is None:
        return safe
    return f"{safe}_{axis or 's'}{index:04d}"


def is_valid_key(key: str) -> bool:
    """True if ``key`` can be used as a webdataset sample key."""
    return bool(_KEY_RE.match(key))


# ------------------------------------------------------------------------------------------------
# The ``dataset.json`` schema.
#
# One typed description of the manifest, used by the writer (``sharding/build.py`` builds a
# :class:`DatasetManifest` and writes ``to_dict()``), by ``bigmodel-shard verify`` and ``inspect``
# and by the training side (``bigmodel.data.load_manifest``). ``from_dict`` validates every field
# it knows and raises one :class:`ManifestFormatError` naming the file, the dotted field and the
# fix. Fields a build always writes but hand-made manifests may lack are optional (``None``);
# ``to_dict`` leaves out what is ``None``, so ``from_dict(d).to_dict() == d`` key for key, in the
# writer's order: what ``bigmodel-shard build`` writes reads back and writes again byte for byte.
# Plain dataclasses, not pydantic: sharding depends on numpy, nibabel, pydicom and PIL only.

READABLE_VERSIONS = (FORMAT_VERSION,)
"""``format_version`` values this code reads (a change to the schema bumps the version and keeps
reading the old ones, converting them in :meth:`DatasetManifest.from_dict`)."""

LAYOUTS = ("2d", "2.5d", "3d")
ENCODINGS = ("npy", "png")
CLS_TYPES = ("multiclass", "multilabel")
SLICE_LABELS = ("mask", "volume", "copy")
"""Recorded ``tasks.cls.slice_labels`` (the build option ``auto`` resolves to one of these)."""


@dataclass(kw_only=True)
class CreatedBy(_Record):
    """The command and version that built the shards."""

    command: str | None = None
    """The command line (``bigmodel-shard build ...``), or ``sharding.build_shards(...)``."""
    version: str | None = None
    """``sharding.__version__`` of the builder."""
    time: str | None = None
    """UTC time the manifest was written, ``YYYY-MM-DDTHH:MM:SSZ``."""
    fingerprint: str | None = None
    """sha256 of everything that decides the shards' content; a rerun with the same one is a
    no-op, another one is refused."""

    @classmethod
    def from_fields(cls, f: _Fields) -> CreatedBy:
        f.only(cls)
        return cls(**{k: f.get(k, str) for k in ("command", "version", "time", "fingerprint")})


@dataclass(kw_only=True)
class SourceInfo(_Record):
    """Where the shards came from."""

    kind: str | None = None
    """The reader (``--source``): ``nnunet``, ``dicom``, ``csv``, ..."""
    path: str | None = None
    """``--input`` as given."""

    @classmethod
    def from_fields(cls, f: _Fields) -> SourceInfo:
        f.only(cls)
        return cls(kind=f.get("kind", str), path=f.get("path", str))


@dataclass(kw_only=True)
class SplitPolicy(_Record):
    """How items were assigned to splits."""

    ratios: list[float] | None = None
    """train/val/test fractions of the patients."""
    seed: int | None = None
    use_source_split: bool | None = None
    """True: the source's own split was kept where it names one."""
    by: str | None = None
    """Unit of assignment (``patient (group)``)."""

    @classmethod
    def from_fields(cls, f: _Fields) -> SplitPolicy:
        f.only(cls)
        return cls(
            ratios=f.list_of("ratios", float),
            seed=f.get("seed", int),
            use_source_split=f.get("use_source_split", bool),
            by=f.get("by", str),
        )


@dataclass(kw_only=True)
class ImageSpec(_Record):
    """How images are stored."""

    encoding: str
    """``npy`` (``image.npy``, any dtype) or ``png`` (``image.png``, 8-bit sources)."""
    dtype: str | None = None
    """numpy dtype of every image (``int16``, ``float32``, ``uint8``...)."""
    channels: int
    """Channels of every image (2.5D: source channels x (2 x context + 1))."""
    channel_names: list[str] | None = None
    modality: str | None = None
    """From the readers' meta (``CT``, ``MR``, nnU-Net channel names); ``""`` when unknown. It
    picks the intensity scheme of ``data.intensity=auto`` (:func:`default_intensity`)."""

    @classmethod
    def from_fields(cls, f: _Fields) -> ImageSpec:
        f.only(cls)
        channels = f.get("channels", int, required=True)
        if channels < 1:
            f.fail("channels", f"field {f.name('channels')} is {channels}; it must be >= 1")
        return cls(
            encoding=f.choice("encoding", ENCODINGS, required=True),
            dtype=f.get("dtype", str),
            channels=channels,
            channel_names=f.list_of("channel_names", str),
            modality=f.get("modality", str),
        )


@dataclass(kw_only=True)
class TaskSpec(_Record):
    """One labelled task (``cls``, ``mask`` or ``boxes``) and its class names."""

    type: str | None = None
    """``cls`` only: ``multiclass`` (``cls`` member) or ``multilabel`` (``cls.json``)."""
    classes: list[str]
    """Class names in index order (``mask``: index 0 is background)."""
    slice_labels: str | None = None
    """``cls`` of 2D/2.5D slices cut from volumes: ``mask`` (read from each slice's mask),
    ``volume`` (slices carry none; the volume's label is in ``meta.json``) or ``copy`` (the
    source label on every sample; also what a manifest without the field means)."""

    @classmethod
    def from_fields(cls, f: _Fields, task: str) -> TaskSpec:
        f.only(cls)
        classes = f.list_of("classes", str, required=True)
        if not classes:
            f.fail("classes", f"field {f.name('classes')} is empty")
        kind = f.choice("type", CLS_TYPES) if task == "cls" else f.get("type", str)
        return cls(type=kind, classes=classes, slice_labels=f.choice("slice_labels", SLICE_LABELS))


@dataclass(kw_only=True)
class ImageSize(_Record):
    """Smallest and largest spatial side lengths seen, per spatial axis."""

    min: list[int]
    max: list[int]

    @classmethod
    def from_fields(cls, f: _Fields) -> ImageSize:
        f.only(cls)
        return cls(min=f.list_of("min", int, True), max=f.list_of("max", int, True))


@dataclass(kw_only=True)
class IntensityStats(_Record):
    """Per-channel intensity statistics (one pass over a split; ``sharding/_stats.py``)."""

    mean: list[float] | None = None
    std: list[float] | None = None
    p0_5: list[float] | None = None
    """0.5th percentile, from a bottom-k sample of pixels."""
    p99_5: list[float] | None = None
    count: int | None = None
    """Pixels per channel the moments are over."""
    percentiles_from: str | None = None
    image_size: ImageSize | None = None
    foreground: IntensityStats | None = None
    """The same over labelled (mask > 0) pixels: what ``data.intensity=ct`` clips and
    normalises with."""
    nonzero_crop: float | None = None
    """Median over volumes of the share of a volume its non-zero bounding box holds. Below 0.75
    (nnU-Net's rule) ``data.intensity=mr`` z-scores each volume within its non-zero region.
    Present only in builds that record per-volume statistics in ``meta.json`` (``intensity``)."""

    @classmethod
    def from_fields(cls, f: _Fields, channels: int | None = None) -> IntensityStats:
        f.only(cls)
        lists = {k: f.list_of(k, float) for k in ("mean", "std", "p0_5", "p99_5")}
        if channels is not None:
            for key, values in lists.items():
                if values is not None and len(values) != channels:
                    f.fail(
                        key,
                        f"field {f.name(key)} has {len(values)} values for {channels} channels",
                    )
        return cls(
            **lists,
            count=f.get("count", int),
            percentiles_from=f.get("percentiles_from", str),
            image_size=_maybe(ImageSize.from_fields, f.obj("image_size")),
            foreground=_maybe(cls.from_fields, f.obj("foreground"), channels),
            nonzero_crop=f.get("nonzero_crop", float),
        )


@dataclass(kw_only=True)
class ShardSpec(_Record):
    """One tar shard."""

    name: str
    """File name next to ``dataset.json`` (:func:`shard_name`)."""
    num_samples: int
    bytes: int | None = None
    """File size; ``verify`` compares it."""
    sha256: str | None = None
    """Hex digest of the file; ``verify`` and the training loaders compare it."""
    fold: int | None = None
    """Cross-validation fold of every sample in the shard (``--folds``; pool splits only)."""

    @classmethod
    def from_fields(cls, f: _Fields) -> ShardSpec:
        f.only(cls)
        num_samples = f.get("num_samples", int, required=True)
        if num_samples < 0:
            f.fail("num_samples", f"field {f.name('num_samples')} is negative")
        return cls(
            name=f.get("name", str, required=True),
            num_samples=num_samples,
            bytes=f.get("bytes", int),
            sha256=f.get("sha256", str),
            fold=f.get("fold", int),
        )


@dataclass(kw_only=True)
class SplitSpec(_Record):
    """One split (``train``, ``val``, ``test``): its shards and what they hold."""

    num_samples: int | None = None
    """Samples in the split; must equal the sum over its shards."""
    num_groups: int | None = None
    """Patients in the split (skipped items' patients not counted)."""
    shards: list[ShardSpec]
    label_counts: dict[str, list[int]] | None = None
    """Per task, per class: samples (``cls``), pixels (``mask``) or boxes (``boxes``)."""
    stats: IntensityStats | None = None
    """This split's intensity statistics."""

    @property
    def total(self) -> int:
        """Samples in the split (``num_samples``, or the sum over the shards when absent)."""
        return sum(s.num_samples for s in self.shards)

    @classmethod
    def from_fields(cls, f: _Fields, tasks: dict[str, TaskSpec]) -> SplitSpec:
        f.only(cls)
        shards = [ShardSpec.from_fields(s) for s in f.objects("shards", required=True)]
        total = sum(s.num_samples for s in shards)
        num_samples = f.get("num_samples", int)
        if num_samples is not None and num_samples != total:
            f.fail(
                "num_samples",
                f"field {f.name('num_samples')} is {num_samples} but its shards hold {total}",
                "the manifest is inconsistent: run bigmodel-shard verify and rebuild",
            )
        counts = f.obj("label_counts")
        label_counts = None
        if counts is not None:
            label_counts = {}
            for task in counts.data:
                row = counts.list_of(task, int, required=True)
                if task not in tasks:
                    counts.fail(task, f"field {counts.name(task)} counts a task not in tasks")
                if len(row) != len(tasks[task].classes):
                    counts.fail(
                        task,
                        f"field {counts.name(task)} has {len(row)} values for "
                        f"{len(tasks[task].classes)} classes",
                    )
                label_counts[task] = row
        return cls(
            num_samples=num_samples,
            num_groups=f.get("num_groups", int),
            shards=shards,
            label_counts=label_counts,
            stats=_maybe(IntensityStats.from_fields, f.obj("stats")),
        )


@dataclass(kw_only=True)
class SkippedItem(_Record):
    """A source item left out by ``--skip-bad``."""

    file: str
    reason: str
    source_id: str | None = None

    @classmethod
    def from_fields(cls, f: _Fields) -> SkippedItem:
        f.only(cls)
        return cls(
            file=f.get("file", str, True),
            reason=f.get("reason", str, True),
            source_id=f.get("source_id", str),
        )


@dataclass(kw_only=True)
class FoldsSpec(_Record):
    """Cross-validation folds (``--folds K``): patients of the pool splits dealt into K folds;
    every shard of the pool carries its ``fold``, so fold i is a set of whole shards."""

    k: int
    seed: int | None = None
    pool: list[str] | None = None
    """Splits dealt into folds (``train`` and ``val``)."""
    by: str | None = None
    num_groups: list[int] | None = None
    """Patients per fold."""
    num_samples: list[int] | None = None
    """Samples per fold."""
    groups: dict[str, int] | None = None
    """Fold of each patient id."""

    @classmethod
    def from_fields(cls, f: _Fields) -> FoldsSpec:
        f.only(cls)
        k = f.get("k", int, required=True)
        if k < 2:
            f.fail("k", f"field {f.name('k')} is {k}; folds need k >= 2")
        lists = {}
        for key in ("num_groups", "num_samples"):
            values = f.list_of(key, int)
            if values is not None and len(values) != k:
                f.fail(key, f"field {f.name(key)} has {len(values)} values for {k} folds")
            lists[key] = values
        groups = f.obj("groups")
        return cls(
            k=k,
            seed=f.get("seed", int),
            pool=f.list_of("pool", str),
            by=f.get("by", str),
            **lists,
            groups={g: groups.get(g, int, True) for g in groups.data} if groups else None,
        )


@dataclass(kw_only=True)
class DatasetManifest(_Record):
    """``dataset.json``: everything a shard folder says about itself.

    The writer is ``sharding/build.py``; ``bigmodel-shard verify``/``inspect`` and
    ``bigmodel.data.load_manifest`` read it through :meth:`from_dict`.
    """

    format_version: int
    name: str | None = None
    created_by: CreatedBy | None = None
    source: SourceInfo | None = None
    layout: str | None = None
    """``2d`` slices, ``2.5d`` slices with neighbours as channels, ``3d`` volumes or patches
    (absent: ``2d``)."""
    axis: str | None = None
    """Slicing axis of volumes (``z``, ``y``, ``x``)."""
    context: int | None = None
    """2.5D: neighbouring slices on each side (0 otherwise)."""
    patch: list[int] | None = field(default=None, metadata={"write_null": True})
    """3D: the ``(D, H, W)`` tile size; null for whole volumes and 2D (always written)."""
    split: SplitPolicy | None = None
    image: ImageSpec
    tasks: dict[str, TaskSpec]
    """Per task name (keys of :data:`TASK_MEMBERS`): its class names and label kind."""
    stats: IntensityStats | None = None
    """Over the train split (or everything written when there is none)."""
    splits: dict[str, SplitSpec]
    skipped: list[SkippedItem] | None = None
    folds: FoldsSpec | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str | Path = MANIFEST_NAME) -> DatasetManifest:
        """Validate ``data`` (the parsed JSON); :class:`ManifestFormatError` names the field.

        Args:
            data: the parsed ``dataset.json``.
            path: the file, for messages.
        """
        f = _Fields(data, "", str(path))
        version = data.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:  # not 1.0 nor true
            f.fail(
                "format_version",
                f"format_version is {version!r} but this reader needs {FORMAT_VERSION}",
                "rebuild the shards with this version's bigmodel-shard build",
            )
        f.only(cls)
        image = ImageSpec.from_fields(f.obj("image", required=True))
        task_fields = f.obj("tasks", required=True)
        tasks = {}
        for task in task_fields.data:
            if task not in TASK_MEMBERS:
                task_fields.fail(
                    task,
                    f"unknown task tasks.{task} (known: {sorted(TASK_MEMBERS)})",
                    "the shards were written by a newer or foreign builder; " + REBUILD,
                )
            tasks[task] = TaskSpec.from_fields(task_fields.obj(task, required=True), task)
        split_fields = f.obj("splits", required=True)
        splits = {
            name: SplitSpec.from_fields(split_fields.obj(name, required=True), tasks)
            for name in split_fields.data
        }
        parts = {k: f.obj(k) for k in ("created_by", "source", "split", "stats", "folds")}
        skipped = f.objects("skipped")
        manifest = cls(
            format_version=version,
            name=f.get("name", str),
            created_by=_maybe(CreatedBy.from_fields, parts["created_by"]),
            source=_maybe(SourceInfo.from_fields, parts["source"]),
            layout=f.choice("layout", LAYOUTS),
            axis=f.get("axis", str),
            context=f.get("context", int),
            patch=f.list_of("patch", int),
            split=_maybe(SplitPolicy.from_fields, parts["split"]),
            image=image,
            tasks=tasks,
            stats=_maybe(IntensityStats.from_fields, parts["stats"], image.channels),
            splits=splits,
            skipped=None if skipped is None else [SkippedItem.from_fields(s) for s in skipped],
            folds=_maybe(FoldsSpec.from_fields, parts["folds"]),
        )
        manifest._check_folds(f)
        return manifest

    def _check_folds(self, f: _Fields) -> None:
        """With folds, every shard of the pool splits is in a fold 0..k-1.

        (A shard listed twice is left to ``verify``, which names the duplicate samples and the
        patients it puts in two splits.)
        """
        if self.folds is None:
            return
        k = self.folds.k
        for split in self.folds.pool or ("train", "val"):
            for i, shard in enumerate(self.splits[split].shards if split in self.splits else ()):
                if shard.fold is None or not 0 <= shard.fold < k:
                    where = f"splits.{split}.shards[{i}].fold"
                    raise ManifestFormatError(
                        f.path,
                        where,
                        f"shard {shard.name} of split {split!r} has no fold in 0..{k - 1} "
                        f"(field {where})",
                        f"rebuild the shards with bigmodel-shard build --folds {k}",
                    )

    def to_json(self) -> str:
        """The file's text, exactly as the writer writes it (one-space indent, key order kept)."""
        return json.dumps(self.to_dict(), indent=1) + "\n"


def read_manifest_json(path: str | Path) -> dict[str, Any]:
    """The parsed ``dataset.json`` at ``path`` (not yet validated); errors name the file.

    ``path`` may be a URL (``s3://bucket/prefix/dataset.json``); it is read through
    ``sharding.storage`` (a missing bucket, credentials or endpoint raise its StorageError).
    """
    if storage.is_remote(path):
        if not storage.exists(path):
            raise ManifestFormatError(
                str(path), "", "not found", "build the prefix with bigmodel-shard build first"
            )
        text = storage.read_bytes(path)
    else:
        path = Path(path)
        if not path.is_file():
            raise ManifestFormatError(
                str(path), "", "not found", "build the folder with bigmodel-shard build first"
            )
        text = None
    try:
        data = json.loads(path.read_text() if text is None else text)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ManifestFormatError(str(path), "", f"not readable JSON ({err})", REBUILD) from None
    if not isinstance(data, dict):
        raise ManifestFormatError(str(path), "", "top level should be a JSON object", REBUILD)
    return data


def read_manifest(path: str | Path) -> DatasetManifest:
    """Read and validate ``dataset.json`` (the file, or the folder holding it)."""
    if str(path).rstrip("/").rsplit("/", 1)[-1] != MANIFEST_NAME:
        path = storage.join(path, MANIFEST_NAME)
    if not storage.is_remote(path):
        path = Path(path)
    return DatasetManifest.from_dict(read_manifest_json(path), path)
