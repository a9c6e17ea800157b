"""CocoReader on generated COCO JSON over real digit images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from sharding.readers.coco import CocoReader
from sharding.records import SourceError

W, H = 32, 24


def _coco(root: Path, annotations: list[dict] | None = None, **image_fields) -> Path:
    """Three 32x24 RGB images from digits; categories with non-contiguous ids 7 and 3."""
    digits = load_digits()
    (root / "images").mkdir(exist_ok=True)
    images = []
    for i in range(3):
        gray = np.kron(digits.images[i] * 15, np.ones((3, 4))).astype(np.uint8)  # 24x32
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(root / "images" / f"im{i}.png")
        images.append(
            {"id": 10 + i, "file_name": f"im{i}.png", "width": W, "height": H, **image_fields}
        )
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 0, 32, 24], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [5.5, 6, 4, 4.25]},
            {"id": 4, "image_id": 11, "category_id": 7, "bbox": [0, 0, 8, 8], "iscrowd": 1},
        ]
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "nodule"}, {"id": 3, "name": "mass"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(coco))
    return path


def test_boxes_labels_and_images(tmp_path):
    ann = _coco(tmp_path)
    reader = CocoReader(str(tmp_path / "images"), annotations=str(ann))
    items, schema = reader.scan()
    assert schema.to_json() == {"boxes": {"classes": ["mass", "nodule"]}}  # category-id order
    by_id = {it.source_id: it for it in items}
    assert by_id["im0"].boxes == {"boxes": [[1, 2, 11, 7], [0, 0, 32, 24]], "labels": [1, 0]}
    assert by_id["im1"].boxes == {"boxes": [[5.5, 6, 9.5, 10.25]], "labels": [0]}  # crowd dropped
    assert by_id["im2"].boxes == {"boxes": [], "labels": []}  # kept as a negative
    vol = reader.load(by_id["im1"])
    assert vol.image.shape == (3, H, W) and vol.image.dtype == np.uint8
    assert vol.meta["encoding"] == "png" and vol.meta["crowd_dropped"] == 1
    assert "group_note" in vol.meta and by_id["im1"].group == "im1"


def test_group_field_and_split(tmp_path):
    _coco(tmp_path, hospital_mrn="H-77")
    reader = CocoReader(
        str(tmp_path / "images"),
        annotations="../instances.json",
        group_field="hospital_mrn",
        split="val",
    )
    items, _ = reader.scan()
    assert {(it.group, it.split) for it in items} == {("H-77", "val")}
    assert "group_note" not in reader.load(items[0]).meta


@pytest.mark.parametrize(
    "bbox,problem",
    [
        ([30, 2, 10, 5], r"annotation 9 \(image im0.png\): box .* lies outside the 32x24 image"),
        ([3, 2, 0, 5], r"annotation 9 \(image im0.png\): box has size 0.0x5.0"),
        ([3, 2, 5], r"annotation 9 \(image im0.png\): bbox .* is not"),
    ],
)
def test_bad_boxes_name_image_and_annotation(tmp_path, bbox, problem):
    ann = _coco(tmp_path, [{"id": 9, "image_id": 10, "category_id": 3, "bbox": bbox}])
    with pytest.raises(SourceError, match=problem):
        CocoReader(str(tmp_path / "images"), annotations=str(ann)).scan()


def test_bad_input_errors(tmp_path):
    with pytest.raises(SourceError, match="pass --option annotations"):
        CocoReader(str(tmp_path))
    with pytest.raises(SourceError, match="valid options: annotations"):
        CocoReader(str(tmp_path), annotations="x.json", boxes="xyxy")
    ann = _coco(tmp_path, [{"id": 5, "image_id": 10, "category_id": 99, "bbox": [1, 1, 2, 2]}])
    with pytest.raises(SourceError, match="unknown category 99"):
        CocoReader(str(tmp_path / "images"), annotations=str(ann)).scan()
    ann = _coco(tmp_path, [])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "images" / "im2.png")
    reader = CocoReader(str(tmp_path / "images"), annotations=str(ann))
    items, _ = reader.scan()
    with pytest.raises(SourceError, match="im2.png: image is 5x5 but the COCO file says 32x24"):
        reader.load(items[2])
