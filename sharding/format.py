"""The shard format: sample keys, file names inside a sample, and the ``dataset.json`` schema.

This module is the contract between ``sharding/`` (the writer) and ``bigmodel/data`` (the
reader). It imports nothing heavy so that both sides can use it.

A shard is a POSIX tar named ``{split}-{index:06d}.tar``. Each sample is a group of members
sharing a key (webdataset convention: ``KEY.EXT``):

==================  ==========================================================================
member              content
==================  ==========================================================================
``image.npy``       numpy array ``[C, H, W]`` (2D/2.5D) or ``[C, D, H, W]`` (3D), dtype kept
``image.png``       8-bit sources only: ``H x W`` (gray) or ``H x W x 3`` (RGB)
``cls``             ASCII integer class index (multi-class tasks)
``cls.json``        JSON list of 0/1 per class, -1 where the label is unknown (multi-label)
``mask.png``        uint8 label map ``H x W`` (2D, fewer than 256 classes)
``mask.npy``        integer label map ``[H, W]`` or ``[D, H, W]``
``boxes.json``      ``{"boxes": [[x1, y1, x2, y2], ...], "labels": [int, ...]}`` in pixels
``group``           ASCII patient id (a salted hash for DICOM); never the patient's name
``meta.json``       modality, spacing, orientation, source, slice index, axis, window
==================  ==========================================================================

A sample carries only the task members it has labels for (partial labels are normal).
"""

from __future__ import annotations

import re

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
SPLITS = ("train", "val", "test")

# member extensions (the part after ``KEY.``)
IMAGE_NPY = "image.npy"
IMAGE_PNG = "image.png"
CLS = "cls"
CLS_MULTI = "cls.json"
MASK_PNG = "mask.png"
MASK_NPY = "mask.npy"
BOXES = "boxes.json"
GROUP = "group"
META = "meta.json"

# task names in ``dataset.json["tasks"]``; each is backed by the members listed
TASK_MEMBERS = {
    "cls": (CLS, CLS_MULTI),
    "mask": (MASK_PNG, MASK_NPY),
    "boxes": (BOXES,),
}

# (center, width) in HU: the common radiology window presets. The DICOM reader records one per
# sample in meta.json ("window"); bigmodel.data.intensity clips CT to a named one or to that.
CT_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
    "abdomen": (40.0, 400.0),
}

_MR_SEQUENCES = ("MR", "T1", "T2", "FLAIR", "ADC", "DWI", "PD", "SWI", "DIFFUSION")


def default_intensity(modality: str) -> str:
    """The intensity scheme ``data.intensity=auto`` picks for a manifest's ``image.modality``.

    ``ct`` for CT, ``mr`` for MR (or MR sequence names, as nnU-Net channel names give them),
    ``dataset`` (z-score with the manifest's mean/std) for anything else or unknown.
    """
    modality = modality.upper()
    if modality == "CT":
        return "ct"
    tokens = [t for t in modality.replace(",", "+").split("+") if t]
    if tokens and all(t.startswith(_MR_SEQUENCES) for t in tokens):
        return "mr"
    return "dataset"


UNKNOWN_LABEL = -1  # in multi-label vectors
MASK_IGNORE = 255  # in label maps: not annotated

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def sample_key(source_id: str, index: int | None = None, axis: str | None = None) -> str:
    """Stable, unique sample key: the source id plus slice index (no dots; webdataset splits on them).

    ``sample_key("case_001", 42, "z") == "case_001_z0042"``.
    """
    safe = re.sub(r"[^A-Za-z0-9_\-]", "-", source_id)
    if index is None:
        return safe
    return f"{safe}_{axis or 's'}{index:04d}"


def is_valid_key(key: str) -> bool:
    """True if ``key`` can be used as a webdataset sample key."""
    return bool(_KEY_RE.match(key))


# The ``dataset.json`` schema, as an annotated example (``bigmodel-shard verify`` checks it).
MANIFEST_EXAMPLE = {
    "format_version": FORMAT_VERSION,
    "name": "my-dataset",
    "created_by": {
        "command": "bigmodel-shard build --source nnunet ...",
        "version": "0.1.0",
        "time": "2026-11-21T12:00:00Z",
    },
    "source": {"kind": "nnunet", "path": "/data/Task01"},
    "layout": "2d",  # "2d" | "2.5d" | "3d"
    "image": {
        "encoding": "npy",  # "npy" | "png"
        "dtype": "int16",
        "channels": 1,
        "channel_names": ["CT"],
        "modality": "CT",  # from the readers' meta; "" when unknown
    },
    "tasks": {
        # type "multiclass" or "multilabel"; slice_labels (2D/2.5D): "mask", "volume" or "copy"
        "cls": {"type": "multiclass", "classes": ["normal", "tumour"], "slice_labels": "mask"},
        "mask": {"classes": ["background", "liver", "tumour"]},
        "boxes": {"classes": ["lesion"]},
    },
    "stats": {  # per channel, over the train split, one pass
        "mean": [0.0],
        "std": [1.0],
        "p0_5": [-1000.0],
        "p99_5": [400.0],
        "image_size": {"min": [512, 512], "max": [512, 512]},  # spatial sides seen
        "foreground": {"mean": [60.0], "std": [40.0], "p0_5": [-80.0], "p99_5": [250.0]},
    },
    "splits": {
        "train": {
            "num_samples": 0,
            "num_groups": 0,
            "shards": [{"name": "train-000000.tar", "num_samples": 0, "bytes": 0, "sha256": "..."}],
        },
    },
    "skipped": [{"file": "imagesTr/bad_0000.nii.gz", "reason": "unreadable: ..."}],
}
