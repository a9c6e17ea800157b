"""Prediction throughput on a NIfTI volume: bigmodel-predict's path against a hand-written loop.

One run, side by side, on the same 256 x 256 x 64 volume (generated, MR-like; or ``--volume``),
the same model (resnet18 backbone, U-Net segmentation + classification heads, trained size 256)
and the same batch size, on CPU:

* ``hand-written eager``: nibabel -> numpy -> z-score -> ``model(batch)`` -> argmax -> nibabel;
* ``bigmodel-predict eager``: ``Predictor.predict_file`` (reads with the sharding readers, slices
  as in training, normalises from ``preprocessing.json``, whole-image windows, writes the NIfTI in
  the input's space and the JSON summary);
* ``ONNX Runtime`` and ``torch.export (.pt2)``: the hand-written loop on the graphs written by
  ``bigmodel-export`` (the same preprocessing and writing, a different engine);
* ``bigmodel-predict ONNX Runtime``: ``Predictor(..., backend="onnxruntime")`` on the export.

Runs are interleaved and repeated; the table shows the best run's slices/s (the least disturbed
by other load on the machine, as ``timeit`` reports), the ratio to the
hand-written eager loop, and bigmodel-predict's ratio to the hand-written loop on the same
engine (goal: >= 0.9).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bigmodel.config import config_from_dict
from bigmodel.inference.export import export
from bigmodel.inference.predict import Predictor
from bigmodel.model_folder import save_model
from bigmodel.models import build_model
from bigmodel.preprocessing import Preprocessing

MEAN, STD = 400.0, 250.0


def write_volume(path: Path, shape=(256, 256, 64)) -> Path:
    """An MR-like int16 volume: a noisy ellipse of tissue with a brighter lesion, 1 x 1 x 3 mm."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((x - 128) / 90) ** 2 + ((y - 120) / 70) ** 2 <= 1
    lesion = (x - 150) ** 2 + (y - 100) ** 2 <= 18**2
    data = rng.normal(50, 20, size=shape)
    data[body] += 450
    data[lesion] += 300
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([1.0, 1.0, 3.0, 1.0])), str(path))
    return path


def make_model_folder(out: Path, size: int) -> Path:
    cfg = config_from_dict(
        {
            "name": "bench",
            "data": {"image_size": size},
            "model": {
                "backbone": {"name": "resnet18", "in_chans": 1},
                "heads": {
                    "diagnosis": {"type": "classification", "num_classes": 2},
                    "organs": {"type": "segmentation", "target": "mask", "num_classes": 3},
                },
            },
        }
    )
    prep = Preprocessing(
        in_chans=1,
        source_channels=1,
        layout="2d",
        axis="z",
        context=0,
        image_size=size,
        normalize="manifest",
        mean=(MEAN,),
        std=(STD,),
        classes={"diagnosis": ["normal", "lesion"], "organs": ["background", "tissue", "lesion"]},
        head_types={"diagnosis": "classification", "organs": "segmentation"},
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return save_model(model.state_dict(), cfg, out, preprocessing=prep)


def hand_written(volume: Path, out: Path, run_batch, batch_size: int) -> None:
    """What a user would write by hand around ``run_batch(images) -> seg logits``."""
    image = nib.load(str(volume))
    data = np.asarray(image.dataobj, dtype=np.float32)  # [x, y, z]
    slices = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 1, 0)))[:, None]
    slices = (slices - MEAN) / STD
    labels = []
    for start in range(0, len(slices), batch_size):
        labels.append(run_batch(slices[start : start + batch_size]).argmax(dim=1).to(torch.uint8))
    volume_zyx = torch.cat(labels).numpy()
    nib.save(nib.Nifti1Image(volume_zyx.transpose(2, 1, 0), image.affine), str(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume", help="a NIfTI volume (default: generated 256x256x64)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        volume = Path(args.volume) if args.volume else write_volume(root / "volume.nii.gz")
        shape = nib.load(str(volume)).shape
        size = max(shape[0], shape[1])
        folder = make_model_folder(root / "model", size)
        export(str(folder), root / "exported", ["safetensors", "onnx", "pt2"], log=lambda m: None)

        import onnxruntime as ort

        predictor = Predictor(folder, batch_size=args.batch_size)
        predictor_ort = Predictor(root / "exported", args.batch_size, backend="onnxruntime")
        model = predictor.model
        session = ort.InferenceSession(
            str(root / "exported" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        organs = session.get_outputs()[[o.name for o in session.get_outputs()].index("organs")]
        program = torch.export.load(str(root / "exported" / "model.pt2")).module()
        order = list(predictor.prep.head_types)

        def eager(batch):
            with torch.inference_mode():
                return model(batch)["outputs"]["organs"]

        def onnx(batch):
            return torch.from_numpy(session.run([organs.name], {"images": batch.numpy()})[0])

        def pt2(batch):
            with torch.inference_mode():
                return program(batch)[order.index("organs")]

        paths = {
            "hand-written eager": lambda: hand_written(
                volume, root / "hand.nii.gz", eager, args.batch_size
            ),
            "bigmodel-predict eager": lambda: predictor.predict_file(volume, root / "ours"),
            "ONNX Runtime": lambda: hand_written(
                volume, root / "ort.nii.gz", onnx, args.batch_size
            ),
            "torch.export (.pt2)": lambda: hand_written(
                volume, root / "pt2.nii.gz", pt2, args.batch_size
            ),
            "bigmodel-predict ORT": lambda: predictor_ort.predict_file(volume, root / "ours_ort"),
        }
        same_engine = {
            "bigmodel-predict eager": "hand-written eager",
            "bigmodel-predict ORT": "ONNX Runtime",
        }
        slices = shape[2]
        times: dict[str, list[float]] = {name: [] for name in paths}
        for run in paths.values():  # warm-up (first-call allocations, ORT graph setup)
            run()
        for _ in range(args.repeats):
            for name, run in paths.items():  # interleaved, so load drift hits every path
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        ours = nib.load(str(root / "ours" / f"{volume.name.split('.')[0]}_organs.nii.gz"))
        same = np.array_equal(
            np.asarray(ours.dataobj), np.asarray(nib.load(str(root / "hand.nii.gz")).dataobj)
        )

    base = slices / min(times["hand-written eager"])
    print(
        f"\nvolume {shape} ({slices} slices of {shape[0]}x{shape[1]}), resnet18 + U-Net + "
        f"classifier, batch {args.batch_size}, CPU threads {torch.get_num_threads()}, "
        f"best of {args.repeats}"
    )
    print(
        f"{'path':26s} {'slices/s':>9s} {'s/volume':>9s} {'vs hand eager':>14s} "
        f"{'vs hand, same engine':>21s}"
    )
    for name, values in times.items():
        rate = slices / min(values)
        paired = ""
        if name in same_engine:
            paired = f"{min(times[same_engine[name]]) / min(values):20.2f}x"
        print(f"{name:26s} {rate:9.2f} {min(values):9.2f} {rate / base:13.2f}x {paired}")
    print(f"bigmodel-predict labels identical to the hand-written loop's: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
