"""A typed view of a shard folder's ``dataset.json``, and filling a config from it.

The manifest is the only thing the reading side trusts about a shard folder: which tasks and
classes exist, how many channels an image has, the intensity statistics used for normalisation,
and per split the shards with their sample counts (which fix the epoch length and the exactly-once
evaluation bookkeeping). Reading it up front turns a missing, old or broken manifest into one
error that names the file, instead of a crash deep inside a DataLoader worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigmodel.config import Config, ConfigError
from bigmodel.data.intensity import IntensitySpec, intensity_spec
from sharding.format import FORMAT_VERSION, MANIFEST_NAME, TASK_MEMBERS

__all__ = [
    "ImageInfo",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "SplitInfo",
    "TaskInfo",
    "data_intensity",
    "fold_split_names",
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

    root: Path
    """Folder holding ``dataset.json`` and the shards."""
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

    @property
    def path(self) -> Path:
        """The ``dataset.json`` file."""
        return self.root / MANIFEST_NAME

    def split(self, name: str) -> SplitInfo:
        """The split ``name``; an error listing the splits that exist when it is missing."""
        if name not in self.splits:
            raise ManifestError(
                f"{self.path}: no split {name!r} (splits: {sorted(self.splits)}); set "
                f"data.train_split / data.val_split to one of them or rebuild the shards"
            )
        return self.splits[name]

    def shard_paths(self, split: str) -> list[str]:
        """Absolute paths of the split's shards, in manifest order; missing files are an error.

        Checked here, in the main process, so a lost shard is one clear message instead of a
        crash inside a loader worker halfway through an epoch.
        """
        paths = [self.root / s.name for s in self.split(split).shards]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ManifestError(
                f"{self.path}: split {split!r} lists shard(s) that are missing: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; run bigmodel-shard verify "
                f"and rerun the build command to restore them"
            )
        return [str(p) for p in paths]


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, path: Path):
    if key not in data:
        raise ManifestError(
            f"{path}: field {where}{key} is missing; rebuild the shards with bigmodel-shard build"
        )
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(
            f"{path}: field {where}{key} should be {getattr(kind, '__name__', kind)}, "
            f"got {type(value).__name__}; rebuild the shards with bigmodel-shard build"
        )
    return value


def _parse_tasks(raw: dict[str, Any], path: Path) -> dict[str, TaskInfo]:
    tasks = {}
    for name, spec in _require(raw, "tasks", dict, "", path).items():
        if name not in TASK_MEMBERS:
            raise ManifestError(
                f"{path}: unknown task tasks.{name} (known: {sorted(TASK_MEMBERS)}); the "
                f"shards were written by a newer or foreign builder"
            )
        if not isinstance(spec, dict):
            raise ManifestError(f"{path}: tasks.{name} should be an object with 'classes'")
        classes = _require(spec, "classes", list, f"tasks.{name}.", path)
        if not classes:
            raise ManifestError(f"{path}: tasks.{name}.classes is empty")
        kind = spec.get("type", "multiclass" if name == "cls" else "")
        if name == "cls" and kind not in ("multiclass", "multilabel"):
            raise ManifestError(
                f"{path}: tasks.cls.type is {kind!r}; allowed: 'multiclass', 'multilabel'"
            )
        tasks[name] = TaskInfo(
            classes=tuple(str(c) for c in classes),
            type=kind,
            slice_labels=str(spec.get("slice_labels", "copy")),
        )
    return tasks


def _parse_splits(raw: dict[str, Any], path: Path) -> dict[str, SplitInfo]:
    splits = {}
    for name, spec in _require(raw, "splits", dict, "", path).items():
        where = f"splits.{name}."
        shards = []
        for i, shard in enumerate(_require(spec, "shards", list, where, path)):
            if not isinstance(shard, dict):
                raise ManifestError(f"{path}: {where}shards[{i}] should be an object")
            shards.append(
                ShardInfo(
                    name=_require(shard, "name", str, f"{where}shards[{i}].", path),
                    num_samples=_require(shard, "num_samples", int, f"{where}shards[{i}].", path),
                    bytes=int(shard.get("bytes", 0)),
                    sha256=str(shard.get("sha256", "")),
                )
            )
        total = sum(s.num_samples for s in shards)
        num_samples = int(spec.get("num_samples", total))
        if num_samples != total:
            raise ManifestError(
                f"{path}: {where}num_samples is {num_samples} but its shards hold {total}; "
                f"the manifest is inconsistent, run bigmodel-shard verify and rebuild"
            )
        splits[name] = SplitInfo(
            num_samples=num_samples,
            num_groups=int(spec.get("num_groups", 0)),
            shards=tuple(shards),
        )
    return splits


def fold_split_names(fold: int) -> tuple[str, str]:
    """The training and validation split names of cross-validation fold ``fold``."""
    return f"fold{fold}-train", f"fold{fold}-val"


def _fold_splits(
    raw: dict[str, Any], splits: dict[str, SplitInfo], path: Path
) -> dict[str, SplitInfo]:
    """Fold ``i``'s splits from whole shards: validation = the pool's shards of fold ``i``,
    training = those of every other fold. The builder cuts shards at fold boundaries and
    records each shard's fold, so exact sample counts (epoch length, exactly-once evaluation)
    hold for folds as for ordinary splits."""
    folds = raw.get("folds")
    if not folds:
        return {}
    k = _require(folds, "k", int, "folds.", path)
    groups = list(folds.get("num_groups") or [0] * k)
    by_fold: list[list[ShardInfo]] = [[] for _ in range(k)]
    for split in folds.get("pool", ["train", "val"]):
        if split not in splits:
            continue
        for entry, shard in zip(raw["splits"][split]["shards"], splits[split].shards, strict=True):
            fold = entry.get("fold")
            if not isinstance(fold, int) or not 0 <= fold < k:
                raise ManifestError(
                    f"{path}: shard {shard.name} of split {split!r} has no fold in 0..{k - 1}; "
                    f"rebuild the shards with bigmodel-shard build --folds {k}"
                )
            by_fold[fold].append(shard)
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
    """Read and check ``directory/dataset.json``.

    Raises:
        ManifestError: the file is missing, not JSON, from another format version, or lacks a
            field; the message names the file and how to fix it.
    """
    root = Path(directory).expanduser().resolve()
    path = root / MANIFEST_NAME
    if not path.is_file():
        hint = "set data.shards to the folder holding dataset.json"
        if not root.is_dir():
            hint = f"the folder does not exist; {hint}"
        raise ManifestError(
            f"{path}: no shard manifest ({hint}, or build one with bigmodel-shard build)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not readable JSON ({err}); rebuild the shards") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: top level should be a JSON object; rebuild the shards")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version is {version!r} but this reader needs {FORMAT_VERSION}; "
            f"rebuild the shards with this version's bigmodel-shard build"
        )
    image = _require(raw, "image", dict, "", path)
    channels = _require(image, "channels", int, "image.", path)
    if channels < 1:
        raise ManifestError(f"{path}: image.channels is {channels}; it must be >= 1")
    stats = raw.get("stats") or {}
    mean, std = stats.get("mean"), stats.get("std")
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != channels:
            raise ManifestError(
                f"{path}: stats.{key} has {len(value)} values for {channels} channels; "
                f"rebuild the shards"
            )
    splits = _parse_splits(raw, path)
    splits.update(_fold_splits(raw, splits, path))
    return Manifest(
        root=root,
        format_version=version,
        name=str(raw.get("name", root.name)),
        layout=str(raw.get("layout", "2d")),
        image=ImageInfo(
            encoding=_require(image, "encoding", str, "image.", path),
            channels=channels,
            dtype=str(image.get("dtype", "")),
            channel_names=tuple(image.get("channel_names", ())),
        ),
        tasks=_parse_tasks(raw, path),
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
        splits=splits,
        raw=raw,
        num_folds=int((raw.get("folds") or {}).get("k", 0)),
    )


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


def resolve_config(cfg: Config, manifest: Manifest) -> Config:
    """Return a copy of ``cfg`` with ``in_chans`` and every head's ``num_classes`` from the data.

    Values already set must agree with the manifest: a silent mismatch would train a model whose
    output layer cannot represent the dataset's classes.

    Raises:
        ConfigError: a head's target is not in the manifest, or a set value disagrees.
    """
    cfg = cfg.model_copy(deep=True)
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
        num_classes = _classes_for(name, head.target, manifest, cfg)
        if head.num_classes is None:
            head.num_classes = num_classes
        elif head.num_classes != num_classes:
            raise ConfigError(
                f"model.heads.{name}.num_classes is {head.num_classes} but target "
                f"{head.target!r} has {num_classes} classes in {manifest.path}; unset it"
            )
        if head.type == "classification" and head.target == "cls":
            # Only one value can work (cls is int64 [B] or float32 [B, K]), so the data decides
            # unless the user set it explicitly to the other one.
            multilabel = manifest.tasks["cls"].multilabel
            if "multilabel" in head.model_fields_set and head.multilabel != multilabel:
                raise ConfigError(
                    f"model.heads.{name}.multilabel is {head.multilabel} but tasks.cls in "
                    f"{manifest.path} is {manifest.tasks['cls'].type}; unset it"
                )
            head.multilabel = multilabel
    return cfg
