"""Normalisation, augmentation and collation of decoded samples.

Geometry goes through ``torchvision.transforms.v2`` with ``tv_tensors``: one call transforms the
image, the mask and the boxes together, so flips and crops can never misalign labels, and
``SanitizeBoundingBoxes`` drops boxes a crop made degenerate (with their labels). Intensities are
normalised *before* the geometry so that padding with 0 means "the dataset mean", and the
intensity jitter (a scale and shift of normalised intensities; torchvision's ColorJitter assumes
[0, 1] RGB images, not CT in HU or multi-channel MR) is written here.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from bigmodel.config import AugmentConfig
from sharding.format import MASK_IGNORE

# Padding values per tv_tensor type: the normalised mean for images, "ignore" for masks.
_FILL = {tv_tensors.Image: 0.0, tv_tensors.Mask: MASK_IGNORE}


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


class SampleTransform:
    """Normalise and (for training) augment one decoded sample; picklable for loader workers.

    Args:
        image_size: side of the square output.
        mean: per-channel mean (None: no normalisation).
        std: per-channel std (None: no normalisation).
        augment: training augmentation; None for evaluation (deterministic centre crop/pad).
        boxes: whether samples carry boxes (torchvision's box sanitiser refuses samples without).
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        augment: AugmentConfig | None,
        boxes: bool = False,
    ) -> None:
        self.mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        # A constant channel has std 0; dividing by 1 keeps it finite.
        self.std = None if std is None else torch.tensor([s if s > 0 else 1.0 for s in std])
        if self.std is not None:
            self.std = self.std.view(-1, 1, 1)
        self.jitter = augment.intensity_jitter if augment is not None else 0.0
        stages: list[torch.nn.Module] = []
        if augment is not None:
            stages += [
                v2.RandomHorizontalFlip(augment.hflip),
                v2.RandomVerticalFlip(augment.vflip),
            ]
        if augment is not None and augment.random_crop:
            stages.append(v2.RandomCrop(image_size, pad_if_needed=True, fill=_FILL))
        else:
            stages.append(_CenterCropOrPad(image_size))
        if boxes:
            # Crops clip boxes to the new canvas; boxes left thinner than a pixel are dropped.
            stages += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0)]
        self.geometry = v2.Compose(stages)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        if self.mean is not None:
            image = (image - self.mean) / self.std
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
        image = views["image"].as_subclass(torch.Tensor)
        if self.jitter > 0:
            scale, shift = (torch.rand(2) * 2 - 1) * self.jitter
            image = image * (1 + scale) + shift
        out = dict(sample, image=image)
        if "mask" in views:
            out["mask"] = views["mask"].as_subclass(torch.Tensor)
        if "boxes" in views:
            out["boxes"] = views["boxes"].as_subclass(torch.Tensor)
            out["labels"] = views["labels"]
        return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch following docs/contracts.md (lists for keys, groups, boxes)."""
    first = samples[0]
    batch: dict[str, Any] = {
        "image": torch.stack([s["image"] for s in samples]),
        "key": [s["key"] for s in samples],
        "group": [s["group"] for s in samples],
        "has": {
            task: torch.tensor([s["has"][task] for s in samples], dtype=torch.bool)
            for task in first["has"]
        },
    }
    if "cls" in first:
        batch["cls"] = torch.stack([s["cls"] for s in samples])
    if "mask" in first:
        batch["mask"] = torch.stack([s["mask"] for s in samples])
    if "boxes" in first:
        batch["boxes"] = [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples]
    return batch
