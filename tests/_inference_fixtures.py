"""A small real model folder for the inference tests: demo NIfTI data, real shards, tiny timm model.

The folder is made the way a run makes it (``save_model`` with the resolved config and the
shards' manifest), from a model built from a config; no training is needed to test that loading,
exporting and predicting reproduce the in-memory model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigmodel.config import Config, config_from_dict
from bigmodel.data import load_manifest, resolve_config
from bigmodel.model_folder import save_model
from bigmodel.models import build_model
from launch._demo_data import MASK_CLASSES, write_demo_source
from sharding.build import BuildOptions, build_shards
from sharding.readers import NiftiCsvReader

IMAGE_SIZE = 32
"""Smaller than the 48 x 48 demo slices: whole-image inference needs sliding windows."""


def build_demo_shards(
    root: Path, layout: str = "2d", patients: int = 6, modality: str | None = None
) -> Path:
    """Demo NIfTI source (nibabel's anatomical.nii + generated volumes) -> shards."""
    csv_path = write_demo_source(root / "source", patients=patients)
    options = {"modality": modality} if modality else {}
    reader = NiftiCsvReader(str(csv_path), mask_classes=",".join(MASK_CLASSES), **options)
    out = root / f"shards_{layout.replace('.', '')}{modality or ''}"
    options = BuildOptions(
        layout=layout, context=1, use_source_split=True, max_shard_samples=16, progress=False
    )
    build_shards(reader, out, options)
    return out


def tiny_config(
    shards: Path, heads: dict | None = None, image_size: int = IMAGE_SIZE, **data
) -> Config:
    """test_resnet backbone with classification + segmentation + retrieval heads."""
    heads = heads or {
        "diagnosis": {"type": "classification", "target": "cls"},
        "organs": {"type": "segmentation", "target": "mask", "decoder_channels": 16},
        "patient": {"type": "retrieval", "target": "group", "embed_dim": 8},
    }
    raw = {
        "name": "tiny",
        "data": {"shards": str(shards), "image_size": image_size, "batch_size": 4, **data},
        "model": {"backbone": {"name": "test_resnet"}, "heads": heads},
    }
    return resolve_config(config_from_dict(raw), load_manifest(shards))


def make_model_folder(
    shards: Path,
    out: Path,
    heads: dict | None = None,
    seed: int = 0,
    image_size: int = IMAGE_SIZE,
    **data,
):
    """A model folder from an untrained (seeded) model; returns (folder, in-memory model)."""
    cfg = tiny_config(shards, heads, image_size, **data)
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    # Non-trivial BatchNorm statistics, so eval-mode behaviour is actually exercised.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    folder = save_model(model.state_dict(), cfg, out, {"x": 1.0}, shards / "dataset.json")
    return folder, model
