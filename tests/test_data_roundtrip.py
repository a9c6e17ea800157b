"""Round trip through the real builder: what a reader hands sharding.build comes back as batches.

The reader here is a real implementation of the ``sharding.records.Reader`` protocol over
in-memory arrays, so every task (cls, mask, boxes, partial labels, 3D volumes cut into slices)
is covered without depending on one file format; the format readers have their own tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_pipeline import make_cfg

from bigmodel.data import load_manifest, make_eval_loader, make_train_loader
from sharding import format as fmt
from sharding.build import BuildOptions, build_shards
from sharding.records import SourceItem, TaskSchema, Volume

SIZE = 24


class ArrayReader:
    """Items 0-9: 2D CT-like int16 images; items 10-11: 3D volumes of 3 slices (patients p0-p5)."""

    kind = "arrays"
    path = "memory"

    def _volume(self, index: int) -> Volume:
        rng = np.random.default_rng(index)
        depth = (3,) if index >= 10 else ()
        image = rng.integers(-1024, 3000, size=(1, *depth, SIZE, SIZE)).astype(np.int16)
        mask = None
        if index % 3:
            mask = rng.integers(0, 3, size=(*depth, SIZE, SIZE)).astype(np.uint8)
        return Volume(image=image, mask=mask, spacing=(1.0,) * (2 + len(depth)))

    def _item(self, index: int) -> SourceItem:
        boxes = None
        if index < 10 and index % 2:
            boxes = {"boxes": [[1.0, 2.0, 10.0, 12.5], [0.0, 5.0, 24.0, 24.0]], "labels": [1, 0]}
        return SourceItem(
            source_id=f"case{index:02d}",
            group=f"p{index % 6}",
            paths={"image": f"case{index:02d}.npy"},
            cls=index % 4 if index % 5 else None,
            boxes=boxes,
            extra={"index": index},
        )

    def scan(self):
        schema = TaskSchema(
            cls={"type": "multiclass", "classes": ["a", "b", "c", "d"]},
            mask={"classes": ["background", "organ", "lesion"]},
            boxes={"classes": ["lesion", "nodule"]},
        )
        return [self._item(i) for i in range(12)], schema

    def load(self, item: SourceItem) -> Volume:
        return self._volume(item.extra["index"])

    def expected(self) -> dict[str, dict]:
        """What each written sample must read back as, by sample key."""
        out = {}
        for i in range(12):
            item, volume = self._item(i), self._volume(i)
            slices = range(3) if i >= 10 else [None]
            for z in slices:
                key = fmt.sample_key(item.source_id, z, "z" if z is not None else None)
                image = volume.image if z is None else volume.image[:, z]
                mask = volume.mask if (volume.mask is None or z is None) else volume.mask[z]
                out[key] = {"image": image, "mask": mask, "cls": item.cls, "boxes": item.boxes}
        return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    # The random masks say nothing about cls classes a-d: the volume label is copied by request.
    options = BuildOptions(
        split_ratios=(0.5, 0.5, 0.0),
        max_shard_samples=3,
        progress=False,
        name="arrays",
        slice_labels="copy",
    )
    build_shards(ArrayReader(), out, options)
    return out


def test_builder_shards_read_back_exactly(built):
    manifest = load_manifest(built)
    expected = ArrayReader().expected()
    cfg = make_cfg(image_size=SIZE, normalize="none", loader_workers=2, eval_batch_size=4)
    seen = set()
    for split in ("train", "val"):
        for batch in make_eval_loader(cfg, manifest, rank=0, world_size=1, split=split):
            for i, key in enumerate(batch["key"]):
                want = expected[key]
                seen.add(key)
                assert torch.equal(
                    batch["image"][i], torch.from_numpy(want["image"].astype(np.float32))
                )
                assert batch["cls"][i].item() == (-1 if want["cls"] is None else want["cls"])
                if want["mask"] is None:
                    assert not batch["has"]["mask"][i] and (batch["mask"][i] == 255).all()
                else:
                    assert torch.equal(
                        batch["mask"][i], torch.from_numpy(want["mask"].astype(np.int64))
                    )
                target = batch["boxes"][i]
                assert bool(batch["has"]["boxes"][i]) == (want["boxes"] is not None)
                if want["boxes"] is not None:
                    assert target["boxes"].tolist() == want["boxes"]["boxes"]
                    assert target["labels"].tolist() == want["boxes"]["labels"]
                else:
                    assert target["boxes"].shape == (0, 4)
    assert seen == set(expected)


def test_builder_shards_train_and_normalise_with_their_stats(built):
    manifest = load_manifest(built)
    assert manifest.image.channels == 1 and manifest.mean is not None
    cfg = make_cfg(image_size=16, batch_size=2, shuffle_buffer=4)
    loader = make_train_loader(cfg, manifest, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) >= 1
    images = torch.cat([b["image"] for b in batches])
    assert images.shape[1:] == (1, 16, 16)
    # normalised by the train split's own statistics: roughly centred and unit-scaled
    assert abs(images.mean().item()) < 0.5 and 0.5 < images.std().item() < 1.5


def test_real_nifti_through_the_reader_reads_back_slice_by_slice(tmp_path):
    """nibabel's own test volume plus a derived mask: NIfTI+CSV reader -> shards -> batches."""
    import nibabel as nib
    import nibabel.tests

    from sharding.readers.nifti import NiftiCsvReader

    src = tmp_path / "src"
    src.mkdir()
    volume = nib.load(Path(nibabel.tests.__file__).parent / "data" / "anatomical.nii")
    data = np.asanyarray(volume.dataobj)  # x, y, z = 33, 41, 25; int16
    mask = (data > np.percentile(data, 70)).astype(np.uint8) + (data > np.percentile(data, 95))
    nib.save(volume, src / "anat.nii")
    nib.save(nib.Nifti1Image(mask, volume.affine), src / "anat_mask.nii")
    (src / "labels.csv").write_text(
        "image,mask,patient_id,label\nanat.nii,anat_mask.nii,P1,tumour\n"
    )
    reader = NiftiCsvReader(str(src / "labels.csv"), mask_classes="background,tissue,bright")
    # "tumour" names no mask class, so the label is copied onto every slice only when asked.
    options = BuildOptions(split_ratios=(1, 0, 0), progress=False, slice_labels="copy")
    build_shards(reader, tmp_path / "out", options)

    manifest = load_manifest(tmp_path / "out")
    cfg = make_cfg(image_size=41, normalize="none", eval_batch_size=8)
    seen = []
    for batch in make_eval_loader(cfg, manifest, 0, 1, split="train"):
        assert (batch["cls"] == 0).all() and batch["group"] == ["P1"] * len(batch["key"])
        for i, key in enumerate(batch["key"]):
            z = int(key.rsplit("_z", 1)[1])
            seen.append(z)
            # [H, W] = [y, x]; evaluation reads the whole 41 x 33 slice, nothing cropped
            want = torch.from_numpy(data[:, :, z].T.astype(np.float32))
            assert torch.equal(batch["image"][i, 0], want)
            assert torch.equal(batch["mask"][i], torch.from_numpy(mask[:, :, z].T.astype(np.int64)))
    assert sorted(seen) == list(range(25))
