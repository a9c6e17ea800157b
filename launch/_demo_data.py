"""Source data for ``make demo``: one real MR volume from nibabel plus generated MR-like volumes.

Written as the kind of folder a user brings (NIfTI files and a ``labels.csv``), so the demo
goes through the real ``bigmodel-shard build --source nifti`` path.

- ``anatomical.nii`` from ``nibabel.testing.data_path`` (a real 33 x 41 x 25 MR volume): its
  mask marks bright tissue (Otsu threshold); its diagnosis is left empty (unknown), which
  the data side turns into "no label" for the classification head.
- ``case_XX.nii.gz``: 48 x 48 x 12 int16 volumes in the same intensity range as the real one
  (so one normalisation fits both), with a body ellipse and, in half of the patients, a bright
  ellipsoid lesion spanning a few slices; masks background / tissue / lesion, diagnosis
  ``lesion`` or ``normal`` per patient. The build reads each slice's diagnosis from its mask
  (``slice_labels=mask``): a lesion patient's slices without lesion are ``normal`` slices, so the
  classifier must find the lesion rather than recognise the patient.

The CSV's ``split`` column puts the last pairs of patients (one normal, one lesion each) in
``val`` and ``test`` (one pair each below 12 patients, two pairs each from 12 on), so both
held-out splits see both classes however few patients there are.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.testing import data_path

from sharding.helpers import atomic_write

TINY_DEMO = [
    "model.backbone.name=test_resnet",
    "model.heads.organs.decoder_channels=8",
    "model.heads.patient.embed_dim=8",
    "data.image_size=32",
    "data.batch_size=8",
    "train.checkpoint_interval_s=0",
]
"""``configs/demo.yaml`` shrunk to seconds per step on a CPU (a tiny timm ResNet at 32 px, small
heads, every epoch checkpointed, as the resume tests count on): the overrides the end-to-end tests and benchmarks start from, each adding its own
strategy, schedule and cluster."""
MASK_CLASSES = ("background", "tissue", "lesion")
REAL_VOLUME = "anatomical.nii"


def _write_nifti(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    affine = np.diag([*spacing, 1.0])
    # the temporary name keeps the suffix, from which nibabel picks the format
    atomic_write(path, lambda tmp: nib.save(nib.Nifti1Image(array, affine), str(tmp)))


def _otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance); numpy only, for one demo mask."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centers) / np.maximum(weight_low, 1)
    mean_high = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(np.argmax(between))])


def _generated_case(rng: np.random.Generator, with_lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """One MR-like volume ``[X, Y, Z]`` (int16) and its label map."""
    shape = (48, 48, 12)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = rng.uniform(20, 28, size=2)
    ax, ay = rng.uniform(12, 18, size=2)
    body = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
    label = np.zeros(shape, dtype=np.uint8)
    label[body] = 1
    image = rng.normal(300, 150, size=shape)  # background
    image[body, :] = rng.normal(8000, 900, size=(int(body.sum()), shape[2]))  # tissue
    if with_lesion:  # an ellipsoid: a disc whose radius shrinks away from its centre slice
        lx = cx + rng.uniform(-ax / 3, ax / 3)
        ly = cy + rng.uniform(-ay / 3, ay / 3)
        radius = rng.uniform(6, 9)
        # Centred in the volume and shorter than it: the first and last slices never hold lesion.
        centre, half_depth = rng.uniform(5, 6), rng.uniform(5, 6.5)
        for z in range(shape[2]):
            shrink = 1 - ((z - centre) / half_depth) ** 2
            if shrink < 0.3:  # the ellipsoid's tips: no lesion under ~3 px radius
                continue
            disc = ((x - lx) ** 2 + (y - ly) ** 2 <= radius**2 * shrink) & body
            label[disc, z] = 2
            image[disc, z] = rng.normal(12500, 900, size=int(disc.sum()))  # bright
    return image.astype(np.int16), label


DEMO_PATIENTS = 36
"""Generated patients of ``make demo``: 14 lesion patients for training. With 24 (8 lesion
patients) and the demo's few steps, held-out figures depended on which lesions the held-out
patients had (test accuracy 0.79, lesion Dice 0.0 in one run); with 36 they hold (1.00, 0.97)."""


def write_demo_source(out_dir: str | Path, patients: int = DEMO_PATIENTS, seed: int = 0) -> Path:
    """Write NIfTI volumes, masks and ``labels.csv`` under ``out_dir``; returns the CSV path.

    ``patients`` must be at least 6 (one normal/lesion pair each for val and test, and train).
    """
    if patients < 6:
        raise ValueError(f"patients={patients}: the demo needs at least 6 (4 are held out)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []

    real = nib.load(os.path.join(data_path, REAL_VOLUME))
    real_image = np.asarray(real.dataobj)
    shutil.copyfile(os.path.join(data_path, REAL_VOLUME), out / REAL_VOLUME)
    # "tissue": voxels above Otsu's threshold (bright matter); no lesion annotation.
    tissue = (real_image > _otsu_threshold(real_image)).astype(np.uint8)
    _write_nifti(tissue, real.header.get_zooms()[:3], out / "anatomical_mask.nii.gz")
    rows.append(
        {
            "image": REAL_VOLUME,
            "mask": "anatomical_mask.nii.gz",
            "patient_id": "nibabel-anatomical",
            "label": "",
            "split": "train",
        }
    )

    per_split = 2 if patients >= 12 else 1  # normal/lesion pairs held out per split
    held_out = {patients - 1 - k: "test" for k in range(2 * per_split)}
    held_out.update({patients - 1 - 2 * per_split - k: "val" for k in range(2 * per_split)})
    for i in range(patients):
        with_lesion = i % 2 == 1
        image, label = _generated_case(rng, with_lesion)
        name = f"case_{i:02d}"
        _write_nifti(image, (0.8, 0.8, 2.5), out / f"{name}.nii.gz")
        _write_nifti(label, (0.8, 0.8, 2.5), out / f"{name}_mask.nii.gz")
        rows.append(
            {
                "image": f"{name}.nii.gz",
                "mask": f"{name}_mask.nii.gz",
                "patient_id": f"patient-{i:02d}",
                "label": "lesion" if with_lesion else "normal",
                "split": held_out.get(i, "train"),
            }
        )

    csv_path = out / "labels.csv"

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "mask", "patient_id", "label", "split"])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(csv_path, write)
    return csv_path
