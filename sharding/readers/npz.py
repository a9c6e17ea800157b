"""npz arrays in the MedMNIST layout: ``{train,val,test}_images`` and ``..._labels`` in one file.

Images ``(N, H, W)`` are gray 2D, ``(N, H, W, 3)`` RGB 2D, ``(N, D, H, W)`` single-channel
volumes (MedMNIST 3D). Labels ``(N,)``/``(N, 1)`` are multi-class, ``(N, K)`` with K > 1
multi-label (0/1). The file's own splits are kept. MedMNIST carries no patient ids, so every
sample is its own group; ``meta`` says so, because its splits cannot be checked for patient
overlap.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from sharding.readers._common import check_options, image_meta, parse_list
from sharding.records import SourceError, SourceItem, TaskSchema, Volume

SPLIT_PREFIXES = ("train", "val", "test")
NO_GROUP_NOTE = "no patient ids in the source (MedMNIST layout): each sample is its own group"


class NpzReader:
    """One ``.npz`` holding images and labels per split."""

    kind = "npz"
    OPTIONS = {"classes": "comma-separated class names (default: 0..K-1)"}

    def __init__(self, path: str, **options: str) -> None:
        opts = check_options(self.kind, options, self.OPTIONS)
        self.path = Path(path)
        self.classes = parse_list(opts["classes"]) if "classes" in opts else None
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        # the decoded-array cache stays in the process that filled it (workers refill their own)
        return {**self.__dict__, "_arrays": {}}

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """Read the labels and the image arrays' headers (not their pixels)."""
        file = str(self.path)
        if not self.path.is_file():
            raise SourceError(file, "npz file not found", "check the path")
        shapes = _member_shapes(self.path)
        found = [s for s in SPLIT_PREFIXES if f"{s}_images" in shapes]
        if not found:
            raise SourceError(
                file,
                f"no train_images/val_images/test_images arrays (found {sorted(shapes)})",
                "save the arrays under MedMNIST names",
            )
        labels_by_split = {}
        with np.load(self.path, allow_pickle=False) as npz:
            for s in found:
                if f"{s}_labels" not in shapes:
                    raise SourceError(file, f"has {s}_images but no {s}_labels", "add the labels")
                lab = np.asarray(npz[f"{s}_labels"])
                n = shapes[f"{s}_images"][0]
                if lab.ndim == 1:
                    lab = lab[:, None]
                if lab.ndim != 2 or lab.shape[0] != n:
                    raise SourceError(
                        file, f"{s}_labels has shape {lab.shape}, expected ({n}, 1) or ({n}, K)", ""
                    )
                labels_by_split[s] = lab
        widths = {lab.shape[1] for lab in labels_by_split.values()}
        if len(widths) != 1:
            raise SourceError(file, f"label widths differ between splits: {sorted(widths)}", "")
        multilabel = widths.pop() > 1
        task = self._task(labels_by_split, multilabel, file)
        items = []
        for s in found:
            layout = _layout(shapes[f"{s}_images"], f"{file}: {s}_images")
            for i, row in enumerate(labels_by_split[s]):
                sid = f"{s}_{i:06d}"
                cls = [int(v) for v in row] if multilabel else int(row[0])
                items.append(
                    SourceItem(
                        source_id=sid,
                        group=sid,
                        paths={"image": file},
                        cls=cls,
                        split=s,
                        extra={"array": f"{s}_images", "index": i, "layout": layout},
                    )
                )
        return items, TaskSchema(cls=task)

    def _task(self, labels: dict[str, np.ndarray], multilabel: bool, file: str) -> dict[str, Any]:
        every = np.concatenate(list(labels.values()))
        if multilabel:
            if not np.isin(every, (0, 1, -1)).all():
                raise SourceError(file, "multi-label labels must be 0, 1 (or -1 unknown)", "")
            k = every.shape[1]
        else:
            if every.min() < 0:
                raise SourceError(file, f"negative class index {every.min()}", "")
            k = int(every.max()) + 1
        classes = self.classes or [str(i) for i in range(k)]
        if (multilabel and len(classes) != k) or len(classes) < k:
            raise SourceError(
                "--option classes",
                f"{len(classes)} names for {k} classes in {file}",
                "name every class, in index order",
            )
        return {"type": "multilabel" if multilabel else "multiclass", "classes": classes}

    def load(self, item: SourceItem) -> Volume:
        """One sample of the split's array (memory-mapped, or decoded once per process)."""
        name = item.extra["array"]
        if name not in self._arrays:
            self._arrays[name] = _open_member(self.path, name)
        arr = self._arrays[name][item.extra["index"]]
        layout = item.extra["layout"]
        if layout == "hwc":
            image = np.ascontiguousarray(arr.transpose(2, 0, 1))
        else:  # "hw" -> [1, H, W]; "dhw" -> [1, D, H, W]
            image = np.ascontiguousarray(arr[None])
        meta = {**image_meta(image), "group_note": NO_GROUP_NOTE}
        return Volume(image=image, meta=meta)


def _member_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Array shapes of an npz read from the .npy headers inside the zip (no decompression)."""
    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    shape, _, _ = _npy_header(f)
                shapes[info.filename[: -len(".npy")]] = shape
    except (zipfile.BadZipFile, ValueError, OSError) as err:
        raise SourceError(
            str(path), f"not a readable .npz: {err}", "re-save it with numpy.savez"
        ) from None
    return shapes


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from an open ``.npy`` stream (left just past the header)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _open_member(path: Path, name: str) -> np.ndarray:
    """The array ``name``: memory-mapped when stored uncompressed, else decompressed in full.

    ``np.load`` on an npz always decompresses a whole member; mapping a stored (``np.savez``)
    member instead lets every worker read only its samples and share the page cache.
    """
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with zf.open(info) as f:
                shape, fortran, dtype = _npy_header(f)
                header_len = f.tell()
            with path.open("rb") as raw:  # the member's local header precedes its data
                raw.seek(info.header_offset + 26)
                name_len, extra_len = np.frombuffer(raw.read(4), "<u2")
            start = info.header_offset + 30 + int(name_len) + int(extra_len) + header_len
            if not dtype.hasobject:
                order = "F" if fortran else "C"
                return np.memmap(path, dtype, "r", offset=start, shape=shape, order=order)
    with np.load(path, allow_pickle=False) as npz:
        return npz[name]


def _layout(shape: tuple[int, ...], where: str) -> str:
    if len(shape) == 3:
        return "hw"
    if len(shape) == 4 and shape[-1] == 3:
        return "hwc"
    if len(shape) == 4:
        return "dhw"
    raise SourceError(
        where, f"image array shape {shape}", "use (N, H, W), (N, H, W, 3) or (N, D, H, W)"
    )
