"""NIfTI volumes listed in a CSV with their labels, patient ids and (optionally) masks.

``--input`` is the CSV (or a folder holding ``labels.csv``). Columns: the image path (relative
to the CSV's folder), the patient id, optionally ``label`` (one class) or ``labels``
(``a|b`` multi-label), a mask path and a split. Volumes come out as ``[C, D, H, W]`` with the
source dtype; a 4D NIfTI's last axis becomes the channels.
"""

from __future__ import annotations

from pathlib import Path

from sharding.readers._common import (
    check_options,
    label_columns,
    parse_list,
    read_csv_rows,
    read_nifti,
    read_nifti_mask,
    resolve,
    safe_id,
    split_name,
)
from sharding.records import SourceError, SourceItem, TaskSchema, Volume


class NiftiCsvReader:
    """NIfTI volumes plus a CSV of labels."""

    kind = "nifti"
    OPTIONS = {
        "image_column": "CSV column with the NIfTI path (default: image)",
        "group_column": "CSV column with the patient id (default: patient_id)",
        "mask_column": "CSV column with a label-map NIfTI path (default: mask, if present)",
        "mask_classes": "comma-separated mask class names, background first (needed with masks)",
        "classes": "comma-separated class names in index order (default: sorted labels)",
        "split_column": "CSV column with train/val/test (default: split, if present)",
        "modality": "modality written to meta.json (e.g. CT, MR)",
    }

    def __init__(self, path: str, **options: str) -> None:
        self.path = str(path)
        self.options = check_options(self.kind, options, self.OPTIONS)

    def _csv(self) -> Path:
        p = Path(self.path)
        return p / "labels.csv" if p.is_dir() else p

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """One item per CSV row; checks files exist, patient ids are filled and classes known."""
        csv_path = self._csv()
        opt = self.options
        image_col = opt.get("image_column", "image")
        group_col = opt.get("group_column", "patient_id")
        rows = read_csv_rows(csv_path, required=[image_col, group_col])
        classes = parse_list(opt["classes"]) if "classes" in opt else None
        cls_task, labels = label_columns(rows, str(csv_path), classes)
        mask_col = opt.get("mask_column", "mask")
        has_mask = mask_col in rows[0]
        if "mask_column" in opt and not has_mask:
            raise SourceError(str(csv_path), f"no column {mask_col!r}", "fix --option mask_column")
        mask_task = None
        if has_mask:
            if "mask_classes" not in opt:
                raise SourceError(
                    str(csv_path),
                    f"column {mask_col!r} holds masks but their class names are unknown",
                    "pass --option mask_classes=background,organ,...",
                )
            mask_task = {"classes": parse_list(opt["mask_classes"])}
        split_col = opt.get("split_column", "split")
        base = csv_path.parent
        items = []
        for row, label in zip(rows, labels, strict=True):
            where = f"{csv_path}:{row['_line']}"
            if not row.get(image_col):
                raise SourceError(
                    where, f"empty {image_col!r} cell", "give every row an image path"
                )
            group = row.get(group_col, "")
            if not group:
                raise SourceError(
                    where,
                    f"missing patient id in column {group_col!r}",
                    "fill it in; patient-level splits need it (use the file name if each "
                    "file is its own patient)",
                )
            image = resolve(base, row[image_col])
            if not image.is_file():
                raise SourceError(
                    str(image), "file not found", f"fix the path on line {row['_line']}"
                )
            paths = {"image": str(image)}
            if has_mask and row.get(mask_col):
                mask = resolve(base, row[mask_col])
                if not mask.is_file():
                    raise SourceError(str(mask), "mask file not found", f"fix line {row['_line']}")
                paths["mask"] = str(mask)
            split = split_name(row.get(split_col, ""), where) if split_col in row else None
            items.append(SourceItem(safe_id(row[image_col]), group, paths, cls=label, split=split))
        return items, TaskSchema(cls=cls_task, mask=mask_task)

    def load(self, item: SourceItem) -> Volume:
        """Read the volume (and its mask) keeping the stored dtype."""
        image, spacing, meta = read_nifti(Path(item.paths["image"]))
        mask = read_nifti_mask(Path(item.paths["mask"])) if "mask" in item.paths else None
        if "modality" in self.options:
            meta["modality"] = self.options["modality"]
        return Volume(image=image, mask=mask, spacing=spacing, meta=meta)


__all__ = ["NiftiCsvReader"]
