"""Segmentation: a label per pixel from a decoder over the backbone's feature levels.

Outputs are logits ``[B, K, *spatial]`` at input resolution. Padding is cut off and a resized
input's logits are resized back (bilinear in 2D, trilinear in 3D) before the argmax, so label
maps are on the input's own grid; sliding windows blend them (MONAI, Gaussian importance). As
numpy they are label maps (uint8 argmax). The evaluation report adds Dice and IoU per structure,
each patient's Dice over all its slices (in 3D), bootstrap intervals over patients, and overlays
of the best, median and worst sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bigmodel.tasks import _plots
from bigmodel.tasks._base import EvalRun, Evaluation, SummaryContext, Task
from bigmodel.tasks._stats import dice, foreground_mean, interval
from bigmodel.tasks.heads.segmentation import SegmentationHead
from bigmodel.tasks.losses import SegmentationLoss
from bigmodel.tasks.metrics import SegmentationMetrics

__all__ = ["SegmentationTask"]

_RESIZE_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}
"""Interpolation of logits by spatial dimension count."""


def _region(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[Any, ...]:
    """The index of a region at ``offset`` of ``shape`` in the trailing spatial dimensions."""
    return (..., *(slice(o, o + s) for o, s in zip(offset, shape, strict=True)))


class SegmentationTask(Task):
    name = "segmentation"
    head = SegmentationHead
    loss = SegmentationLoss
    metrics = SegmentationMetrics
    window = "blend"

    def crop(self, output: Any, offset: tuple[int, ...], shape: tuple[int, ...]) -> Any:
        return output[_region(offset, shape)]

    def to_pixels(
        self,
        output: Any,
        offset: tuple[int, ...],
        size: tuple[int, ...],
        shape: tuple[int, ...],
        scale: float,
    ) -> Any:
        inside = output[_region(offset, size)].float()
        mode = _RESIZE_MODE[len(shape)]
        return F.interpolate(inside, size=tuple(shape), mode=mode, align_corners=False)

    def to_numpy(self, output: Any, cfg: Any) -> Any:
        """Label maps ``[N, *spatial]`` (uint8, argmax of the logits)."""
        return output.argmax(dim=1).to(torch.uint8).cpu().numpy()

    def summary(self, head: str, value: Any, classes: list[str], ctx: SummaryContext) -> dict:
        """Pixels (voxels) per structure, volumes in mL for a volume, and the label map files."""
        names = classes or [str(k) for k in range(int(value.max()) + 1)]
        counts = np.bincount(value.ravel(), minlength=len(names))[: len(names)]
        entry: dict[str, Any] = {"voxels": {c: int(n) for c, n in zip(names, counts, strict=True)}}
        study = ctx.study
        if study.is_volume and study.spacing:
            voxel_ml = float(np.prod(study.spacing)) / 1000.0
            entry["volumes_ml"] = {
                c: round(int(n) * voxel_ml, 3) for c, n in zip(names[1:], counts[1:], strict=True)
            }
        entry |= ctx.write_labels(head, value, names)
        return entry

    def one_line(self, head: str, entry: dict) -> str | None:
        if "volumes_ml" not in entry:
            return None
        vols = ", ".join(f"{c} {v:.1f} mL" for c, v in entry["volumes_ml"].items())
        return f"{head}: {vols}"

    def evaluation(self, head: str, cfg: Any, classes: list[str]) -> Evaluation:
        return SegmentationEvaluation(head, cfg, classes)


class SegmentationEvaluation(Evaluation):
    """A confusion matrix per sample (labelled pixels only), for Dice per sample and patient."""

    def __init__(self, head: str, cfg: Any, classes: list[str]) -> None:
        super().__init__(head, cfg, classes)
        self.confusions: list[np.ndarray] = []
        self.annotated_pixels = 0

    def add(self, output: Any, batch: dict[str, Any]) -> None:
        cfg = self.cfg
        mask = batch[cfg.target]
        if output.shape[2:] != mask.shape[1:]:
            raise RuntimeError(
                f"head {self.head!r}: logits {list(output.shape)} do not cover masks "
                f"{list(mask.shape)}"
            )
        k = cfg.num_classes
        pred = output.argmax(dim=1).cpu()
        for i in range(len(mask)):
            valid = (mask[i] != cfg.ignore_index) & bool(batch["has"][cfg.target][i])
            self.annotated_pixels += int(valid.sum())
            index = mask[i][valid] * k + pred[i][valid]
            confusion = np.bincount(index.numpy(), minlength=k * k).reshape(k, k)
            self.confusions.append(confusion)

    def report(self, run: EvalRun, report: dict[str, Any], per_sample: dict[str, list]) -> None:
        head = self.head
        tables = self._tables(run)
        report["ci95"] |= tables["ci"]
        report["per_class"][head] = tables["rows"]
        report["per_patient"][head] = {"dice_mean_3d": tables["patient_dice"]}
        report[f"{head}_pixels"] = {
            "annotated": self.annotated_pixels,
            "evaluated": tables["evaluated_pixels"],
        }
        per_sample[f"{head}_dice_mean"] = np.round(tables["sample_dice"], 4).tolist()
        report["plots"][f"{head}_overlays"] = str(self._overlays(run, tables["sample_dice"]))

    def _tables(self, run: EvalRun) -> dict[str, Any]:
        head, classes = self.head, self.classes
        per_sample = np.stack(self.confusions)  # [N, K, K]
        per_patient = np.zeros((len(run.patients), *per_sample.shape[1:]), dtype=np.int64)
        np.add.at(per_patient, run.patient, per_sample)
        total = per_sample.sum(axis=0)
        class_dice = dice(total)
        sample_dice = foreground_mean(dice(per_sample))
        patient_dice = foreground_mean(dice(per_patient))
        replicate_dice = dice(np.einsum("bp,pkl->bkl", run.counts, per_patient))
        ci = {f"{head}/dice_mean": interval(foreground_mean(replicate_dice))}
        ci |= {f"{head}/dice_{c}": interval(replicate_dice[:, c]) for c in range(len(classes))}
        pixels = total.sum(axis=1)
        rows = [
            {
                "class": name,
                "pixels": int(pixels[c]),
                "dice": float(class_dice[c]),
                "iou": float(class_dice[c] / (2 - class_dice[c]))
                if np.isfinite(class_dice[c])
                else math.nan,
            }
            for c, name in enumerate(classes)
        ]
        return {
            "rows": rows,
            "ci": ci,
            "sample_dice": sample_dice,
            "patient_dice": {n: float(d) for n, d in zip(run.patients, patient_dice, strict=True)},
            "evaluated_pixels": int(total.sum()),
        }

    def _overlays(self, run: EvalRun, sample_dice: np.ndarray) -> Any:
        """Overlays of the worst, median and best sample by Dice; None: no sample has a Dice."""
        keys = run.keys
        scored = [i for i in np.argsort(sample_dice) if np.isfinite(sample_dice[i])]
        if not scored:
            return None
        picks = {"worst": scored[0], "median": scored[len(scored) // 2], "best": scored[-1]}
        samples = run.samples_of({keys[i] for i in picks.values()})
        cases = []
        for label, index in picks.items():
            sample = samples[keys[index]]
            logits = run.predict(sample)[self.head]
            pred = logits.argmax(dim=1)[0].numpy()
            mask = sample[self.cfg.target].numpy()
            cases.append(
                (
                    f"{label} {keys[index]}",
                    sample["image"].numpy(),
                    mask,
                    pred,
                    float(sample_dice[index]),
                )
            )
        return _plots.overlays_png(
            cases,
            len(self.classes),
            f"{self.head}: best / median / worst Dice",
            run.out / f"{self.head}_overlays.png",
        )
