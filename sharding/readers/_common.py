"""Machinery shared by the readers: option checks, CSV rows, label columns, image files, hashing.

Kept in one private module so each reader file holds only what its format needs.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sharding.records import SourceError, SourceItem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def check_options(
    kind: str, options: Mapping[str, str], allowed: Mapping[str, str]
) -> dict[str, str]:
    """Return ``options`` as a dict, or raise naming the unknown option and the valid ones."""
    for name in options:
        if name not in allowed:
            valid = ", ".join(f"{k} ({v})" for k, v in allowed.items()) or "none"
            raise SourceError(
                f"--option {name}",
                f"unknown option for source '{kind}'",
                f"valid options: {valid}",
            )
    return {k: str(v) for k, v in options.items()}


def parse_bool(name: str, value: str) -> bool:
    """Read a yes/no option value."""
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise SourceError(f"--option {name}={value}", "not a boolean", "use true or false")


def parse_list(value: str) -> list[str]:
    """Split a comma-separated option value, dropping blanks."""
    return [v.strip() for v in value.split(",") if v.strip()]


def resolve(base: Path, path: str) -> Path:
    """``path`` as written in a source file, taken relative to ``base`` unless absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def split_name(value: str, where: str) -> str | None:
    """Map a split cell (``train``/``valid``/...) to ``train``/``val``/``test``; blank -> None."""
    v = value.strip().lower()
    if not v:
        return None
    if v not in SPLIT_NAMES:
        raise SourceError(
            where, f"unknown split '{value}'", "use train, val or test (or leave it blank)"
        )
    return SPLIT_NAMES[v]


