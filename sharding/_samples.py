"""Load one source item, cut it into samples (2D, 2.5D, 3D, patches) and encode their members.

This is the expensive, embarrassingly parallel part of a build: it runs in worker processes or
Ray tasks, so it imports nothing heavy (no webdataset, no torch) and returns plain bytes.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sharding import format as fmt
from sharding._stats import ChannelStats, volume_intensity
from sharding.records import Reader, SourceError, SourceItem, Volume

AXES = {"z": 0, "y": 1, "x": 2}
"""Spatial dimension of ``[D, H, W]`` that each ``--axis`` slices along (readers put z first)."""

SLICE_LABEL_POLICIES = ("auto", "mask", "volume", "copy")
"""How a volume's ``cls`` label reaches its 2D/2.5D slices (``-o slice_labels=...``):

* ``mask``: each slice's label from its own mask: a slice is positive for a class when its mask
  holds that class (``cls`` classes are matched to ``mask`` classes by name; the one ``cls`` class
  that is not a mask class, e.g. ``normal``, is the label of slices without any);
* ``volume``: slices carry no ``cls``; the volume's label is kept in ``meta.json``
  (``volume_cls``), since a tumour volume's tumour-free slices are not tumour slices;
* ``copy``: every slice gets the volume's label (right only when the finding is in every slice);
* ``auto``: ``mask`` when the ``cls`` classes can be read from the masks, else ``volume``.

2D sources and 3D samples are one sample per item and keep the item's label whatever the policy.
"""


@dataclass(frozen=True)
class SamplePlan:
    """How items become samples; the picklable part of the build options."""

    layout: str = "2d"
    axis: str = "z"
    context: int = 0
    patch: tuple[int, int, int] | None = None
    dtype: str | None = None
    """Store images as this dtype; None keeps the item's own (float64 becomes float32)."""
    force_dtype: bool = False
    """True when the user chose ``dtype`` (cast anything); False: only lossless casts."""
    tasks: dict[str, Any] = field(default_factory=dict)
    """The task schema, to reject unknown classes."""
    source_root: str = ""
    """Paths in ``meta.json`` are written relative to this."""
    slice_labels: str = "copy"
    """Resolved slice-label policy (``mask``, ``volume`` or ``copy``; see SLICE_LABEL_POLICIES)."""


@dataclass
class ItemResult:
    """What one item produced: encoded samples plus what the writer needs to know about them."""

    source_id: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    stats: ChannelStats | None = None
    dtype: str = ""
    channels: int = 0
    sample_ndim: int = 0
    """3 for ``[C, H, W]`` samples, 4 for ``[C, D, H, W]``."""
    sliced: bool = False
    """The item was a volume cut into 2D/2.5D samples (a 2D image is its own sample)."""
    channel_names: list[str] = field(default_factory=list)
    encoding: str = "npy"
    label_counts: dict[str, list[int]] = field(default_factory=dict)
    modality: str = ""
    """``meta["modality"]`` of the item (CT, MR, ...), empty when the reader does not know."""
    error: SourceError | None = None


def process_item(reader: Reader, item: SourceItem, plan: SamplePlan) -> ItemResult:
    """Load ``item`` and encode its samples; bad input comes back as ``error``, never raised."""
    try:
        volume = reader.load(item)
        return _encode_item(item, volume, plan)
    except SourceError as err:
        return ItemResult(item.source_id, error=err)
    except Exception as err:  # a reader bug or a library error on a broken file: name the file
        file = item.paths.get("image", next(iter(item.paths.values()), item.source_id))
        problem = f"unreadable: {type(err).__name__}: {err}"
        return ItemResult(
            item.source_id, error=SourceError(file, problem, "fix or remove it, or use --skip-bad")
        )


