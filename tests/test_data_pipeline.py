"""bigmodel.data loaders on tiny shards written here with webdataset.TarWriter (per format.py)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from bigmodel.config import Config
from bigmodel.data import (
    ManifestError,
    SampleError,
    load_manifest,
    make_eval_loader,
    make_train_loader,
    train_batches_per_epoch,
)
from bigmodel.data._augment import SampleTransform, collate
from bigmodel.data.intensity import IntensitySpec
from sharding import format as fmt

TASKS = {
    "cls": {"type": "multiclass", "classes": ["a", "b", "c"]},
    "mask": {"classes": ["background", "organ", "lesion"]},
    "boxes": {"classes": ["lesion", "nodule"]},
}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_dataset(
    root: Path,
    shard_sizes: dict[str, list[int]],
    size: int = 16,
    channels: int = 1,
    encoding: str = "npy",
    tasks: dict | None = None,
    layout: str = "2d",
    seed: int = 0,
) -> dict[str, dict]:
    """Write shards + dataset.json; return every sample's content by key (for comparisons).

    Labels are partial on purpose: every third sample has no cls, every fourth no mask, every
    fifth no boxes.
    """
    tasks = TASKS if tasks is None else tasks
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict] = {}
    splits = {}
    index = 0
    for split, sizes in shard_sizes.items():
        shards = []
        for s, count in enumerate(sizes):
            name = fmt.shard_name(split, s)
            with wds.TarWriter(str(root / name)) as sink:
                for _ in range(count):
                    key = fmt.sample_key(f"{split}_case{index:03d}", index % 7, "z")
                    sample = {"__key__": key, fmt.GROUP: f"patient{index % 5}".encode()}
                    content: dict = {"group": f"patient{index % 5}"}
                    if encoding == "npy":
                        shape = (
                            (channels, size, size) if layout != "3d" else (channels, 4, size, size)
                        )
                        image = rng.integers(-1000, 1000, size=shape, dtype=np.int16)
                        sample[fmt.IMAGE_NPY] = _npy(image)
                    else:
                        shape = (size, size) if channels == 1 else (size, size, channels)
                        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
                        sample[fmt.IMAGE_PNG] = _png(image)
                        image = image[None] if channels == 1 else image.transpose(2, 0, 1)
                    content["image"] = image
                    if "cls" in tasks and index % 3:
                        k = len(tasks["cls"]["classes"])
                        if tasks["cls"]["type"] == "multilabel":
                            vector = [int(v) for v in rng.integers(-1, 2, size=k)]
                            sample[fmt.CLS_MULTI] = json.dumps(vector).encode()
                            content["cls"] = vector
                        else:
                            content["cls"] = index % k
                            sample[fmt.CLS] = str(index % k).encode()
                    if "mask" in tasks and index % 4:
                        mask = rng.integers(0, len(tasks["mask"]["classes"]), (size, size))
                        sample[fmt.MASK_PNG] = _png(mask.astype(np.uint8))
                        content["mask"] = mask
                    if "boxes" in tasks and index % 5:
                        boxes = [[1.0, 2.0, 7.0, 9.0], [4.0, 4.0, 15.0, 12.0]][: index % 3]
                        labels = [index % 2, 1][: len(boxes)]
                        sample[fmt.BOXES] = json.dumps({"boxes": boxes, "labels": labels}).encode()
                        content["boxes"], content["labels"] = boxes, labels
                    sample[fmt.META] = json.dumps({"slice": index % 7}).encode()
                    sink.write(sample)
                    written[key] = content
                    index += 1
            shards.append({"name": name, "num_samples": count, "bytes": 0, "sha256": ""})
        splits[split] = {"num_samples": sum(sizes), "num_groups": 5, "shards": shards}
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "name": "tiny",
        "layout": layout,
        "image": {"encoding": encoding, "dtype": "int16", "channels": channels},
        "tasks": tasks,
        "stats": {"mean": [10.0] * channels, "std": [100.0] * channels},
        "splits": splits,
    }
    (root / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    return written


def make_cfg(**data) -> Config:
    """A config with the given ``data.*`` values and one head per task."""
    return Config.model_validate(
        {
            "data": {"shards": "", "image_size": 16, "batch_size": 4, "loader_workers": 0, **data},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {
                    "diag": {"type": "classification"},
                    "seg": {"type": "segmentation"},
                    "det": {"type": "detection"},
                },
            },
        }
    )


def test_eval_batches_equal_what_was_written(tmp_path):
    written = write_dataset(tmp_path, {"val": [5, 4]})
    manifest = load_manifest(tmp_path)
    cfg = make_cfg(normalize="none", loader_workers=1)
    seen = 0
    for batch in make_eval_loader(cfg, manifest, rank=0, world_size=1):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (1, 16, 16)
        assert batch["cls"].dtype == torch.int64 and batch["mask"].dtype == torch.int64
        assert set(batch["has"]) == {"cls", "mask", "boxes"}
        for i, key in enumerate(batch["key"]):
            want = written[key]
            assert torch.equal(
                batch["image"][i], torch.from_numpy(want["image"].astype(np.float32))
            )
            assert batch["group"][i] == want["group"]
            assert bool(batch["has"]["cls"][i]) == ("cls" in want)
            assert batch["cls"][i].item() == want.get("cls", -1)
            if "mask" in want:
                assert torch.equal(batch["mask"][i], torch.from_numpy(want["mask"]))
            else:
                assert (batch["mask"][i] == 255).all() and not batch["has"]["mask"][i]
            target = batch["boxes"][i]
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert target["boxes"].tolist() == want.get("boxes", [])
            assert target["labels"].tolist() == want.get("labels", [])
            assert bool(batch["has"]["boxes"][i]) == ("boxes" in want)
            seen += 1
    assert seen == len(written)


def test_normalisation_uses_manifest_stats(tmp_path):
    written = write_dataset(tmp_path, {"val": [3]})
    batch = next(iter(make_eval_loader(make_cfg(), load_manifest(tmp_path), 0, 1)))
    raw = torch.from_numpy(written[batch["key"][0]]["image"].astype(np.float32))
    assert torch.allclose(batch["image"][0], (raw - 10.0) / 100.0)


def test_png_rgb_and_multilabel(tmp_path):
    tasks = {"cls": {"type": "multilabel", "classes": ["x", "y", "z", "w"]}}
    written = write_dataset(tmp_path, {"val": [6]}, channels=3, encoding="png", tasks=tasks)
    cfg = make_cfg(normalize="none")
    batches = list(make_eval_loader(cfg, load_manifest(tmp_path), 0, 1))
    for batch in batches:
        assert set(batch) == {"image", "key", "group", "shards", "has", "cls"}
        assert batch["cls"].dtype == torch.float32 and batch["cls"].shape[1] == 4
        for i, key in enumerate(batch["key"]):
            assert torch.equal(
                batch["image"][i].to(torch.uint8), torch.from_numpy(written[key]["image"])
            )
            assert batch["cls"][i].tolist() == written[key].get("cls", [-1] * 4)


def test_eval_each_sample_exactly_once_across_ranks_and_workers(tmp_path):
    written = write_dataset(tmp_path, {"val": [7, 1, 4, 5, 2]})
    manifest = load_manifest(tmp_path)
    cfg = make_cfg(loader_workers=2, eval_batch_size=3)
    keys: Counter = Counter()
    for rank in range(2):
        loader = make_eval_loader(cfg, manifest, rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert sum(len(b["key"]) for b in batches) == loader.num_samples
        keys.update(k for b in batches for k in b["key"])
    assert keys == Counter(set(written))


def test_train_ranks_take_equal_steps_on_uneven_shards(tmp_path):
    write_dataset(tmp_path, {"train": [11, 2, 6, 1]})
    manifest = load_manifest(tmp_path)
    cfg = make_cfg(shuffle_buffer=8)
    expected = train_batches_per_epoch(cfg, manifest, world_size=2)
    assert expected == 20 // (4 * 2)
    for rank in range(2):
        loader = make_train_loader(cfg, manifest, rank, world_size=2)
        for epoch in range(2):
            assert loader.epoch == epoch
            batches = list(loader)
            assert len(batches) == len(loader) == expected
            assert all(b["image"].shape == (4, 1, 16, 16) for b in batches)
    # rank 1 owns shards 1 and 3 only (2 + 1 samples): it resamples them to keep pace
    keys = {k for b in make_train_loader(cfg, manifest, 1, 2) for k in b["key"]}
    assert keys <= {k for k in _shard_keys(tmp_path, [1, 3])}


def _shard_keys(root: Path, indices: list[int]) -> set[str]:
    keys = set()
    for i in indices:
        for sample in wds.WebDataset(str(root / fmt.shard_name("train", i)), shardshuffle=False):
            keys.add(sample["__key__"])
    return keys


def test_train_with_loader_workers_is_seeded_by_epoch(tmp_path):
    write_dataset(tmp_path, {"train": [6, 5, 7, 4]})
    manifest = load_manifest(tmp_path)
    cfg = make_cfg(loader_workers=2, shuffle_buffer=4, batch_size=2)

    def epoch_keys(epoch: int) -> list[str]:
        loader = make_train_loader(cfg, manifest, rank=0, world_size=2)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == train_batches_per_epoch(cfg, manifest, 2) == 5
        return [k for b in batches for k in b["key"]]

    first = epoch_keys(3)
    assert first == epoch_keys(3)
    assert first != epoch_keys(4)


def test_too_few_shards_fails_fast_with_the_fix(tmp_path):
    write_dataset(tmp_path, {"train": [4, 4, 4]})
    manifest = load_manifest(tmp_path)
    with pytest.raises(
        ManifestError, match=r"3 shard\(s\).*2 rank\(s\) x 2 loader.*loader_workers=1"
    ):
        make_train_loader(make_cfg(loader_workers=2), manifest, 0, world_size=2)
    make_train_loader(make_cfg(loader_workers=1), manifest, 0, world_size=2)  # 3 >= 2: fine


def test_3d_samples_are_refused(tmp_path):
    write_dataset(tmp_path / "a", {"val": [2]}, layout="3d")
    with pytest.raises(ManifestError, match="3d"):
        make_eval_loader(make_cfg(), load_manifest(tmp_path / "a"), 0, 1)
    # a 3D array inside a shard whose manifest claims 2D is named with shard and key
    write_dataset(tmp_path / "b", {"val": [2]}, layout="3d")
    raw = json.loads((tmp_path / "b" / "dataset.json").read_text())
    raw["layout"] = "2d"
    (tmp_path / "b" / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(SampleError, match=r"val-000000.tar sample .*3D volume.*--layout 2d"):
        list(make_eval_loader(make_cfg(), load_manifest(tmp_path / "b"), 0, 1))


def _bbox(region: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(region, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("seed", range(12))
def test_masks_and_boxes_follow_flips_and_crops(seed):
    """A bright rectangle, its mask and its box must still coincide after augmentation."""
    torch.manual_seed(seed)
    image = torch.zeros(1, 40, 48)
    mask = torch.zeros(40, 48, dtype=torch.int64)
    x1, y1, x2, y2 = 5 + seed, 8, 30, 21 + seed
    image[:, y1:y2, x1:x2] = 1.0
    mask[y1:y2, x1:x2] = 2
    from bigmodel.config import AugmentConfig

    augment = AugmentConfig(hflip=0.5, vflip=0.5, random_crop=True, intensity_jitter=0.0)
    transform = SampleTransform(24, intensity=None, augment=augment, boxes=True)
    sample = {
        "image": image,
        "mask": mask,
        "boxes": torch.tensor([[x1, y1, x2, y2], [0.0, 0.0, 2.0, 2.0]]),
        "labels": torch.tensor([1, 0]),
        "has": {"mask": True, "boxes": True},
    }
    out = transform(sample)
    assert out["image"].shape == (1, 24, 24) and out["mask"].shape == (24, 24)
    visible = out["mask"] == 2
    assert torch.equal(visible, out["image"][0] == 1.0)
    rect = out["labels"] == 1
    if visible.any():
        assert rect.sum() == 1
        assert out["boxes"][rect][0].tolist() == _bbox(visible)
    else:
        assert rect.sum() == 0  # cropped away: the box is dropped with its label
    corner = out["labels"] == 0  # the 2x2 corner box survives only if fully in view
    assert corner.sum() <= 1 and len(out["boxes"]) == len(out["labels"])


def test_eval_keeps_whole_images_and_collate_pads_bottom_right():
    """Evaluation crops nothing; a batch of different sizes is padded (mask: ignore)."""
    spec = IntensitySpec("dataset", mean=(1.0,), std=(2.0,))
    transform = SampleTransform(20, intensity=spec, augment=None, boxes=True)
    samples = []
    for height, width in ((10, 30), (24, 12)):
        sample = {
            "image": torch.full((1, height, width), 5.0),
            "mask": torch.ones(height, width, dtype=torch.int64),
            "boxes": torch.tensor([[0.0, 0.0, float(width), float(height)]]),
            "labels": torch.tensor([0]),
            "key": f"k{height}",
            "group": "g",
            "has": {"mask": True, "boxes": True},
        }
        samples.append(transform(sample))
    assert samples[0]["image"].shape == (1, 10, 30)  # larger than image_size: not cropped
    assert (samples[0]["image"] == 2.0).all()
    batch = collate(samples)
    assert batch["image"].shape == (2, 1, 24, 30) and batch["mask"].shape == (2, 24, 30)
    assert (batch["mask"][0, 10:] == 255).all() and (batch["mask"][1, :, 12:] == 255).all()
    assert (batch["image"][0, 0, 10:] == 0).all() and (batch["mask"][0, :10] == 1).all()
    assert batch["boxes"][0]["boxes"].tolist() == [[0.0, 0.0, 30.0, 10.0]]


def test_resize_fit_keeps_aspect_pads_and_scales_boxes():
    transform = SampleTransform(20, intensity=None, augment=None, boxes=True, resize="fit")
    sample = {
        "image": torch.ones(1, 20, 40),
        "mask": torch.ones(20, 40, dtype=torch.int64),
        "boxes": torch.tensor([[0.0, 0.0, 40.0, 20.0]]),
        "labels": torch.tensor([0]),
    }
    out = transform(sample)
    assert out["image"].shape == (1, 20, 20)
    assert (out["mask"][:5] == 255).all() and (out["mask"][5:15] == 1).all()
    assert out["boxes"].tolist() == [[0.0, 5.0, 20.0, 15.0]]
    too_far = SampleTransform(20, intensity=None, augment=None, resize="fit", resize_tolerance=1.5)
    with pytest.raises(ValueError, match=r"changing its spacing 2.00x.*resize_tolerance=1.5"):
        too_far({"image": torch.ones(1, 20, 40)})


def test_persistent_workers_follow_the_epoch(tmp_path):
    """Epoch 1 of a loader whose workers survived epoch 0 equals a fresh loader set to epoch 1."""
    write_dataset(tmp_path, {"train": [6, 5, 7, 4]})
    manifest = load_manifest(tmp_path)
    cfg = make_cfg(loader_workers=2, shuffle_buffer=4, batch_size=2)
    loader = make_train_loader(cfg, manifest, rank=1, world_size=2)
    first, second = ([k for b in loader for k in b["key"]] for _ in range(2))
    fresh = make_train_loader(cfg, manifest, rank=1, world_size=2)
    fresh.set_epoch(1)
    assert first != second == [k for b in fresh for k in b["key"]]


def test_rank_without_eval_shard_yields_nothing(tmp_path):
    written = write_dataset(tmp_path, {"val": [3, 2]})
    manifest = load_manifest(tmp_path)
    counts = []
    for rank in range(3):
        loader = make_eval_loader(make_cfg(loader_workers=2), manifest, rank, world_size=3)
        counts.append((len(loader), loader.num_samples, sum(len(b["key"]) for b in loader)))
    assert counts == [(1, 3, 3), (1, 2, 2), (0, 0, 0)]
    assert sum(c[2] for c in counts) == len(written)


def test_empty_split_evaluates_to_nothing(tmp_path):
    write_dataset(tmp_path, {"train": [2], "val": []})
    loader = make_eval_loader(make_cfg(loader_workers=2), load_manifest(tmp_path), 0, 1)
    assert (len(loader), loader.num_samples, list(loader)) == (0, 0, [])
