"""3D data through the training engine: volume shards -> patches -> a trained 3D segmentation.

The shards are built inside the test the way a user builds them: an nnU-Net folder of six
generated MR-like patients (24 x 32 x 32 volumes, a bright sphere as the label) read by the
nnU-Net reader and written by ``sharding.build.build_shards`` with ``layout="3d"``. Patches are
16^3, the model a 3-level ``resenc3d`` of 4 base channels; one thread.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bigmodel.config import ConfigError, config_from_dict
from bigmodel.data import ManifestError, load_manifest, make_eval_loader, make_train_loader
from bigmodel.data import resolve_config as resolve
from sharding.build import BuildOptions, build_shards
from sharding.readers import NnUNetReader

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (24, 32, 32)  # D, H, W of every volume
PATCH = [16, 16, 16]
RADIUS = 4.0


def _patient(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A [D, H, W] MR-like volume and its sphere label (1 inside, 0 outside)."""
    centre = [rng.uniform(RADIUS + 1, s - RADIUS - 1) for s in SHAPE]
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij"))
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    label = (distance <= RADIUS).astype(np.uint8)
    image = 100 + 20 * rng.standard_normal(SHAPE) + 150 * label
    return image.astype(np.float32), label


def write_volumes(root: Path, patients: int = 6, seed: int = 0) -> Path:
    """An nnU-Net v2 folder (``imagesTr/{case}_0000.nii.gz``, ``labelsTr``, ``dataset.json``)."""
    rng = np.random.default_rng(seed)
    affine = np.diag([1.0, 1.0, 1.5, 1.0])  # anisotropic: 1.5 mm slices
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(patients):
        image, label = _patient(rng)
        case = f"case{index:02d}"
        # NIfTI stores x, y, z; the reader gives [C, z, y, x]
        nib.save(nib.Nifti1Image(image.T, affine), root / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label.T, affine), root / "labelsTr" / f"{case}.nii.gz")
    spec = {"channel_names": {"0": "T2"}, "labels": {"background": 0, "sphere": 1}}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    source = write_volumes(tmp_path_factory.mktemp("nnunet"))
    out = tmp_path_factory.mktemp("shards3d")
    options = BuildOptions(
        layout="3d", progress=False, split_ratios=(2 / 3, 1 / 3, 0.0), max_shard_samples=2, seed=0
    )
    build_shards(NnUNetReader(str(source)), out, options)
    return out


def _config(shards: Path, out: Path | None = None, **data):
    return config_from_dict(
        {
            "name": "seg3d",
            "seed": 5,
            "data": {
                "shards": str(shards),
                "batch_size": 2,
                "loader_workers": 0,
                "shuffle_buffer": 2,
                "patch_size": PATCH,
                **data,
            },
            "model": {
                "backbone": {
                    "name": "resenc3d",
                    "spatial_dims": 3,
                    "base_channels": 4,
                    "out_indices": [0, 1, 2],
                },
                "heads": {"seg": {"type": "segmentation", "decoder_channels": 16}},
            },
            "optim": {"name": "adamw", "lr": 0.01, "lr_scaling": "none"},
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 3,
                "steps_per_epoch": 4,
                "log_every": 1,
                "eval_every": 1,
                "ema_decay": None,
                "output_dir": str(out or shards.parent),
            },
        }
    )


def _train_patches(cfg, manifest, epoch: int = 0, start_step: int = 0) -> list[dict]:
    loader = make_train_loader(resolve(cfg, manifest), manifest, 0, 1)
    loader.set_epoch(epoch, start_step)
    return list(loader)


def test_shards_hold_volumes_with_spacing_and_volume_statistics(shards: Path):
    manifest = load_manifest(shards)
    assert manifest.layout == "3d" and manifest.split("train").num_samples == 4
    cfg = resolve(_config(shards), manifest)
    [batch] = list(make_eval_loader(cfg, manifest, 0, 1))  # the two validation volumes
    assert batch["image"].shape == (2, 1, *SHAPE) and batch["mask"].shape == (2, *SHAPE)
    # MR z-scored per volume with the statistics sharding recorded: mean 0, std 1 per volume
    flat = batch["image"].flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)


def test_patches_have_the_patch_size_and_follow_the_foreground_ratio(shards: Path):
    manifest = load_manifest(shards)
    shares = {}
    for ratio in (0.0, 0.33, 1.0):
        cfg = _config(shards, foreground_ratio=ratio, samples_per_volume=8, patch_size=[8, 8, 8])
        cfg.train.steps_per_epoch = 48  # 48 batches x 2 patches, from 12 volume reads
        batches = _train_patches(cfg, manifest)
        assert len(batches) == 48
        masks = torch.cat([b["mask"] for b in batches])
        assert torch.cat([b["image"] for b in batches]).shape == (96, 1, 8, 8, 8)
        assert masks.shape == (96, 8, 8, 8) and masks.dtype == torch.int64
        assert set(masks.unique().tolist()) <= {0, 1}
        shares[ratio] = float((masks == 1).flatten(1).any(1).float().mean())
    # every patch centred on a sphere voxel holds foreground; background centres mostly miss it
    assert shares[1.0] == 1.0
    assert shares[0.0] < 0.25
    # a third on foreground, the rest on background (which sometimes reaches the sphere)
    expected = 0.33 + 0.67 * shares[0.0]
    assert abs(shares[0.33] - expected) < 0.12, shares


