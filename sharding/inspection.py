"""``bigmodel-shard inspect``: a summary table, a PNG grid of samples, intensity histograms.

The grid is the quickest check that masks and boxes line up with the pixels after slicing and
that windowing looks sane, before anyone trains on the data. The histograms show the raw
intensities of sampled pixels next to what the training's intensity preprocessing
(``data.intensity``) makes of them: air piled at -1000 HU squeezing soft tissue, or a window
that clips the structure of interest, is visible at a glance.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from sharding import format as fmt
from sharding.helpers import atomic_write
from sharding.records import SourceError
from sharding.verify import _samples


def summary_table(manifest: fmt.DatasetManifest) -> str:
    """Splits, samples, patients, shards, bytes, classes with counts, and intensity stats."""
    img = manifest.image
    created = manifest.created_by or fmt.CreatedBy()
    lines = [
        f"dataset {manifest.name or '?'!r}  format {manifest.format_version}  layout "
        f"{manifest.layout or '?'}  built by bigmodel-shard {created.version or '?'} "
        f"at {created.time or '?'}",
        f"image   {img.encoding} {img.dtype} x {img.channels} channel(s) {img.channel_names or []}",
        "",
        f"{'split':<7}{'samples':>10}{'patients':>10}{'shards':>8}{'MB':>10}",
    ]
    totals = [0, 0, 0, 0]
    for split, info in manifest.splits.items():
        size = sum(s.bytes or 0 for s in info.shards)
        row = [info.total, info.num_groups or 0, len(info.shards), size]
        totals = [a + b for a, b in zip(totals, row, strict=True)]
        lines.append(f"{split:<7}{row[0]:>10}{row[1]:>10}{row[2]:>8}{row[3] / 1e6:>10.2f}")
    lines.append(
        f"{'total':<7}{totals[0]:>10}{totals[1]:>10}{totals[2]:>8}{totals[3] / 1e6:>10.2f}"
    )
    for task, spec in manifest.tasks.items():
        unit = {"cls": "samples", "mask": "pixels", "boxes": "boxes"}.get(task, "")
        kind = f" ({spec.type})" if spec.type else ""
        lines += ["", f"task {task}{kind}: counts in {unit}"]
        header = "".join(f"{s:>12}" for s in manifest.splits)
        lines.append(f"  {'class':<20}{header}")
        for i, name in enumerate(spec.classes):
            cells = ""
            for info in manifest.splits.values():
                counts = (info.label_counts or {}).get(task)
                cells += f"{counts[i] if counts else 0:>12}"
            lines.append(f"  {str(name)[:20]:<20}{cells}")
    stats = manifest.stats or fmt.IntensityStats()
    if stats.mean:
        lines += ["", f"stats ({stats.percentiles_from or ''})"]
        lines.append(f"  {'channel':<14}{'mean':>11}{'std':>11}{'p0.5':>11}{'p99.5':>11}")
        names = img.channel_names or [f"ch{i}" for i in range(len(stats.mean))]
        columns = (stats.mean, stats.std, stats.p0_5, stats.p99_5)
        for i, name in enumerate(names):
            values = [column[i] if column else float("nan") for column in columns]
            lines.append(f"  {str(name)[:14]:<14}" + "".join(f"{v:>11.4g}" for v in values))
    skipped = manifest.skipped or []
    if skipped:
        lines += ["", f"skipped {len(skipped)} item(s):"]
        lines += [f"  {s.file}: {s.reason}" for s in skipped[:10]]
    return "\n".join(lines)


def pick_samples(root: Path, manifest: fmt.DatasetManifest, n: int) -> list[dict[str, Any]]:
    """About ``n`` samples spread over the shards of every split (patients differ by shard)."""
    shards = [s for info in manifest.splits.values() for s in info.shards]
    if not shards or n <= 0:
        return []
    count = min(n, len(shards))
    chosen = [shards[i * len(shards) // count] for i in range(count)]  # evenly spaced
    picked: list[dict[str, Any]] = []
    for i, shard in enumerate(chosen):
        want = -(-(n - len(picked)) // (count - i))  # what is left, shared by the shards left
        step = max(1, shard.num_samples // max(want, 1))
        for j, (key, members) in enumerate(_samples(root / shard.name)):
            if j % step == 0 and want > 0:
                picked.append({"__key__": key, **members})
                want -= 1
    return picked[:n]


def save_grid(root: str | Path, n: int, out: str | Path) -> Path:
    """Draw ``n`` samples with masks overlaid and boxes drawn into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    root, out = Path(root), Path(out)
    manifest = fmt.read_manifest(root)
    samples = pick_samples(root, manifest, n)
    cols = min(4, max(1, len(samples)))
    rows = max(1, -(-len(samples) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, sample in zip(axes.ravel(), samples, strict=False):
        image, mask = _display_arrays(sample, manifest)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        if mask is not None and np.any((mask > 0) & (mask != fmt.MASK_IGNORE)):
            shown = np.ma.masked_where((mask == 0) | (mask == fmt.MASK_IGNORE), mask)
            ax.imshow(shown, cmap="tab10", alpha=0.45, vmin=0, vmax=9, interpolation="nearest")
        title = sample["__key__"][-24:]
        if fmt.BOXES in sample:
            boxes = json.loads(sample[fmt.BOXES])
            names = manifest.tasks["boxes"].classes if "boxes" in manifest.tasks else []
            for (x1, y1, x2, y2), label in zip(boxes["boxes"], boxes["labels"], strict=True):
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow"))
                if label < len(names):
                    ax.text(x1, y1, names[label], color="yellow", fontsize=7, va="bottom")
        if fmt.CLS in sample:
            names = manifest.tasks["cls"].classes
            title += f"\n{names[int(sample[fmt.CLS].decode())]}"
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


def _display_arrays(sample: dict[str, Any], manifest: fmt.DatasetManifest):
    """A 2D (or RGB) view of the sample: the centre channel of a 2.5D stack, the middle slice of
    a 3D volume, windowed by the manifest's 0.5/99.5 percentiles; plus the matching mask view."""
    from PIL import Image

    mask = None
    if fmt.MASK_NPY in sample:
        mask = np.load(io.BytesIO(sample[fmt.MASK_NPY]), allow_pickle=False)
    elif fmt.MASK_PNG in sample:
        mask = np.asarray(Image.open(io.BytesIO(sample[fmt.MASK_PNG])))
    if fmt.IMAGE_PNG in sample:
        return np.asarray(Image.open(io.BytesIO(sample[fmt.IMAGE_PNG]))), mask
    image = np.load(io.BytesIO(sample[fmt.IMAGE_NPY]), allow_pickle=False)
    channel = manifest.context or 0  # centre of the first channel's 2.5D stack
    plane = image[min(channel, image.shape[0] - 1)]
    if plane.ndim == 3:  # 3D: the middle slice
        plane = plane[plane.shape[0] // 2]
        mask = None if mask is None else mask[mask.shape[0] // 2]
    stats = manifest.stats or fmt.IntensityStats()
    lo, hi = float(plane.min()), float(plane.max())
    if stats.p0_5 and stats.p99_5 and channel < len(stats.p0_5):
        lo, hi = stats.p0_5[channel], stats.p99_5[channel]
    plane = np.clip((plane.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    return plane, mask


def preview_intensity(
    values: np.ndarray,
    scheme: str,
    manifest: dict[str, Any],
    window: dict | None = None,
    volume: dict | None = None,
) -> np.ndarray:
    """``values`` (one channel's raw pixels of one image) as ``data.intensity=scheme`` makes them.

    A numpy mirror of ``bigmodel.data.intensity.apply_intensity`` for channel 0 (sharding may
    not import torch or bigmodel); tests/test_intensity.py checks that the two agree.
    """
    name, _, named = scheme.partition(":")
    if name == "auto":
        name = fmt.default_intensity(str((manifest.get("image") or {}).get("modality", "")))
    stats = manifest.get("stats") or {}
    values = values.astype(np.float64)
    if name == "none":
        return values
    if name == "ct_window":
        if named:
            center, width = fmt.CT_WINDOWS.get(named) or tuple(float(v) for v in named.split(","))
        elif window:
            center, width = float(window["center"]), float(window["width"])
        else:
            raise ValueError("ct_window: this sample has no DICOM window; name one")
        return (np.clip(values, center - width / 2, center + width / 2) - center) / (width / 2)
    if name == "image":
        return (values - values.mean()) / max(float(values.std()), 1e-6)
    if name == "mr":
        crop = stats.get("nonzero_crop")
        region = named or ("nonzero" if crop is not None and crop < 0.75 else "all")
        if not volume:
            raise ValueError("mr: this sample has no volume statistics (meta.json intensity)")
        prefix = "nonzero_" if region == "nonzero" else ""
        std = max(float(volume[prefix + "std"][0]), 1e-6)
        out = (values - volume[prefix + "mean"][0]) / std
        return np.where(values != 0, out, 0.0) if region == "nonzero" else out
    source = (stats.get("foreground") or stats) if name == "ct" else stats
    if name == "ct":
        values = np.clip(values, source["p0_5"][0], source["p99_5"][0])
    std = source["std"][0] if source["std"][0] > 0 else 1.0
    return (values - source["mean"][0]) / std


def save_histograms(root: str | Path, n: int, out: str | Path, scheme: str = "auto") -> Path:
    """Histograms of ``n`` samples' channel-0 intensities, raw and after ``scheme``, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root, out = Path(root), Path(out)
    manifest = fmt.read_manifest(root)
    as_json = manifest.to_dict()
    raw, done = [], []
    for sample in pick_samples(root, manifest, n):
        if fmt.IMAGE_NPY in sample:
            image = np.load(io.BytesIO(sample[fmt.IMAGE_NPY]), allow_pickle=False)
        else:
            from PIL import Image

            image = np.asarray(Image.open(io.BytesIO(sample[fmt.IMAGE_PNG])))
            image = image[None] if image.ndim == 2 else image.transpose(2, 0, 1)
        meta = json.loads(sample.get(fmt.META, b"{}"))
        raw.append(image[0].ravel())
        done.append(
            preview_intensity(
                image[0].ravel(), scheme, as_json, meta.get("window"), meta.get("intensity")
            )
        )
    if not raw:
        raise SourceError(str(root), "has no samples to draw", "build the shards first")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    modality = manifest.image.modality or "modality unknown"
    for ax, values, title in (
        (axes[0], np.concatenate(raw), f"raw ({modality})"),
        (axes[1], np.concatenate(done), f"after data.intensity={scheme}"),
    ):
        ax.hist(values, bins=100, color="steelblue")
        ax.set_yscale("log")
        ax.set_title(f"{title}: {len(raw)} samples", fontsize=9)
        ax.set_xlabel("intensity")
    axes[0].set_ylabel("pixels (log)")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return out


__all__ = ["pick_samples", "preview_intensity", "save_grid", "save_histograms", "summary_table"]