def read_csv_rows(path: Path, required: Iterable[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV with header; each row gets ``_line`` (its 1-based line number) for errors."""
    if not path.is_file():
        raise SourceError(str(path), "CSV file not found", "check the path")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = []
            for row in reader:
                clean = {k: (v or "").strip() for k, v in row.items() if k is not None}
                clean["_line"] = str(reader.line_num)
                rows.append(clean)
    except (UnicodeDecodeError, csv.Error) as err:
        raise SourceError(str(path), f"not a readable CSV: {err}", "save it as UTF-8 CSV") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise SourceError(
            str(path),
            f"missing column(s) {missing}; found {header}",
            "add the column(s) to the header row",
        )
    if not rows:
        raise SourceError(str(path), "CSV has a header but no rows", "add one row per item")
    return rows


def _class_sort_key(name: str) -> tuple[int, float | str]:
    # numeric class names ("2" < "10") sort as numbers; others alphabetically
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def sorted_classes(names: Iterable[str]) -> list[str]:
    """Class names in a stable order: numerically when they are all numbers, else alphabetically."""
    return sorted(set(names), key=_class_sort_key)


def label_columns(
    rows: list[dict[str, str]], file: str, classes: list[str] | None = None
) -> tuple[dict[str, Any] | None, list[int | list[int] | None]]:
    """Parse a ``label`` (one class) or ``labels`` (``a|b``, multi-label) column.

    Returns the task entry (``{"type", "classes"}``, or None without a label column) and, per
    row, a class index, a 0/1 vector (-1 everywhere for an empty multi-label cell), or None.
    """
    has_one = "label" in rows[0]
    has_many = "labels" in rows[0]
    if has_one and has_many:
        raise SourceError(file, "has both 'label' and 'labels' columns", "keep one of them")
    if not (has_one or has_many):
        return None, [None] * len(rows)
    column = "label" if has_one else "labels"
    cells = []
    for row in rows:
        raw = row.get(column, "")
        names = [raw] if has_one else [n.strip() for n in raw.split("|")]
        cells.append([n for n in names if n])
    if classes is None:
        classes = sorted_classes(n for names in cells for n in names)
    if not classes:
        raise SourceError(file, f"column '{column}' is empty in every row", "fill in the labels")
    index = {name: i for i, name in enumerate(classes)}
    out: list[int | list[int] | None] = []
    for row, names in zip(rows, cells, strict=True):
        for n in names:
            if n not in index:
                raise SourceError(
                    file,
                    f"line {row['_line']}: unknown class '{n}' (classes: {classes})",
                    "fix the cell or add the class to the classes= option",
                )
        if has_one:
            out.append(index[names[0]] if names else None)
        elif not names:
            out.append([-1] * len(classes))
        else:
            vec = [0] * len(classes)
            for n in names:
                vec[index[n]] = 1
            out.append(vec)
    kind = "multiclass" if has_one else "multilabel"
    return {"type": kind, "classes": list(classes)}, out


def safe_id(text: str) -> str:
    """A sample-key-safe id from a relative path or name (no dots, slashes or spaces)."""
    stem = re.sub(r"\.(nii\.gz|[A-Za-z0-9]+)$", "", text)
    return re.sub(r"[^A-Za-z0-9_\-]", "-", stem).strip("-") or "item"


def keyed_hash(salt: str, kind: str, value: str, length: int = 20) -> str:
    """HMAC-SHA256 of ``value`` under ``salt``: a pseudonym that cannot be reversed without it.

    A keyed hash rather than ``sha256(salt + value)``: same purpose, and it is the standard
    construction that has no length-extension or concatenation ambiguity. ``kind`` keeps
    patient and series pseudonyms in separate spaces.
    """
    msg = f"{kind}:{value}".encode()
    return hmac.new(salt.encode(), msg, hashlib.sha256).hexdigest()[:length]


def pil_to_chw(img: Any, file: str, labels: bool = False) -> np.ndarray:
    """A PIL image as ``[C, H, W]``; 8-bit stays uint8, 16-bit stays uint16, float stays float.

    ``labels``: a label map, so a palette image keeps its indices instead of becoming RGB.
    """
    mode = img.mode
    if labels and mode == "P":
        pass
    elif mode in ("1", "LA"):
        img = img.convert("L")
    elif mode in ("P", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    raise SourceError(file, f"unsupported image layout {arr.shape} (mode {mode})", "save as PNG")


def read_pil(path: Path, labels: bool = False) -> np.ndarray:
    """Read a PNG/JPEG as ``[C, H, W]`` with its own dtype (``labels``: see :func:`pil_to_chw`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_chw(img, str(path), labels)
    except FileNotFoundError:
        raise SourceError(str(path), "file not found", "check the path in the source") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SourceError(
            str(path), f"unreadable image: {err}", "re-export the file, or use --skip-bad"
        ) from None


def image_meta(image: np.ndarray) -> dict[str, Any]:
    """``{"encoding": "png"}`` for 8-bit gray/RGB 2D images (the builder writes image.png)."""
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[0] in (1, 3):
        return {"encoding": "png"}
    return {"encoding": "npy"}


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """Read a NIfTI as ``[C, D, H, W]`` (array axes x,y,z reversed to z,y,x), spacing and meta.

    The source dtype is kept unless the header scales the values (then nibabel's float).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        hdr = img.header
        # the array proxy returns the on-disk dtype when the header applies no scaling
        data = np.asanyarray(img.dataobj)
    except FileNotFoundError:
        raise SourceError(str(path), "file not found", "check the path in the source") from None
    except Exception as err:  # nibabel raises many types for broken files
        raise SourceError(
            str(path), f"unreadable NIfTI: {err}", "re-export it, or use --skip-bad"
        ) from None
    zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
    if data.ndim == 2:
        data = data[:, :, None]
        zooms = zooms[:2] + (1.0,)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise SourceError(str(path), f"expected a 3D or 4D NIfTI, got shape {data.shape}", "")
    image = np.ascontiguousarray(data.transpose(3, 2, 1, 0))
    axcodes = "".join(nib.aff2axcodes(img.affine))
    meta = {"orientation": axcodes, "affine": np.round(img.affine, 6).tolist()}
    return image, tuple(reversed(zooms)), meta


def check_unique_ids(items: list[SourceItem]) -> None:
    """Raise naming both files when two items would get the same sample key."""
    seen: dict[str, str] = {}
    for it in items:
        path = next(iter(it.paths.values()), it.source_id)
        if it.source_id in seen:
            raise SourceError(
                path,
                f"has the same sample id '{it.source_id}' as {seen[it.source_id]}",
                "rename one of the files (ids come from paths with punctuation replaced by '-')",
            )
        seen[it.source_id] = path


def read_nifti_mask(path: Path) -> np.ndarray:
    """Read a NIfTI label map as ``[D, H, W]`` (the same axis order as :func:`read_nifti`)."""
    mask, _, _ = read_nifti(path)
    if mask.shape[0] != 1:
        raise SourceError(
            str(path),
            f"a label map must be 3D, got {mask.shape[0]} volumes",
            "save the labels as one 3D integer volume",
        )
    return mask[0]
