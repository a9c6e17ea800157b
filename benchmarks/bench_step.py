"""Step benchmark: the training step of the MR quality guard's model under the usual speed levers.

The model is the one ``bigmodel-train`` builds for the guard (``bigmodel.models.build_model``:
resnet18 + U-Net decoder of width 64, one 3-class segmentation head with its CE + Dice loss), one
process, batch 8 of 128 px slices, AdamW. Each variant is timed on the same in-memory batches:

* ``fp32``: what the engine runs by default;
* ``channels_last``: ``model.backbone.channels_last=true`` (NHWC convolutions);
* ``bf16``: ``train.precision=bf16`` (``torch.autocast`` around forward and loss, as the engine);
* ``channels_last+bf16``;
* ``compile``: ``torch.compile`` of the model (not a config field: see the table first).

Variants alternate round by round (fp32, channels_last, ..., fp32, ...) so load on a shared
machine hits each alike; the median per variant and its ratio to fp32 are printed side by side.
Ratio > 1 is faster than fp32. Run it on the machine you will train on: the answer differs
between a CPU without bf16 matrix units, where none of these pays, and a GPU with tensor cores.

Usage: ``python -m benchmarks.bench_step [--steps 12] [--rounds 3] [--size 128] [--batch 8]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch

VARIANTS = ("fp32", "channels_last", "bf16", "channels_last+bf16", "compile")


def _model(channels_last: bool):
    from bigmodel.config import ModelConfig
    from bigmodel.models import build_model

    cfg = ModelConfig.model_validate(
        {
            "backbone": {"name": "resnet18", "in_chans": 1, "channels_last": channels_last},
            "heads": {
                "tissue": {
                    "type": "segmentation",
                    "target": "mask",
                    "num_classes": 3,
                    "decoder_channels": 64,
                }
            },
        }
    )
    return build_model(cfg)


def _batches(args: argparse.Namespace, device: torch.device) -> list[tuple[torch.Tensor, dict]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        images = torch.randn(args.batch, 1, args.size, args.size, generator=gen)
        mask = torch.randint(0, 3, (args.batch, args.size, args.size), generator=gen)
        out.append((images.to(device), {"mask": mask.to(device)}))
    return out


def time_variant(name: str, args: argparse.Namespace, device: torch.device) -> float:
    """Seconds per step (forward, loss, backward, AdamW step) after two warm-up steps."""
    torch.manual_seed(0)
    model = _model("channels_last" in name).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_model = torch.compile(model) if name == "compile" else model
    bf16 = "bf16" in name
    batches = _batches(args, device)

    def step(images, batch):
        context = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        with context:
            loss = step_model(images, batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(2):  # warm-up: allocator, oneDNN primitives, compilation
        step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(args.steps):
        step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / args.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            times[v].append(time_variant(v, args, device))
            print(f"round {r + 1}/{args.rounds} {v}: {times[v][-1]:.3f} s/step", flush=True)
    base = statistics.median(times[variants[0]])
    print()
    print(
        f"step of resnet18 + U-Net (64), {args.size} px, batch {args.batch}, {device.type}, "
        f"{torch.get_num_threads()} threads; median of {args.rounds} rounds of {args.steps} steps"
    )
    print()
    print(f"| variant | s/step | ratio {variants[0]} / variant |")
    print("| --- | --- | --- |")
    for v in variants:
        median = statistics.median(times[v])
        print(f"| {v} | {median:.3f} | {base / median:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
