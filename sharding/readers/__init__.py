"""Source-format readers (nnU-Net/MSD, NIfTI+CSV, DICOM, image folders, CSV, COCO, npz).

``READERS`` maps ``bigmodel-shard build --source KIND`` to the reader class. Every class takes
``(path, **options)``, lists its options in ``OPTIONS`` and rejects unknown ones.
"""

from __future__ import annotations

from sharding.readers.coco import CocoReader
from sharding.readers.csv_manifest import CsvReader
from sharding.readers.dicom import DicomReader
from sharding.readers.images import ImageFolderReader
from sharding.readers.nifti import NiftiCsvReader
from sharding.readers.nnunet import NnUNetReader
from sharding.readers.npz import NpzReader

READERS: dict[str, type] = {
    "nnunet": NnUNetReader,
    "nifti": NiftiCsvReader,
    "dicom": DicomReader,
    "imagefolder": ImageFolderReader,
    "csv": CsvReader,
    "coco": CocoReader,
    "npz": NpzReader,
}

__all__ = [
    "READERS",
    "CocoReader",
    "CsvReader",
    "DicomReader",
    "ImageFolderReader",
    "NiftiCsvReader",
    "NnUNetReader",
    "NpzReader",
]
