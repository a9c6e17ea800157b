"""3D samples: intensity, patches sampled from whole volumes, augmentation (MONAI transforms).

A 3D shard sample is a whole volume ``[C, D, H, W]`` (or a ``--patch`` tile of one) with its mask
``[D, H, W]`` and, in ``meta.json``, the statistics of its whole volume, so intensities are
preprocessed exactly as the 2D slices of the same scan are (``apply_intensity`` with
``spatial_dims=3``), before any crop.

Training (:class:`VolumePatches`) turns one decoded volume into ``data.samples_per_volume``
patches of ``data.patch_size``, so a volume is read and decoded once per visit, not once per
patch:

1. ``SpatialPad``: a volume smaller than the patch is padded (centred; image with 0, the
   normalised mean; mask with the ignore value, so padding never counts as background).
2. Crop centres (MONAI's conventions): ``RandCropByPosNegLabeld`` puts a share
   ``data.foreground_ratio`` of the patches on a foreground voxel and the others on a labelled
   background voxel (nnU-Net: one third on foreground); with ``data.foreground_classes``
   ``RandCropByLabelClassesd`` first draws a class among those present in the volume, so rare
   classes get as many foreground patches as common ones. The voxel indices are computed here
   from the mask (ignored voxels are neither foreground nor background) and handed to MONAI.
   Volumes with no labelled foreground (or no mask) are cropped uniformly
   (``RandSpatialCropSamplesd``).
3. Augmentation of each patch (``data.augment3d``): mirroring on every axis, one rotation +
   scaling (``RandAffined``, masks by nearest neighbour), intensity scale/shift
   (``data.augment.intensity_jitter``), gamma, Gaussian noise.

Every random transform draws from its own numpy generator, seeded by :meth:`set_random_state`
from the pipeline's stream seed (seed, rank, worker, epoch, start step), so a resumed loader
draws the same patches, and the torch RNG is not touched.

Evaluation (:class:`VolumeTransform`) only preprocesses intensities: the engine runs the
sliding window over the whole volume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    SpatialPad,
)
from monai.transforms.utils import map_binary_to_indices, map_classes_to_indices

from bigmodel.config import DataConfig
from bigmodel.data.intensity import IntensitySpec, apply_intensity
from sharding.format import MASK_IGNORE

__all__ = ["VolumePatches", "VolumeTransform"]

_KEYS = ("image", "mask")
_GAMMA = (0.7, 1.5)  # nnU-Net's gamma range


@contextlib.contextmanager
def _plain_tensors() -> Iterator[None]:
    """MONAI transforms on plain tensors inside the block: no ``MetaTensor`` bookkeeping of
    each transform (it took two thirds of the patch time), nothing to invert here."""
    tracked = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracked)


def _plain(tensor: Any) -> torch.Tensor:
    """A MONAI ``MetaTensor`` as a plain tensor (batches follow docs/contracts.md)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


class VolumeTransform:
    """Evaluation: one decoded volume with its intensities preprocessed, whole (picklable)."""

    def __init__(self, intensity: IntensitySpec | None) -> None:
        self.intensity = intensity

    def normalise(self, sample: dict[str, Any]) -> torch.Tensor:
        if self.intensity is None:
            return sample["image"]
        return apply_intensity(
            sample["image"], self.intensity, sample.get("window"), sample.get("volume"), 3
        )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return dict(sample, image=self.normalise(sample))


