"""Every error of ``bigmodel/data/_decode.py``, each tripped by a sample built to trip it.

A good sample decodes first (so each bad one differs from a working one by one member); every
message names the shard and the sample key, and says what was expected.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigmodel.data._decode import SampleDecoder, SampleError, png_handler
from bigmodel.data.manifest import ImageInfo, Manifest, TaskInfo
from sharding import format as fmt

H, W = 6, 5
WHERE = r"shard s-000\.tar sample case1"


def _manifest(layout: str = "2d", multilabel: bool = False) -> Manifest:
    return Manifest(
        root=Path("/data/shards"),
        format_version=1,
        name="t",
        layout=layout,
        image=ImageInfo(encoding="npy", channels=2),
        tasks={
            "cls": TaskInfo(("a", "b", "c"), "multilabel" if multilabel else "multiclass"),
            "mask": TaskInfo(("background", "organ")),
            "boxes": TaskInfo(("lesion", "nodule")),
        },
        mean=None,
        std=None,
        splits={},
    )


def _sample(**members) -> dict:
    sample = {
        "__key__": "case1",
        "__url__": "s-000.tar",
        fmt.GROUP: b"patient1",
        fmt.IMAGE_NPY: np.zeros((2, H, W), dtype=np.float32),
        fmt.CLS: 1,
        fmt.MASK_NPY: np.zeros((H, W), dtype=np.uint8),
        fmt.BOXES: {"boxes": [[0, 0, 2, 2]], "labels": [1]},
    }
    for key, value in members.items():
        name = {"image_npy": fmt.IMAGE_NPY, "image_png": fmt.IMAGE_PNG, "cls": fmt.CLS}.get(key)
        name = name or {"cls_json": fmt.CLS_MULTI, "mask": fmt.MASK_NPY, "boxes": fmt.BOXES}[key]
        if value is None:
            sample.pop(name, None)
        else:
            sample[name] = value
    return sample


def test_a_good_sample_decodes():
    out = SampleDecoder(_manifest())(_sample())
    assert out["image"].shape == (2, H, W) and int(out["cls"]) == 1
    assert out["has"] == {"cls": True, "mask": True, "boxes": True}
    assert out["group"] == "patient1" and out["labels"].tolist() == [1]


@pytest.mark.parametrize(
    "members,match",
    [
        (
            {"image_npy": np.zeros((2, 3, H, W))},
            WHERE + r": image\.npy is a 3D volume \[2, 3, 6, 5\].*--layout 2d",
        ),
        ({"image_npy": np.zeros((H, W))}, WHERE + r": image\.npy has shape \[6, 5\]; expected"),
        (
            {"image_npy": None, "image_png": np.zeros((1, 2, H, W), dtype=np.uint8)},
            WHERE + r": image\.png has shape \[1, 2, 6, 5\]",
        ),
        ({"image_npy": None}, WHERE + r": no image\.npy or image\.png member \(members: \["),
        (
            {"image_npy": np.zeros((3, H, W))},
            WHERE + r": image has 3 channels but dataset\.json says 2",
        ),
        ({"cls": 3}, WHERE + r": cls is 3 but tasks\.cls has 3 classes"),
        ({"cls": -2}, WHERE + r": cls is -2 but tasks\.cls has 3 classes"),
        (
            {"mask": np.zeros((H, W + 1))},
            WHERE + r": mask shape \[6, 6\] does not match the image's \[6, 5\]",
        ),
        (
            {"boxes": {"boxes": [[0, 0, 2, 2], [1, 1, 3, 3]], "labels": [0]}},
            WHERE + r": boxes\.json has 2 boxes and 1 labels",
        ),
        (
            {"boxes": {"boxes": [[0, 0, 2, 2]], "labels": [2]}},
            WHERE + r": box labels \[2\] outside 0\.\.1",
        ),
    ],
    ids=[
        "volume",
        "flat-npy",
        "png-4d",
        "no-image",
        "channels",
        "cls-high",
        "cls-negative",
        "mask-shape",
        "box-count",
        "box-label",
    ],
)
def test_bad_sample_is_refused_naming_shard_and_key(members: dict, match: str):
    with pytest.raises(SampleError, match=match):
        SampleDecoder(_manifest())(_sample(**members))


def test_multilabel_vector_of_the_wrong_length():
    decoder = SampleDecoder(_manifest(multilabel=True))
    assert decoder(_sample(cls=None, cls_json=[1, 0, -1]))["cls"].tolist() == [1.0, 0.0, -1.0]
    with pytest.raises(SampleError, match=WHERE + r": cls\.json has 2 entries for 3 classes"):
        decoder(_sample(cls=None, cls_json=[1, 0]))


def test_volume_manifest_is_refused_before_any_sample():
    with pytest.raises(SampleError, match=r"layout is '3d'.*rebuild the shards with --layout 2d"):
        SampleDecoder(_manifest(layout="3d"))


def test_png_handler_keeps_exact_values_and_ignores_other_members():
    array = np.arange(30, dtype=np.uint8).reshape(H, W)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    np.testing.assert_array_equal(png_handler("mask.png", buf.getvalue()), array)
    assert png_handler("image.npy", b"not a png") is None
