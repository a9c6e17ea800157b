"""int8 against fp32 on CPU: PyTorch eager, ONNX Runtime fp32 and ONNX Runtime int8, one table.

One run, on one trained model:

1. the demo source (nibabel's real MR volume plus generated MR-like patients with lesions) is
   sharded with ``bigmodel-shard``'s builder (patient-level train / val / test splits);
2. a resnet18 backbone with a U-Net segmentation head (background / tissue / lesion) and a
   classifier (lesion / normal) is trained in-process by ``bigmodel.engine.train`` (the loop
   ``bigmodel-train`` runs), at ``--size`` px (``data.resize=fit``: the 48 px slices are scaled
   up, so the network does the work of a ``--size`` px model);
3. ``bigmodel.inference.export.export`` writes ``model.onnx`` and ``model.int8.onnx``
   (``--int8``: calibrated on ``--calibration-samples`` training windows, checked on held-out
   ones; the export refuses int8 below 0.95 agreement);
4. every test-split slice is predicted through ``Predictor.predict_arrays`` (normalisation,
   ``fit``, the task's argmax and softmax) with each backend; runs are interleaved and repeated,
   the best run counts (the least disturbed, as ``timeit`` reports).

Columns: images/s, ratio to eager, model file size, and quality on the test split: the
segmentation's foreground Dice against the ground-truth masks, the classifier's accuracy against
the slice labels, and the agreement with fp32 ONNX Runtime (Dice of the label maps, top-1).

    python benchmarks/bench_int8.py                 # ~11 min on 2 busy CPU cores, mostly training
    python benchmarks/bench_int8.py --steps 20      # smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bigmodel.config import config_from_dict
from bigmodel.data import SplitSamples, load_manifest, resolve_config
from bigmodel.engine import LocalSession, train
from bigmodel.inference.export import Int8Options, export
from bigmodel.inference.predict import Predictor
from launch._demo_data import MASK_CLASSES, write_demo_source
from sharding.build import BuildOptions, build_shards
from sharding.readers import NiftiCsvReader


def build(root: Path, patients: int) -> Path:
    """Demo NIfTI source -> 2D shards with patient-level splits."""
    csv_path = write_demo_source(root / "source", patients=patients)
    reader = NiftiCsvReader(str(csv_path), mask_classes=",".join(MASK_CLASSES))
    options = BuildOptions(layout="2d", use_source_split=True, max_shard_samples=64, progress=False)
    build_shards(reader, root / "shards", options)
    return root / "shards"


def train_model(shards: Path, root: Path, size: int, steps: int) -> Path:
    """resnet18 + U-Net + classifier, ``steps`` optimizer steps of the real engine; its model/."""
    raw = {
        "name": "int8",
        "seed": 0,
        "data": {
            "shards": str(shards),
            "image_size": size,
            "resize": "fit",
            "resize_tolerance": 4.0,  # the demo's 41-48 px slices, scaled up on purpose
            "batch_size": 8,
            "loader_workers": 0,
            "shuffle_buffer": 64,
        },
        "model": {
            "backbone": {"name": "resnet18"},
            "heads": {
                "diagnosis": {"type": "classification", "target": "cls"},
                "organs": {"type": "segmentation", "target": "mask", "decoder_channels": 32},
            },
        },
        "optim": {"name": "adamw", "lr": 3e-3, "lr_scaling": "none", "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "train": {
            "epochs": 1,
            "steps_per_epoch": steps,
            "eval_every": 0,
            "checkpoint_every": 0,
            "precision": "fp32",
            "output_dir": str(root / "runs"),
        },
    }
    cfg = resolve_config(config_from_dict(raw), load_manifest(shards))
    train(cfg, LocalSession())
    return root / "runs" / "int8" / "model"


def held_out(shards: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw images ``[N, 1, H, W]``, masks, slice labels and whether each has a label."""
    samples = list(SplitSamples(load_manifest(shards), split))
    images = np.stack([s["image"].numpy() for s in samples])
    masks = np.stack([s["mask"].numpy() for s in samples])
    labels = np.array([int(s["cls"]) for s in samples])
    has = np.array([bool(s["has"]["cls"]) for s in samples])
    return images, masks, labels, has


def dice(got: np.ndarray, want: np.ndarray) -> float:
    """Mean Dice over the foreground labels either map holds."""
    labels = [k for k in np.union1d(np.unique(got), np.unique(want)) if k > 0]
    scores = [
        2 * np.sum((got == k) & (want == k)) / (np.sum(got == k) + np.sum(want == k))
        for k in labels
    ]
    return float(np.mean(scores)) if scores else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=128, help="training / window size (px)")
    parser.add_argument("--steps", type=int, default=150, help="training steps")
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        shards = build(root, args.patients)
        folder = train_model(shards, root, args.size, args.steps)
        trained_s = time.perf_counter() - started
        started = time.perf_counter()
        report = export(
            str(folder),
            root / "exported",
            ["safetensors", "onnx"],
            log=lambda line: None,
            int8=Int8Options(calibration_samples=args.calibration_samples),
        )
        export_s = time.perf_counter() - started
        out = root / "exported"
        images, masks, labels, has = held_out(shards, "test")
        backends = {
            "PyTorch eager fp32": ("torch", out / "model.safetensors"),
            "ONNX Runtime fp32": ("onnxruntime", out / "model.onnx"),
            "ONNX Runtime int8": ("onnxruntime-int8", out / "model.int8.onnx"),
        }
        sizes = {name: file.stat().st_size / 1e6 for name, (_, file) in backends.items()}
        predictors = {
            name: Predictor(out, args.batch_size, backend=backend)
            for name, (backend, _) in backends.items()
        }
        outputs = {name: p.predict_arrays(images) for name, p in predictors.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in predictors}
        for _ in range(args.repeats):
            for name, predictor in predictors.items():  # interleaved: load drift hits all
                start = time.perf_counter()
                predictor.predict_arrays(images)
                times[name].append(time.perf_counter() - start)

    reference = outputs["ONNX Runtime fp32"]
    n = len(images)
    eager = n / min(times["PyTorch eager fp32"])
    int8 = report["formats"]["int8"]
    print(
        f"\n{n} test slices ({images.shape[-2]}x{images.shape[-1]} px, fitted to {args.size}), "
        f"resnet18 + U-Net + classifier trained {args.steps} steps ({trained_s:.0f} s incl. "
        f"sharding), batch {args.batch_size}, CPU threads {torch.get_num_threads()}, best of "
        f"{args.repeats}; export + int8 calibration ({int8['calibration']['windows']} train "
        f"windows) and check: {export_s:.0f} s"
    )
    header = (
        f"{'backend':20s} {'images/s':>9s} {'vs eager':>9s} {'file MB':>8s} "
        f"{'Dice (GT)':>10s} {'acc (GT)':>9s} {'Dice vs fp32':>13s} {'top-1 vs fp32':>14s}"
    )
    print(header)
    for name in backends:
        got = outputs[name]
        rate = n / min(times[name])
        accuracy = float(np.mean(got["diagnosis"].argmax(1)[has] == labels[has]))
        agree = float(np.mean(got["diagnosis"].argmax(1) == reference["diagnosis"].argmax(1)))
        print(
            f"{name:20s} {rate:9.1f} {rate / eager:8.2f}x {sizes[name]:8.2f} "
            f"{dice(got['organs'], masks):10.4f} {accuracy:9.4f} "
            f"{dice(got['organs'], reference['organs']):13.4f} {agree:14.4f}"
        )
    print(f"export check on held-out {int8['check']['split']} windows: {int8['agreement']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
