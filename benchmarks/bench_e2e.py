"""End to end: a whole ``bigmodel-train`` run against a minimal hand-written PyTorch script.

Both train the same model (timm backbone + segmentation_models_pytorch U-Net decoder), with the
same batch, number of steps, optimizer (timm AdamW, no decay on norms/biases), warmup + cosine
schedule and gradient clipping, on the same WebDataset shards, one after the other in this
process's presence; both models are then scored by the same code on the held-out patients.

Data: nibabel's ``example4d.nii.gz`` (a real 128 x 96 x 24 brain EPI with 2 time points),
upsampled to 256 x 192 in-plane, cut into 4 "patients" (slabs of 6 slices, both time points
each), with a 3-class mask (background / darker / brighter tissue, two Otsu thresholds of the
smoothed volume). Three patients train, one is held out. Shards come from
``bigmodel-shard build --source nifti`` as a user would build them.

The ``bigmodel-train`` run is what a user runs: embedded Ray, 1 worker, the schema's defaults
for evaluation and checkpoint cadence and loader workers; its breakdown comes from the run's own
``metrics.csv`` (``time/*`` rows), ``workers/rank0.json`` and the process's wall time.

    python -m benchmarks.bench_e2e                  # default: 60 steps at 256 px (a few minutes)
    python -m benchmarks.bench_e2e --steps 380      # a longer run (about 380 steps, as a real brain-MRI training)
    python -m benchmarks.bench_e2e --quick          # smoke run (64 px, 4 steps)
    python -m benchmarks.bench_e2e decoders         # U-Net vs light FPN: phantom Dice, step time
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("background", "darker", "brighter")
SLAB = 6  # slices per "patient"
HELD_OUT = 2  # index of the held-out slab


# --------------------------------------------------------------------------------------------
# data


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (largest between-class variance); numpy only."""
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    low = np.cumsum(hist)
    high = low[-1] - low
    mean_low = np.cumsum(hist * centers) / np.maximum(low, 1)
    mean_high = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(high, 1)
    return float(centers[int(np.argmax(low * high * (mean_low - mean_high) ** 2))])


def write_source(out: Path, size: int) -> Path:
    """NIfTI slabs + masks + ``labels.csv`` from nibabel's example4d; returns the CSV."""
    from nibabel.testing import data_path
    from scipy import ndimage

    out.mkdir(parents=True, exist_ok=True)
    volume = nib.load(os.path.join(data_path, "example4d.nii.gz"))
    data = np.asarray(volume.dataobj).astype(np.float32)  # [128, 96, 24, 2]
    zoom = size / data.shape[0]
    rows = []
    for t in range(data.shape[3]):
        image = ndimage.zoom(data[..., t], (zoom, zoom, 1), order=1)
        smooth = ndimage.gaussian_filter(image, sigma=(1.5, 1.5, 0))
        t1 = _otsu(smooth)
        t2 = _otsu(smooth[smooth > t1])
        mask = (smooth > t1).astype(np.uint8) + (smooth > t2).astype(np.uint8)
        spacing = (2.0 / zoom, 2.0 / zoom, 2.2)
        for slab in range(data.shape[2] // SLAB):
            z = slice(slab * SLAB, (slab + 1) * SLAB)
            name = f"p{slab}_t{t}"
            affine = np.diag([*spacing, 1.0])
            nib.save(
                nib.Nifti1Image(image[:, :, z].astype(np.int16), affine), out / f"{name}.nii.gz"
            )
            nib.save(nib.Nifti1Image(mask[:, :, z], affine), out / f"{name}_mask.nii.gz")
            split = "val" if slab == HELD_OUT else "train"
            rows.append([f"{name}.nii.gz", f"{name}_mask.nii.gz", f"patient-{slab}", split])
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "patient_id", "split"])
        writer.writerows(rows)
    return csv_path


