"""Model quality on CPU: small models trained in-process, scored with ``bigmodel.metrics``.

Two tasks, each trained from scratch with ``bigmodel.models.build_model`` and its losses:

* **digits** — scikit-learn's handwritten digits (1,797 real 8x8 scans, bundled with sklearn),
  upsampled to 32x32, one channel; a timm ResNet classifies them. Target: test accuracy >= 0.97.
* **phantoms** — generated images: a body ellipse holding up to three small lesion ellipses, with
  noise and a smooth intensity bias; one shared backbone with a segmentation head (background /
  body / lesion) and a RetinaNet head (lesion boxes). Targets: foreground Dice >= 0.9 and
  mAP@.5 >= 0.8 on held-out phantoms.

This measures model quality, not the distributed engine, so the loop is plain torch on one
process. ``--quick`` shrinks everything to a smoke run (seconds) and checks no target.

    python -m benchmarks.quality            # full run, exit status 1 when a target is missed
    python -m benchmarks.quality --quick    # smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from bigmodel.config import ModelConfig
from bigmodel.metrics import build_metrics
from bigmodel.models import build_model


@dataclass
class Row:
    """One line of the result table."""

    task: str
    metric: str
    value: float
    target: float
    wall_s: float

    @property
    def passed(self) -> bool:
        return not math.isnan(self.value) and self.value >= self.target


# --------------------------------------------------------------------------------------------
# data


def digits_split(size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """sklearn digits as ``[N, 1, size, size]`` normalised images; stratified 75/25 split."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=digits.target, random_state=seed
    )
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float
) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    return u**2 + v**2 <= 1.0


