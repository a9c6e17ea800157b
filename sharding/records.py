"""What readers hand to the shard builder.

A reader turns one source layout (nnU-Net folder, DICOM tree, CSV, ...) into two things:

* :meth:`Reader.scan` - a cheap pass over the source that lists :class:`SourceItem` s (paths,
  labels, patient id, the source's own split) and the task schema. It reads no pixels, so it
  can validate the whole source before anything is written.
* :meth:`Reader.load` - the expensive part for one item, run in worker processes or Ray tasks:
  read the pixels and labels into a :class:`Volume`.

The builder then cuts each volume into samples (2D slices, 2.5D stacks, 3D volumes or patches)
and writes them. Everything here must be picklable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class SourceError(ValueError):
    """Bad input: the message names the file and what would fix it."""

    def __init__(self, file: str, problem: str, fix: str = "") -> None:
        self.file = file
        self.problem = problem
        self.fix = fix
        msg = f"{file}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)

    def __reduce__(self):
        # exceptions pickle as ``cls(*self.args)``; ours takes three arguments, and it must
        # cross process and Ray task boundaries intact
        return (type(self), (self.file, self.problem, self.fix))


@dataclass
class SourceItem:
    """One unit of the source (a case, a series, an image): cheap to make, cheap to pickle."""

    source_id: str
    """Stable id, unique within the dataset (case id, image stem, hashed series uid)."""
    group: str
    """Patient id used for splitting (salted hash for DICOM). Never a name."""
    paths: dict[str, str]
    """Files to read, by role: ``{"image": ..., "image_1": ..., "mask": ...}``."""
    cls: int | list[int] | None = None
    """Class index (multi-class) or 0/1/-1 vector (multi-label) if the source has one."""
    boxes: dict[str, list] | None = None
    """``{"boxes": [[x1, y1, x2, y2], ...], "labels": [...]}`` in pixels, if any."""
    split: str | None = None
    """The source's own split (``train``/``val``/``test``) when it defines one."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Reader-specific hints for :meth:`Reader.load` (never written)."""


@dataclass
class Volume:
    """Pixels and labels of one item, as loaded."""

    image: np.ndarray
    """``[C, H, W]`` for 2D sources, ``[C, D, H, W]`` for volumes; the source dtype is kept."""
    mask: np.ndarray | None = None
    """Label map ``[H, W]`` or ``[D, H, W]`` matching the image's spatial shape."""
    spacing: tuple[float, ...] | None = None
    """Voxel spacing in mm, in the same axis order as the spatial dims."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Modality, orientation, window, ... (written to ``meta.json``; no identifying data)."""


@dataclass
class TaskSchema:
    """Task names and class names, as written to ``dataset.json["tasks"]``."""

    cls: dict[str, Any] | None = None
    """``{"type": "multiclass"|"multilabel", "classes": [...]}``."""
    mask: dict[str, Any] | None = None
    """``{"classes": [...]}`` (index 0 is background)."""
    boxes: dict[str, Any] | None = None
    """``{"classes": [...]}``."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


class Reader(Protocol):
    """A source format."""

    kind: str
    """Short name used by ``bigmodel-shard build --source KIND``."""

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """List the items and the task schema; raise :class:`SourceError` on bad layout."""

    def load(self, item: SourceItem) -> Volume:
        """Read one item's pixels and labels; raise :class:`SourceError` naming the file."""
