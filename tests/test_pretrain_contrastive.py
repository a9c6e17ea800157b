"""Contrastive self-supervised pretraining (SimCLR) end to end, in process, without Ray.

The shards are unlabeled: ``bigmodel-shard build``'s NIfTI reader on nibabel's own volumes with
a CSV of image paths and patient ids only (no label, no mask column), sliced to 2D. A run with
a contrastive head trains on two views of each slice; its model folder holds
``backbone.safetensors``, which a segmentation run names in ``model.backbone.pretrained``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nibabel.testing import data_path

from bigmodel.config import (
    AugmentConfig,
    ConfigError,
    ContrastiveHeadConfig,
    config_from_dict,
)
from bigmodel.data import load_manifest, make_train_loader, resolve_config
from bigmodel.data._augment import SampleTransform, collate
from bigmodel.engine import LocalSession, train
from bigmodel.model_folder import BACKBONE_WEIGHTS, WEIGHTS, load_model
from bigmodel.models import build_model
from bigmodel.tasks.losses import ContrastiveLoss
from sharding.build import BuildOptions, build_shards
from sharding.readers import NiftiCsvReader

VOLUMES = {  # nibabel's test volumes (not resampled_anat_moved.nii: it holds NaN voxels)
    "anatomical.nii": "train",  # 25 slices of 41 x 33
    "standard.nii.gz": "train",  # 7 of 5 x 4
    "reoriented_anat_moved.nii": "val",  # 22 of 26 x 21
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Unlabeled 2D shards from ``bigmodel-shard build``'s NIfTI reader (no label column)."""
    src = tmp_path_factory.mktemp("volumes")
    (src / "vols").mkdir()
    with open(src / "labels.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["image", "patient_id", "split"])
        for i, (name, split) in enumerate(VOLUMES.items()):
            shutil.copy(Path(data_path) / name, src / "vols" / name)
            rows.writerow([f"vols/{name}", f"P{i}", split])
    out = tmp_path_factory.mktemp("shards")
    options = BuildOptions(
        layout="2d",
        dtype="float32",
        progress=False,
        use_source_split=True,
        max_shard_samples=12,
    )
    manifest = build_shards(NiftiCsvReader(str(src)), out, options)
    assert manifest["tasks"] == {}  # nothing labelled
    return out


def _config(shards: Path, out: Path, name: str = "pretrain", **train: object):
    return config_from_dict(
        {
            "name": name,
            "seed": 1,
            "data": {"shards": str(shards), "image_size": 32, "batch_size": 8},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {"ssl": {"type": "contrastive", "projection_dim": 16}},
            },
            "optim": {"name": "adamw", "lr": 0.003, "lr_scaling": "none", "weight_decay": 0.0},
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 1,
                "steps_per_epoch": 40,
                "log_every": 1,
                "eval_every": 1,
                "ema_decay": None,
                "output_dir": str(out),
                **train,
            },
        }
    )


# ------------------------------------------------------------------------------ config


def test_config_refuses_labels_and_one_view_for_a_contrastive_head(shards, tmp_path):
    cfg = _config(shards, tmp_path)
    assert cfg.data.views == 2 and "views" not in cfg.data.model_fields_set
    head = {"type": "contrastive"}
    with pytest.raises(ValueError, match="has no classes"):
        ContrastiveHeadConfig(num_classes=3)
    with pytest.raises(ValueError, match="reads no labels"):
        ContrastiveHeadConfig(target="cls")
    with pytest.raises(ValueError, match="needs both views"):
        ContrastiveLoss(ContrastiveHeadConfig())(torch.randn(5, 4))
    base = {"model": {"backbone": {"name": "test_resnet"}, "heads": {"ssl": head}}}
    with pytest.raises(ConfigError, match="data.views=2"):
        config_from_dict({**base, "data": {"views": 1}})
    seg = {"ssl": head, "seg": {"type": "segmentation"}}
    with pytest.raises(ConfigError, match="model.heads.seg's mask would not fit"):
        config_from_dict({"model": {"backbone": {"name": "test_resnet"}, "heads": seg}})
    only_seg = {"model": {"backbone": {"name": "test_resnet"}, "heads": {"s": seg["seg"]}}}
    assert config_from_dict(only_seg).data.views == 1  # every other run is untouched
    # the manifest has no task, and a contrastive head needs none
    resolved = resolve_config(cfg, load_manifest(shards))
    assert resolved.model.heads["ssl"].num_classes is None
    assert resolved.model.backbone.in_chans == 1


# ------------------------------------------------------------------------------ two views


def test_two_views_differ_but_come_from_the_same_image():
    """Sample i holds values in [10 i, 10 i + 1]: a view's pixels say which image it shows."""
    torch.manual_seed(0)
    augment = AugmentConfig(hflip=0.5, vflip=0.5, intensity_jitter=0.0)
    transform = SampleTransform(32, None, augment, views=2)
    samples = []
    for i in range(3):
        ramp = torch.linspace(0, 1, 40 * 48).reshape(1, 40, 48)
        sample = {
            "image": 10.0 * i + ramp,
            "mask": torch.zeros(40, 48, dtype=torch.long),
            "key": f"s{i}",
            "group": f"p{i}",
            "shard": "train-000000.tar",
            "has": {"mask": True},
        }
        samples.append(transform(sample))
    batch = collate(samples)
    assert batch["image"].shape == (6, 1, 32, 32)
    assert batch["key"] == ["s0", "s1", "s2"] * 2 and batch["group"] == ["p0", "p1", "p2"] * 2
    assert "mask" not in batch and "mask" not in batch["has"]  # fits neither view
    for i in range(3):
        first, second = batch["image"][i], batch["image"][i + 3]
        assert not torch.allclose(first, second)
        for view in (first, second):
            assert view.min() >= 10 * i - 1e-4 and view.max() <= 10 * i + 1 + 1e-4