def make_phantoms(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Images ``[n, 1, size, size]``, masks ``[n, size, size]`` (0 bg, 1 body, 2 lesion), boxes.

    Each lesion is an ellipse inside the body, brighter or darker than it; its box is the tight
    box of its mask pixels (labels: 0, the one lesion class). Gaussian noise and a linear bias
    field keep plain thresholding from solving the task.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((n, 1, size, size), np.float32)
    masks = np.zeros((n, size, size), np.int64)
    boxes: list[dict] = []
    for i in range(n):
        cy, cx = rng.uniform(0.4, 0.6, 2) * size
        ry, rx = rng.uniform(0.28, 0.42, 2) * size
        body = _ellipse(yy, xx, cy, cx, ry, rx, rng.uniform(0, math.pi))
        image = np.where(body, rng.uniform(0.4, 0.6), 0.0).astype(np.float32)
        mask = body.astype(np.int64)
        lesion_boxes = []
        for _ in range(rng.integers(0, 4)):
            for _attempt in range(20):  # place the lesion inside the body, apart from others
                ly, lx = rng.uniform(0.2, 0.8, 2) * size
                lr = rng.uniform(0.09, 0.15, 2) * size
                lesion = _ellipse(yy, xx, ly, lx, lr[0], lr[1], rng.uniform(0, math.pi))
                if (body[lesion]).all() and not (mask[lesion] == 2).any() and lesion.sum() >= 12:
                    break
            else:
                continue
            image[lesion] += rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4)
            mask[lesion] = 2
            ys, xs = np.nonzero(lesion)
            lesion_boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        bias = rng.uniform(-0.15, 0.15) * (xx / size - 0.5) + rng.uniform(-0.15, 0.15) * (
            yy / size - 0.5
        )
        image = image + bias + rng.normal(0, 0.06, image.shape)
        images[i, 0], masks[i] = image, mask
        boxes.append(
            {
                "boxes": torch.tensor(lesion_boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.zeros(len(lesion_boxes), dtype=torch.long),
            }
        )
    images = (images - images.mean()) / images.std()
    return torch.from_numpy(images), torch.from_numpy(masks), boxes


# --------------------------------------------------------------------------------------------
# training and evaluation


def batches(
    n: int, batch_size: int, shuffle: bool, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches over ``n`` samples."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    yield from order.split(batch_size)


def make_batch(index: torch.Tensor, data: dict[str, Any]) -> dict[str, Any]:
    """A batch dict per docs/contracts.md from whole-dataset tensors and lists."""
    batch: dict[str, Any] = {"image": data["image"][index], "has": {}}
    for field in ("cls", "mask"):
        if field in data:
            batch[field] = data[field][index]
            batch["has"][field] = torch.ones(len(index), dtype=torch.bool)
    if "boxes" in data:
        batch["boxes"] = [data["boxes"][i] for i in index.tolist()]
        batch["has"]["boxes"] = torch.ones(len(index), dtype=torch.bool)
    return batch


def train(
    model: torch.nn.Module,
    data: dict[str, Any],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    label: str = "",
) -> None:
    """AdamW with a one-cycle schedule over ``epochs`` passes (plain loop, one process)."""
    generator = torch.Generator().manual_seed(seed)
    n = len(data["image"])
    steps = epochs * math.ceil(n / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.15
    )
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        losses = []
        for index in batches(n, batch_size, shuffle=True, generator=generator):
            batch = make_batch(index, data)
            loss = model(batch["image"], batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        elapsed = time.perf_counter() - start
        print(f"  {label} epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.3f} ({elapsed:.0f} s)")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, model_cfg: ModelConfig, data: dict[str, Any], batch_size: int
) -> dict[str, float]:
    """``bigmodel.metrics`` figures of ``model`` on ``data``."""
    metrics = build_metrics(model_cfg)
    model.eval()
    for index in batches(
        len(data["image"]), batch_size, shuffle=False, generator=torch.Generator()
    ):
        batch = make_batch(index, data)
        metrics.update(model(batch["image"])["outputs"], batch)
    return metrics.compute()


# --------------------------------------------------------------------------------------------
# the two benchmarks


# Settings of the full run (chosen to finish in a few minutes on 2 CPU cores); --quick shrinks
# the data to a handful of batches and trains one epoch.
DIGITS = {"backbone": "test_resnet", "size": 24, "epochs": 5, "batch_size": 64, "lr": 3e-3}
PHANTOMS = {
    "backbone": "test_resnet",
    "detector": "retinanet",
    "width": 32,  # decoder and detection FPN channels
    "size": 64,
    "n_train": 512,
    "n_test": 128,
    "epochs": 12,
    "batch_size": 16,
    "lr": 3e-3,
}


def bench_digits(quick: bool, seed: int) -> list[Row]:
    """Digits classification accuracy of a small timm ResNet trained from scratch."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    s = DIGITS
    x_train, y_train, x_test, y_test = digits_split(size=s["size"], seed=seed)
    if quick:
        x_train, y_train, x_test, y_test = x_train[:64], y_train[:64], x_test[:32], y_test[:32]
    model_cfg = ModelConfig.model_validate(
        {
            "backbone": {"name": s["backbone"], "in_chans": 1},
            "heads": {"digit": {"type": "classification", "num_classes": 10}},
        }
    )
    model = build_model(model_cfg)
    epochs = 1 if quick else s["epochs"]
    train(
        model, {"image": x_train, "cls": y_train}, epochs, s["batch_size"], s["lr"], seed, "digits"
    )
    figures = evaluate(model, model_cfg, {"image": x_test, "cls": y_test}, batch_size=256)
    wall = time.perf_counter() - start
    task = f"digits ({s['size']} px, {s['backbone']})"
    return [
        Row(task, "accuracy", figures["digit/accuracy"], 0.97, wall),
        Row(task, "balanced_accuracy", figures["digit/balanced_accuracy"], 0.0, wall),
    ]


def bench_phantoms(quick: bool, seed: int) -> list[Row]:
    """Segmentation Dice and detection mAP@.5 of one shared backbone with two heads."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    s = PHANTOMS
    n_train, n_test = (16, 8) if quick else (s["n_train"], s["n_test"])
    x_train, m_train, b_train = make_phantoms(n_train, s["size"], seed=seed)
    x_test, m_test, b_test = make_phantoms(n_test, s["size"], seed=seed + 1)
    model_cfg = ModelConfig.model_validate(
        {
            "backbone": {"name": s["backbone"], "in_chans": 1},
            "heads": {
                "organ": {"type": "segmentation", "num_classes": 3, "decoder_channels": s["width"]},
                "lesion": {
                    "type": "detection",
                    "num_classes": 1,
                    "detector": s["detector"],
                    "fpn_channels": s["width"],
                },
            },
        }
    )
    model = build_model(model_cfg)
    train_data = {"image": x_train, "mask": m_train, "boxes": b_train}
    epochs = 1 if quick else s["epochs"]
    train(model, train_data, epochs, s["batch_size"], s["lr"], seed, "phantoms")
    test_data = {"image": x_test, "mask": m_test, "boxes": b_test}
    figures = evaluate(model, model_cfg, test_data, batch_size=64)
    wall = time.perf_counter() - start
    task = f"phantoms ({s['size']} px, {s['detector']})"
    return [
        Row(task, "dice_mean (body, lesion)", figures["organ/dice_mean"], 0.9, wall),
        Row(task, "dice lesion", figures["organ/dice_2"], 0.0, wall),
        Row(task, "mAP@.5 lesion", figures["lesion/map_50"], 0.8, wall),
        Row(task, "mAP@[.5:.95] lesion", figures["lesion/map"], 0.0, wall),
    ]


def print_table(rows: list[Row], check: bool = True) -> None:
    """The result table: task, metric, value, target, pass (``-`` unchecked), wall time."""
    header = f"{'task':<28} {'metric':<26} {'value':>7} {'target':>7} {'pass':>5} {'wall s':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        target = f"{row.target:.2f}" if row.target > 0 else "-"
        passed = ("yes" if row.passed else "NO") if check and row.target > 0 else "-"
        print(
            f"{row.task:<28} {row.metric:<26} {row.value:7.4f} {target:>7} {passed:>5} {row.wall_s:7.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks, print the table; 1 when a score is not in [0, 1] (NaN included) or
    when a full run misses a target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; checks no target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, quick={args.quick}")
    print(f"digits: {DIGITS}\nphantoms: {PHANTOMS}", flush=True)
    rows = bench_digits(args.quick, args.seed) + bench_phantoms(args.quick, args.seed)
    print_table(rows, check=not args.quick)
    broken = [r for r in rows if not 0.0 <= r.value <= 1.0]  # NaN fails this too
    for row in broken:
        print(f"BROKEN: {row.task} {row.metric} = {row.value} (a score must lie in [0, 1])")
    if broken:
        return 1
    if args.quick:  # too short to reach a target: the smoke run checks only that scores are sane
        return 0
    return 0 if all(r.passed for r in rows if r.target > 0) else 1


if __name__ == "__main__":
    sys.exit(main())
