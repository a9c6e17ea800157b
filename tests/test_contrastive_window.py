"""Supervised-contrastive loss across accumulation steps, through the engine's ``fit``.

With ``across_accumulation`` a window of k micro-batches of b must train exactly like one batch of
k*b (plain SGD, no clipping: a gradient off by a factor would show); without it, each micro-batch
only sees its own negatives and the weights differ. The model is a small conv net with the real
``RetrievalLoss`` (pytorch-metric-learning's SupConLoss) on the model contract; GroupNorm keeps
samples independent of their batch, as the comparison needs. The data is the engine tests'
global-batch stream: optimizer step i sees the same samples whatever the accumulation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from _engine_tiny import (
    CHANNELS,
    GlobalBatchLoader,
    deterministic,
    free_port,
    set_dist_env,
    tiny_config,
)
from torch import nn

from bigmodel.config import RetrievalHeadConfig
from bigmodel.engine import LocalSession, fit
from bigmodel.tasks.losses import RetrievalLoss


class TinyRetrieval(nn.Module):
    """conv -> norm -> ReLU -> pool -> linear -> L2-normalised embedding, SupCon on ``cls``."""

    def __init__(self, across: bool, norm: str) -> None:
        super().__init__()
        layer = nn.GroupNorm(2, 8) if norm == "group" else nn.BatchNorm2d(8)
        self.features = nn.Sequential(nn.Conv2d(CHANNELS, 8, 3, padding=1), layer, nn.ReLU())
        self.project = nn.Linear(8, 16)
        cfg = RetrievalHeadConfig(embed_dim=16, temperature=0.5, across_accumulation=across)
        self.head_configs = {"emb": cfg}
        self.criteria = nn.ModuleDict({"emb": RetrievalLoss(cfg)})

    def forward(self, images: torch.Tensor, batch: dict[str, Any] | None = None) -> dict:
        embedding = F.normalize(self.project(self.features(images).mean((2, 3))), dim=1)
        out: dict[str, Any] = {"outputs": {"emb": embedding}}
        if batch is not None:
            loss = self.criteria["emb"](embedding, batch["cls"])
            loss = embedding.sum() * 0.0 if loss is None else loss
            out["losses"], out["loss"] = {"emb": loss}, loss
        return out


def _train(
    tmp: Path,
    name: str,
    batch_size: int,
    accumulation: int,
    across: bool,
    norm: str = "group",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, torch.Tensor]:
    deterministic()
    cfg = tiny_config(
        tmp,
        name,
        data={"batch_size": batch_size},
        optim={"accumulation_steps": accumulation},
        cluster={"num_workers": world_size},
    )
    torch.manual_seed(0)
    model = TinyRetrieval(across, norm)
    steps = 1 if norm == "batch" else 3
    loader = GlobalBatchLoader(
        batch_size, rank, world_size, steps * accumulation, micro=accumulation
    )
    fit(cfg, LocalSession(), model, loader)
    torch.use_deterministic_algorithms(False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_window_of_micro_batches_trains_like_one_larger_batch(tmp_path: Path):
    large = _train(tmp_path, "large", batch_size=8, accumulation=1, across=False)
    window = _train(tmp_path, "window", batch_size=4, accumulation=2, across=True)
    naive = _train(tmp_path, "naive", batch_size=4, accumulation=2, across=False)
    for key in large:
        torch.testing.assert_close(window[key], large[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.allclose(naive[k], large[k], atol=1e-5) for k in large)


def _two_ranks(rank: int, world_size: int, port: int, tmp: str) -> None:
    set_dist_env(rank, world_size, port)
    weights = _train(Path(tmp), "ranks", 2, 2, across=True, rank=rank, world_size=world_size)
    if rank == 0:
        torch.save(weights, Path(tmp) / "ranks.pt")


def test_window_across_two_ranks_trains_like_one_larger_batch(tmp_path: Path):
    """2 ranks x 2 micro-batches of 2 (DDP over gloo): the window spans ranks and micro-steps."""
    env = dict(os.environ)
    try:
        mp.spawn(_two_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    finally:
        os.environ.clear()
        os.environ.update(env)
    ranks = torch.load(tmp_path / "ranks.pt")
    large = _train(tmp_path, "large", batch_size=8, accumulation=1, across=False)
    for key in large:
        torch.testing.assert_close(ranks[key], large[key], rtol=1e-5, atol=1e-6, msg=key)


def test_embedding_pass_leaves_batch_norm_statistics_alone(tmp_path: Path):
    """One step: the statistics come from the two micro-batches' training forwards only."""
    window = _train(tmp_path, "bn-window", 4, 2, across=True, norm="batch")
    naive = _train(tmp_path, "bn-naive", 4, 2, across=False, norm="batch")
    for key in ("features.1.running_mean", "features.1.running_var"):
        torch.testing.assert_close(window[key], naive[key], rtol=0, atol=0, msg=key)
    assert int(window["features.1.num_batches_tracked"]) == 2
    assert not torch.equal(window["project.weight"], naive["project.weight"])
