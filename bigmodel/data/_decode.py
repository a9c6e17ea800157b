"""Decoding one shard sample into tensors, with absent task labels filled in.

webdataset's decoder turns the members into Python/numpy values (``.npy`` -> array, ``.json`` ->
object, ``cls`` -> int); PNGs are decoded here with PIL so that 8-bit gray and RGB images and
label maps keep their exact values (webdataset's image handlers convert to float or a fixed mode).
:class:`SampleDecoder` then makes every sample the same shape whatever labels it carries (partial
labels are normal), so that batches can be stacked: an absent class is ``-1``, an absent mask is
all ``255`` (ignore), absent boxes are an empty list, and ``has[task]`` says which is which.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from bigmodel.data.manifest import Manifest, layout_mismatch
from sharding.format import (
    BOXES,
    CLS,
    CLS_MULTI,
    GROUP,
    IMAGE_NPY,
    IMAGE_PNG,
    MASK_IGNORE,
    MASK_NPY,
    MASK_PNG,
    META,
    UNKNOWN_LABEL,
)


class SampleError(ValueError):
    """A sample that cannot be decoded; the message names the shard and the sample key."""


def png_handler(key: str, data: bytes) -> np.ndarray | None:
    """webdataset decoder handler: ``*.png`` -> uint8 array ``H x W`` or ``H x W x C``."""
    if not key.lower().endswith("png"):
        return None
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def _where(sample: dict[str, Any]) -> str:
    return f"shard {sample.get('__url__', '?')} sample {sample.get('__key__', '?')}"


class SampleDecoder:
    """Turn a webdataset-decoded sample into a dict of tensors (picklable, for loader workers).

    Output keys: ``image`` float32 ``[C, *spatial]`` (``[C, H, W]``, or ``[C, D, H, W]`` with
    ``spatial_dims=3``; raw intensities, not yet normalised), ``key``, ``group``, ``has``
    (``{task: bool}`` for the manifest's tasks) and per task present in the manifest: ``cls``
    (int64 scalar or float32 ``[K]``), ``mask`` (int64 ``[*spatial]``), ``boxes`` (float32
    ``[N, 4]``) with ``labels`` (int64 ``[N]``).

    Args:
        manifest: the shards' manifest; its layout must fit ``spatial_dims``.
        spatial_dims: 2 (images, slices) or 3 (volumes: ``--layout 3d`` shards).
    """

    def __init__(self, manifest: Manifest, spatial_dims: int = 2) -> None:
        self.channels = manifest.image.channels
        self.tasks = dict(manifest.tasks)
        self.spatial_dims = spatial_dims
        problem = layout_mismatch(manifest, spatial_dims)
        if problem is not None:
            raise SampleError(problem)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = self._image(sample)
        spatial = tuple(image.shape[1:])
        out: dict[str, Any] = {
            "image": image,
            "key": sample["__key__"],
            "group": _text(sample.get(GROUP, "")),
            "shard": sample.get("__url__", ""),
            "has": {},
        }
        meta = sample.get(META)
        if isinstance(meta, dict) and meta.get("window"):
            out["window"] = meta["window"]  # the DICOM window, for data.intensity=ct_window
        if isinstance(meta, dict) and meta.get("intensity"):
            out["volume"] = meta["intensity"]  # its volume's statistics, for data.intensity=mr
        if "cls" in self.tasks:
            out["cls"], out["has"]["cls"] = self._cls(sample)
        if "mask" in self.tasks:
            out["mask"], out["has"]["mask"] = self._mask(sample, spatial)
        if "boxes" in self.tasks:
            out["boxes"], out["labels"], out["has"]["boxes"] = self._boxes(sample)
        return out

    def _image(self, sample: dict[str, Any]) -> torch.Tensor:
        if IMAGE_NPY in sample and self.spatial_dims == 3:
            array = np.asarray(sample[IMAGE_NPY])
            if array.ndim != 4:
                raise SampleError(
                    f"{_where(sample)}: image.npy has shape {list(array.shape)}; a 3D sample is "
                    f"[C, D, H, W]: rebuild the shards with --layout 3d"
                )
        elif IMAGE_PNG in sample and self.spatial_dims == 3:
            raise SampleError(f"{_where(sample)}: image.png in a 3D shard; rebuild the shards")
        elif IMAGE_NPY in sample:
            array = np.asarray(sample[IMAGE_NPY])
            if array.ndim == 4:
                raise SampleError(
                    f"{_where(sample)}: image.npy is a 3D volume {list(array.shape)} "
                    f"([C, D, H, W]); the 2D models need [C, H, W]: rebuild with --layout 2d"
                )
            if array.ndim != 3:
                raise SampleError(
                    f"{_where(sample)}: image.npy has shape {list(array.shape)}; expected "
                    f"[C, H, W]; rebuild the shards"
                )
        elif IMAGE_PNG in sample:
            array = np.asarray(sample[IMAGE_PNG])
            if array.ndim == 2:
                array = array[None]
            elif array.ndim == 3:
                array = array.transpose(2, 0, 1)  # H x W x C -> C x H x W
            else:
                raise SampleError(f"{_where(sample)}: image.png has shape {list(array.shape)}")
        else:
            raise SampleError(
                f"{_where(sample)}: no image.npy or image.png member (members: "
                f"{sorted(k for k in sample if not k.startswith('__'))}); rebuild the shards"
            )
        if array.shape[0] != self.channels:
            raise SampleError(
                f"{_where(sample)}: image has {array.shape[0]} channels but dataset.json says "
                f"{self.channels}; the shards and manifest disagree, rebuild them"
            )
        # astype copies, so the tensor owns writable, contiguous memory whatever the source dtype.
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def _cls(self, sample: dict[str, Any]) -> tuple[torch.Tensor, bool]:
        task = self.tasks["cls"]
        num_classes = len(task.classes)
        if task.multilabel:
            if CLS_MULTI not in sample:
                return torch.full((num_classes,), float(UNKNOWN_LABEL)), False
            vector = torch.tensor(sample[CLS_MULTI], dtype=torch.float32)
            if vector.shape != (num_classes,):
                raise SampleError(
                    f"{_where(sample)}: cls.json has {vector.numel()} entries for "
                    f"{num_classes} classes"
                )
            return vector, True
        if CLS not in sample:
            return torch.tensor(UNKNOWN_LABEL, dtype=torch.int64), False
        index = int(sample[CLS])
        if not 0 <= index < num_classes:
            raise SampleError(
                f"{_where(sample)}: cls is {index} but tasks.cls has {num_classes} classes"
            )
        return torch.tensor(index, dtype=torch.int64), True

    def _mask(self, sample: dict[str, Any], spatial: tuple[int, ...]) -> tuple[torch.Tensor, bool]:
        raw = sample.get(MASK_PNG, sample.get(MASK_NPY))
        if raw is None:
            return torch.full(spatial, MASK_IGNORE, dtype=torch.int64), False
        mask = np.asarray(raw)
        if mask.shape != spatial:
            raise SampleError(
                f"{_where(sample)}: mask shape {list(mask.shape)} does not match the image's "
                f"{list(spatial)}"
            )
        return torch.from_numpy(mask.astype(np.int64)), True

    def _boxes(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        spec = sample.get(BOXES)
        if spec is None:
            return torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), False
        boxes = torch.tensor(spec.get("boxes", []), dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(spec.get("labels", []), dtype=torch.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise SampleError(
                f"{_where(sample)}: boxes.json has {len(boxes)} boxes and {len(labels)} labels"
            )
        num_classes = len(self.tasks["boxes"].classes)
        if len(labels) and not (int(labels.min()) >= 0 and int(labels.max()) < num_classes):
            raise SampleError(
                f"{_where(sample)}: box labels {labels.tolist()} outside 0..{num_classes - 1}"
            )
        return boxes, labels, True


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
