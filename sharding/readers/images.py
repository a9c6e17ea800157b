"""Image folders: ``root/CLASS/*.png|jpg``, one subfolder per class (torchvision's ImageFolder).

``root/{train,val,test}/CLASS/*`` is recognised too, and then the source's split is kept.
8-bit images stay uint8 and are written as ``image.png``; 16-bit PNGs stay uint16 (``image.npy``).

Patient groups come from a ``groups=CSV`` (``file,patient_id``; ``file`` relative to the root
or a bare file name), or from ``group_regex=`` applied to the file name (the named group
``patient`` or the first group). Without either, each image is its own group and ``meta`` says
so: images of one patient could then land in different splits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sharding.readers._common import (
    IMAGE_SUFFIXES,
    check_options,
    check_unique_ids,
    image_meta,
    read_csv_rows,
    read_pil,
    resolve,
    safe_id,
)
from sharding.records import SourceError, SourceItem, TaskSchema, Volume

NO_GROUP_NOTE = "no patient ids: each image is its own group (pass groups= or group_regex=)"


class ImageFolderReader:
    """One subfolder per class of PNG/JPEG images."""

    kind = "imagefolder"
    OPTIONS = {
        "groups": "CSV with columns file,patient_id (file relative to the root, or its name)",
        "group_regex": "regex on the file name; the group 'patient' (or group 1) is the id",
    }

    def __init__(self, path: str, **options: str) -> None:
        opts = check_options(self.kind, options, self.OPTIONS)
        self.path = path
        """The source as given (the builder records it in the manifest)."""
        self.root = Path(path)
        self.groups = opts.get("groups")
        self.group_regex = None
        if "group_regex" in opts:
            try:
                self.group_regex = re.compile(opts["group_regex"])
            except re.error as err:
                raise SourceError(
                    f"--option group_regex={opts['group_regex']}", f"bad regex: {err}", ""
                ) from None
            if self.group_regex.groups == 0:
                raise SourceError(
                    f"--option group_regex={opts['group_regex']}",
                    "the regex has no group to take the patient id from",
                    r"capture it, e.g. group_regex=^(?P<patient>[^_]+)_",
                )
        if self.groups and self.group_regex:
            raise SourceError("--option groups", "groups and group_regex both given", "pass one")

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """List class folders and their images (no pixels read)."""
        if not self.root.is_dir():
            raise SourceError(str(self.root), "image folder not found", "check the path")
        top = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        split_dirs = [d for d in top if d in ("train", "val", "test")]
        if split_dirs and len(split_dirs) != len(top):
            raise SourceError(
                str(self.root),
                f"mixes split folders {split_dirs} with class folders {sorted(set(top) - set(split_dirs))}",
                "use either root/CLASS/* or root/SPLIT/CLASS/*",
            )
        bases = [(self.root / s, s) for s in split_dirs] or [(self.root, None)]
        found: list[tuple[Path, str, str | None]] = []
        for base, split in bases:
            for class_dir in sorted(base.iterdir()):
                if not class_dir.is_dir() or class_dir.name.startswith("."):
                    continue
                for f in sorted(class_dir.rglob("*")):
                    if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                        found.append((f, class_dir.name, split))
        if not found:
            raise SourceError(
                str(self.root),
                "no PNG/JPEG images in class subfolders",
                "lay the images out as root/CLASS/image.png",
            )
        classes = sorted({c for _, c, _ in found})
        index = {c: i for i, c in enumerate(classes)}
        groups = self._group_table()
        items = []
        for f, cls_name, split in found:
            rel = f.relative_to(self.root).as_posix()
            group = self._group(f, rel, groups)
            items.append(
                SourceItem(
                    source_id=safe_id(rel),
                    group=group or safe_id(rel),
                    paths={"image": str(f)},
                    cls=index[cls_name],
                    split=split,
                    extra={"grouped": group is not None},
                )
            )
        check_unique_ids(items)
        return items, TaskSchema(cls={"type": "multiclass", "classes": classes})

    def _group_table(self) -> dict[str, str] | None:
        if not self.groups:
            return None
        path = resolve(Path.cwd(), self.groups)
        rows = read_csv_rows(path, required=("file", "patient_id"))
        table = {}
        for row in rows:
            if not row["patient_id"]:
                raise SourceError(
                    str(path), f"line {row['_line']}: empty patient_id", "fill in every patient id"
                )
            table[Path(row["file"]).as_posix()] = row["patient_id"]
        return table

    def _group(self, f: Path, rel: str, table: dict[str, str] | None) -> str | None:
        if table is not None:
            gid = table.get(rel) or table.get(f.name)
            if gid is None:
                raise SourceError(
                    str(f),
                    f"not listed in the groups CSV {self.groups}",
                    "add a row: file,patient_id",
                )
            return gid
        if self.group_regex is not None:
            m = self.group_regex.search(f.name)
            if m is None:
                raise SourceError(
                    str(f),
                    f"file name does not match group_regex {self.group_regex.pattern!r}",
                    "fix the regex or rename the file",
                )
            gid = m.groupdict().get("patient") or m.group(1)
            if not gid:
                raise SourceError(
                    str(f), "group_regex captured an empty patient id", "fix the regex"
                )
            return gid
        return None

    def load(self, item: SourceItem) -> Volume:
        """Read the image as ``[C, H, W]``, keeping its dtype."""
        image = read_pil(Path(item.paths["image"]))
        meta: dict[str, Any] = image_meta(image)
        if not item.extra.get("grouped"):
            meta["group_note"] = NO_GROUP_NOTE
        return Volume(image=image, meta=meta)