def _encode_item(item: SourceItem, vol: Volume, plan: SamplePlan) -> ItemResult:
    image_file = item.paths.get("image", item.source_id)
    image = _check_image(vol.image, image_file, plan)
    mask = _check_mask(vol.mask, image, item.paths.get("mask", image_file), plan)
    _check_labels(item, plan)
    meta = dict(vol.meta)
    encoding_hint = meta.pop("encoding", "npy")
    channel_names = [str(n) for n in meta.pop("channel_names", [])] or [
        f"ch{i}" for i in range(image.shape[0])
    ]
    meta["source"] = _relative(image_file, plan.source_root)
    meta["source_id"] = item.source_id
    # Per-volume intensity statistics (per source channel), on every sample of the volume: a
    # slice is normalised with its patient's numbers, not with its own (bigmodel.data.intensity).
    volume_stats = volume_intensity(image)
    meta["intensity"] = {k: v for k, v in volume_stats.items() if k != "nonzero_crop"}

    result = ItemResult(item.source_id, stats=ChannelStats(0), dtype=str(image.dtype))
    result.modality = str(meta.get("modality", "") or "").upper()
    sliced = image.ndim == 4 and plan.layout != "3d"
    result.sliced = sliced
    policy = plan.slice_labels if sliced and item.cls is not None else "copy"
    if policy == "mask" and mask is None:
        policy = "volume"  # no mask to read slice labels from: keep the label at volume level
    if policy == "mask":
        _check_volume_label(item, mask, plan)
    for key, img, msk, extra in _cut(item.source_id, image, mask, vol.spacing, plan):
        sample_meta = {**meta, **extra}
        if result.stats.channels == 0:
            result.stats = ChannelStats(img.shape[0])
            result.channels = img.shape[0]
            result.sample_ndim = img.ndim
        result.stats.add_image(key, img, msk)
        encoding = _image_encoding(img, encoding_hint)
        result.encoding = encoding
        sample = {"__key__": key}
        sample[fmt.IMAGE_PNG if encoding == "png" else fmt.IMAGE_NPY] = _encode_image(img, encoding)
        if msk is not None:
            name, data = _encode_mask(msk)
            sample[name] = data
        cls = item.cls
        if policy == "mask":
            cls = slice_label(item.cls, msk, plan.tasks)
        elif policy == "volume":
            sample_meta["volume_cls"], cls = item.cls, None
        if cls is not None:
            if isinstance(cls, list):
                sample[fmt.CLS_MULTI] = json.dumps(cls).encode()
            else:
                sample[fmt.CLS] = str(int(cls)).encode()
        if item.boxes is not None and img.ndim == 3:
            sample[fmt.BOXES] = json.dumps(item.boxes).encode()
        sample[fmt.GROUP] = item.group.encode()
        sample[fmt.META] = json.dumps(sample_meta, sort_keys=True, default=_json_default).encode()
        result.samples.append(sample)
        _count_labels(result.label_counts, cls, item.boxes, msk, plan.tasks)
    result.channel_names = _stacked_names(channel_names, plan, image.ndim)
    if result.samples:
        result.stats.nonzero_crops.append(volume_stats["nonzero_crop"])
    return result


def _class_map(tasks: dict[str, Any]) -> tuple[dict[int, int], list[int]]:
    """``{cls index: mask value}`` for cls classes that are mask classes, and the other cls indices."""
    cls_classes = (tasks.get("cls") or {}).get("classes") or []
    mask_classes = (tasks.get("mask") or {}).get("classes") or []
    # Mask value 0 is background: a cls class named like it is never "present in the mask".
    by_name = {str(name): value for value, name in enumerate(mask_classes) if value > 0}
    mapped = {i: by_name[str(c)] for i, c in enumerate(cls_classes) if str(c) in by_name}
    return mapped, [i for i in range(len(cls_classes)) if i not in mapped]


def resolve_slice_labels(policy: str, tasks: dict[str, Any], layout: str) -> str:
    """The slice-label policy a build uses (``auto`` resolved); errors name the option and fix."""
    if policy not in SLICE_LABEL_POLICIES:
        raise SourceError(
            f"-o slice_labels={policy}", "unknown policy", f"use one of {SLICE_LABEL_POLICIES}"
        )
    if layout == "3d":
        return "copy"  # a 3D sample is the volume (or a patch of it) and keeps its label
    mapped, others = _class_map(tasks)
    multilabel = (tasks.get("cls") or {}).get("type") == "multilabel"
    readable = bool(mapped) and (multilabel or len(others) == 1)
    if policy == "auto":
        return "mask" if readable else "volume"
    if policy == "mask" and not readable:
        cls_classes = (tasks.get("cls") or {}).get("classes")
        mask_classes = (tasks.get("mask") or {}).get("classes")
        raise SourceError(
            "-o slice_labels=mask",
            f"cannot read cls classes {cls_classes} from mask classes {mask_classes}: a "
            "multi-class label needs at least one cls class named as a mask class and exactly "
            "one that is not (the label of slices without any)",
            "name the classes to match, or use -o slice_labels=volume or copy",
        )
    return policy


def slice_label(volume_cls: int | list[int], mask: np.ndarray, tasks: dict[str, Any]):
    """A slice's ``cls`` from its mask (policy ``mask``): positive where the mask has the class.

    Multi-label: 1/0 per class read from the mask, ``-1`` (unknown) for classes the mask does not
    annotate. Multi-class: the mask-annotated class present in the slice, else the one cls class
    that is not a mask class.
    """
    mapped, others = _class_map(tasks)
    present = set(np.unique(mask).tolist())
    if isinstance(volume_cls, list):
        return [int(mapped[i] in present) if i in mapped else -1 for i in range(len(volume_cls))]
    found = [i for i, value in mapped.items() if value in present]
    if len(found) > 1:
        names = [tasks["cls"]["classes"][i] for i in found]
        raise SourceError(
            "-o slice_labels=mask",
            f"a slice holds several cls classes {names}; one multi-class label cannot say so",
            "make the cls task multi-label, or use -o slice_labels=volume",
        )
    return found[0] if found else others[0]


