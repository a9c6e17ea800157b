"""Intensity preprocessing, resize, augmentation and collation of decoded samples.

Geometry goes through ``torchvision.transforms.v2`` with ``tv_tensors``: one call transforms the
image, the mask and the boxes together, so flips, resizes and crops can never misalign labels,
and ``SanitizeBoundingBoxes`` drops boxes a crop made degenerate (with their labels).
Intensities are preprocessed (``bigmodel.data.intensity``) *before* the geometry so that padding
with 0 means "the normalised mean", and the intensity jitter (a scale and shift of normalised
intensities; torchvision's ColorJitter assumes [0, 1] RGB images, not CT in HU or multi-channel
MR) is written here.

Evaluation never crops: with ``resize=none`` it keeps the whole image (the engine runs sliding
windows over images larger than ``image_size``), with ``resize=fit`` it resizes exactly as
training did. Batches of whole images (or 3D volumes) of different sizes are padded at the
end of each spatial dimension by :func:`collate` (images with 0, masks with the ignore value;
box coordinates are unchanged). 3D samples are transformed by ``bigmodel.data._volume``.

With ``data.views=2`` (contrastive pretraining) each training image is augmented twice,
independently, from the loader's seeded stream, with a random resized crop (SimCLR's scale
range :data:`VIEW_CROP_SCALE`) instead of the plain random crop; masks and boxes are dropped
(they would fit neither view) and :func:`collate` stacks the second views after the first ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from bigmodel.config import AugmentConfig
from bigmodel.data.intensity import IntensitySpec, apply_intensity
from sharding.format import MASK_IGNORE

# Padding values per tv_tensor type: the normalised mean for images, "ignore" for masks.
_FILL = {tv_tensors.Image: 0.0, tv_tensors.Mask: MASK_IGNORE}

VIEW_CROP_SCALE = (0.2, 1.0)
"""Share of the image area each view's random resized crop keeps (SimCLR uses 0.08-1 on
ImageNet; a scan's findings are smaller, so the crops keep more)."""

_DENSE = ("mask", "boxes", "labels")
"""Sample fields that follow the geometry and so fit no view when there are several."""


