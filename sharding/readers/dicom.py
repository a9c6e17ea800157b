"""DICOM series folders -> one item per series, pixels in HU (CT), nothing identifying kept.

The folder tree may be laid out any way (PACS exports nest by patient/study/series, often with
names in the folder names): files are grouped by SeriesInstanceUID read from their headers.
Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
the ImageOrientationPatient direction cosines), falling back to InstanceNumber.

Privacy. No identifying value leaves this module: ``meta`` holds only modality, spacing,
orientation, window, body part and pixel-interpretation fields taken from a fixed list;
``group`` is a keyed hash (HMAC-SHA256) of PatientID and ``source_id`` one of SeriesInstanceUID.

Why the salt is required (no generated default): the pseudonyms must be the same on every
build of a dataset (a rerun resumes, data added later keeps its patients' splits, two datasets
built with the same salt can be checked for shared patients), so a random per-run salt would
break resume and splits; and a fixed built-in salt would let anyone with a list of candidate
PatientIDs (often short hospital numbers) recompute the hashes. So the data owner keeps one
secret salt per dataset and passes it as ``salt_file=`` or in the environment variable
``BIGMODEL_SHARD_SALT``. There is deliberately no ``salt=VALUE`` option: the builder records its
command line in ``dataset.json`` (and shells keep history), so a salt given there would be
published with the shards. Only a short fingerprint of the salt is written
(``meta["group_salt_id"]``) so builds can be compared.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from sharding import format as fmt
from sharding.readers._common import (
    check_options,
    keyed_hash,
    label_columns,
    read_csv_rows,
    resolve,
)
from sharding.records import SourceError, SourceItem, TaskSchema, Volume

SALT_ENV = "BIGMODEL_SHARD_SALT"
MIN_SALT_CHARS = 16

# (center, width) in HU; the common radiology presets. Pixels stay raw HU: the window is metadata
# that display and intensity normalisation (bigmodel.data.intensity) use.
WINDOWS = fmt.CT_WINDOWS

# header tags read during scan (no pixels)
_SCAN_TAGS = [
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "PatientID",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SamplesPerPixel",
]

_GEN_SALT = "python -c 'import secrets; print(secrets.token_hex(16))' > salt.txt"


class DicomReader:
    """A folder tree of DICOM files, one item per series (2D files give ``[C, H, W]``)."""

    kind = "dicom"
    OPTIONS = {
        "salt_file": f"file holding the secret salt (>= {MIN_SALT_CHARS} chars) for the patient "
        f"and series pseudonyms; default: the environment variable {SALT_ENV}",
        "window": "lung|mediastinum|brain|bone|abdomen|none|auto (auto: the file's own window)",
        "labels": "CSV: one of patient_id|group|series_uid|source_id, and label or labels",
    }

    def __init__(self, path: str, **options: str) -> None:
        opts = check_options(self.kind, options, self.OPTIONS)
        self.path = path
        """The source as given (the builder records it in the manifest)."""
        self.root = Path(path)
        self.window = opts.get("window", "auto").lower()
        if self.window not in (*WINDOWS, "none", "auto"):
            raise SourceError(
                f"--option window={self.window}",
                "unknown window preset",
                f"use one of {', '.join([*WINDOWS, 'none', 'auto'])}",
            )
        self.labels = opts.get("labels")
        self._salt = _read_salt(opts)
        self.salt_id = hashlib.sha256(f"bigmodel-salt-id:{self._salt}".encode()).hexdigest()[:8]

    def __repr__(self) -> str:  # never show the salt
        return f"DicomReader({str(self.root)!r}, window={self.window!r})"

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """Read headers only, group by series, order slices, derive spacing."""
        if not self.root.exists():
            raise SourceError(str(self.root), "DICOM folder not found", "check the path")
        files = [self.root] if self.root.is_file() else sorted(self.root.rglob("*"))
        by_series: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
        for f in files:
            if not f.is_file() or f.name.startswith("."):
                continue
            try:
                ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_SCAN_TAGS)
            except (InvalidDicomError, EOFError):
                continue  # not DICOM (README, checksums...): ignored
            except Exception as err:
                raise SourceError(
                    str(f), f"unreadable DICOM header: {err}", "remove or re-export it"
                ) from None
            if "Rows" not in ds or not ds.get("SeriesInstanceUID"):
                continue  # DICOMDIR, structured reports, presentation states: no image
            by_series[str(ds.SeriesInstanceUID)].append((f, ds))
        if not by_series:
            raise SourceError(
                str(self.root),
                "no DICOM image files found",
                "point --input at the folder holding the series",
            )
        items = []
        for uid, members in sorted(by_series.items()):
            items.extend(self._series_items(uid, members))
        items.sort(key=lambda it: it.source_id)
        schema = TaskSchema()
        if self.labels:
            schema.cls = self._apply_labels(items)
        return items, schema

    def _series_items(self, uid: str, members: list[tuple[Path, Any]]) -> list[SourceItem]:
        first_file = members[0][0]
        pids = {str(ds.get("PatientID", "")).strip() for _, ds in members}
        if "" in pids:
            bad = next(f for f, ds in members if not str(ds.get("PatientID", "")).strip())
            raise SourceError(
                str(bad),
                "no PatientID (0010,0020): patient-level splits need one",
                "fill in PatientID",
            )
        if len(pids) > 1:
            raise SourceError(
                str(first_file),
                f"series shares its SeriesInstanceUID with {len(pids)} different PatientIDs",
                "re-export the series; UIDs must be unique",
            )
        group = "p" + keyed_hash(self._salt, "patient", pids.pop())
        multi = [(f, ds) for f, ds in members if int(ds.get("NumberOfFrames", 1) or 1) > 1]
        if multi and len(members) > 1:
            # several multi-frame files in one series (cine loops, ...): one item per file
            return [
                self._item(uid + "/" + str(ds.get("SOPInstanceUID", f.name)), group, [(f, ds)])
                for f, ds in members
            ]
        return [self._item(uid, group, members)]

    def _item(self, uid: str, group: str, members: list[tuple[Path, Any]]) -> SourceItem:
        shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in members}
        if len(shapes) > 1:
            raise SourceError(
                str(members[0][0]),
                f"series mixes image sizes {sorted(shapes)} (a localizer in the series?)",
                "remove the odd files from the folder",
            )
        ordered, order, slice_spacing = _order_slices(members)
        first = ordered[0][1]
        row, col = _pixel_spacing(first)
        extra = {
            "files": [str(f) for f, _ in ordered],
            "slice_order": order,
            "slice_spacing": slice_spacing,
            "pixel_spacing": [row, col],
        }
        if len(members) == 1 and int(first.get("NumberOfFrames", 1) or 1) > 1:
            extra.update(_frame_geometry(members[0][0]))
        return SourceItem(
            source_id="s" + keyed_hash(self._salt, "series", uid, 16),
            group=group,
            # paths stays empty on purpose: the builder writes item paths into meta.json and the
            # manifest's skipped list, and PACS export folders are often named after patients
            paths={},
            extra=extra,
        )

    def _apply_labels(self, items: list[SourceItem]) -> dict[str, Any]:
        path = resolve(Path.cwd(), self.labels)
        rows = read_csv_rows(path)
        keys = [k for k in ("patient_id", "group", "series_uid", "source_id") if k in rows[0]]
        if len(keys) != 1:
            raise SourceError(
                str(path),
                f"need exactly one id column of patient_id, group, series_uid, source_id; found {keys}",
                "keep one id column",
            )
        key = keys[0]
        task, values = label_columns(rows, str(path))
        by_id: dict[str, Any] = {}
        for row, value in zip(rows, values, strict=True):
            ident = row[key]
            if key == "patient_id":
                ident = "p" + keyed_hash(self._salt, "patient", ident)
            elif key == "series_uid":
                ident = "s" + keyed_hash(self._salt, "series", ident, 16)
            by_id[ident] = value
        field = "group" if key in ("patient_id", "group") else "source_id"
        matched = 0
        for it in items:
            ident = getattr(it, field)
            if ident in by_id:
                it.cls = by_id[ident]
                matched += 1
        if not matched:
            raise SourceError(
                str(path),
                f"no row matches any series by {key}",
                "check the id column (hashed ids need the same salt as this build)",
            )
        return task

    def load(self, item: SourceItem) -> Volume:
        """Read the series' pixels, apply the modality LUT (rescale -> HU), stack in order."""
        files = item.extra["files"]
        planes = []
        integral = True
        first = None
        for k, f in enumerate(files):
            try:
                ds = pydicom.dcmread(f)
                raw = ds.pixel_array
            except Exception as err:
                # named by pseudonym and slice, not path: this error may land in the manifest
                raise SourceError(
                    f"series {item.source_id} slice {k + 1}/{len(files)}",
                    f"unreadable DICOM pixels: {type(err).__name__}: {err}",
                    f"list its files with `python -m sharding.readers.dicom DIR {item.source_id}` "
                    f"(salt from ${SALT_ENV}), re-export or remove it, or use --skip-bad",
                ) from None
            if first is None:
                first = ds
            values, exact = _modality_values(ds, raw)
            integral &= exact
            planes.append(values)
        data = np.concatenate(planes, axis=0)
        if item.extra.get("frame_order"):
            data = data[item.extra["frame_order"]]
        data = _exact_dtype(data, integral)
        image = np.ascontiguousarray(data.transpose(3, 0, 1, 2))  # [C, D, H, W]
        row, col = item.extra["pixel_spacing"]
        if image.shape[1] == 1:
            image = image[:, 0]
            spacing: tuple[float, ...] = (row, col)
        else:
            dz = item.extra["slice_spacing"] or _header_slice_spacing(first)
            spacing = (dz, row, col)
        return Volume(image=image, spacing=spacing, meta=self._meta(first, item, spacing))

    def _meta(self, ds: Any, item: SourceItem, spacing: tuple[float, ...]) -> dict[str, Any]:
        modality = str(ds.get("Modality", "OT"))
        meta: dict[str, Any] = {
            "source": item.source_id,
            "modality": modality,
            "spacing": [float(s) for s in spacing],
            "slice_order": item.extra["slice_order"],
            "group_hash": "hmac-sha256(PatientID)",
            "group_salt_id": self.salt_id,
        }
        iop = ds.get("ImageOrientationPatient") or item.extra.get("orientation")
        if iop is not None and len(iop) == 6:
            r, c = np.array(iop[:3], float), np.array(iop[3:], float)
            meta["orientation"] = {
                "row": r.round(6).tolist(),
                "col": c.round(6).tolist(),
                "normal": np.cross(r, c).round(6).tolist(),
            }
        if ds.get("BodyPartExamined"):
            meta["body_part"] = str(ds.BodyPartExamined)
        meta["photometric"] = str(ds.get("PhotometricInterpretation", ""))
        if meta["photometric"] == "MONOCHROME1":
            meta["inverted"] = True  # stored as MONOCHROME2 (see _modality_values)
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            meta["units"] = "HU" if modality == "CT" else str(ds.get("RescaleType", "") or "")
        meta["window"] = _window(ds, self.window, modality)
        return meta