def build_shards(out: Path, size: int) -> Path:
    """``bigmodel-shard build`` on the source folder (skipped when the manifest exists)."""
    shards = out / f"shards_{size}"
    if (shards / "dataset.json").is_file():
        return shards
    csv_path = write_source(out / f"source_{size}", size)
    cmd = [
        str(Path(sys.executable).parent / "bigmodel-shard"),
        "build",
        "--source",
        "nifti",
        "--input",
        str(csv_path),
        "--out",
        str(shards),
        "--option",
        f"mask_classes={','.join(CLASSES)}",
        "--layout",
        "2d",
        "--axis",
        "z",
        "--use-source-split",
        "--max-shard-samples",
        "4",
        "--name",
        "e2e",
        "--quiet",
    ]
    subprocess.run(cmd, check=True)
    return shards


# --------------------------------------------------------------------------------------------
# the hand-written script (run in its own process by ``python -m benchmarks.bench_e2e baseline``)


def _pad_to(array: np.ndarray, size: int, value: float) -> np.ndarray:
    """Centre-pad (or centre-crop) the last two axes to ``size`` x ``size``."""
    h, w = array.shape[-2:]
    out = np.full((*array.shape[:-2], size, size), value, dtype=array.dtype)
    top, left = (size - h) // 2, (size - w) // 2
    src_t, src_l = max(0, -top), max(0, -left)
    dst_t, dst_l = max(0, top), max(0, left)
    hh, ww = min(h, size), min(w, size)
    out[..., dst_t : dst_t + hh, dst_l : dst_l + ww] = array[
        ..., src_t : src_t + hh, src_l : src_l + ww
    ]
    return out


def _sample_to_tensors(sample: dict, mean: float, std: float, size: int, train: bool):
    import torch

    image = (sample["image.npy"].astype(np.float32) - mean) / std  # [C, H, W]
    mask = sample["mask.png"].astype(np.int64)  # [H, W]
    if train and np.random.rand() < 0.5:
        image, mask = image[..., ::-1], mask[..., ::-1]
    image = _pad_to(np.ascontiguousarray(image), size, 0.0)
    mask = _pad_to(np.ascontiguousarray(mask), size, 255)
    return torch.from_numpy(image), torch.from_numpy(mask)


class HandModel:
    """timm features -> smp U-Net decoder -> smp segmentation head, as a script would write it."""

    @staticmethod
    def create(backbone: str, in_chans: int, num_classes: int, width: int):
        import timm
        import torch
        from segmentation_models_pytorch.base import SegmentationHead
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.encoder = timm.create_model(
                    backbone, features_only=True, in_chans=in_chans, pretrained=False
                )
                chans = self.encoder.feature_info.channels()
                widths = [max(16, width >> i) for i in range(len(chans))]
                self.decoder = UnetDecoder([0, *chans], widths, n_blocks=len(chans))
                self.head = SegmentationHead(widths[-1], num_classes)

            def forward(self, x):
                feats = self.encoder(x)
                stem = feats[0].new_empty((x.shape[0], 0, *x.shape[-2:]))
                return self.head(self.decoder([stem, *feats]))

        return Net()