class _CenterCropOrPad(torch.nn.Module):
    """Centre crop to ``size``, padding first where the image is smaller.

    ``v2.CenterCrop`` pads with zeros for every type; masks must be padded with the ignore value.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.crop = v2.CenterCrop(size)

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        height, width = sample["image"].shape[-2:]
        pad_h, pad_w = max(0, self.size - height), max(0, self.size - width)
        if pad_h or pad_w:
            padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
            sample = v2.Pad(padding, fill=_FILL)(sample)
        return self.crop(sample)


class _FitCheck(torch.nn.Module):
    """Refuse a ``resize=fit`` that would change the spacing by more than ``tolerance``."""

    def __init__(self, size: int, tolerance: float) -> None:
        super().__init__()
        self.size, self.tolerance = size, tolerance

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        longer = max(sample["image"].shape[-2:])
        factor = max(longer / self.size, self.size / longer)
        if factor > self.tolerance:
            raise ValueError(
                f"data.resize=fit would scale a {list(sample['image'].shape[-2:])} image to "
                f"{self.size} px, changing its spacing {factor:.2f}x (data.resize_tolerance="
                f"{self.tolerance}); raise data.image_size, data.resize_tolerance, or use "
                f"data.resize=none (crops in training, sliding windows in evaluation)"
            )
        return sample


class SampleTransform:
    """Preprocess intensities, resize/crop and (for training) augment one decoded sample.

    Picklable, for loader workers.

    Args:
        image_size: side of the square training input.
        intensity: the resolved intensity scheme (None: raw values).
        augment: training augmentation; None for evaluation (no crop, no randomness).
        boxes: whether samples carry boxes (torchvision's box sanitiser refuses samples without).
        resize: ``none`` or ``fit`` (``data.resize``).
        resize_tolerance: ``data.resize_tolerance``.
        views: ``data.views``; above 1 (training only), the sample's ``image`` is the first view
            and ``views`` the list of the others.
    """

    def __init__(
        self,
        image_size: int,
        intensity: IntensitySpec | None,
        augment: AugmentConfig | None,
        boxes: bool = False,
        resize: str = "none",
        resize_tolerance: float = 2.0,
        views: int = 1,
    ) -> None:
        self.intensity = intensity
        self.jitter = augment.intensity_jitter if augment is not None else 0.0
        self.views = views if augment is not None else 1
        stages: list[torch.nn.Module] = []
        if resize == "fit":
            stages += [
                _FitCheck(image_size, resize_tolerance),
                v2.Resize(size=None, max_size=image_size, antialias=True),
                _CenterCropOrPad(image_size),  # pads the shorter side; crops nothing
            ]
        if augment is not None:
            stages += [
                v2.RandomHorizontalFlip(augment.hflip),
                v2.RandomVerticalFlip(augment.vflip),
            ]
            if self.views > 1 and augment.random_crop:
                stages.append(
                    v2.RandomResizedCrop(image_size, scale=VIEW_CROP_SCALE, antialias=True)
                )
            elif resize != "fit" and augment.random_crop:
                stages.append(v2.RandomCrop(image_size, pad_if_needed=True, fill=_FILL))
            elif resize != "fit":
                stages.append(_CenterCropOrPad(image_size))
        if boxes and stages:
            # Crops clip boxes to the new canvas; boxes left thinner than a pixel are dropped.
            stages += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
        self.geometry = v2.Compose(stages) if stages else None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        if self.intensity is not None:
            image = apply_intensity(
                image, self.intensity, sample.get("window"), sample.get("volume")
            )
        if self.geometry is None:
            return dict(sample, image=image)
        if self.views > 1:
            return self._views(sample, image)
        height, width = image.shape[-2:]
        views: dict[str, Any] = {"image": tv_tensors.Image(image)}
        if "mask" in sample:
            views["mask"] = tv_tensors.Mask(sample["mask"])
        if "boxes" in sample:
            views["boxes"] = tv_tensors.BoundingBoxes(
                sample["boxes"], format="XYXY", canvas_size=(height, width)
            )
            views["labels"] = sample["labels"]
        views = self.geometry(views)
        image = self._jitter(views["image"].as_subclass(torch.Tensor))
        out = dict(sample, image=image)
        if "mask" in views:
            out["mask"] = views["mask"].as_subclass(torch.Tensor)
        if "boxes" in views:
            out["boxes"] = views["boxes"].as_subclass(torch.Tensor)
            out["labels"] = views["labels"]
        return out

    def _jitter(self, image: torch.Tensor) -> torch.Tensor:
        if self.jitter > 0:
            scale, shift = (torch.rand(2) * 2 - 1) * self.jitter
            image = image * (1 + scale) + shift
        return image

    def _views(self, sample: dict[str, Any], image: torch.Tensor) -> dict[str, Any]:
        """``self.views`` independent augmentations of the image; dense labels dropped."""
        views = [
            self._jitter(self.geometry(tv_tensors.Image(image)).as_subclass(torch.Tensor))
            for _ in range(self.views)
        ]
        out = {k: v for k, v in sample.items() if k not in _DENSE}
        out["has"] = {k: v for k, v in sample["has"].items() if k not in _DENSE}
        return dict(out, image=views[0], views=views[1:])


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...], value: float) -> torch.Tensor:
    """Pad the trailing (spatial) dimensions at their end (box coordinates stay valid)."""
    pad: list[int] = []
    for have, want in zip(reversed(tensor.shape[-len(shape) :]), reversed(shape), strict=True):
        pad += [0, want - have]  # F.pad: last dimension first
    if not any(pad):
        return tensor
    return torch.nn.functional.pad(tensor, pad, value=value)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch following docs/contracts.md (lists for keys, groups, boxes).

    Samples with several views (``data.views``) make a batch of ``views x B`` rows: all first
    views, then all second views, every per-sample field repeated in the same order (row
    ``i + v * B`` is view ``v`` of sample ``i``).
    """
    if "views" in samples[0]:
        count = 1 + len(samples[0]["views"])
        samples = [
            dict(s, image=s["views"][v - 1] if v else s["image"])
            for v in range(count)
            for s in samples
        ]
        for s in samples:
            del s["views"]
    first = samples[0]
    # Whole images (volumes) in evaluation may differ in size: pad to the largest of the batch.
    spatial = first["image"].ndim - 1
    shape = tuple(max(s["image"].shape[1 + d] for s in samples) for d in range(spatial))
    batch: dict[str, Any] = {
        "image": torch.stack([_pad_to(s["image"], shape, 0.0) for s in samples]),
        "key": [s["key"] for s in samples],
        "group": [s["group"] for s in samples],
        # the shards the batch's samples come from (integrity reports name the steps using one)
        "shards": sorted({s["shard"] for s in samples if s.get("shard")}),
        "has": {
            task: torch.tensor([s["has"][task] for s in samples], dtype=torch.bool)
            for task in first["has"]
        },
    }
    if "cls" in first:
        batch["cls"] = torch.stack([s["cls"] for s in samples])
    if "mask" in first:
        batch["mask"] = torch.stack([_pad_to(s["mask"], shape, MASK_IGNORE) for s in samples])
    if "boxes" in first:
        batch["boxes"] = [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples]
    return batch