def _modality_values(ds: Any, raw: np.ndarray) -> tuple[np.ndarray, bool]:
    """Pixels through the modality LUT (rescale slope/intercept) as ``[F, H, W, S]``; whole numbers?"""
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        # inverted grey scale (CR/DX): flip over the stored bit range, the same for every image
        # of a bit depth (not per-image min/max), so that brighter means denser everywhere
        bits = int(ds.get("BitsStored", raw.dtype.itemsize * 8))
        if int(ds.get("PixelRepresentation", 0)):
            raw = -raw.astype(np.int64) - 1
        else:
            raw = (2**bits - 1) - raw.astype(np.int64)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rescale = [_functional(ds, i, "PixelValueTransformationSequence") for i in range(frames)]
    if frames > 1 and "RescaleSlope" not in ds and all(rescale):
        # enhanced multi-frame: rescale lives in the (per-frame or shared) functional groups
        slope = np.array([float(r.RescaleSlope) for r in rescale]).reshape(
            -1, *[1] * (raw.ndim - 1)
        )
        inter = np.array([float(r.RescaleIntercept) for r in rescale]).reshape(slope.shape)
        values = raw * slope + inter
    else:
        values = apply_modality_lut(raw, ds)
    exact = bool(np.all(np.mod(values, 1) == 0))
    if frames == 1:
        values = values[None]
    if int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        values = values[..., None]
    return values, exact


