"""CSV manifests: one row per image, with its label(s), patient id, optional mask and split.

Columns: ``path`` (png/jpg/npy/nii/nii.gz/dcm, relative to the CSV's folder), ``patient_id``
(required), ``label`` (one class) or ``labels`` (``a|b``: multi-label; an empty cell means
unknown, -1 for every class), optional ``mask_path`` and ``split`` (train/val/test).

Array layouts: ``.npy`` ``[H, W]`` -> ``[1, H, W]``, ``[C, H, W]`` and ``[C, D, H, W]`` as
stored (save a single-channel volume as ``[1, D, H, W]``); NIfTI -> ``[C, D, H, W]`` with the
axes reversed to z, y, x; DICOM files through the modality LUT (HU for CT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sharding.readers._common import (
    check_options,
    check_unique_ids,
    image_meta,
    label_columns,
    parse_bool,
    parse_list,
    read_csv_rows,
    read_nifti,
    read_pil,
    resolve,
    safe_id,
    split_name,
)
from sharding.readers.dicom import read_dicom_file
from sharding.records import SourceError, SourceItem, TaskSchema, Volume

SUFFIXES = (".png", ".jpg", ".jpeg", ".npy", ".nii", ".nii.gz", ".dcm")


class CsvReader:
    """A CSV listing image files with labels and patient ids."""

    kind = "csv"
    OPTIONS = {
        "classes": "comma-separated class names, fixing their order (others are an error)",
        "mask_classes": "comma-separated mask class names, background first "
        "(default: background,foreground)",
        "binary_mask": "true: any mask value > 0 becomes 1 (for 0/255 PNG masks)",
    }

    def __init__(self, path: str, **options: str) -> None:
        opts = check_options(self.kind, options, self.OPTIONS)
        self.path = path
        """The source as given (the builder records it in the manifest)."""
        self.csv = Path(path)
        self.classes = parse_list(opts["classes"]) if "classes" in opts else None
        self.mask_classes = parse_list(opts.get("mask_classes", "background,foreground"))
        if len(self.mask_classes) < 2:
            raise SourceError(
                "--option mask_classes", "needs background and at least one class", ""
            )
        self.binary_mask = parse_bool("binary_mask", opts.get("binary_mask", "false"))

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """Read the CSV, check every row (patient id, file type, split, labels)."""
        file = str(self.csv)
        rows = read_csv_rows(self.csv, required=("path", "patient_id"))
        task, labels = label_columns(rows, file, self.classes)
        base = self.csv.parent
        has_mask = "mask_path" in rows[0]
        items = []
        for row, cls in zip(rows, labels, strict=True):
            where = f"{file} line {row['_line']}"
            if not row["path"]:
                raise SourceError(where, "empty path", "fill in the image path")
            if not row["patient_id"]:
                raise SourceError(
                    where, "missing patient_id", "every row needs its patient id for the splits"
                )
            paths = {"image": str(resolve(base, row["path"]))}
            if has_mask and row.get("mask_path"):
                paths["mask"] = str(resolve(base, row["mask_path"]))
            for p in paths.values():
                if not p.lower().endswith(SUFFIXES):
                    raise SourceError(
                        where, f"unsupported file type: {p}", f"use one of {', '.join(SUFFIXES)}"
                    )
            items.append(
                SourceItem(
                    source_id=safe_id(row["path"]),
                    group=row["patient_id"],
                    paths=paths,
                    cls=cls,
                    split=split_name(row.get("split", ""), where),
                    extra={"line": row["_line"]},
                )
            )
        check_unique_ids(items)
        schema = TaskSchema(cls=task)
        if has_mask:
            schema.mask = {"classes": self.mask_classes}
        return items, schema

    def load(self, item: SourceItem) -> Volume:
        """Read the image (and mask) named on the item's row."""
        image, spacing, meta = read_any(item.paths["image"], item.extra.get("line"), self.csv)
        mask = None
        if "mask" in item.paths:
            mask_file = item.paths["mask"]
            raw, _, _ = read_any(mask_file, item.extra.get("line"), self.csv, labels=True)
            if raw.shape[0] != 1:
                raise SourceError(
                    mask_file,
                    f"mask has {raw.shape[0]} channels",
                    "save a single-channel label map",
                )
            mask = raw[0]
            if mask.shape != image.shape[1:]:
                raise SourceError(
                    mask_file,
                    f"mask shape {mask.shape} does not match image {item.paths['image']} "
                    f"shape {image.shape[1:]}",
                    "resample the mask onto the image grid",
                )
            if self.binary_mask:
                mask = (mask > 0).astype(np.uint8)
        return Volume(image=image, mask=mask, spacing=spacing, meta=meta)


def read_any(
    path: str, line: str | None = None, csv: Path | None = None, labels: bool = False
) -> tuple[np.ndarray, tuple[float, ...] | None, dict[str, Any]]:
    """Read an image file of any supported type as ``[C, ...]`` plus spacing and meta."""
    p = Path(path)
    if not p.is_file():
        where = f" (listed on line {line} of {csv})" if line else ""
        raise SourceError(path, f"file not found{where}", "fix the path or use --skip-bad")
    name = p.name.lower()
    if name.endswith((".png", ".jpg", ".jpeg")):
        image = read_pil(p, labels)
        return image, None, image_meta(image)
    if name.endswith(".npy"):
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise SourceError(
                path, f"unreadable .npy: {err}", "re-save it with numpy.save"
            ) from None
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim not in (3, 4):
            raise SourceError(
                path, f"array shape {arr.shape}", "save [H, W], [C, H, W] or [C, D, H, W]"
            )
        return arr, None, {}
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(p)
    image, spacing, meta = read_dicom_file(path)
    return image, spacing, meta
