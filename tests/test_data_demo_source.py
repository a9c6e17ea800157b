"""The demo's source data cannot make "diagnosis" a synonym of "patient" again.

``make demo`` once printed test accuracy 0.50 with AUROC 1.00: every slice of a lesion patient
was labelled lesion (the volume label copied onto slices) and the lesion ran through every slice,
so each class was a set of patients and the classifier memorised patients. Held-out lesion
patients then scored on the "normal" side of 0 while still ranking below the normal ones.
"""

from __future__ import annotations

import collections
import json
import tarfile

from launch._demo_data import MASK_CLASSES, write_demo_source
from sharding.build import BuildOptions, build_shards
from sharding.readers.nifti import NiftiCsvReader


def test_lesion_patients_have_normal_slices_and_labels_come_from_masks(tmp_path):
    csv_path = write_demo_source(tmp_path / "source", patients=6)
    reader = NiftiCsvReader(str(csv_path), mask_classes=",".join(MASK_CLASSES))
    options = BuildOptions(progress=False, use_source_split=True, split_ratios=(1, 0, 0))
    manifest = build_shards(reader, tmp_path / "shards", options)
    assert manifest["tasks"]["cls"]["slice_labels"] == "mask"
    lesion = manifest["tasks"]["cls"]["classes"].index("lesion")
    per_patient: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(tmp_path / "shards" / shard["name"]) as tar:
                members = {m.name: m for m in tar}
                for name, member in members.items():
                    if not name.endswith(".cls"):
                        continue
                    key = name[: -len(".cls")]
                    group = tar.extractfile(members[f"{key}.group"]).read().decode()
                    per_patient[group][int(tar.extractfile(member).read())] += 1
    lesion_patients = [g for g, c in per_patient.items() if c[lesion]]
    assert len(lesion_patients) == 3
    for group in lesion_patients:  # every lesion patient also shows normal slices
        assert per_patient[group][1 - lesion] > 0, (group, per_patient[group])
    assert json.loads((tmp_path / "shards" / "dataset.json").read_text())["splits"]
