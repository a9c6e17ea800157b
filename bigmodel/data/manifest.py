"""A typed view of a shard folder's ``dataset.json``, and filling a config from it.

The manifest is the only thing the reading side trusts about a shard folder: which tasks and
classes exist, how many channels an image has, the intensity statistics used for normalisation,
and per split the shards with their sample counts (which fix the epoch length and the exactly-once
evaluation bookkeeping). Reading it up front turns a missing, old or broken manifest into one
error that names the file, instead of a crash deep inside a DataLoader worker.

The schema itself, and every check of it, is ``sharding.format.DatasetManifest``: the writer,
``bigmodel-shard verify`` and this reader share it, so a broken manifest gets the same message
from each. :class:`Manifest` is the training side's view of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bigmodel.config import BackboneConfig, Config, ConfigError
from bigmodel.data.intensity import IntensitySpec, intensity_spec
from sharding import format as fmt
from sharding import storage
from sharding.format import MANIFEST_NAME, TASK_MEMBERS
from sharding.records import SourceError

__all__ = [
    "ClassBalance",
    "ImageInfo",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "SplitInfo",
    "TaskInfo",
    "class_balance",
    "data_intensity",
    "fold_split_names",
    "layout_mismatch",
    "load_manifest",
    "resolve_config",
]


class ManifestError(ValueError):
    """A ``dataset.json`` that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a split."""

    name: str
    num_samples: int
    bytes: int = 0
    sha256: str = ""


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split and their totals."""

    num_samples: int
    num_groups: int
    shards: tuple[ShardInfo, ...]
    label_counts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Per task, per class: samples (``cls``), mask pixels (``mask``) or boxes (``boxes``);
    empty for fold splits and manifests that record none."""


@dataclass(frozen=True)
class TaskInfo:
    """One labelled task (``cls``, ``mask`` or ``boxes``) and its class names."""

    classes: tuple[str, ...]
    type: str = ""
    """``multiclass`` or ``multilabel`` for ``cls``; empty for the others."""
    slice_labels: str = "copy"
    """``cls`` of 2D/2.5D slices cut from volumes: ``mask`` (read from each slice's mask),
    ``volume`` (slices carry none; the volume's label is in ``meta.json``) or ``copy`` (the
    volume's label on every slice; manifests from before the policy existed)."""

    @property
    def multilabel(self) -> bool:
        """True when a sample may carry several classes (``cls.json`` 0/1/-1 vectors)."""
        return self.type == "multilabel"


@dataclass(frozen=True)
class ImageInfo:
    """How images are stored."""

    encoding: str
    channels: int
    dtype: str = ""
    channel_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Manifest:
    """Everything ``bigmodel/data`` needs from ``dataset.json``."""

    root: Path | str
    """Folder holding ``dataset.json`` and the shards: a local ``Path``, or the URL of an
    object-store prefix (``s3://bucket/prefix``, no trailing slash) as a string."""
    format_version: int
    name: str
    layout: str
    """``2d``, ``2.5d`` or ``3d``."""
    image: ImageInfo
    tasks: dict[str, TaskInfo]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    splits: dict[str, SplitInfo]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    """The parsed JSON, for fields this view does not type (``created_by``, ``skipped``...)."""
    num_folds: int = 0
    """Cross-validation folds (``bigmodel-shard build --folds K``); fold ``i`` is read as the
    splits ``fold{i}-train`` and ``fold{i}-val`` (:func:`fold_split_names`)."""
    dataset: fmt.DatasetManifest | None = field(repr=False, default=None)
    """The validated ``dataset.json`` this view was built from (the shared schema)."""

    @classmethod
    def from_dataset(
        cls, root: Path | str, dataset: fmt.DatasetManifest, raw: dict[str, Any] | None = None
    ) -> Manifest:
        """The view of a validated manifest; ``raw`` is the parsed JSON it came from."""
        stats = dataset.stats or fmt.IntensityStats()
        splits = {name: _split_info(spec) for name, spec in dataset.splits.items()}
        splits.update(_fold_splits(dataset))
        return cls(
            root=root,
            format_version=dataset.format_version,
            name=dataset.name if dataset.name is not None else str(root).rsplit("/", 1)[-1],
            layout=dataset.layout or "2d",
            image=ImageInfo(
                encoding=dataset.image.encoding,
                channels=dataset.image.channels,
                dtype=dataset.image.dtype or "",
                channel_names=tuple(dataset.image.channel_names or ()),
            ),
            tasks={
                name: TaskInfo(
                    classes=tuple(spec.classes),
                    type=spec.type or ("multiclass" if name == "cls" else ""),
                    slice_labels=spec.slice_labels or "copy",
                )
                for name, spec in dataset.tasks.items()
            },
            mean=tuple(float(v) for v in stats.mean) if stats.mean is not None else None,
            std=tuple(float(v) for v in stats.std) if stats.std is not None else None,
            splits=splits,
            raw=raw if raw is not None else dataset.to_dict(),
            num_folds=dataset.folds.k if dataset.folds is not None else 0,
            dataset=dataset,
        )

    @property
    def path(self) -> Path | str:
        """The ``dataset.json`` file (a URL string for an object-store prefix)."""
        if isinstance(self.root, str):
            return storage.join(self.root, MANIFEST_NAME)
        return self.root / MANIFEST_NAME

    @property
    def remote(self) -> bool:
        """True when the shards are in object storage (read through fsspec)."""
        return isinstance(self.root, str)

    def split(self, name: str) -> SplitInfo:
        """The split ``name``; an error listing the splits that exist when it is missing."""
        if name not in self.splits:
            raise ManifestError(
                f"{self.path}: no split {name!r} (splits: {sorted(self.splits)}); set "
                f"data.train_split / data.val_split to one of them or rebuild the shards"
            )
        return self.splits[name]

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths (or URLs) of the split's shards, in manifest order; missing files are
        an error, and so are objects of another size than the manifest records.

        Checked here, in the main process, so a lost shard is one clear message instead of a
        crash inside a loader worker halfway through an epoch. An object-store prefix is
        listed once (one request), not asked object by object.
        """
        shards = self.split(split).shards
        if self.remote:
            return self._remote_shard_paths(split, shards)
        paths = [self.root / s.name for s in shards]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ManifestError(
                f"{self.path}: split {split!r} lists shard(s) that are missing: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; run bigmodel-shard verify "
                f"and rerun the build command to restore them"
            )
        return [str(p) for p in paths]

    def _remote_shard_paths(self, split: str, shards: tuple[ShardInfo, ...]) -> list[str]:
        try:
            sizes = storage.list_sizes(self.root)
        except SourceError as err:
            raise ManifestError(str(err)) from None
        missing = [s.name for s in shards if s.name not in sizes]
        wrong = [
            f"{s.name} ({sizes[s.name]} bytes, manifest says {s.bytes})"
            for s in shards
            if s.name in sizes and s.bytes and sizes[s.name] != s.bytes
        ]
        if missing or wrong:
            what = (
                f"lists shard object(s) that are missing: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
                if missing
                else f"has shard object(s) of the wrong size: {wrong[:3]}"
                f"{' ...' if len(wrong) > 3 else ''}"
            )
            raise ManifestError(
                f"{self.path}: split {split!r} {what}; run bigmodel-shard verify {self.root} and "
                f"rerun the build command with --out {self.root} to upload them again"
            )
        return [storage.join(self.root, s.name) for s in shards]


def _shard_info(shard: fmt.ShardSpec) -> ShardInfo:
    return ShardInfo(shard.name, shard.num_samples, shard.bytes or 0, shard.sha256 or "")


def _split_info(spec: fmt.SplitSpec) -> SplitInfo:
    return SplitInfo(
        num_samples=spec.total,
        num_groups=spec.num_groups or 0,
        shards=tuple(_shard_info(s) for s in spec.shards),
        label_counts={task: tuple(row) for task, row in (spec.label_counts or {}).items()},
    )


def fold_split_names(fold: int) -> tuple[str, str]:
    """The training and validation split names of cross-validation fold ``fold``."""
    return f"fold{fold}-train", f"fold{fold}-val"


def _fold_splits(dataset: fmt.DatasetManifest) -> dict[str, SplitInfo]:
    """Fold ``i``'s splits from whole shards: validation = the pool's shards of fold ``i``,
    training = those of every other fold. The builder cuts shards at fold boundaries and
    records each shard's fold (the schema checks every pool shard has one), so exact sample
    counts (epoch length, exactly-once evaluation) hold for folds as for ordinary splits."""
    folds = dataset.folds
    if folds is None:
        return {}
    k = folds.k
    groups = folds.num_groups or [0] * k
    by_fold: list[list[ShardInfo]] = [[] for _ in range(k)]
    for split in folds.pool or ("train", "val"):
        for shard in dataset.splits[split].shards if split in dataset.splits else ():
            by_fold[shard.fold].append(_shard_info(shard))
    out = {}
    for i in range(k):
        train_name, val_name = fold_split_names(i)
        train = tuple(s for j in range(k) if j != i for s in by_fold[j])
        out[train_name] = SplitInfo(
            sum(s.num_samples for s in train), sum(groups) - groups[i], train
        )
        out[val_name] = SplitInfo(
            sum(s.num_samples for s in by_fold[i]), groups[i], tuple(by_fold[i])
        )
    return out


def load_manifest(directory: str | Path) -> Manifest:
    """Read ``directory/dataset.json`` and check it against ``sharding.format.DatasetManifest``.

    ``directory`` is a local folder or an object-store prefix (``s3://bucket/prefix``, any URL
    fsspec opens; credentials and endpoint from the environment, see ``sharding.storage``).

    Raises:
        ManifestError: the file is missing, not JSON, from another format version, or a field
            does not fit the schema; one line naming the file, the field and the fix (the same
            message ``bigmodel-shard verify`` gives); for a prefix also a missing bucket,
            absent credentials or an unreachable endpoint (after retries), naming the URL.
    """
    directory = storage.unfold(directory)  # Path("s3://b/p") prints as "s3:/b/p"
    if storage.is_remote(directory):
        return _load_remote(str(directory).rstrip("/"))
    root = storage.local_path(directory).resolve()
    path = root / MANIFEST_NAME
    if not path.is_file():
        hint = "set data.shards to the folder holding dataset.json"
        if not root.is_dir():
            hint = f"the folder does not exist; {hint}"
        raise ManifestError(
            f"{path}: no shard manifest ({hint}, or build one with bigmodel-shard build)"
        )
    try:
        raw = fmt.read_manifest_json(path)
        dataset = fmt.DatasetManifest.from_dict(raw, path)
    except fmt.ManifestFormatError as err:
        raise ManifestError(str(err)) from None
    return Manifest.from_dataset(root, dataset, raw)


def _load_remote(url: str) -> Manifest:
    """``load_manifest`` of an object-store prefix: one GET of ``dataset.json`` (retried)."""
    path = storage.join(url, MANIFEST_NAME)
    try:
        raw = fmt.read_manifest_json(path)
        dataset = fmt.DatasetManifest.from_dict(raw, path)
    except fmt.ManifestFormatError as err:
        if err.problem == "not found":
            raise ManifestError(
                f"{path}: no shard manifest under this prefix (set data.shards to the prefix "
                f"holding dataset.json, or build one with bigmodel-shard build --out {url})"
            ) from None
        raise ManifestError(str(err)) from None
    except SourceError as err:  # bucket, credentials, endpoint: storage names them
        raise ManifestError(str(err)) from None
    return Manifest.from_dataset(url, dataset, raw)


def _classes_for(head_name: str, target: str, manifest: Manifest, cfg: Config) -> int:
    """Number of classes a head's target has in this dataset."""
    if target == "group":
        split = manifest.split(cfg.data.train_split)
        if split.num_groups < 1:
            raise ConfigError(
                f"model.heads.{head_name}.target is 'group' but {manifest.path} records no "
                f"num_groups for split {cfg.data.train_split!r}; set num_classes explicitly"
            )
        return split.num_groups
    if target not in TASK_MEMBERS:
        raise ConfigError(
            f"model.heads.{head_name}.target is {target!r}; allowed: "
            f"{sorted([*TASK_MEMBERS, 'group'])}"
        )
    if target not in manifest.tasks:
        raise ConfigError(
            f"model.heads.{head_name}.target is {target!r} but {manifest.path} has no such "
            f"task (tasks: {sorted(manifest.tasks)}); change the target or remove the head"
        )
    if (
        target == "cls"
        and manifest.tasks["cls"].slice_labels == "volume"
        and manifest.layout != "3d"
    ):
        # The shards keep cls at volume level: no slice carries one, the head would learn nothing.
        raise ConfigError(
            f"model.heads.{head_name} learns cls from {manifest.layout} slices but {manifest.path} "
            f"keeps cls at volume level (tasks.cls.slice_labels=volume): rebuild the shards with "
            f"masks naming the cls classes (-o slice_labels=mask) or, if every slice shows the "
            f"finding, -o slice_labels=copy"
        )
    return len(manifest.tasks[target].classes)


MIN_VAL_PATIENTS = 3
"""Fewer validation patients than this get a warning: one patient's figures rank noise."""


def validation_note(cfg: Config, manifest: Manifest) -> str | None:
    """A warning when the validation split is too small to rank checkpoints; None when it is not.

    A checkpoint's figure on one or two patients follows those patients more than the model:
    ``train.best_metric`` and ASHA would pick noise.
    """
    if not cfg.train.eval_every or cfg.data.val_split not in manifest.splits:
        return None
    patients = manifest.split(cfg.data.val_split).num_groups
    if patients >= MIN_VAL_PATIENTS:
        return None
    return (
        f"the validation split '{cfg.data.val_split}' holds {patients} patient(s): its figures "
        f"follow those patients more than the model and cannot rank checkpoints or sweep "
        f"trials (train.best_metric, ASHA); rebuild the shards with at least "
        f"{MIN_VAL_PATIENTS} patients in it (bigmodel-shard build --split-ratios) or use --folds"
    )


def layout_mismatch(manifest: Manifest, spatial_dims: int) -> str | None:
    """The one-line refusal when the shards' layout and ``model.backbone.spatial_dims``
    disagree (3D volumes for a 2D backbone, or 2D/2.5D slices for a 3D one); None when they fit.
    """
    if manifest.layout == "3d" and spatial_dims == 2:
        return (
            f"{manifest.path}: layout is '3d' ([C, D, H, W] volumes) but "
            f"model.backbone.spatial_dims=2 (a 2D backbone): set model.backbone.spatial_dims=3 "
            f"with a 3D backbone ({', '.join(BackboneConfig.BACKBONES_3D)}) and data.patch_size, "
            f"or rebuild the shards with --layout 2d or 2.5d"
        )
    if manifest.layout != "3d" and spatial_dims == 3:
        return (
            f"{manifest.path}: layout is '{manifest.layout}' ([C, H, W] slices) but "
            f"model.backbone.spatial_dims=3 (a 3D backbone): rebuild the shards with "
            f"--layout 3d, or set model.backbone.spatial_dims=2 with a timm backbone"
        )
    return None


def _check_spatial_dims(cfg: Config, manifest: Manifest) -> None:
    """Refuse shards of the other dimension count, and 3D without ``data.patch_size``."""
    spatial_dims = cfg.model.backbone.spatial_dims
    problem = layout_mismatch(manifest, spatial_dims)
    if problem is not None:
        raise ConfigError(problem)
    if spatial_dims == 3 and cfg.data.patch_size is None:
        raise ConfigError(
            f"data.patch_size is unset but model.backbone.spatial_dims=3 trains on patches of "
            f"{manifest.path}'s volumes: set data.patch_size=[D,H,W] (e.g. [64,128,128], each "
            f"side a multiple of the backbone's coarsest reduction)"
        )


def data_intensity(cfg: Config, manifest: Manifest) -> IntensitySpec | None:
    """The intensity preprocessing of this run (None: ``data.normalize=none``, raw values)."""
    if cfg.data.normalize == "none":
        return None
    return intensity_spec(cfg.data.intensity, manifest.raw, str(manifest.path))


def _check_resize(cfg: Config, manifest: Manifest) -> None:
    """Refuse ``resize=fit`` when the manifest's image sides would change spacing too much."""
    sides = (manifest.raw.get("stats") or {}).get("image_size")
    if cfg.data.resize != "fit" or not sides:
        return
    size, tolerance = cfg.data.image_size, cfg.data.resize_tolerance
    for which in ("min", "max"):
        longer = max(sides[which][-2:])
        factor = max(longer / size, size / longer)
        if factor > tolerance:
            raise ConfigError(
                f"data.resize=fit would scale {manifest.path}'s {which} image side ({longer} px) "
                f"to data.image_size={size}, changing the spacing {factor:.2f}x, more than "
                f"data.resize_tolerance={tolerance}; choose an image_size nearer the data, raise "
                f"the tolerance, or use data.resize=none (crops, sliding-window evaluation)"
            )


def _train_counts(field: str, target: str, manifest: Manifest, cfg: Config) -> tuple[int, ...]:
    """The training split's per-class counts of ``target``; every class must have samples."""
    split = cfg.data.train_split
    counts = manifest.split(split).label_counts.get(target)
    if not counts:
        raise ConfigError(
            f"{field} needs per-class counts but {manifest.path} records no label_counts for "
            f"{target!r} in split {split!r} (fold splits and older manifests have none): rebuild "
            f"the shards with bigmodel-shard build, or give the numbers yourself"
        )
    classes = manifest.tasks[target].classes
    empty = [name for name, count in zip(classes, counts, strict=True) if count == 0]
    if empty:
        raise ConfigError(
            f"{field}: class(es) {empty} have no {target!r} samples in split {split!r} of "
            f"{manifest.path}, so there is nothing to balance them with; give the numbers "
            f"yourself or drop the classes"
        )
    return counts


@dataclass(frozen=True)
class ClassBalance:
    """``data.balance``: how the training stream thins samples to draw classes equally."""

    task: str
    """The shard task whose label decides (``cls``)."""
    keep: tuple[float, ...]
    """Probability of keeping a sample of each class: rarest count / the class's count."""
    keep_unlabelled: float
    """Probability of keeping a sample without that label: the labelled samples' mean, so
    their share of the stream stays what it is in the data."""

    @property
    def read_per_kept(self) -> float:
        """Samples read per sample kept (the cost of balancing)."""
        return 1.0 / self.keep_unlabelled


def class_balance(cfg: Config, manifest: Manifest) -> ClassBalance | None:
    """The sampling of ``data.balance`` from the manifest's counts; None when it is unset.

    Raises:
        ConfigError: ``data.balance`` names no multi-class classification head, or the manifest
            has no per-class counts for its target.
    """
    name = cfg.data.balance
    if name is None:
        return None
    head = cfg.model.heads.get(name)
    if head is None:
        raise ConfigError(f"data.balance={name!r} is not a head; heads: {sorted(cfg.model.heads)}")
    if not head.draws_by_class:
        raise ConfigError(
            f"data.balance={name!r} names a {head.type} head; balancing draws samples by their "
            f"class, which needs a classification head"
        )
    if head.target in manifest.tasks and manifest.tasks[head.target].multilabel:
        raise ConfigError(
            f"data.balance={name!r} names a multi-label head: a sample has several classes, so "
            f"there is no one class to balance by; weigh rare findings with "
            f"model.heads.{name}.pos_weight=balanced instead"
        )
    counts = _train_counts(f"data.balance={name!r}", head.target, manifest, cfg)
    rarest = min(counts)
    keep = tuple(rarest / count for count in counts)
    return ClassBalance(head.target, keep, len(counts) * rarest / sum(counts))


def resolve_config(cfg: Config, manifest: Manifest) -> Config:
    """Return a copy of ``cfg`` with ``in_chans`` and every head's ``num_classes`` from the data.

    Values already set must agree with the manifest: a silent mismatch would train a model whose
    output layer cannot represent the dataset's classes. ``class_weights``/``pos_weight`` set to
    ``balanced`` become numbers from the training split's ``label_counts``, and ``data.balance``
    is checked against them.

    Raises:
        ConfigError: the shards' layout does not fit ``model.backbone.spatial_dims`` (or 3D has
            no ``data.patch_size``), a head's target is not in the manifest, a set value
            disagrees, or a ``balanced`` option has no counts to come from.
    """
    cfg = cfg.model_copy(deep=True)
    _check_spatial_dims(cfg, manifest)  # 3D shards for a 2D backbone (or the reverse) fail here
    data_intensity(cfg, manifest)  # an intensity scheme unfit for the modality fails here
    _check_resize(cfg, manifest)
    backbone = cfg.model.backbone
    channels = manifest.image.channels
    if backbone.in_chans is None:
        backbone.in_chans = channels
    elif backbone.in_chans != channels:
        raise ConfigError(
            f"model.backbone.in_chans is {backbone.in_chans} but {manifest.path} has "
            f"{channels} channels; unset it or use matching shards"
        )
    for name, head in cfg.model.heads.items():
        if head.pretrains_backbone:
            continue  # self-supervised: its targets come from the images, not the shards
        num_classes = _classes_for(name, head.target, manifest, cfg)
        if head.num_classes is None:
            head.num_classes = num_classes
        elif head.num_classes != num_classes:
            raise ConfigError(
                f"model.heads.{name}.num_classes is {head.num_classes} but target "
                f"{head.target!r} has {num_classes} classes in {manifest.path}; unset it"
            )
        # what else the data decides is the head's own (multilabel, balanced weights)
        head.fit_to_data(
            f"model.heads.{name}",
            str(manifest.path),
            manifest.tasks[head.target].type if head.target in manifest.tasks else "",
            partial(_train_counts, target=head.target, manifest=manifest, cfg=cfg),
            lambda: manifest.split(cfg.data.train_split).num_samples,
        )
    class_balance(cfg, manifest)  # an impossible data.balance fails here, before any worker
    return cfg
