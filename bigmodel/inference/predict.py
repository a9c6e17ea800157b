"""``bigmodel-predict MODEL INPUT... --out DIR``: a trained model on PNG/JPEG, NIfTI and DICOM.

:class:`Predictor` is the library API (``launch/`` calls it from Ray Data ``map_batches`` for
bulk prediction): ``predict_arrays`` runs raw ``[N, C, H, W]`` images, ``predict_file`` one input
file end to end. A volume is cut into 2D / 2.5D slices exactly as ``bigmodel-shard build`` cut
the training volumes (the model folder's ``preprocessing.json``), normalised as in training,
predicted in batches (whole slices: sliding windows where they exceed the training size), and
restacked: segmentations become a NIfTI label volume with the input's affine, spacing and
orientation. Each input gets a JSON summary: class probabilities, volumes of segmented
structures in mL, detections in patient coordinates, the embedding of retrieval heads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.inference.files import (
    Study,
    read_study,
    study_name,
    write_json,
    write_nifti,
    write_png,
)
from bigmodel.inference.forward import forward
from bigmodel.inference.loading import load_model
from bigmodel.model_folder import LoadedModel, ModelFolderError
from bigmodel.preprocessing import (
    AXES,
    InputError,
    Preprocessing,
    check_channels,
    normalize,
    slice_volume,
)
from bigmodel.tasks import TASKS, SummaryContext
from sharding.format import volume_intensity

__all__ = ["Predictor", "main"]

DEFAULT_BATCH = 16
ONNX_BACKENDS = ("onnxruntime", "onnxruntime-int8")
"""ONNX Runtime on ``model.onnx`` (fp32) or ``model.int8.onnx`` (``bigmodel-export --int8``)."""


class Predictor:
    """A loaded model folder, ready to predict on arrays and files (no Ray, no shards).

    Args:
        model: a model folder, ``models:/name@alias``, or an already loaded model.
        batch_size: slices per forward pass.
        device: ``cpu``, ``cuda``... (the model is moved there once).
        backend: ``torch`` (eager), ``onnxruntime`` (the folder's ``model.onnx`` from
            ``bigmodel-export``: its heads only, several times faster on CPU) or
            ``onnxruntime-int8`` (its ``model.int8.onnx``, from ``bigmodel-export --int8``).
    """

    def __init__(
        self,
        model: str | Path | LoadedModel,
        batch_size: int = DEFAULT_BATCH,
        device: str | torch.device = "cpu",
        backend: str = "torch",
    ) -> None:
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.prep = self.loaded.preprocessing
        self.device = torch.device(device)
        if backend in ONNX_BACKENDS:
            from bigmodel.inference import _onnx_backend

            file = _onnx_backend.INT8_FILE if backend.endswith("int8") else _onnx_backend.ONNX_FILE
            self.model = _onnx_backend.OnnxModel(self.loaded, self.device, file)
        elif backend == "torch":
            self.model = self.loaded.model.to(self.device).eval()
        else:
            raise ValueError(f"backend {backend!r}: choose from {('torch', *ONNX_BACKENDS)}")
        self.batch_size = batch_size
        self.tasks = {name: TASKS[self.prep.head_types[name]] for name in self.model.head_configs}

    # ------------------------------------------------------------------ arrays

    def predict_arrays(
        self,
        images: np.ndarray | torch.Tensor,
        progress: Any = None,
        window: dict[str, Any] | None = None,
        volume: dict[str, Any] | None = None,
    ) -> dict:
        """Raw images ``[N, C, H, W]`` (as stored in the shards) -> numpy outputs per head.

        ``window`` is the images' DICOM window (``{"center", "width"}``), needed only by models
        trained with ``data.intensity=ct_window`` without a fixed window. ``volume`` holds the
        statistics of the volume the images were cut from (``volume_intensity``), needed by
        ``data.intensity=mr``; without it the images are taken as slices of one volume and
        their own statistics are used.

        Returns ``{head: value}``: classification probabilities ``[N, K]`` (softmax, or sigmoid
        for multi-label), segmentation label maps ``[N, H, W]`` (uint8, argmax of the logits),
        retrieval embeddings ``[N, D]``, detection a list of ``{"boxes", "scores", "labels"}``
        per image (pixels).
        """
        if not torch.is_tensor(images):
            # float32 in native byte order, as the training decoder makes it (NIfTI may be >i2).
            images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if images.ndim != 4 or images.shape[1] != self.prep.in_chans:
            raise InputError(
                f"images have shape {list(images.shape)}; the model takes [N, "
                f"{self.prep.in_chans}, H, W]"
            )
        if volume is None and self.prep.intensity and self.prep.intensity.get("scheme") == "mr":
            volume = volume_intensity(_source_channels(images.numpy(), self.prep))
        parts: dict[str, list[Any]] = {name: [] for name in self.tasks}
        configs = self.loaded.config.model.heads
        for start in range(0, images.shape[0], self.batch_size):
            raw = images[start : start + self.batch_size].to(self.device)
            batch = normalize(raw, self.prep, window, volume)
            outputs = forward(self.model, batch, self.prep)
            for name, out in outputs.items():
                parts[name].append(self.tasks[name].to_numpy(out, configs[name]))
            if progress is not None:
                progress.update(int(batch.shape[0]))
        return {name: self.tasks[name].concat(chunks) for name, chunks in parts.items()}

    def samples_of(self, study: Study) -> np.ndarray:
        """The model's input samples ``[N, C', H, W]`` cut from one study, as in training."""
        file = str(study.path)
        check_channels(study.image, self.prep, file)
        if not study.is_volume:
            if self.prep.context:
                raise InputError(
                    f"{file}: a 2D image, but the model is 2.5D (it reads {self.prep.slices_per_sample} "
                    f"neighbouring slices); give it a volume"
                )
            return study.image[None]
        return slice_volume(study.image, self.prep)

    # ------------------------------------------------------------------ files

    def predict_file(self, path: str | Path, out_dir: str | Path, progress: Any = None) -> dict:
        """Predict one input file and write its outputs and ``NAME.json`` into ``out_dir``.

        Returns the summary (what the JSON holds). Raises :class:`InputError` naming the file
        when it cannot be read or does not fit the model; nothing is written then.
        """
        started = time.perf_counter()
        study = read_study(path)
        samples = self.samples_of(study)
        outputs = self.predict_arrays(
            samples, progress=progress, window=study.window, volume=volume_intensity(study.image)
        )
        out_dir = Path(out_dir)
        name = study_name(study.path)
        summary: dict[str, Any] = {
            "input": str(study.path),
            "kind": study.kind,
            "shape": list(study.image.shape),
            "spacing_mm": [float(s) for s in study.spacing] or None,
            "model": str(self.loaded.path),
            "model_name": self.loaded.card.get("name"),
            "slices": int(samples.shape[0]),
            "heads": {},
        }
        ctx = SummaryContext(
            study=study,
            slice_dim=AXES[self.prep.axis],
            write_labels=lambda head, labels, names: self._write_labels(
                head, labels, names, study, out_dir, name
            ),
        )
        for head, value in outputs.items():
            task = self.tasks[head]
            classes = self.prep.classes.get(head) or []
            summary["heads"][head] = {"type": task.name, **task.summary(head, value, classes, ctx)}
        summary["seconds"] = round(time.perf_counter() - started, 3)
        summary["summary_file"] = str(write_json(out_dir / f"{name}.json", summary))
        return summary

    def _restack(self, labels: np.ndarray, study: Study) -> np.ndarray:
        """Per-slice maps ``[N, h, w]`` back into the volume's ``[z, y, x]`` order."""
        return np.moveaxis(labels, 0, AXES[self.prep.axis])

    def _write_labels(
        self,
        head: str,
        labels: np.ndarray,
        names: list[str],
        study: Study,
        out_dir: Path,
        name: str,
    ) -> dict:
        """A head's label maps as files: PNG for an image; NIfTI (and DICOM SEG) for a volume."""
        if not study.is_volume:
            return {"output": str(write_png(out_dir / f"{name}_{head}.png", labels[0]))}
        volume = self._restack(labels, study)
        entry = {"output": str(write_nifti(out_dir / f"{name}_{head}.nii.gz", volume, study))}
        if study.dicom_files:  # a DICOM series: the SEG references its instances
            entry |= self._dicom_seg(out_dir / f"{name}_{head}.seg.dcm", volume, study, names)
        return entry

    def _dicom_seg(self, path: Path, volume: np.ndarray, study: Study, names: list[str]) -> dict:
        """The segmentation as DICOM SEG beside the NIfTI; a failure is reported, not fatal."""
        from bigmodel.inference.dicom_seg import write_dicom_seg

        try:
            model_name = str(self.loaded.card.get("name") or "bigmodel")
            return {"dicom_seg": str(write_dicom_seg(path, volume, study, names, model_name))}
        except (ValueError, TypeError, AttributeError, KeyError) as err:
            # highdicom refuses series lacking attributes a SEG must reference (e.g. no frame
            # of reference); the NIfTI output above is still valid.
            return {"dicom_seg_error": f"{type(err).__name__}: {err}"}


