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

   The same under bf16, two ways: the engine's (``torch.autocast``, DeepSpeed's ``torch_autocast``
   mode: fp32 parameters and gradients, so the fp32 formulas hold), and DeepSpeed's ``bf16`` mode
   (the model cast to bf16), whose layout is the ZeRO paper's mixed-precision one: 2 bytes of
   weights, 2 of gradients and K=12 of fp32 master + m + v, i.e. DDP-like 2+2+12, ZeRO-1
   2+2+12/N, ZeRO-2 2+(2+12)/N, ZeRO-3 (2+2+12)/N. That mode is what the engine gave up to keep
   BatchNorm statistics and the exported weights fp32: the table shows what it costs.
3. Step time with and without a device sync per micro-batch, 2 ranks, accumulation 4: the engine
   checks finiteness once per optimizer step on the gradient norm; the variant adds what it did
   before, an all-reduce of the loss's finiteness and a host read after every micro-batch.

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


def _config(
    args: argparse.Namespace,
    out: str,
    precision: str = "fp32",
    accumulation: int = 1,
    **distributed: Any,
) -> Config:
    return config_from_dict(
        {
            "name": "bench",
            "data": {"batch_size": args.batch_size, "image_size": args.image_size},
            "model": {
                "backbone": {"name": args.model, "in_chans": 3},
                "heads": {"diag": {"type": "classification", "num_classes": CLASSES}},
            },
            "optim": {
                "name": "adamw",
                "lr": 1e-3,
                "lr_scaling": "none",
                "grad_clip": 1.0,
                "accumulation_steps": accumulation,
            },
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 1,
                "log_every": 10**6,  # one figure over the whole run
                "eval_every": 0,
                "output_dir": out,
                "precision": precision,
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

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        pass  # never resumed here

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
    # DeepSpeed's bf16 mode (model cast to bf16), for the paper's mixed-precision layout
    ds_bf16 = {"bf16": {"enabled": True}, "torch_autocast": {"enabled": False}}
    for precision in ("fp32", "bf16", "ds-bf16"):
        variants = {
            "ddp": {"strategy": "ddp"},
            **{f"zero{s}": {"strategy": "deepspeed", "zero_stage": s} for s in (1, 2, 3)},
        }
        if precision == "ds-bf16":  # ZeRO only: DeepSpeed's bf16 optimizer partitions anyway
            variants = {
                k: {**v, "deepspeed_overrides": ds_bf16} for k, v in variants.items() if k != "ddp"
            }
        for name, distributed in variants.items():
            if rank == 0:
                print(f"   measuring {precision} {name}", file=sys.stderr, flush=True)
            cfg = _config(args, out, "fp32" if precision == "ds-bf16" else precision, **distributed)
            device = torch.device("cpu")
            init_distributed(cfg, rank, rank, world, device)
            torch.manual_seed(0)
            model = build_model(cfg.model)
            numel = sum(p.numel() for p in model.parameters())
            dm = distribute(model, cfg, world, device, total_steps=10)
            images = batch["image"]
            if precision == "ds-bf16":
                # the cast model wants bf16 inputs, and CPU BatchNorm kernels want its
                # statistics in the weights' dtype (what the engine's _match_norm_buffers did)
                images = images.to(torch.bfloat16)
                for m in dm.module.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        m.running_mean.data = m.running_mean.data.to(torch.bfloat16)
                        m.running_var.data = m.running_var.data.to(torch.bfloat16)
            for step in range(2):  # the second backward: optimizer state exists by then
                with dm.autocast():
                    loss = dm.model(images, batch)["loss"]
                dm.backward(loss)
                if step == 1:
                    results[(precision, name)] = _rank_bytes(dm)
                dm.optimizer_step()
            results[(precision, name)]["numel"] = numel
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
MIXED = {  # the ZeRO paper's mixed precision: 2-byte weights and gradients, K=12 fp32 state
    "ddp": lambda n: 2 + 2 + 12,
    "zero1": lambda n: 2 + 2 + 12 / n,
    "zero2": lambda n: 2 + (2 + 12) / n,
    "zero3": lambda n: (2 + 2 + 12) / n,
}


# ------------------------------------------------------------------------- per-micro-batch sync


class _SyncEveryMicroBatch(torch.nn.Module):
    """The model plus the engine's former per-micro-batch check: all-reduce + host read."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, batch: dict[str, Any] | None = None) -> Any:
        out = self.model(images, batch)
        if batch is not None:
            bad = (~torch.isfinite(out["loss"].detach())).to(torch.int32).reshape(1)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
            out["finite"] = not bool(bad.item())  # the device sync
        return out


def _sync_worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    batches = _batches(args, args.steps * 4)
    times: dict[str, list[float]] = {"per step": [], "per micro-batch": []}
    for _ in range(args.repeats):
        for variant in times:  # alternating, so load on a shared machine hits both
            cfg = _config(args, out, accumulation=4, strategy="ddp")
            torch.manual_seed(0)
            model = build_model(cfg.model)
            if variant == "per micro-batch":
                model = _SyncEveryMicroBatch(model)
            figures = fit(cfg, LocalSession(), model, _MemoryLoader(batches))
            times[variant].append(args.batch_size * 4 / figures["samples_per_s"])
    if rank == 0:
        torch.save({k: statistics.median(v) for k, v in times.items()}, Path(out) / "sync.pt")


def sync_cost(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_sync_worker, args=(2, port, args, out), nprocs=2, join=True)
        return torch.load(Path(out) / "sync.pt")


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
    print(f"\n2. bytes per rank at {n} ranks, AdamW, after a backward (params + grads + state)")
    print(f"   parameters: {mem[('fp32', 'ddp')]['numel']:,}")
    header = f"   {'precision':26} {'strategy':8} {'params':>11} {'grads':>11} {'optimizer':>11}"
    print(header + f" {'total':>11} {'formula':>11} {'meas/form':>9} {'vs fp32 DDP':>11}")
    labels = {
        "fp32": ("fp32", FORMULA),
        "bf16": ("bf16 autocast (the engine)", FORMULA),
        "ds-bf16": ("bf16 DeepSpeed cast (paper)", MIXED),
    }
    base = sum(mem[("fp32", "ddp")][k] for k in ("params", "grads", "optimizer"))
    for precision, (label, formulas) in labels.items():
        for name in ("ddp", "zero1", "zero2", "zero3"):
            if (precision, name) not in mem:
                continue
            m = mem[(precision, name)]
            total = m["params"] + m["grads"] + m["optimizer"]
            formula = formulas[name](n) * m["numel"]
            print(
                f"   {label:26} {name:8} {m['params']:11,} {m['grads']:11,}"
                f" {m['optimizer']:11,} {total:11,} {int(formula):11,}"
                f" {total / formula:9.3f} {total / base:11.3f}"
            )

    sync = sync_cost(args)
    once, every = sync["per step"], sync["per micro-batch"]
    print(f"\n3. step time, {n} ranks (gloo), DDP, accumulation 4 (median of alternating runs)")
    print(f"   finiteness checked once per step (the engine) : {once * 1000:8.1f} ms/step")
    print(f"   + an all-reduce and host read per micro-batch  : {every * 1000:8.1f} ms/step")
    print(f"   ratio per-micro-batch / per-step                : {every / once:8.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