def read_dicom_file(path: str) -> tuple[np.ndarray, tuple[float, ...], dict[str, Any]]:
    """One DICOM file (as listed in a CSV manifest): ``[C, H, W]`` or ``[C, F, H, W]``, spacing, meta.

    The meta is the same non-identifying subset the series reader writes.
    """
    try:
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array
    except FileNotFoundError:
        raise SourceError(path, "file not found", "check the path in the source") from None
    except Exception as err:
        raise SourceError(
            path,
            f"unreadable DICOM: {type(err).__name__}: {err}",
            "re-export it, or use --skip-bad",
        ) from None
    values, exact = _modality_values(ds, raw)
    image = np.ascontiguousarray(_exact_dtype(values, exact).transpose(3, 0, 1, 2))
    spacing: tuple[float, ...] = _pixel_spacing(ds)
    if image.shape[1] == 1:
        image = image[:, 0]
    else:
        spacing = (_header_slice_spacing(ds), *spacing)
    meta = {
        "modality": str(ds.get("Modality", "OT")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
    }
    if ds.get("BodyPartExamined"):
        meta["body_part"] = str(ds.BodyPartExamined)
    meta["window"] = _window(ds, "auto", meta["modality"])
    return image, spacing, meta


def _read_salt(opts: dict[str, str]) -> str:
    if "salt_file" in opts:
        p = Path(opts["salt_file"]).expanduser()
        if not p.is_file():
            raise SourceError(str(p), "salt file not found", f"create one: {_GEN_SALT}")
        salt = p.read_text().strip()
    else:
        salt = os.environ.get(SALT_ENV, "")
    if not salt:
        raise SourceError(
            "--option salt_file",
            "DICOM needs a secret salt to pseudonymise patient ids",
            f"create one with {_GEN_SALT}, keep it private, pass --option salt_file=salt.txt "
            f"(or set {SALT_ENV}) "
            "and reuse it for every build of this dataset",
        )
    if len(salt) < MIN_SALT_CHARS:
        raise SourceError(
            "--option salt_file",
            f"salt shorter than {MIN_SALT_CHARS} characters",
            f"use {_GEN_SALT}",
        )
    return salt


def _pixel_spacing(ds: Any) -> tuple[float, float]:
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if ps is None or len(ps) != 2:
        return (1.0, 1.0)
    return (float(ps[0]), float(ps[1]))


def _header_slice_spacing(ds: Any) -> float:
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        v = ds.get(tag)
        if v not in (None, ""):
            return abs(float(v))
    return 1.0


def _order_slices(
    members: list[tuple[Path, Any]],
) -> tuple[list[tuple[Path, Any]], str, float | None]:
    """Order slices by position along the normal; return (ordered, method, slice spacing)."""
    if len(members) == 1:
        return members, "single", None
    have_geometry = all(
        ds.get("ImagePositionPatient") is not None and ds.get("ImageOrientationPatient") is not None
        for _, ds in members
    )
    if have_geometry:
        iop = np.array(members[0][1].ImageOrientationPatient, float)
        if all(
            np.allclose(np.array(ds.ImageOrientationPatient, float), iop, atol=1e-4)
            for _, ds in members
        ):
            normal = np.cross(iop[:3], iop[3:])
            pos = [
                float(np.dot(np.array(ds.ImagePositionPatient, float), normal)) for _, ds in members
            ]
            order = np.argsort(pos, kind="stable")
            ordered = [members[i] for i in order]
            steps = np.diff(np.sort(pos))
            if np.any(steps < 1e-4):
                i = int(np.argmin(steps))
                raise SourceError(
                    str(ordered[i + 1][0]),
                    "two slices of the series sit at the same position (several echoes or phases?)",
                    "split the series so each holds one image per position",
                )
            return ordered, "position", float(np.median(steps))
    if all(ds.get("InstanceNumber") is not None for _, ds in members):
        ordered = sorted(members, key=lambda m: int(m[1].InstanceNumber))
        return ordered, "instance_number", None
    return sorted(members, key=lambda m: m[0].name), "file_name", None


def _functional(ds: Any, frame: int, sequence: str) -> Any:
    """First item of a functional-group ``sequence`` for ``frame`` (per-frame, else shared)."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        seq = ds.get(groups)
        if seq and index < len(seq) and seq[index].get(sequence):
            return seq[index].get(sequence)[0]
    return None


def _frame_geometry(path: Path) -> dict[str, Any]:
    """Frame order and spacing of an enhanced multi-frame file, from its functional groups."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(ds.NumberOfFrames)
    out: dict[str, Any] = {}
    measures = _functional(ds, 0, "PixelMeasuresSequence")
    if measures is not None and measures.get("PixelSpacing"):
        out["pixel_spacing"] = [float(v) for v in measures.PixelSpacing]
    plane = _functional(ds, 0, "PlaneOrientationSequence")
    positions = [_functional(ds, i, "PlanePositionSequence") for i in range(frames)]
    if plane is None or not all(p is not None and p.get("ImagePositionPatient") for p in positions):
        return out
    iop = np.array(plane.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([np.dot(np.array(p.ImagePositionPatient, float), normal) for p in positions])
    order = np.argsort(pos, kind="stable")
    steps = np.diff(pos[order])
    if np.any(steps < 1e-4):
        return out  # frames share positions (time series, echoes): keep the stored order
    out.update(
        frame_order=order.tolist(),
        slice_order="position",
        slice_spacing=float(np.median(steps)),
        orientation=iop.tolist(),
    )
    return out


def _exact_dtype(data: np.ndarray, integral: bool) -> np.ndarray:
    """int16/uint16/int32 when every value is a whole number that fits, else float32."""
    if integral and data.size:
        lo, hi = float(data.min()), float(data.max())
        for dt in (np.int16, np.uint16, np.int32):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return data.astype(dt)
    return data.astype(np.float32)


def _window(ds: Any, preset: str, modality: str) -> dict[str, Any] | None:
    if preset in WINDOWS and modality == "CT":
        center, width = WINDOWS[preset]
        return {"name": preset, "center": center, "width": width}
    if preset == "none":
        return None
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    if wc is None or ww is None:
        return None
    wc = wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc
    ww = ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww
    return {"name": "file", "center": float(wc), "width": float(ww)}


def _locate(argv: list[str] | None = None) -> None:
    """Print the files of a series given its pseudonym (error messages name only the pseudonym)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m sharding.readers.dicom", description=_locate.__doc__
    )
    parser.add_argument("folder")
    parser.add_argument("source_id", help="the series pseudonym, e.g. s0123abcd...")
    parser.add_argument("--salt-file", help=f"salt file (default: ${SALT_ENV})")
    args = parser.parse_args(argv)
    opts = {"salt_file": args.salt_file} if args.salt_file else {}
    items, _ = DicomReader(args.folder, **opts).scan()
    for it in items:
        if it.source_id == args.source_id:
            print("\n".join(it.extra["files"]))
            return
    raise SystemExit(f"{args.source_id}: no such series in {args.folder} with this salt")


if __name__ == "__main__":
    _locate()