def _source_channels(samples: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """``[C, N, H, W]``: the centre slice of each 2.5D stack per source channel, samples as depth
    (the volume the samples were cut from, as far as they show it)."""
    k = prep.context
    centre = samples[:, k :: 2 * k + 1] if k else samples
    return np.moveaxis(centre, 0, 1)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bigmodel-predict",
        description="Predict with a trained model on PNG/JPEG images, NIfTI volumes and DICOM "
        "series; writes label maps (PNG / NIfTI in the input's space) and a JSON summary each.",
    )
    parser.add_argument("model", help="model folder (RUN/model) or models:/NAME@ALIAS")
    parser.add_argument("inputs", nargs="+", help="image, .nii/.nii.gz, .dcm, or a DICOM folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="slices per pass")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    parser.add_argument(
        "--backend",
        choices=("torch", *ONNX_BACKENDS),
        default="torch",
        help="eager PyTorch, or ONNX Runtime on the model.onnx (model.int8.onnx: "
        "onnxruntime-int8) that bigmodel-export wrote",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bigmodel-predict``; exit 2 on bad input, naming the file."""
    from tqdm import tqdm

    args = _parse(argv)
    try:
        predictor = Predictor(args.model, args.batch_size, args.device, args.backend)
    except (ModelFolderError, FileNotFoundError, ValueError) as err:
        print(f"bigmodel-predict: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed = 0
    bar = tqdm(args.inputs, desc="inputs", unit="input", disable=len(args.inputs) == 1)
    for path in bar:
        try:
            with tqdm(desc=Path(path).name, unit="slice", leave=False) as slices:
                summary = predictor.predict_file(path, out, progress=slices)
        except InputError as err:
            failed += 1
            tqdm.write(f"bigmodel-predict: {err}", file=sys.stderr)
            continue
        tqdm.write(_one_line(summary))
    if failed:
        print(f"bigmodel-predict: {failed} of {len(args.inputs)} input(s) failed", file=sys.stderr)
        return 2
    print(f"outputs and JSON summaries in {out}")
    return 0


def _one_line(summary: dict) -> str:
    parts = [Path(summary["input"]).name]
    for head, entry in summary["heads"].items():
        part = TASKS[entry["type"]].one_line(head, entry)
        if part is not None:
            parts.append(part)
    return "  ".join(parts) + f"  -> {summary['summary_file']}"


if __name__ == "__main__":
    sys.exit(main())
