"""nnU-Net v2 and Medical Segmentation Decathlon raw folders.

Layout: ``dataset.json`` (label names, channel names, file ending), ``imagesTr/CASE_0000.nii.gz``
with ``_0001``... as further channels (MSD: one 4D file per case), ``labelsTr/CASE.nii.gz``;
optionally ``imagesTs`` (+ ``labelsTs``), which become the source's own ``test`` split.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from sharding.readers._common import check_options, parse_bool, read_nifti, read_nifti_mask
from sharding.records import SourceError, SourceItem, TaskSchema, Volume

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


class NnUNetReader:
    """An nnU-Net (v2) or MSD (v1) raw dataset folder."""

    kind = "nnunet"
    OPTIONS = {
        "group_regex": "regex whose first group is the patient id within a case id "
        "(default: each case is its own patient)",
        "include_test": "true/false: add imagesTs as the test split (default: only when "
        "labelsTs exists)",
    }

    def __init__(self, path: str, **options: str) -> None:
        self.path = str(path)
        self.options = check_options(self.kind, options, self.OPTIONS)
        pattern = self.options.get("group_regex")
        try:
            self._group_re = re.compile(pattern) if pattern else None
        except re.error as err:
            raise SourceError(f"--option group_regex={pattern}", f"bad regex: {err}", "") from None

    def scan(self) -> tuple[list[SourceItem], TaskSchema]:
        """List cases with their channel files and labels; reads only ``dataset.json``."""
        root = Path(self.path)
        spec_path = root / "dataset.json"
        if not spec_path.is_file():
            raise SourceError(
                str(spec_path),
                "not found",
                "point --input at the folder holding dataset.json, imagesTr and labelsTr",
            )
        try:
            spec = json.loads(spec_path.read_text())
        except ValueError as err:
            raise SourceError(str(spec_path), f"not valid JSON: {err}", "") from None
        classes = _label_names(spec, str(spec_path))
        channels = spec.get("channel_names") or spec.get("modality") or {"0": "image"}
        channel_names = [str(channels[k]) for k in sorted(channels, key=int)]
        ending = spec.get("file_ending", ".nii.gz")
        items = self._cases(root / "imagesTr", root / "labelsTr", ending, channel_names, None)
        labels_ts = root / "labelsTs"
        include = self.options.get("include_test")
        want_test = parse_bool("include_test", include) if include else labels_ts.is_dir()
        if want_test and (root / "imagesTs").is_dir():
            items += self._cases(root / "imagesTs", labels_ts, ending, channel_names, "test")
        return items, TaskSchema(mask={"classes": classes})

    def _cases(self, images: Path, labels: Path, ending: str, channel_names, split):
        if not images.is_dir():
            raise SourceError(str(images), "folder not found", "an nnU-Net dataset needs imagesTr/")
        files = sorted(p for p in images.iterdir() if p.name.endswith(ending))
        cases: dict[str, dict[int, Path]] = {}
        for path in files:
            stem = path.name[: -len(ending)]
            m = _CHANNEL_RE.match(stem)
            case, ch = (m["case"], int(m["ch"])) if m else (stem, -1)  # -1: MSD, one 4D file
            cases.setdefault(case, {})[ch] = path
        items = []
        for case, by_channel in sorted(cases.items()):
            if -1 not in by_channel:
                for ch in range(len(channel_names)):
                    if ch not in by_channel:
                        raise SourceError(
                            str(images / f"{case}_{ch:04d}{ending}"),
                            f"channel {ch} ({channel_names[ch]}) of case {case} is missing",
                            "add it, or fix channel_names in dataset.json",
                        )
            paths = {"image": str(by_channel[min(by_channel)])}
            for ch in sorted(by_channel)[1:]:
                paths[f"image_{ch}"] = str(by_channel[ch])
            label = labels / f"{case}{ending}"
            if label.is_file():
                paths["mask"] = str(label)
            elif split is None:
                raise SourceError(
                    str(label),
                    f"label of training case {case} not found",
                    "add it, or move the case's images to imagesTs",
                )
            group = case
            if self._group_re is not None:
                m = self._group_re.search(case)
                if not m or not m.groups() or not m.group(1):
                    raise SourceError(
                        paths["image"],
                        f"missing patient id: group_regex does not match case {case!r}",
                        "fix --option group_regex (its first group is the patient id)",
                    )
                group = m.group(1)
            items.append(
                SourceItem(case, group, paths, split=split, extra={"channel_names": channel_names})
            )
        return items

    def load(self, item: SourceItem) -> Volume:
        """Read all channel files into ``[C, D, H, W]`` and the label map into ``[D, H, W]``."""
        channel_files = [item.paths["image"]] + [
            item.paths[k] for k in sorted(item.paths) if k.startswith("image_")
        ]
        arrays, spacing, meta = [], None, {}
        for file in channel_files:
            image, sp, m = read_nifti(Path(file))
            if arrays and image.shape[1:] != arrays[0].shape[1:]:
                raise SourceError(
                    file,
                    f"shape {image.shape[1:]} differs from channel 0's {arrays[0].shape[1:]}",
                    "resample all channels of a case onto one grid",
                )
            if arrays and image.dtype != arrays[0].dtype:
                image = image.astype(np.result_type(image.dtype, arrays[0].dtype))
            arrays.append(image)
            if len(arrays) == 1:  # geometry and orientation come from channel 0
                spacing, meta = sp, m
        image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        mask = read_nifti_mask(Path(item.paths["mask"])) if "mask" in item.paths else None
        names = item.extra.get("channel_names", [])
        if len(names) == image.shape[0]:
            meta["channel_names"] = names
            meta["modality"] = "+".join(names)
        return Volume(image=image, mask=mask, spacing=spacing, meta=meta)


def _label_names(spec: dict, file: str) -> list[str]:
    """Class names by index from nnU-Net v2 ``{"name": idx}`` or MSD ``{"idx": "name"}``."""
    labels = spec.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise SourceError(file, "has no 'labels' mapping", 'add e.g. {"background": 0, "organ": 1}')
    by_index: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool):
            by_index[value] = str(key)  # v2: name -> index
        elif isinstance(value, str) and str(key).isdigit():
            by_index[int(key)] = value  # MSD: "index" -> name
        else:
            raise SourceError(
                file,
                f"label {key!r}: {value!r} is not a plain class index (region-based labels "
                "are not supported)",
                "list each label as name: index",
            )
    if sorted(by_index) != list(range(len(by_index))):
        raise SourceError(file, f"label indices {sorted(by_index)} are not 0..N-1", "renumber them")
    return [by_index[i] for i in range(len(by_index))]
