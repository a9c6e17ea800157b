"""Engine benchmark: loop overhead and per-rank memory of DDP vs ZeRO-1/2/3, in one run.

1. Throughput: our training loop (``bigmodel.engine.fit``: the real model from
   ``bigmodel.models.build_model``, AdamW, clipping, logging, the non-finite check) against a
   minimal hand-written PyTorch loop (forward, backward, clip, step) on the same model and the
   same in-memory batches, one worker. Runs alternate (ours, hand, ours, hand, ...) so load on a
   shared machine hits both; the ratio of medians is printed. Target: >= 0.95.
2. Memory per rank at 2 ranks (gloo, CPU, fp32, Adam): bytes of parameters + gradients +
   optimizer state each rank holds right after a backward pass (before the step, when all three
   coexist), read from where each strategy keeps them (module parameters or ZeRO-3 partitions,
   ``.grad`` or ZeRO's gradient partitions, torch optimizer state and ZeRO's fp32 master
   partitions; storages counted once). Compared with the ZeRO paper's formulas written for the
   precision measured: with fp32 weights and gradients (4 bytes, the paper's 2Ψ becomes 4Ψ),
   DDP + torch AdamW keeps K=8 bytes of state (m, v) per parameter, ZeRO K=12 (DeepSpeed keeps
   an fp32 master partition even in fp32, plus m and v), N=2 ranks:
   DDP 4+4+8; ZeRO-1 4+4+12/N; ZeRO-2 4+(4+12)/N; ZeRO-3 (4+4+12)/N bytes per parameter.

Usage: ``python benchmarks/bench_engine.py [--quick]`` (``DS_ACCELERATOR=cpu`` is set here).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from bigmodel.config import Config, config_from_dict  # noqa: E402
from bigmodel.engine import LocalSession, fit  # noqa: E402
from bigmodel.engine._strategy import distribute, init_distributed  # noqa: E402
from bigmodel.models import build_model  # noqa: E402

CLASSES = 10


def _config(args: argparse.Namespace, out: str, **distributed: Any) -> Config:
    return config_from_dict(
        {
            "name": "bench",
            "data": {"batch_size": args.batch_size, "image_size": args.image_size},
            "model": {
                "backbone": {"name": args.model, "in_chans": 3},
                "heads": {"diag": {"type": "classification", "num_classes": CLASSES}},
            },
            "optim": {"name": "adamw", "lr": 1e-3, "lr_scaling": "none", "grad_clip": 1.0},
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 1,
                "log_every": 10**6,  # one figure over the whole run
                "eval_every": 0,
                "output_dir": out,
            },
            "distributed": distributed or {"strategy": "ddp"},
            "cluster": {"num_workers": 2 if distributed else 1},
        }
    )


def _batches(args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        labels = torch.randint(0, CLASSES, (args.batch_size,), generator=g)
        keys = [f"b{i}_{j}" for j in range(args.batch_size)]
        out.append(
            {
                "image": torch.randn(
                    args.batch_size, 3, args.image_size, args.image_size, generator=g
                ),
                "cls": labels,
                "key": keys,
                "group": keys,
                "has": {"cls": torch.ones(args.batch_size, dtype=torch.bool)},
            }
        )
    return out


class _MemoryLoader:
    """The same in-memory batches every epoch (the loader contract of ``fit``)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _ours(args: argparse.Namespace, batches: list[dict[str, Any]]) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = _config(args, out)
        torch.manual_seed(0)
        figures = fit(cfg, LocalSession(), build_model(cfg.model), _MemoryLoader(batches))
    return figures["samples_per_s"]


