"""Real-anatomy brain MR for quality checks: the MNI152 T1 template and its tissue maps.

nilearn ships the ICBM 2009a symmetric MNI152 template (a real T1-weighted average of 152
adult brains, skull-stripped, 1 mm) with its grey- and white-matter probability maps inside the
package (``nilearn/datasets/data``), so nothing is downloaded. This module makes "patients"
from it the way scans of different people differ on a scanner, and writes them in the nnU-Net
raw layout that ``bigmodel-shard build --source nnunet`` reads:

* anatomy: a random rotation (±10° in-plane, ±4° out of plane), scaling (±8 %) and shift, applied
  to the T1 and the tissue maps together (labels = argmax of background / grey / white after
  the warp, so label edges stay smooth);
* coverage: each patient is a slab of axial slices at its own height, so some hold a little
  brain at the top of the head and others the whole width of it, as partial-coverage scans do;
* intensity: a per-patient gain (x0.4 - x2.5) and gamma, a smooth multiplicative bias field
  (±25 %, a low-order polynomial as N4 models it) and noise; MR has no absolute unit.

Used by ``benchmarks/bench_quality.py`` (the whole ``bigmodel-train`` against a short script)
and by ``tests/test_quality_guard.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np

CLASSES = ("background", "grey", "white")


def template_dir() -> Path:
    """nilearn's bundled data folder (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("the MR quality data need nilearn (pip install nilearn; make env has it)")
    return Path(spec.origin).parent / "datasets" / "data"


def load_template(spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """The T1 ``[X, Y, Z]`` (float32) and tissue probabilities ``[3, X, Y, Z]`` at ``spacing`` mm."""
    from scipy import ndimage

    base = template_dir()
    arrays = []
    for name in ("t1", "gm", "wm"):
        path = base / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        arrays.append(np.asarray(nib.load(path).dataobj, dtype=np.float32))
    t1, gm, wm = arrays
    gm, wm = gm / 255.0, wm / 255.0
    if spacing != 1.0:
        zoom = 1.0 / spacing
        t1 = ndimage.zoom(t1, zoom, order=1)
        gm = ndimage.zoom(gm, zoom, order=1)
        wm = ndimage.zoom(wm, zoom, order=1)
    background = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return t1, np.stack([background, gm, wm])


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A random rotation matrix: ±10° about z (axial plane), ±4° about x and y."""
    ax, ay = (math.radians(a) for a in rng.uniform(-4, 4, size=2))
    az = math.radians(rng.uniform(-10, 10))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float) -> np.ndarray:
    """A smooth multiplicative field: exp of a random 2nd-order polynomial, within ±strength."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    terms = [*grids, *(g * g for g in grids), grids[0] * grids[1], grids[1] * grids[2]]
    field = sum(rng.normal() * t for t in terms)
    field = field / (np.abs(field).max() + 1e-6) * math.log1p(strength)
    return np.exp(field).astype(np.float32)


def make_patient(
    t1: np.ndarray, tissue: np.ndarray, seed: int, slab: int, height: float
) -> tuple[np.ndarray, np.ndarray]:
    """One patient: ``(image int16 [X, Y, slab], labels uint8 [X, Y, slab])``.

    ``height`` in [0, 1] places the slab between the bottom and the top of the brain.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    center = (np.array(t1.shape) - 1) / 2
    matrix = _rotation(rng) / rng.uniform(0.92, 1.08)
    offset = center - matrix @ center + rng.uniform(-3, 3, size=3)
    warp = dict(matrix=matrix, offset=offset, mode="constant", cval=0.0)
    image = ndimage.affine_transform(t1, order=1, **warp)
    probs = np.stack([ndimage.affine_transform(p, order=1, **warp) for p in tissue])
    probs[0] += 1e-3  # outside the field of view is background
    labels = probs.argmax(0).astype(np.uint8)
    # the slab: axial slices at this patient's height within the brain's extent
    rows = np.flatnonzero(labels.any(axis=(0, 1)))
    low, high = int(rows.min()), int(rows.max()) - slab + 1
    z0 = int(round(low + height * max(0, high - low)))
    image, labels = image[..., z0 : z0 + slab], labels[..., z0 : z0 + slab]
    # intensity: gain, gamma, bias field, noise (only where there is signal: skull-stripped)
    inside = image > 0
    scaled = (image / 255.0) ** rng.uniform(0.8, 1.25)
    scaled *= _bias_field(image.shape, rng, 0.25) * rng.uniform(0.4, 2.5) * 1000.0
    scaled += rng.normal(0.0, 0.02 * scaled[inside].mean(), size=image.shape) * inside
    return np.clip(scaled * inside, 0, 32767).astype(np.int16), labels


def write_nnunet(
    out: Path,
    n_train: int = 10,
    n_test: int = 3,
    spacing: float = 2.0,
    slab: int = 12,
    seed: int = 0,
) -> Path:
    """An nnU-Net raw folder of ``n_train`` (imagesTr) and ``n_test`` (imagesTs) patients."""
    t1, tissue = load_template(spacing)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    heights = np.linspace(0.0, 1.0, n_train + n_test)
    order = np.random.default_rng(seed).permutation(n_train + n_test)
    for index in range(n_train + n_test):
        train = index < n_train
        images, labels = ("imagesTr", "labelsTr") if train else ("imagesTs", "labelsTs")
        (out / images).mkdir(exist_ok=True)
        (out / labels).mkdir(exist_ok=True)
        case = f"brain_{index:03d}"
        image, label = make_patient(t1, tissue, seed * 1000 + index, slab, heights[order[index]])
        nib.save(nib.Nifti1Image(image, affine), out / images / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), out / labels / f"{case}.nii.gz")
    spec = {
        "channel_names": {"0": "T1"},
        "labels": {name: value for value, name in enumerate(CLASSES)},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": "mni-brains",
    }
    (out / "dataset.json").write_text(json.dumps(spec, indent=2))
    return out
