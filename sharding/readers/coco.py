"""COCO detection JSON: boxes as xyxy pixels, labels contiguous 0..K-1 in category-id order.

``path`` is the images folder; ``annotations=instances.json`` the COCO file. Images without
annotations are kept with zero boxes (negatives matter for detection). Crowd annotations
(``iscrowd: 1``) are dropped: torchvision detection targets have no crowd flag, and counting a
crowd region as one object would teach the model wrong boxes.

Patient groups come from an image field (``patient_id``, or the one named by ``group_field=``);
without it each image is its own group and ``meta`` says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sharding.readers._common import (
    check_options,
    check_unique_ids,
    image_meta,
    read_pil,
    resolve,
    safe_id,
    split_name,
)
from sharding.readers.images import NO_GROUP_NOTE
from sharding.records import SourceError, SourceItem, TaskSchema, Volume

# COCO's own exports round box corners; allow this much past the image edge, then clip.
EDGE_TOLERANCE_PX = 1.0


class CocoReader:
    """A COCO ``instances.json`` plus its images folder."""

    kind = "coco"
    OPTIONS = {
        "annotations": "the COCO JSON file (required; relative paths: to the current folder, "
        "then to the images folder)",
        "group_field": "image field holding the patient id (default: patient_id)",
        "split": "train|val|test: the split every image of this file belongs to",
    }

    def __init__(self, path: str, **options: str) -> None:
        opts = check_options(self.kind, options, self.OPTIONS)
        self.path = path
        """The source as given (the builder records it in the manifest)."""
        self.root = Path(path)
        if "annotations" not in opts:
            raise SourceError(
                "--option annotations",
                "required for COCO",
                "pass --option annotations=instances.json",
            )
        ann = Path(opts["annotations"]).expanduser()
        self.annotations = ann if ann.is_absolute() or ann.exists() else self.root / ann
        self.group_field = opts.get("group_field", "patient_id")
        self.split = split_name(opts["split"], "--option split") if "split" in opts else None

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """Parse and validate the JSON; no pixels read."""
        file = str(self.annotations)
        if not self.annotations.is_file():
            raise SourceError(file, "COCO annotation file not found", "check --option annotations")
        try:
            coco = json.loads(self.annotations.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SourceError(file, f"not valid JSON: {err}", "") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(coco.get(key), list):
                raise SourceError(file, f"no '{key}' list", "is this a COCO instances file?")
        if not coco["images"]:
            raise SourceError(file, "no images", "")
        if not coco["categories"]:
            raise SourceError(file, "no categories", "list the box classes under 'categories'")
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        label_of = {c["id"]: i for i, c in enumerate(cats)}
        classes = [str(c["name"]) for c in cats]
        images = {}
        for img in coco["images"]:
            for key in ("id", "file_name", "width", "height"):
                if key not in img:
                    raise SourceError(file, f"image {img.get('id', '?')} has no '{key}'", "")
            images[img["id"]] = img
        boxes: dict[Any, list] = {i: [] for i in images}
        labels: dict[Any, list] = {i: [] for i in images}
        crowd: dict[Any, int] = dict.fromkeys(images, 0)
        for ann in coco["annotations"]:
            img = images.get(ann.get("image_id"))
            if img is None:
                raise SourceError(
                    file,
                    f"annotation {ann.get('id')} refers to unknown image {ann.get('image_id')}",
                    "",
                )
            if ann.get("iscrowd", 0):
                crowd[img["id"]] += 1
                continue
            if ann.get("category_id") not in label_of:
                raise SourceError(
                    file,
                    f"annotation {ann.get('id')} (image {img['file_name']}): unknown category "
                    f"{ann.get('category_id')}",
                    "add it to 'categories'",
                )
            boxes[img["id"]].append(_xyxy(ann, img, file))
            labels[img["id"]].append(label_of[ann["category_id"]])
        items = []
        for img_id, img in images.items():
            group = img.get(self.group_field)
            items.append(
                SourceItem(
                    source_id=safe_id(Path(img["file_name"]).as_posix()),
                    group=str(group)
                    if group not in (None, "")
                    else safe_id(Path(img["file_name"]).stem),
                    paths={"image": str(resolve(self.root, img["file_name"]))},
                    boxes={"boxes": boxes[img_id], "labels": labels[img_id]},
                    split=self.split,
                    extra={
                        "size": (int(img["height"]), int(img["width"])),
                        "grouped": group not in (None, ""),
                        "crowd_dropped": crowd[img_id],
                    },
                )
            )
        items.sort(key=lambda it: it.source_id)
        check_unique_ids(items)
        return items, TaskSchema(boxes={"classes": classes})

    def load(self, item: SourceItem) -> Volume:
        """Read the image; its size must match the JSON's width/height (the boxes depend on it)."""
        image = read_pil(Path(item.paths["image"]))
        h, w = item.extra["size"]
        if image.shape[1:] != (h, w):
            raise SourceError(
                item.paths["image"],
                f"image is {image.shape[2]}x{image.shape[1]} but the COCO file says {w}x{h}",
                "fix width/height in the JSON or re-export the image",
            )
        meta: dict[str, Any] = image_meta(image)
        if not item.extra["grouped"]:
            meta["group_note"] = NO_GROUP_NOTE.replace("groups= or group_regex=", "an image field")
        if item.extra["crowd_dropped"]:
            meta["crowd_dropped"] = item.extra["crowd_dropped"]
        return Volume(image=image, meta=meta)


def _xyxy(ann: dict[str, Any], img: dict[str, Any], file: str) -> list[float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``, checked against the image size."""
    where = f"annotation {ann.get('id')} (image {img['file_name']})"
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4):
        raise SourceError(file, f"{where}: bbox {bbox!r} is not [x, y, w, h]", "")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise SourceError(file, f"{where}: box has size {w}x{h}", "remove it or fix its size")
    width, height = float(img["width"]), float(img["height"])
    tol = EDGE_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise SourceError(
            file,
            f"{where}: box {bbox} lies outside the {int(width)}x{int(height)} image",
            "fix the box (COCO boxes are [x, y, width, height] in pixels)",
        )
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x2 <= x1 or y2 <= y1:
        raise SourceError(file, f"{where}: box {bbox} has no area inside the image", "remove it")
    return [x1, y1, x2, y2]