def test_the_train_loader_stacks_the_views_of_unlabeled_shards(shards, tmp_path):
    cfg = resolve_config(_config(shards, tmp_path), load_manifest(shards))
    loader = make_train_loader(cfg, load_manifest(shards), rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 1, 32, 32)
    assert batch["key"][:8] == batch["key"][8:]  # row i and row i + 8: one slice's views
    assert not torch.allclose(batch["image"][:8], batch["image"][8:])


# ------------------------------------------------------------------------------ the run


def _contrastive_loss(model: torch.nn.Module, batches: list[dict]) -> float:
    """Mean loss of ``model`` (training-mode BatchNorm, no update) over fixed batches."""
    model.train()
    with torch.no_grad():
        return sum(float(model(b["image"], b)["losses"]["ssl"]) for b in batches) / len(batches)


def test_pretraining_lowers_its_loss_and_its_backbone_starts_a_segmentation_run(shards, tmp_path):
    cfg = _config(shards, tmp_path)
    figures = train(cfg, LocalSession())
    run = tmp_path / "pretrain"
    steps = {r["step"] for r in csv.DictReader((run / "metrics.csv").open())}
    assert len(steps) == 40
    assert figures["val/ssl/count"] == 22.0 and figures["val/ssl/spread"] > 0.05

    folder = run / "model"
    assert (folder / WEIGHTS).is_file() and (folder / BACKBONE_WEIGHTS).is_file()
    pretrained = load_model(folder)
    backbone = {k: v.clone() for k, v in pretrained.model.backbone.state_dict().items()}
    # the loss per step is noisy (8 samples, drawn with replacement): compare the model before
    # and after on the same batches instead
    manifest = load_manifest(shards)
    loader = iter(make_train_loader(pretrained.config, manifest, rank=0, world_size=1))
    batches = [next(loader) for _ in range(4)]
    torch.manual_seed(0)
    before = _contrastive_loss(build_model(pretrained.config.model), batches)
    after = _contrastive_loss(pretrained.model, batches)
    assert after < 0.8 * before, (before, after)

    seg_cfg = config_from_dict(
        {
            "data": {"image_size": 32},
            "model": {
                "backbone": {
                    "name": "test_resnet",
                    "in_chans": 1,
                    "pretrained": str(folder / BACKBONE_WEIGHTS),
                },
                "heads": {"seg": {"type": "segmentation", "num_classes": 3}},
            },
        }
    )
    seg = build_model(seg_cfg.model).backbone.state_dict()
    assert seg.keys() == backbone.keys()
    for key in seg:
        torch.testing.assert_close(seg[key], backbone[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------ two ranks

BATCH = 6  # samples, so 12 views


def _views():
    torch.manual_seed(0)
    projection = torch.nn.Linear(5, 4)
    inputs = torch.randn(2, BATCH, 5)  # [view, sample, feature]
    return projection, inputs


def _rank_batch(inputs: torch.Tensor, part: slice) -> torch.Tensor:
    """One rank's batch per docs/contracts.md: its samples' first views, then their second."""
    return torch.cat([inputs[0, part], inputs[1, part]])


def _ntxent_ranks(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    projection, inputs = _views()
    share = BATCH // world_size
    rows = _rank_batch(inputs, slice(rank * share, (rank + 1) * share))
    loss = ContrastiveLoss(ContrastiveHeadConfig(temperature=0.5))
    value = loss(F.normalize(projection(rows), dim=1))
    value.backward()
    grad = projection.weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does: the mean of the ranks' gradients
    if rank == 0:
        torch.save({"loss": value.detach(), "grad": grad / world_size}, out)
    dist.destroy_process_group()


def test_ntxent_on_two_ranks_equals_one_rank_with_the_double_batch(tmp_path):
    """Each rank's views are gathered with gradients: every other rank's views are negatives."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_ntxent_ranks, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    projection, inputs = _views()
    rows = _rank_batch(inputs, slice(0, BATCH))
    loss = ContrastiveLoss(ContrastiveHeadConfig(temperature=0.5))
    expected = loss(F.normalize(projection(rows), dim=1))
    expected.backward()
    torch.testing.assert_close(got["loss"], expected.detach())
    torch.testing.assert_close(got["grad"], projection.weight.grad)


def test_an_accumulation_window_gives_the_loss_of_the_whole_window():
    """Two micro-batches' views recorded, then each rerun live: the loss of all four halves,
    with the views of each micro-batch's samples still paired (ids offset per slot)."""
    from bigmodel.tasks.losses import AccumulationWindow

    projection, inputs = _views()
    cfg = ContrastiveHeadConfig(temperature=0.5, across_accumulation=True)
    loss = ContrastiveLoss(cfg)
    halves = [_rank_batch(inputs, slice(0, 3)), _rank_batch(inputs, slice(3, 6))]
    loss.window = AccumulationWindow(2)
    with torch.no_grad():
        for rows in halves:
            assert loss(F.normalize(projection(rows), dim=1)) is None  # recorded
    whole = ContrastiveLoss(cfg)(F.normalize(projection(_rank_batch(inputs, slice(0, 6))), dim=1))
    for slot, rows in enumerate(halves):
        loss.window.slot = slot
        live = loss(F.normalize(projection(rows), dim=1))
        torch.testing.assert_close(live.detach(), whole.detach())