def test_class_aware_foreground_and_small_volumes_are_padded(shards: Path):
    manifest = load_manifest(shards)
    shares = []
    for ratio in (1.0, 0.0):  # a class drawn among those present, then a voxel of it
        cfg = _config(shards, foreground_ratio=ratio, foreground_classes=True, patch_size=[8, 8, 8])
        masks = torch.cat([b["mask"] for b in _train_patches(cfg, manifest)])
        shares.append(float((masks == 1).flatten(1).any(1).float().mean()))
    assert shares[0] == 1.0 and shares[1] < 0.5
    cfg = _config(shards, patch_size=[32, 32, 32], augment3d={"affine_prob": 0.0})
    masks = torch.cat([b["mask"] for b in _train_patches(cfg, manifest)])
    assert masks.shape[1:] == (32, 32, 32)  # D 24 < 32: padded
    # the padding is ignored (255), never background: 8 of 32 slices along D
    assert float((masks == 255).float().mean()) == pytest.approx(8 / 32)


def test_same_seed_same_patches_and_a_resumed_loader_matches(shards: Path):
    manifest = load_manifest(shards)
    cfg = _config(shards)
    loader = make_train_loader(resolve(cfg, manifest), manifest, 0, 1)
    first = [list(loader) for _ in range(2)]  # epochs 0 and 1, back to back
    again = _train_patches(cfg, manifest, epoch=0)
    resumed = _train_patches(cfg, manifest, epoch=1)  # a fresh loader started at epoch 1
    for a, b in zip(first[0], again, strict=True):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        assert torch.equal(a["mask"], b["mask"])
    for a, b in zip(first[1], resumed, strict=True):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    # a new epoch draws other patches, and a mid-epoch resume draws its own, reproducibly
    assert not torch.equal(first[0][0]["image"], first[1][0]["image"])
    mid = _train_patches(cfg, manifest, epoch=1, start_step=2)
    assert len(mid) == 2
    for a, b in zip(mid, _train_patches(cfg, manifest, epoch=1, start_step=2), strict=True):
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


def test_layout_and_spatial_dims_must_agree(shards: Path, tmp_path: Path):
    manifest = load_manifest(shards)
    two_d = config_from_dict(
        {
            "data": {"shards": str(shards), "loader_workers": 0},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {"seg": {"type": "segmentation"}},
            },
        }
    )
    line = r"dataset\.json: layout is '3d' .* but model\.backbone\.spatial_dims=2 .*--layout 2d"
    with pytest.raises(ConfigError, match=line):
        resolve(two_d, manifest)
    with pytest.raises(ManifestError, match=line) as caught:
        make_train_loader(two_d, manifest, 0, 1)
    assert "\n" not in str(caught.value)
    # the reverse: 2D slices of the same volumes for a 3D backbone
    slices = tmp_path / "slices"
    build_shards(
        NnUNetReader(str(write_volumes(tmp_path / "src", patients=3))),
        slices,
        BuildOptions(layout="2d", progress=False, split_ratios=(2 / 3, 1 / 3, 0.0)),
    )
    with pytest.raises(ConfigError, match=r"layout is '2d' .*spatial_dims=3.*--layout 3d"):
        resolve(_config(slices), load_manifest(slices))
    with pytest.raises(ConfigError, match=r"data\.patch_size is unset .*spatial_dims=3"):
        resolve(_config(shards, patch_size=None), manifest)


def test_a_3d_model_trains_on_patches_and_is_evaluated_on_whole_volumes(shards, tmp_path):
    from bigmodel.engine import LocalSession, train

    cfg = _config(shards, tmp_path, foreground_ratio=0.5)
    cfg.model.backbone.channels_last = True  # NDHWC: the engine converts with channels_last_3d
    session = LocalSession()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's and torch's deprecation notes
        figures = train(cfg, session)
    rows = dict(figures)
    # whole 24 x 32 x 32 volumes through 16^3 Gaussian-blended windows: a 3D Dice per class
    assert rows["val/num_samples"] == 2.0
    assert rows["val/seg/count"] == 2 * np.prod(SHAPE)
    assert rows["val/seg/dice_1"] > 0.5
    losses = _logged(tmp_path / "seg3d", "loss/seg")
    assert len(losses) == 12 and np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    dice = _logged(tmp_path / "seg3d", "val/seg/dice_1")
    assert len(dice) == 3 and dice[-1] > dice[0]  # evaluated after every epoch, and improving
    assert (tmp_path / "seg3d" / "model" / "model.safetensors").is_file()


def _logged(run_dir: Path, name: str) -> list[float]:
    import csv

    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] == name]
    return [float(r["value"]) for r in sorted(rows, key=lambda r: int(r["step"]))]
