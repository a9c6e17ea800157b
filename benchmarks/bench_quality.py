"""Quality guard: the whole ``bigmodel-train`` against a short script on real brain MR.

Data: ``benchmarks/mr_brains.py``: the real MNI152 T1 template with its grey/white matter maps
(shipped inside nilearn), made into patients (warp, slab height, gain, bias field, noise), in the
nnU-Net raw layout, sharded by ``bigmodel-shard build --source nnunet`` as a user would: 8
patients train, 2 validate, 3 are the held-out test set (imagesTs/labelsTs).

Both runs are the ones ``benchmarks/bench_e2e.py`` compares (same backbone, U-Net decoder, batch,
steps, AdamW, warmup + cosine, clipping); the script z-scores with the manifest's mean/std, as a
short script would. Both models are scored by the same code on the test patients, each with its
own preprocessing (bigmodel: the model folder's record through ``bigmodel.inference``):
foreground Dice over all pixels of the split and per patient. Printed side by side with wall
time, and bigmodel's validation curve with its steadiness (how often an evaluation is worse than
the one before, and by how much).

    python -m benchmarks.bench_quality                  # 128 px, 360 steps (about 6 minutes)
    python -m benchmarks.bench_quality --quick          # 64 px, 60 steps
    python -m benchmarks.bench_quality --set data.intensity=dataset   # any bigmodel override
    python -m benchmarks.bench_quality swings --run runs/bench_quality/runs/e2e

``swings`` is the experiment behind ``train.ema_decay``: it scores every checkpoint of a run on
the validation split three ways (the raw weights with their running BatchNorm statistics; the
raw weights with BatchNorm statistics recomputed over training slices, ``torch.optim.swa_utils.
update_bn``; the weight average), and the raw weights on training slices too, and counts how
often each curve falls from one epoch to the next.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import bench_e2e, mr_brains

ROOT = Path(__file__).resolve().parents[1]


def build_shards(out: Path, spacing: float) -> Path:
    """Source folder + ``bigmodel-shard build --source nnunet`` (reused when it exists)."""
    shards = out / f"shards_{spacing:g}mm"
    if (shards / "dataset.json").is_file():
        return shards
    raw = mr_brains.write_nnunet(out / f"raw_{spacing:g}mm", spacing=spacing)
    cmd = [str(Path(sys.executable).parent / "bigmodel-shard"), "build", "--source", "nnunet"]
    cmd += ["--input", str(raw), "--out", str(shards), "--split-ratios", "0.8,0.2,0"]
    cmd += ["--use-source-split", "--name", "mni-brains", "--quiet", "--max-shard-samples", "16"]
    subprocess.run(cmd, check=True)
    return shards


def _test_samples(shards: Path, split: str):
    """``(group, image [1, H, W] raw float32, mask [H, W] int64, meta)`` of ``split``, in order."""
    import webdataset as wds

    manifest = json.loads((shards / "dataset.json").read_text())
    urls = [str(shards / s["name"]) for s in manifest["splits"][split]["shards"]]
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l8"):
        yield (
            sample["group"].decode() if isinstance(sample["group"], bytes) else sample["group"],
            sample["image.npy"].astype(np.float32),
            sample["mask.png"].astype(np.int64),
            sample["meta.json"],
        )


def dice_by_patient(predict, shards: Path, size: int, split: str = "test") -> dict[str, float]:
    """Foreground Dice (per class over all pixels, then the classes' mean) for the whole split
    (``"all"``) and per patient; ``predict(image, meta) -> label map [H, W]``."""
    classes = len(mr_brains.CLASSES)
    counts: dict[str, np.ndarray] = {}
    for group, image, mask, meta in _test_samples(shards, split):
        image = bench_e2e._pad_to(image, size, 0.0)
        mask = bench_e2e._pad_to(mask, size, 255)
        pred = np.asarray(predict(image, meta))
        known = mask != 255
        for key in ("all", group):
            tally = counts.setdefault(key, np.zeros((3, classes)))
            for k in range(classes):
                p, t = (pred == k) & known, (mask == k) & known
                tally[:, k] += [(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]
    dice = {}
    for key, (tp, fp, fn) in counts.items():
        scores = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        dice[key] = float(scores[1:].mean())
    return dice


def score(args, shards: Path, ours: dict, theirs: dict) -> tuple[dict, dict]:
    """Test-split Dice of both models, each with its own preprocessing."""
    import torch

    from bigmodel.inference.predict import Predictor

    predictor = Predictor(ours["model_dir"])

    def ours_fn(image, meta):
        out = predictor.predict_arrays(image[None], volume=meta.get("intensity"))
        return out["tissue"][0]

    manifest = json.loads((shards / "dataset.json").read_text())
    mean, std = manifest["stats"]["mean"][0], manifest["stats"]["std"][0]
    hand = bench_e2e.HandModel.create(args.backbone, 1, len(mr_brains.CLASSES), args.width)
    hand.load_state_dict(torch.load(theirs["weights"], map_location="cpu"))
    hand.eval()

    @torch.no_grad()
    def theirs_fn(image, meta):
        return hand(torch.from_numpy((image[None] - mean) / std))[0].argmax(0).numpy()

    return dice_by_patient(ours_fn, shards, args.size), dice_by_patient(
        theirs_fn, shards, args.size
    )


def steadiness(curve: list[float]) -> str:
    """How a validation curve moves: drops between consecutive evaluations."""
    if len(curve) < 2:
        return "one evaluation"
    steps = np.diff(curve)
    drops = steps[steps < 0]
    worst = float(-drops.min()) if drops.size else 0.0
    return f"{drops.size} of {steps.size} evaluations worse than the one before, worst drop {worst:.3f}"


def report(args, ours, theirs, dice_ours, dice_theirs) -> str:
    patients = sorted(k for k in dice_ours if k != "all")
    lines = [
        f"quality guard: real brain MR (MNI152 T1 + tissue maps), {args.size} px, "
        f"{args.backbone} + U-Net ({args.width}), batch {args.batch}, {args.steps} steps, "
        f"lr {args.lr:g}, 1 worker, {args.threads} threads",
        "",
        "| | hand-written script | bigmodel-train | bigmodel - script |",
        "| --- | --- | --- | --- |",
        f"| test Dice, 3 held-out patients | {dice_theirs['all']:.4f} | {dice_ours['all']:.4f} | "
        f"{dice_ours['all'] - dice_theirs['all']:+.4f} |",
    ]
    for p in patients:
        lines.append(
            f"| test Dice, {p} | {dice_theirs[p]:.4f} | {dice_ours[p]:.4f} | "
            f"{dice_ours[p] - dice_theirs[p]:+.4f} |"
        )
    lines += [
        f"| wall time (s) | {theirs['wall_s']:.1f} | {ours['wall_s']:.1f} | "
        f"ratio script/bigmodel {theirs['wall_s'] / ours['wall_s']:.2f} |",
        "",
        "bigmodel validation Dice per epoch: " + " ".join(f"{v:.2f}" for v in ours["val_curve"]),
        f"({steadiness(ours['val_curve'])})",
        "training loss per log step: " + " ".join(f"{v:.2f}" for v in ours["loss_curve"]),
    ]
    return "\n".join(lines)


def _slices(shards: Path, split: str, prep, size: int, limit: int | None = None):
    """Normalised ``[N, 1, size, size]`` images and ``[N, size, size]`` masks of ``split``."""
    import torch

    from bigmodel.preprocessing import normalize

    images, masks = [], []
    for index, (_, image, mask, meta) in enumerate(_test_samples(shards, split)):
        if limit is not None and index >= limit:
            break
        raw = torch.from_numpy(bench_e2e._pad_to(image, size, 0.0))
        images.append(normalize(raw, prep, None, meta.get("intensity")))
        masks.append(torch.from_numpy(bench_e2e._pad_to(mask, size, 255)))
    return torch.stack(images), torch.stack(masks)


def _dice(model, images, masks) -> float:
    import torch

    with torch.no_grad():
        pred = torch.cat(
            [
                model(images[i : i + 16])["outputs"]["tissue"].argmax(1)
                for i in range(0, len(images), 16)
            ]
        )
    known = masks != 255
    scores = []
    for k in range(1, len(mr_brains.CLASSES)):
        p, t = (pred == k) & known, (masks == k) & known
        scores.append(float(2 * (p & t).sum() / max(int(p.sum() + t.sum()), 1)))
    return float(np.mean(scores))


def swings(args: argparse.Namespace) -> str:
    """Validation Dice per checkpoint: raw, raw + recomputed BatchNorm statistics, average."""
    import copy

    import torch
    from torch.optim.swa_utils import update_bn

    from bigmodel.engine.checkpoint import consolidated_state_dict
    from bigmodel.model_folder import load_model

    run = Path(args.run)
    loaded = load_model(run / "model")
    shards = Path(loaded.config.data.shards)
    size = loaded.config.data.image_size
    val_x, val_y = _slices(shards, "val", loaded.preprocessing, size)
    train_x, train_y = _slices(shards, "train", loaded.preprocessing, size)
    model = loaded.model.eval()
    rows = {"raw": [], "raw, BN recomputed": [], "average (EMA)": [], "raw on train": []}
    steps = []
    for ckpt in sorted((run / "checkpoints").glob("step_*")):
        if not (ckpt / "meta.json").is_file():
            continue
        steps.append(int(ckpt.name[5:]))
        raw = consolidated_state_dict(ckpt)
        model.load_state_dict(raw)
        rows["raw"].append(_dice(model.eval(), val_x, val_y))
        rows["raw on train"].append(_dice(model, train_x, train_y))
        recal = copy.deepcopy(model)
        batches = [train_x[i : i + 8] for i in range(0, len(train_x), 8)]
        update_bn(batches, recal)  # cumulative average over every training slice
        rows["raw, BN recomputed"].append(_dice(recal.eval(), val_x, val_y))
        if (ckpt / "ema.pt").is_file():
            model.load_state_dict(torch.load(ckpt / "ema.pt", map_location="cpu"))
            rows["average (EMA)"].append(_dice(model.eval(), val_x, val_y))
    lines = [f"validation Dice per checkpoint of {run} (steps {steps[0]}..{steps[-1]})", ""]
    for name, curve in rows.items():
        if curve:
            lines.append(f"{name:>20}: " + " ".join(f"{v:.2f}" for v in curve))
            lines.append(f"{'':>20}  {steadiness(curve)}; last {curve[-1]:.3f}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = bench_e2e._parser()
    parser.prog = "python -m benchmarks.bench_quality"
    parser.description = __doc__
    parser.set_defaults(size=128, steps=360, lr=2e-3, warmup=20, width=64, out="runs/bench_quality")
    parser.add_argument("--spacing", type=float, default=2.0, help="mm per voxel of the data")
    parser.add_argument("--run", help="swings: the bigmodel-train run folder")
    parser.add_argument(
        "--set", action="append", default=[], help="bigmodel-train override KEY=VALUE"
    )
    return parser


def run(args: argparse.Namespace) -> tuple[dict, dict, dict, dict]:
    """Both runs and their scores: ``(ours, theirs, dice_ours, dice_theirs)``."""
    out = Path(args.out).resolve()
    shards = build_shards(out, args.spacing)
    ours = bench_e2e.run_bigmodel(args, shards, out)
    theirs = bench_e2e.run_baseline(args, shards, out)
    dice_ours, dice_theirs = score(args, shards, ours, theirs)
    return ours, theirs, dice_ours, dice_theirs


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode == "swings":
        print(swings(args))
        return 0
    if args.quick:
        args.size, args.steps, args.spacing, args.width = 64, 60, 3.5, 32
    ours, theirs, dice_ours, dice_theirs = run(args)
    print(report(args, ours, theirs, dice_ours, dice_theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