def _hand(args: argparse.Namespace, batches: list[dict[str, Any]]) -> float:
    """The minimal loop: what a person would write by hand for the same model and settings."""
    cfg = _config(args, "unused")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, foreach=False)
    start = time.perf_counter()
    for batch in batches:
        loss = model(batch["image"], batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return len(batches) * args.batch_size / (time.perf_counter() - start)


def throughput(args: argparse.Namespace) -> dict[str, float]:
    batches = _batches(args, args.steps)
    ours, hand = [], []
    for _ in range(args.repeats):
        ours.append(_ours(args, batches))
        hand.append(_hand(args, batches))
    return {"ours": statistics.median(ours), "hand": statistics.median(hand)}


# ----------------------------------------------------------------------------------- memory


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _walk(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 3:
        return []
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _walk(item, depth + 1)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _walk(item, depth + 1)]
    return []


def _rank_bytes(dm) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds now."""
    module, seen = dm.module, set()
    params = list(module.parameters())
    if dm.zero_stage == 3:
        held = [p.ds_tensor for p in params]
    else:
        held = [p.data for p in params]
    counts = {"params": _storage_bytes(held, seen)}
    zero = dm.engine.optimizer if dm.engine is not None and dm.zero_stage > 0 else None
    grads = [p.grad for p in params if p.grad is not None]
    state = _walk(list(dm.optimizer.state.values()))
    if zero is not None:
        names = vars(zero)
        # fp32 master partitions (stage 1/2 and 3 names) are optimizer state
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            state += _walk(names.get(name))
        state += _walk(list(zero.optimizer.state.values()))
        for name, value in names.items():
            if "grad" in name.lower():
                grads += _walk(value)
    counts["optimizer"] = _storage_bytes(state, seen)
    counts["grads"] = _storage_bytes(grads, seen)
    return counts


def _memory_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    batch = _batches(args, 1)[0]
    results = {}
    variants = {
        "ddp": {"strategy": "ddp"},
        **{f"zero{s}": {"strategy": "deepspeed", "zero_stage": s} for s in (1, 2, 3)},
    }
    for name, distributed in variants.items():
        cfg = _config(args, out, **distributed)
        device = torch.device("cpu")
        init_distributed(cfg, rank, rank, world, device)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        numel = sum(p.numel() for p in model.parameters())
        dm = distribute(model, cfg, world, device, total_steps=10)
        for step in range(2):  # the second backward: optimizer state exists by then
            loss = dm.model(batch["image"], batch)["loss"]
            dm.backward(loss)
            if step == 1:
                results[name] = _rank_bytes(dm)
            dm.optimizer_step()
        results[name]["numel"] = numel
        del dm, model
    torch.save(results, Path(out) / f"memory_rank{rank}.pt")


def memory(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_memory_worker, args=(2, port, args, out), nprocs=2, join=True)
        return torch.load(Path(out) / "memory_rank0.pt")


FORMULA = {  # bytes per parameter on each of N ranks (fp32 weights/gradients, Adam)
    "ddp": lambda n: 4 + 4 + 8,
    "zero1": lambda n: 4 + 4 + 12 / n,
    "zero2": lambda n: 4 + (4 + 12) / n,
    "zero3": lambda n: (4 + 4 + 12) / n,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (smoke run)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.batch_size, args.steps, args.repeats = (
            "test_resnet",
            32,
            8,
            5,
            1,
        )
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"engine benchmark: {args.model} at {args.image_size}px, batch {args.batch_size}, CPU")

    speed = throughput(args)
    ratio = speed["ours"] / speed["hand"]
    print("\n1. throughput, 1 worker, fp32, AdamW + clipping (median of alternating runs)")
    print(f"   our loop (bigmodel.engine.fit) : {speed['ours']:8.1f} samples/s")
    print(f"   minimal hand-written loop      : {speed['hand']:8.1f} samples/s")
    print(f"   ratio ours / hand              : {ratio:8.3f}   (target >= 0.95)")

    mem = memory(args)
    n = 2
    print(f"\n2. bytes per rank at {n} ranks, fp32 weights and gradients, Adam (after a backward)")
    print(f"   parameters: {mem['ddp']['numel']:,}")
    header = f"   {'strategy':8} {'params':>12} {'grads':>12} {'optimizer':>12} {'total':>12}"
    print(header + f" {'formula':>12} {'measured/formula':>17} {'vs DDP':>7}")
    ddp_total = sum(mem["ddp"][k] for k in ("params", "grads", "optimizer"))
    for name in ("ddp", "zero1", "zero2", "zero3"):
        m = mem[name]
        total = m["params"] + m["grads"] + m["optimizer"]
        formula = FORMULA[name](n) * m["numel"]
        print(
            f"   {name:8} {m['params']:12,} {m['grads']:12,} {m['optimizer']:12,} {total:12,}"
            f" {int(formula):12,} {total / formula:17.3f} {total / ddp_total:7.3f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
