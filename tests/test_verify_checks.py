"""Every per-sample check of ``sharding/verify.py``, each tripped by a sample built to trip it.

The members are real bytes as the shard writer stores them (``.npy``, PNG, JSON, text); a good
sample passes first, then each bad one differs from it by one member.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sharding import format as fmt
from sharding.verify import _check_sample, _samples

H, W = 6, 5
MANIFEST = {
    "image": {"channels": 2, "dtype": "float32"},
    "tasks": {
        "cls": {"classes": ["a", "b", "c"]},
        "mask": {"classes": ["background", "organ"]},
        "boxes": {"classes": ["lesion"]},
    },
}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _members(**changes) -> dict[str, bytes]:
    members = {
        fmt.IMAGE_NPY: _npy(np.zeros((2, H, W), dtype=np.float32)),
        fmt.MASK_PNG: _png(np.ones((H, W), dtype=np.uint8)),
        fmt.CLS: b"2",
        fmt.BOXES: json.dumps({"boxes": [[0, 0, 2, 2]], "labels": [0]}).encode(),
        fmt.GROUP: b"patient1",
        fmt.META: json.dumps({"modality": "CT"}).encode(),
    }
    for name, value in changes.items():
        if value is None:
            members.pop(name)
        else:
            members[name] = value
    return members


def test_a_good_sample_passes():
    assert _check_sample(_members(), MANIFEST) == ""
    png_image = _members(**{fmt.IMAGE_NPY: None, fmt.IMAGE_PNG: _png(np.zeros((H, W, 2), "u1"))})
    assert _check_sample(png_image, {**MANIFEST, "image": {"channels": 2}}) == ""


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({fmt.IMAGE_NPY: None}, "no image member"),
        ({fmt.IMAGE_NPY: _npy(np.zeros((3, H, W), "f4"))}, "3 channels, manifest says 2"),
        ({fmt.IMAGE_NPY: _npy(np.zeros((2, H, W), "f8"))}, "dtype float64, manifest says float32"),
        (
            {fmt.MASK_PNG: _png(np.zeros((H, W + 1), "u1"))},
            f"mask shape ({H}, {W + 1}) != image ({H}, {W})",
        ),
        ({fmt.MASK_PNG: _png(np.full((H, W), 2, "u1"))}, "mask values [2] outside 0..1"),
        ({fmt.CLS: b"3"}, "class 3 outside 0..2"),
        ({fmt.CLS: b"-1"}, "class -1 outside 0..2"),
        ({fmt.CLS: None, fmt.CLS_MULTI: b"[1, 0]"}, "multi-label vector of length 2"),
        (
            {fmt.BOXES: json.dumps({"boxes": [[0, 0, 1, 1]], "labels": []}).encode()},
            "boxes and labels differ in length",
        ),
        ({fmt.GROUP: None}, "no patient id (group)"),
        ({fmt.GROUP: b""}, "no patient id (group)"),
        ({fmt.IMAGE_NPY: b"not an npy file"}, "does not decode: ValueError"),
        ({fmt.META: b"{not json"}, "does not decode: JSONDecodeError"),
        ({fmt.CLS: b"two"}, "does not decode: ValueError"),
    ],
    ids=[
        "no-image",
        "channels",
        "dtype",
        "mask-shape",
        "mask-values",
        "class-high",
        "class-negative",
        "multilabel-length",
        "box-labels",
        "no-group",
        "empty-group",
        "bad-npy",
        "bad-meta",
        "bad-cls",
    ],
)
def test_bad_sample_is_reported(changes: dict, expected: str):
    assert _check_sample(_members(**changes), MANIFEST).startswith(expected)


def test_mask_ignore_value_is_allowed():
    mask = np.ones((H, W), dtype=np.uint8)
    mask[0, 0] = fmt.MASK_IGNORE
    assert _check_sample(_members(**{fmt.MASK_PNG: _png(mask)}), MANIFEST) == ""


def test_members_of_a_sample_must_be_contiguous(tmp_path: Path):
    """webdataset groups consecutive members: a key seen again would become a second sample."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.image.npy", "b.image.npy", "a.cls"):
            data = b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(tarfile.TarError, match="members of sample a are not contiguous"):
        list(_samples(path))