class VolumePatches(VolumeTransform):
    """Training: one decoded volume -> ``data.samples_per_volume`` augmented patches.

    Args:
        data: ``data.*`` (``patch_size``, ``foreground_ratio``, ``foreground_classes``,
            ``samples_per_volume``, ``augment3d``, ``augment.intensity_jitter``).
        intensity: the resolved intensity scheme (None: raw values).
        mask_classes: classes of the mask task (background included); 0 without masks.
    """

    def __init__(self, data: DataConfig, intensity: IntensitySpec | None, mask_classes: int):
        super().__init__(intensity)
        if data.patch_size is None:
            raise ValueError("data.patch_size is needed to sample 3D patches")
        patch = tuple(data.patch_size)
        count = data.samples_per_volume
        self.ratio = data.foreground_ratio
        self.mask_classes = mask_classes
        self.by_class_aware = data.foreground_classes and mask_classes > 1
        self.pad_image = SpatialPad(patch, mode="constant", value=0.0)
        self.pad_mask = SpatialPad(patch, mode="constant", value=MASK_IGNORE)
        self.pos_neg = RandCropByPosNegLabeld(
            _KEYS,
            label_key="mask",
            spatial_size=patch,
            pos=self.ratio,
            neg=1.0 - self.ratio,
            num_samples=count,
            fg_indices_key="_fg",
            bg_indices_key="_bg",
        )
        self.by_class = RandCropByLabelClassesd(
            _KEYS,
            label_key="mask",
            spatial_size=patch,
            ratios=[1.0] * max(2, mask_classes),
            num_classes=max(2, mask_classes),
            num_samples=count,
            indices_key="_classes",
            warn=False,
        )
        self.uniform = RandSpatialCropSamplesd(
            _KEYS, roi_size=patch, num_samples=count, random_size=False, allow_missing_keys=True
        )
        self.augment = Compose(_augmentations(data), map_items=False)

    def set_random_state(self, seed: int) -> None:
        """Seed every random transform from one stream seed (any int)."""
        rng = np.random.RandomState(seed % 2**32)
        for transform in (self.pos_neg, self.by_class, self.uniform, self.augment):
            transform.set_random_state(seed=int(rng.randint(2**31)))

    def __call__(self, sample: dict[str, Any]) -> list[dict[str, Any]]:  # type: ignore[override]
        with _plain_tensors():
            views: dict[str, Any] = {"image": self.pad_image(self.normalise(sample))}
            if "mask" in sample:
                views["mask"] = self.pad_mask(sample["mask"][None])
            patches = [self.augment(view) for view in self._crop(views)]
        out = []
        for patch in patches:
            piece = dict(sample, image=_plain(patch["image"]).float().contiguous())
            if "mask" in patch:  # nearest-neighbour resampling leaves whole values in floats
                piece["mask"] = _plain(patch["mask"])[0].round().long().contiguous()
            out.append(piece)
        return out

    def _crop(self, views: dict[str, Any]) -> list[dict[str, Any]]:
        mask = views.get("mask")
        labelled = None if mask is None else mask != MASK_IGNORE
        foreground = None if mask is None else labelled & (mask > 0)
        if foreground is None or not bool(foreground.any()):
            return self.uniform(views)  # nothing to centre on: uniform over the volume
        indices = map_classes_to_indices(mask, self.mask_classes) if self.by_class_aware else []
        present = [c for c in range(1, len(indices)) if len(indices[c])]
        if present:
            ratios = [1.0 - self.ratio if len(indices[0]) else 0.0] + [
                self.ratio / len(present) if c in present else 0.0
                for c in range(1, self.mask_classes)
            ]
            if sum(ratios) == 0:  # foreground_ratio 0 and no labelled background
                ratios[present[0]] = 1.0
            self.by_class.cropper.ratios = ratios  # this volume's: the share stays the ratio
            return self.by_class({**views, "_classes": indices})
        fg, bg = map_binary_to_indices(foreground, labelled.to(torch.uint8), 0)
        return self.pos_neg({**views, "_fg": fg, "_bg": bg})


def _augmentations(data: DataConfig) -> list[Any]:
    """The per-patch augmentations of ``data.augment3d`` (none with probability 0)."""
    aug = data.augment3d
    steps: list[Any] = []
    if aug.flip > 0:
        steps += [
            RandFlipd(_KEYS, prob=aug.flip, spatial_axis=axis, allow_missing_keys=True)
            for axis in range(3)
        ]
    if aug.affine_prob > 0 and (aug.rotate_deg > 0 or aug.scale > 0):
        steps.append(
            RandAffined(
                _KEYS,
                prob=aug.affine_prob,
                rotate_range=(float(np.deg2rad(aug.rotate_deg)),) * 3,
                scale_range=(aug.scale,) * 3,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                allow_missing_keys=True,
            )
        )
    jitter = data.augment.intensity_jitter
    if jitter > 0:  # the 2D jitter: x (1 + s) + t, s and t in [-jitter, jitter]
        steps += [
            RandScaleIntensityd("image", factors=jitter, prob=1.0),
            RandShiftIntensityd("image", offsets=jitter, prob=1.0),
        ]
    if aug.gamma_prob > 0:
        steps.append(RandAdjustContrastd("image", prob=aug.gamma_prob, gamma=_GAMMA))
    if aug.noise_prob > 0 and aug.noise_std > 0:
        steps.append(RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std))
    return steps