def _check_volume_label(item: SourceItem, mask: np.ndarray, plan: SamplePlan) -> None:
    """Refuse a volume label that its own mask contradicts (policy ``mask``)."""
    mapped, _ = _class_map(plan.tasks)
    present = set(np.unique(mask).tolist())
    classes = plan.tasks["cls"]["classes"]
    labels = item.cls if isinstance(item.cls, list) else None
    for i, value in mapped.items():
        said = labels[i] == 1 if labels is not None else item.cls == i
        if labels is not None and labels[i] == -1:
            continue
        if said != (value in present):
            file = item.paths.get("mask", item.paths.get("image", item.source_id))
            verb = "has no" if said else "has"
            raise SourceError(
                file,
                f"the volume's cls label {'says' if said else 'denies'} {classes[i]!r} but its "
                f"mask {verb} {classes[i]!r} voxels, so slice labels read from the mask would "
                "contradict it",
                "fix the label or the mask, or use -o slice_labels=volume or copy",
            )


def _check_image(image: np.ndarray, file: str, plan: SamplePlan) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim not in (3, 4):
        shape = getattr(image, "shape", None)
        raise SourceError(file, f"image shape {shape} is not [C, H, W] or [C, D, H, W]", "")
    if not image.dtype.isnative:  # big-endian NIfTI/DICOM data: torch cannot take it as is
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype == np.float64 and plan.dtype is None:
        image = image.astype(np.float32)  # float64 doubles the bytes and no scanner needs it
    if plan.dtype is not None and image.dtype != np.dtype(plan.dtype):
        target = np.dtype(plan.dtype)
        if not plan.force_dtype and not np.can_cast(image.dtype, target, "safe"):
            raise SourceError(
                file,
                f"dtype {image.dtype} cannot be stored losslessly as {target} (the dtype of "
                "the first item)",
                "pass --dtype float32 (or another common dtype) to convert every item",
            )
        image = image.astype(target)
    return np.ascontiguousarray(image)


def _check_mask(mask: np.ndarray | None, image: np.ndarray, file: str, plan: SamplePlan):
    if mask is None:
        return None
    if mask.shape != image.shape[1:]:
        raise SourceError(
            file,
            f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape[1:])}",
            "resample the label onto the image grid",
        )
    if not mask.dtype.isnative:
        mask = mask.astype(mask.dtype.newbyteorder("="))
    if not np.issubdtype(mask.dtype, np.integer):
        if not np.array_equal(mask, np.round(mask)):
            raise SourceError(file, "mask holds non-integer values", "save labels as integers")
        mask = mask.astype(np.int64)
    classes = (plan.tasks.get("mask") or {}).get("classes")
    if classes is not None and mask.size:
        values = np.unique(mask)
        bad = [int(v) for v in values if (v < 0 or v >= len(classes)) and v != fmt.MASK_IGNORE]
        if bad:
            raise SourceError(
                file,
                f"unknown mask class value(s) {bad[:10]} (classes 0..{len(classes) - 1}: {classes})",
                "fix the label file or list every label in the source's class names",
            )
    dtype = np.uint8 if mask.max(initial=0) <= 255 else np.int32
    return np.ascontiguousarray(mask.astype(dtype))


def _check_labels(item: SourceItem, plan: SamplePlan) -> None:
    file = item.paths.get("image", item.source_id)
    for task, value in (("cls", item.cls), ("boxes", item.boxes)):
        classes = (plan.tasks.get(task) or {}).get("classes")
        if value is None:
            continue
        if classes is None:
            raise SourceError(
                file, f"has a {task} label but the source declares no {task} task", ""
            )
        labels = value["labels"] if task == "boxes" else value
        if task == "cls" and isinstance(value, list):
            if len(value) != len(classes):
                raise SourceError(
                    file, f"label vector has {len(value)} entries, not {len(classes)}", ""
                )
            continue
        labels = labels if isinstance(labels, list) else [labels]
        bad = [v for v in labels if not 0 <= int(v) < len(classes)]
        if bad:
            raise SourceError(
                file, f"unknown {task} class index {bad[0]} (classes: {classes})", "fix the label"
            )


