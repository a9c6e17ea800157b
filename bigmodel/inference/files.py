"""Reading the files people have (PNG/JPEG, NIfTI, DICOM series) and writing results atomically.

Pixels are read with the sharding readers' functions, so a file gives the same array at
prediction time as it gave ``bigmodel-shard build``: NIfTI volumes as ``[C, z, y, x]`` with the
stored dtype, DICOM series through the modality LUT (Hounsfield units for CT), ordered along the
slice normal, images with their own bit depth. Each input also keeps its geometry (a voxel-to-world
affine), so outputs can be written back in the input's space and detections reported in patient
coordinates.

Every output is written under a temporary name and renamed: a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.preprocessing import InputError
from sharding.helpers import atomic_write  # here for the writers below and their callers
from sharding.records import SourceError

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "Study",
    "atomic_write",
    "read_study",
    "study_name",
    "write_json",
    "write_nifti",
    "write_png",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class Study:
    """One input, read: pixels, geometry and where it came from."""

    path: Path
    kind: str
    """``image``, ``nifti`` or ``dicom``."""
    image: np.ndarray
    """``[C, D, H, W]`` for volumes, ``[C, H, W]`` for 2D images (the readers' layout)."""
    spacing: tuple[float, ...] = ()
    """Voxel size in mm in the array's spatial order (``(z, y, x)`` / ``(row, col)``)."""
    affine: np.ndarray | None = None
    """4x4 voxel-to-world (RAS, mm) of the array transposed to ``(x, y, z)``; None for images."""
    header: Any = None
    """The NIfTI header of the input (kept for the output's qform/sform codes)."""
    dicom_files: list[str] = field(default_factory=list)
    """DICOM: the series' files in slice order (for DICOM SEG)."""
    window: dict[str, Any] | None = None
    """DICOM: the display window the file carries (``{"center", "width"}``), if any."""

    @property
    def is_volume(self) -> bool:
        """True for ``[C, D, H, W]`` inputs."""
        return self.image.ndim == 4


def study_name(path: Path) -> str:
    """Output stem of an input: its file name without ``.nii.gz``/``.png``/..."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES, *DICOM_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "input"
    return name or "input"


def read_study(path: str | Path) -> Study:
    """Read one input by its kind (suffix; a folder is a DICOM series).

    Raises:
        InputError: the file does not exist, has an unknown kind or cannot be read.
    """
    path = Path(path).expanduser()
    lower = path.name.lower()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            return _read_dicom_series(path)
        if lower.endswith(NIFTI_SUFFIXES):
            return _read_nifti(path)
        if lower.endswith(IMAGE_SUFFIXES):
            return _read_image(path)
        if lower.endswith(DICOM_SUFFIXES):
            return _read_dicom_file(path)
    except SourceError as err:
        raise InputError(str(err)) from None
    raise InputError(
        f"{path}: unknown input kind; give a .png/.jpg image, a .nii/.nii.gz volume, a .dcm "
        f"file or a folder holding one DICOM series"
    )


def _read_image(path: Path) -> Study:
    from sharding.readers._common import read_pil

    return Study(path=path, kind="image", image=read_pil(path))


def _read_nifti(path: Path) -> Study:
    import nibabel as nib

    from sharding.readers._common import read_nifti

    image, spacing, _ = read_nifti(path)  # [C, z, y, x], the builder's array
    header = nib.load(str(path)).header  # header only: the pixels were read above
    affine = header.get_best_affine()
    return Study(
        path=path, kind="nifti", image=image, spacing=spacing, affine=affine, header=header
    )


def _lps_to_ras(affine: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _dicom_affine(first_file: str, spacing: tuple[float, ...]) -> np.ndarray | None:
    """Voxel ``(col, row, slice)`` -> RAS mm from the first slice's position and orientation."""
    import pydicom

    ds = pydicom.dcmread(first_file, stop_before_pixels=True)
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(iop) != 6:
        return None
    row_dir, col_dir = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row_dir, col_dir)
    dz, dr, dc = spacing if len(spacing) == 3 else (1.0, *spacing)
    lps = np.eye(4)
    # DICOM: column index moves along the row direction, row index along the column direction.
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = normal * dz
    lps[:3, 3] = np.array(ipp, float)
    return _lps_to_ras(lps)


def _read_dicom_series(path: Path) -> Study:
    from sharding.readers.dicom import DicomReader

    # The reader pseudonymises patient ids with a secret salt; prediction never writes them, so
    # a throw-away salt for this process is enough (it is never stored).
    with tempfile.TemporaryDirectory() as tmp:
        salt = Path(tmp) / "salt.txt"
        salt.write_text(secrets.token_hex(16))
        reader = DicomReader(str(path), salt_file=str(salt))
    items, _ = reader.scan()
    if len(items) != 1:
        raise InputError(f"{path}: holds {len(items)} DICOM series; give one folder per series")
    volume = reader.load(items[0])
    image = volume.image if volume.image.ndim == 4 else volume.image[:, None]
    spacing = tuple(volume.spacing) if len(volume.spacing) == 3 else (1.0, *volume.spacing)
    files = list(items[0].extra["files"])
    return Study(
        path=path,
        kind="dicom",
        image=image,
        spacing=spacing,
        affine=_dicom_affine(files[0], spacing),
        dicom_files=files,
        window=volume.meta.get("window"),
    )


def _read_dicom_file(path: Path) -> Study:
    from sharding.readers.dicom import read_dicom_file

    image, spacing, meta = read_dicom_file(str(path))
    window = meta.get("window")
    if image.ndim == 3:
        return Study(path=path, kind="dicom", image=image, spacing=tuple(spacing), window=window)
    return Study(
        path=path,
        kind="dicom",
        image=image,
        spacing=tuple(spacing),
        affine=_dicom_affine(str(path), tuple(spacing)),
        dicom_files=[str(path)],
        window=window,
    )


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Atomic JSON (indented, NaN written as null-safe strings by ``default``)."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def write_png(path: Path, labels: np.ndarray) -> Path:
    """An 8-bit label map ``[H, W]`` as PNG."""
    from PIL import Image

    def write(tmp: Path) -> None:
        Image.fromarray(labels.astype(np.uint8)).save(tmp, format="PNG")

    return atomic_write(path, write)


def write_nifti(path: Path, labels_zyx: np.ndarray, study: Study) -> Path:
    """A label volume ``[z, y, x]`` as NIfTI in the input's space (affine, spacing, orientation)."""
    import nibabel as nib

    data = np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)).astype(np.uint8)
    affine = study.affine if study.affine is not None else np.diag([*study.spacing[::-1], 1.0])
    if study.header is not None:
        header = study.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        image = nib.Nifti1Image(data, affine, header)
    else:
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    # nibabel picks the format from the name: keep the real suffix on the temporary file.
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"

    def write(tmp: Path) -> None:
        named = tmp.with_name(tmp.name + suffix)
        try:
            nib.save(image, str(named))
            os.replace(named, tmp)
        finally:
            named.unlink(missing_ok=True)

    return atomic_write(path, write)
