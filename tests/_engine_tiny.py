"""Small real pieces for the engine tests: a conv+BN model on the model contract, seeded data.

The model follows the MultiTaskModel contract (``forward(images, batch=None)`` returning
``outputs``, ``losses`` and ``loss``) with one classification head, so the engine can be tested
apart from ``bigmodel.models``. The loader is a deterministic "global batch" stream: optimizer
step ``i`` of epoch ``e`` sees the same samples whatever the world size and the accumulation
steps, each (micro-batch, rank) taking its contiguous slice, so ``2 workers x b``,
``1 worker x 2 micro-batches of b`` and ``1 worker x 2b`` see exactly the same data.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.config import ClassificationHeadConfig, Config, config_from_dict
from bigmodel.engine.session import LocalSession

CHANNELS = 3
SIZE = 16
CLASSES = 4


def _norm(kind: str, channels: int) -> nn.Module:
    # GroupNorm does not depend on the batch, so k micro-batches of b give the gradient of one
    # batch of k*b (BatchNorm normalises each micro-batch by its own statistics).
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(2, channels)


class TinyMultiTask(nn.Module):
    """conv -> norm -> ReLU -> conv -> norm -> ReLU -> pool -> linear, on the model contract."""

    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(CHANNELS, 8, 3, padding=1, bias=False),
            _norm(norm, 8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            _norm(norm, 8),
            nn.ReLU(),
        )
        self.head = nn.Linear(8, CLASSES)
        # the MultiTaskModel attribute evaluation reads (bigmodel.models.window)
        self.head_configs = {"diag": ClassificationHeadConfig(num_classes=CLASSES)}

    def forward(self, images: torch.Tensor, batch: dict[str, Any] | None = None) -> dict[str, Any]:
        logits = self.head(self.features(images).mean((2, 3)))
        out: dict[str, Any] = {"outputs": {"diag": logits}}
        if batch is not None:
            loss = F.cross_entropy(logits.float(), batch["cls"])
            if "poison" in batch:  # a NaN injected by the tests of non-finite losses; as a NaN
                loss = loss * batch["poison"].sum()  # in the forward would, it reaches the grads
            out["losses"] = {"diag": loss}
            out["loss"] = loss
        return out


def make_batch(seed: int, epoch: int, index: int, size: int) -> dict[str, Any]:
    """Global batch ``index`` of ``epoch``: the same tensors for any world size."""
    g = torch.Generator().manual_seed(hash((seed, epoch, index)) % 2**31)
    images = torch.randn(size, CHANNELS, SIZE, SIZE, generator=g)
    labels = torch.randint(0, CLASSES, (size,), generator=g)
    images = images + labels.view(-1, 1, 1, 1).float() * 0.5  # learnable signal
    keys = [f"e{epoch}_b{index}_s{i}" for i in range(size)]
    return {
        "image": images,
        "cls": labels,
        "key": keys,
        "group": keys,
        "has": {"cls": torch.ones(size, dtype=torch.bool)},
    }


class GlobalBatchLoader:
    """``batches`` micro-batches per epoch: this rank's slices of the global batches.

    Micro-batch ``i`` is slice ``(i % micro) * world_size + rank`` of global batch
    ``i // micro`` (``micro`` = accumulation steps). ``set_epoch(epoch, start_step)`` starts
    the next ``iter()`` at micro-batch ``start_step * micro`` by index, so a resumed epoch sees
    exactly the batches the uninterrupted run saw (the exact-resume tests rely on it; the real
    loader draws a fresh seeded stream instead).
    """

    def __init__(
        self,
        batch_size: int,
        rank: int,
        world_size: int,
        batches: int,
        seed: int = 0,
        poison: set[tuple[int, int]] | None = None,
        micro: int = 1,
    ) -> None:
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.batches = batches
        self.micro = micro
        self.seed = seed
        self.epoch = 0
        self.start_step = 0
        self.poison = poison or set()
        self.served = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step and start_step >= self.batches // self.micro:  # as the real TrainLoader
            raise ValueError(f"start_step={start_step} is outside the epoch")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        per_step = self.batch_size * self.world_size * self.micro
        for index in range(self.start_step * self.micro, self.batches):
            full = make_batch(self.seed, self.epoch, index // self.micro, per_step)
            part = (index % self.micro) * self.world_size + self.rank
            lo, hi = part * self.batch_size, (part + 1) * self.batch_size
            batch = {
                "image": full["image"][lo:hi],
                "cls": full["cls"][lo:hi],
                "key": full["key"][lo:hi],
                "group": full["group"][lo:hi],
                "has": {"cls": full["has"]["cls"][lo:hi]},
            }
            if (self.epoch, index) in self.poison:
                batch["poison"] = torch.tensor([float("nan")])
            self.served += 1
            yield batch
        self.epoch, self.start_step = self.epoch + 1, 0


class EvalShare:
    """Evaluation batches: sample ``i`` of ``total`` goes to rank ``i % world_size``."""

    def __init__(self, total: int, batch_size: int, rank: int, world_size: int) -> None:
        data = make_batch(123, 0, 0, total)
        mine = list(range(rank, total, world_size))
        self.items = [(data["image"][i], data["cls"][i], data["key"][i]) for i in mine]
        self.batch_size = batch_size
        self.num_samples = len(mine)

    def __len__(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.items), self.batch_size):
            part = self.items[start : start + self.batch_size]
            yield {
                "image": torch.stack([p[0] for p in part]),
                "cls": torch.stack([p[1] for p in part]),
                "key": [p[2] for p in part],
                "group": [p[2] for p in part],
                "has": {"cls": torch.ones(len(part), dtype=torch.bool)},
            }


def tiny_config(tmp: Path, name: str, **sections: dict[str, Any]) -> Config:
    """A config for the tiny model; ``sections`` are merged into the defaults."""
    data: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "data": {"batch_size": 4, "image_size": SIZE},
        "model": {
            "backbone": {"name": "test_resnet", "in_chans": CHANNELS},
            "heads": {"diag": {"type": "classification", "num_classes": CLASSES}},
        },
        "optim": {
            "name": "sgd",
            "lr": 0.1,
            "lr_scaling": "none",
            "weight_decay": 0.01,
            "grad_clip": None,
        },
        "schedule": {"name": "constant"},
        "train": {
            "epochs": 1,
            "log_every": 1,
            "eval_every": 0,
            "output_dir": str(tmp),
            "precision": "fp32",
            # every epoch checkpointed: the tests count and resume from them
            "checkpoint_interval_s": 0,
            # the engine tests check the raw weights' arithmetic; tests/test_engine_ema.py
            # covers the weight average
            "ema_decay": None,
        },
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_dist_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        DS_ACCELERATOR="cpu",
    )


def deterministic() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def run_fit(
    cfg: Config,
    rank: int,
    world_size: int,
    batches: int,
    resume_from: str | None = None,
    poison: set[tuple[int, int]] | None = None,
    eval_total: int = 0,
    norm: str = "batch",
    eval_share: tuple[int, int] | None = None,
) -> tuple[dict[str, float], LocalSession]:
    """Build the tiny model (seeded) and run the engine's ``fit`` on it.

    ``batches`` counts micro-batches per epoch (``optim.accumulation_steps`` per optimizer step).
    ``eval_share`` = (rank, world size) whose evaluation share this rank takes (default its own):
    the tests of the exactly-once check hand two ranks the same share.
    """
    from bigmodel.engine import fit
    from bigmodel.metrics import build_metrics

    torch.manual_seed(cfg.seed)
    model = TinyMultiTask(norm)
    loader = GlobalBatchLoader(
        cfg.data.batch_size,
        rank,
        world_size,
        batches,
        cfg.seed,
        poison,
        micro=cfg.optim.accumulation_steps,
    )
    session = LocalSession(resume_from=resume_from)
    evaluation = None
    metrics = None
    if eval_total:
        evaluation = EvalShare(eval_total, 3, *(eval_share or (rank, world_size)))
        metrics = build_metrics(cfg.model)
    figures = fit(cfg, session, model, loader, evaluation, metrics)
    return figures, session


def load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def logged(run_dir: Path, name: str) -> list[float]:
    """The values of one figure in ``metrics.csv``, in step order (``grad_norm``, ``lr``...)."""
    import csv

    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] == name]
    return [float(r["value"]) for r in sorted(rows, key=lambda r: int(r["step"]))]