def baseline(args: argparse.Namespace) -> None:
    """The minimal script: webdataset -> model -> CE + Dice -> AdamW + cosine; saves weights."""
    import timm.optim
    import torch
    import torch.nn.functional as F
    import webdataset as wds
    from segmentation_models_pytorch.losses import DiceLoss
    from timm.scheduler import CosineLRScheduler

    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    shards = Path(args.shards)
    manifest = json.loads((shards / "dataset.json").read_text())
    mean, std = manifest["stats"]["mean"][0], manifest["stats"]["std"][0]
    urls = [str(shards / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    classes = len(manifest["tasks"]["mask"]["classes"])
    dataset = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
        .shuffle(64)
        .decode("l8")  # .npy -> array, .png -> uint8 [H, W]
        .map(lambda s: _sample_to_tensors(s, mean, std, args.size, train=True))
        .batched(args.batch, partial=False)
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.loader_workers)
    model = HandModel.create(args.backbone, 1, classes, args.width)
    optimizer = timm.optim.create_optimizer_v2(
        model, "adamw", lr=args.lr, weight_decay=0.05, filter_bias_and_bn=True
    )
    schedule = CosineLRScheduler(
        optimizer,
        t_initial=args.steps,
        warmup_t=args.warmup,
        warmup_lr_init=1e-6,
        t_in_epochs=False,
    )
    dice = DiceLoss("multiclass", from_logits=True, ignore_index=255)
    model.train()
    batches = iter(loader)
    for step in range(1, args.steps + 1):
        images, masks = next(batches)
        logits = model(images)
        loss = F.cross_entropy(logits, masks, ignore_index=255) + dice(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step_update(step)
        if step % 10 == 0 or step == args.steps:
            print(f"  script step {step}/{args.steps} loss {loss.item():.3f}", flush=True)
    torch.save(model.state_dict(), args.save)
    print(json.dumps({"train_s": time.perf_counter() - start}))


# --------------------------------------------------------------------------------------------
# scoring (the same code for both models)


def held_out_dice(predict, shards: Path, size: int, split: str = "val") -> float:
    """Mean foreground Dice over ``split`` (per class over all pixels, then averaged)."""
    import torch
    import webdataset as wds

    manifest = json.loads((shards / "dataset.json").read_text())
    mean, std = manifest["stats"]["mean"][0], manifest["stats"]["std"][0]
    classes = len(manifest["tasks"]["mask"]["classes"])
    urls = [str(shards / s["name"]) for s in manifest["splits"][split]["shards"]]
    tp = torch.zeros(classes)
    fp = torch.zeros(classes)
    fn = torch.zeros(classes)
    with torch.no_grad():
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l8"):
            image, mask = _sample_to_tensors(sample, mean, std, size, train=False)
            pred = predict(image[None])[0].argmax(0)
            known = mask != 255
            for k in range(classes):
                p, t = (pred == k) & known, (mask == k) & known
                tp[k] += (p & t).sum()
                fp[k] += (p & ~t).sum()
                fn[k] += (~p & t).sum()
    dice = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
    return float(dice[1:].mean())


# --------------------------------------------------------------------------------------------
# the two runs


def _bigmodel_config(args: argparse.Namespace, shards: Path, out: Path) -> Path:
    """A user's config: only the model, data, optimizer and run length are set."""
    import yaml

    manifest = json.loads((shards / "dataset.json").read_text())
    train_samples = manifest["splits"]["train"]["num_samples"]
    # The longest epoch of at most one pass that divides the run: epochs x steps = --steps.
    one_pass = max(1, train_samples // args.batch)
    steps_per_epoch = max(d for d in range(1, one_pass + 1) if args.steps % d == 0)
    epochs = args.steps // steps_per_epoch
    cfg = {
        "name": "e2e",
        "seed": 0,
        "data": {
            "shards": str(shards),
            "image_size": args.size,
            "batch_size": args.batch,
            "shuffle_buffer": 64,
        },
        "model": {
            "backbone": {"name": args.backbone},
            "heads": {
                "tissue": {
                    "type": "segmentation",
                    "target": "mask",
                    "decoder": args.decoder,
                    "decoder_channels": args.width,
                }
            },
        },
        "optim": {"name": "adamw", "lr": args.lr, "reference_batch_size": args.batch},
        "schedule": {"name": "cosine", "warmup_steps": args.warmup},
        # the run length in steps, as the baseline's: epochs x steps_per_epoch = steps
        "train": {
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "output_dir": str(out / "runs"),
        },
        "cluster": {"num_workers": 1, "cpus_per_worker": args.threads},
    }
    path = out / "e2e.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_bigmodel(args: argparse.Namespace, shards: Path, out: Path) -> dict:
    """``bigmodel-train`` in a subprocess, timed from outside; breakdown from the run's logs."""
    import shutil

    config = _bigmodel_config(args, shards, out)
    for old in (out / "runs" / "e2e", out / "runs" / "ray_results" / "e2e"):
        shutil.rmtree(old, ignore_errors=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu"}
    # On a shared machine Ray's memory monitor may kill the worker for other processes' memory.
    env.setdefault("RAY_memory_usage_threshold", "0.99")
    overrides = list(getattr(args, "set", None) or [])
    cmd = [str(Path(sys.executable).parent / "bigmodel-train"), str(config), *overrides]
    print("$ " + " ".join(["bigmodel-train", str(config), *overrides]), flush=True)
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    ended = time.time()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"bigmodel-train failed with status {proc.returncode}")
    run_dir = out / "runs" / "e2e"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    times = {r["name"][5:]: float(r["value"]) for r in rows if r["name"].startswith("time/")}
    val = [float(r["value"]) for r in rows if r["name"] == "val/tissue/dice_mean"]
    train_loss = [float(r["value"]) for r in rows if r["name"] == "loss/total"]
    worker = json.loads((run_dir / "workers" / "rank0.json").read_text())
    local = run_dir / "checkpoints"
    ckpts = sorted(local.glob("step_*")) if local.is_dir() else []  # Ray holds a copy of each
    loop = times["loop"]
    fwd_bwd = (
        loop - times["data_wait"] - times["eval"] - times["checkpoint_write"] - times["report"]
    )
    return {
        "wall_s": ended - started,
        "ray_and_worker_start_s": worker["started"] - started,
        "worker_setup_and_model_save_s": worker["finished"] - worker["started"] - loop,
        "data_wait_s": times["data_wait"],
        "forward_backward_s": fwd_bwd,
        "eval_s": times["eval"],
        "evals": len(val),
        "checkpoint_write_s": times["checkpoint_write"],
        "report_and_copy_s": times["report"],
        "checkpoints": len(ckpts),
        "after_worker_s": ended - worker["finished"],
        "val_dice_logged": val[-1] if val else float("nan"),
        "val_curve": val,
        "loss_curve": train_loss,
        "model_dir": run_dir / "model",
    }


def run_baseline(args: argparse.Namespace, shards: Path, out: Path) -> dict:
    """The hand-written script in a subprocess, timed from outside."""
    save = out / "baseline.pt"
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "baseline", "--shards", str(shards)]
    cmd += ["--save", str(save)] + _shared_flags(args)
    print("$ python -m benchmarks.bench_e2e baseline ...", flush=True)
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return {"wall_s": time.perf_counter() - started, "weights": save}


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("steps", "batch", "size", "backbone", "width", "lr", "warmup", "threads")
    ] + [f"--loader-workers={args.loader_workers}"]


def score(args: argparse.Namespace, shards: Path, ours: dict, theirs: dict) -> tuple[float, float]:
    """Held-out Dice of both saved models, by :func:`held_out_dice`."""
    import torch
    from safetensors.torch import load_file

    from bigmodel.config import load_config
    from bigmodel.models import build_model

    cfg = load_config(ours["model_dir"] / "config.yaml")
    model = build_model(cfg.model)
    model.load_state_dict(load_file(str(ours["model_dir"] / "model.safetensors")))
    model.eval()
    dice_ours = held_out_dice(lambda x: model(x)["outputs"]["tissue"], shards, args.size)
    hand = HandModel.create(args.backbone, 1, len(CLASSES), args.width)
    hand.load_state_dict(torch.load(theirs["weights"], map_location="cpu"))
    hand.eval()
    dice_theirs = held_out_dice(hand, shards, args.size)
    return dice_ours, dice_theirs


def report(args, ours: dict, theirs: dict, dice_ours: float, dice_theirs: float) -> str:
    samples = args.steps * args.batch
    lines = [
        f"e2e: {args.backbone} + {args.decoder} decoder, {args.size} px, batch {args.batch}, "
        f"{args.steps} steps, 1 worker, {args.threads} threads",
        "",
        "| | hand-written script | bigmodel-train | ratio (script / bigmodel) |",
        "| --- | --- | --- | --- |",
        f"| wall time (s) | {theirs['wall_s']:.1f} | {ours['wall_s']:.1f} | "
        f"{theirs['wall_s'] / ours['wall_s']:.2f} |",
        f"| samples/s (whole run) | {samples / theirs['wall_s']:.2f} | "
        f"{samples / ours['wall_s']:.2f} | |",
        f"| held-out Dice (same scorer) | {dice_theirs:.4f} | {dice_ours:.4f} | "
        f"diff {dice_ours - dice_theirs:+.4f} |",
        "",
        "bigmodel-train's time, from its logs:",
        "",
        "| phase | seconds |",
        "| --- | --- |",
    ]
    for key, label in (
        ("ray_and_worker_start_s", "process start -> Ray up -> worker imports done"),
        ("worker_setup_and_model_save_s", "worker: imports, model, loaders; final model folder"),
        ("forward_backward_s", "training steps (forward, backward, optimizer)"),
        ("data_wait_s", "waiting for data"),
        ("eval_s", f"evaluation ({ours['evals']} passes)"),
        ("checkpoint_write_s", f"checkpoint writes ({ours['checkpoints']} checkpoints)"),
        ("report_and_copy_s", "ray.train.report (barrier + checkpoint copy to storage)"),
        ("after_worker_s", "worker done -> Ray shutdown -> process exit"),
    ):
        lines.append(f"| {label} | {ours[key]:.1f} |")
    lines.append(f"| (bigmodel's own val Dice, logged) | {ours['val_dice_logged']:.4f} |")
    return "\n".join(lines)


def compare_decoders(args: argparse.Namespace) -> str:
    """Dice on held-out phantoms (benchmarks.quality's generator) and step time per decoder.

    Each decoder trains the same backbone from the same seed on the same phantoms; the step
    time is forward + backward + AdamW on one batch of ``--batch`` x ``--size`` px, median of 5.
    """
    import statistics

    import torch

    from benchmarks.quality import evaluate, make_phantoms, train
    from bigmodel.config import ModelConfig
    from bigmodel.models import build_model

    torch.set_num_threads(args.threads)
    n_train, n_test, epochs, phantom_size = (16, 8, 1, 64) if args.quick else (256, 96, 6, 64)
    x_train, m_train, _ = make_phantoms(n_train, phantom_size, seed=0)
    x_test, m_test, _ = make_phantoms(n_test, phantom_size, seed=1)
    lines = [
        f"decoders on {args.backbone}: phantom Dice ({phantom_size} px, {n_train} train / "
        f"{n_test} test, {epochs} epochs) and step time ({args.batch} x {args.size} px, "
        f"{args.threads} threads)",
        "",
        "| decoder | decoder params (M) | phantom dice_mean | phantom dice lesion | step (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for decoder in ("unet", "fpn"):
        head = {"type": "segmentation", "num_classes": 3, "decoder": decoder}
        cfg = ModelConfig.model_validate(
            {
                "backbone": {"name": args.backbone, "in_chans": 1},
                "heads": {"organ": {**head, "decoder_channels": args.width}},
            }
        )
        torch.manual_seed(0)
        model = build_model(cfg)
        train(model, {"image": x_train, "mask": m_train}, epochs, 16, 3e-3, 0, decoder)
        figures = evaluate(model, cfg, {"image": x_test, "mask": m_test}, batch_size=64)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        images = torch.randn(args.batch, 1, args.size, args.size)
        batch = {"image": images, "mask": torch.randint(0, 3, (args.batch, args.size, args.size))}
        times = []
        for _ in range(2 if args.quick else 6):
            tick = time.perf_counter()
            loss = model(images, batch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - tick)
        params = sum(p.numel() for p in model.heads["organ"].parameters()) / 1e6
        lines.append(
            f"| {decoder} | {params:.2f} | {figures['organ/dice_mean']:.4f} | "
            f"{figures['organ/dice_2']:.4f} | {statistics.median(times[1:]):.2f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__)
    parser.add_argument(
        "mode", nargs="?", default="compare", choices=["compare", "baseline", "decoders", "swings"]
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--decoder", default="unet", choices=["unet", "fpn"])
    parser.add_argument("--width", type=int, default=128, help="decoder_channels")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--loader-workers", type=int, default=1, help="the script's DataLoader workers"
    )
    parser.add_argument(
        "--out", default="runs/bench_e2e", help="work folder (runs/ is git-ignored)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 px, 4 steps")
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode == "baseline":
        baseline(args)
        return 0
    if args.quick:
        args.size, args.steps, args.width, args.warmup = 64, 4, 32, 1
    if args.mode == "decoders":
        print(compare_decoders(args))
        return 0
    if args.decoder != "unet":
        raise SystemExit("the hand-written script uses smp's U-Net decoder; keep --decoder unet")
    out = Path(args.out).resolve()
    shards = build_shards(out, args.size)
    ours = run_bigmodel(args, shards, out)
    theirs = run_baseline(args, shards, out)
    dice_ours, dice_theirs = score(args, shards, ours, theirs)
    print(report(args, ours, theirs, dice_ours, dice_theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