def _cut(source_id: str, image: np.ndarray, mask, spacing, plan: SamplePlan):
    """Yield ``(key, image, mask, meta)`` per sample."""
    if image.ndim == 3:  # a 2D source is one sample whatever the layout
        extra = {"spacing": list(spacing)} if spacing else {}
        yield fmt.sample_key(source_id), image, mask, extra
        return
    spatial = image.shape[1:]
    if plan.layout == "3d":
        yield from _patches(source_id, image, mask, spacing, plan.patch)
        return
    dim = AXES[plan.axis]
    k = plan.context if plan.layout == "2.5d" else 0
    for i in range(spatial[dim]):
        idx = np.clip(np.arange(i - k, i + k + 1), 0, spatial[dim] - 1)
        stack = np.take(image, idx, axis=dim + 1)  # [C, ..., 2k+1 at dim+1, ...]
        stack = np.moveaxis(stack, dim + 1, 1)
        img = np.ascontiguousarray(stack.reshape((-1,) + stack.shape[2:]))
        msk = None if mask is None else np.ascontiguousarray(np.take(mask, i, axis=dim))
        extra: dict[str, Any] = {"axis": plan.axis, "slice_index": i, "volume_shape": list(spatial)}
        if spacing:
            extra["spacing"] = [float(s) for j, s in enumerate(spacing) if j != dim]
            extra["slice_thickness"] = float(spacing[dim])
        if k:
            extra["context"] = k
        yield fmt.sample_key(source_id, i, plan.axis), img, msk, extra


def _patches(source_id: str, image: np.ndarray, mask, spacing, patch):
    spatial = image.shape[1:]
    base: dict[str, Any] = {"volume_shape": list(spatial)}
    if spacing:
        base["spacing"] = [float(s) for s in spacing]
    if patch is None:
        yield fmt.sample_key(source_id), image, mask, base
        return
    starts = []
    for size, p in zip(spatial, patch, strict=True):
        s = list(range(0, max(size - p, 0) + 1, p))
        if s[-1] + p < size:
            s.append(size - p)  # last tile shifted back to end at the edge (overlaps, no padding)
        starts.append(s)
    pad_value = image.min()
    for n, origin in enumerate(itertools.product(*starts)):
        sl = tuple(slice(o, o + p) for o, p in zip(origin, patch, strict=True))
        img, msk = image[(slice(None),) + sl], None if mask is None else mask[sl]
        if img.shape[1:] != tuple(patch):  # volume smaller than the patch: pad
            pads = [(0, p - s) for s, p in zip(img.shape[1:], patch, strict=True)]
            img = np.pad(img, [(0, 0)] + pads, constant_values=pad_value)
            if msk is not None:
                msk = np.pad(msk, pads, constant_values=fmt.MASK_IGNORE)
        extra = {**base, "patch_origin": list(origin), "patch_index": n}
        yield fmt.sample_key(source_id, n, "p"), np.ascontiguousarray(img), msk, extra


def _image_encoding(img: np.ndarray, hint: str) -> str:
    two_d_8bit = img.ndim == 3 and img.dtype == np.uint8 and img.shape[0] in (1, 3)
    return "png" if hint == "png" and two_d_8bit else "npy"


def _encode_image(img: np.ndarray, encoding: str) -> bytes:
    if encoding == "png":
        return _png(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
    return _npy(img)


def _encode_mask(mask: np.ndarray) -> tuple[str, bytes]:
    if mask.ndim == 2 and mask.dtype == np.uint8:
        return fmt.MASK_PNG, _png(mask)
    return fmt.MASK_NPY, _npy(mask)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image  # PIL only where PNGs are written; workers of npy-only builds skip it

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _count_labels(counts: dict[str, list[int]], cls, boxes, mask, tasks) -> None:
    """Per-class tallies for ``inspect``: samples per class, mask pixels per class, boxes."""
    if cls is not None and "cls" in tasks:
        n = len(tasks["cls"]["classes"])
        row = counts.setdefault("cls", [0] * n)
        if isinstance(cls, list):
            for i, v in enumerate(cls):
                row[i] += int(v == 1)
        else:
            row[int(cls)] += 1
    if mask is not None and "mask" in tasks:
        n = len(tasks["mask"]["classes"])
        row = counts.setdefault("mask", [0] * n)
        hist = np.bincount(mask.ravel(), minlength=max(n, 256))[:n]
        for i in range(n):
            row[i] += int(hist[i])
    if boxes is not None and "boxes" in tasks:
        row = counts.setdefault("boxes", [0] * len(tasks["boxes"]["classes"]))
        for label in boxes["labels"]:
            row[int(label)] += 1


def _stacked_names(names: list[str], plan: SamplePlan, ndim: int) -> list[str]:
    if ndim == 4 and plan.layout == "2.5d" and plan.context:
        k = plan.context
        return [f"{n}[{o:+d}]" for n in names for o in range(-k, k + 1)]
    return names


def _relative(path: str, root: str) -> str:
    if root and os.path.isabs(path):
        try:
            return os.path.relpath(path, root)
        except ValueError:
            return path
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"meta value {value!r} is not JSON-serialisable")
