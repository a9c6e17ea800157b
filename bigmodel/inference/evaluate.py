"""``bigmodel-eval MODEL --shards DIR --split test --out DIR``: a report people can trust and read.

Every sample of the split is predicted on its whole image (``bigmodel.models.window``:
Gaussian-blended sliding windows where an image exceeds the training size, so every pixel and
every box counts), normalised exactly as in training (the model folder's ``preprocessing.json``).
The figures are the training-time ones (``bigmodel.metrics``), plus:

* per-class tables (support, sensitivity, precision, AUROC; Dice and IoU per structure);
* per-sample and per-patient figures (a patient's Dice over all its slices, i.e. in 3D; its
  diagnosis from the mean probability of its slices) in ``per_sample.csv`` / ``per_patient.csv``;
* 95% bootstrap confidence intervals over patients (patients are the independent unit: slices of
  one patient are correlated, so resampling slices would make the intervals too narrow);
* pictures: confusion matrix, ROC and PR curves, segmentation overlays (best, median, worst
  sample), detection boxes against ground truth, retrieval query/neighbour strips;
* ``report.json`` with all of it.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.data import Manifest, ManifestError, collate, load_manifest
from bigmodel.inference import _plots
from bigmodel.inference._stats import bootstrap_counts, dice, foreground_mean, interval
from bigmodel.inference.files import atomic_write, write_json
from bigmodel.inference.forward import forward
from bigmodel.inference.loading import load_model
from bigmodel.metrics import ClassificationMetrics, build_metrics
from bigmodel.model_folder import LoadedModel, ModelFolderError
from bigmodel.preprocessing import normalize

__all__ = ["EvalError", "evaluate_model", "main"]

BOOTSTRAP = 1000
"""Bootstrap replicates for the confidence intervals."""
SHOW = 4
"""Detection images and retrieval queries shown in the pictures."""


class EvalError(ValueError):
    """Shards that do not fit the model; the message names the file and what differs."""


# ------------------------------------------------------------------------------ data


def _check_fit(loaded: LoadedModel, manifest: Manifest) -> None:
    prep = loaded.preprocessing
    if manifest.image.channels != prep.in_chans:
        raise EvalError(
            f"{manifest.path}: images have {manifest.image.channels} channel(s) but the model "
            f"takes {prep.in_chans}; evaluate on shards built like its training shards"
        )
    for head, classes in prep.classes.items():
        target = loaded.config.model.heads[head].target
        task = manifest.tasks.get(target)
        if classes and (task is None or list(task.classes) != classes):
            found = list(task.classes) if task else "no such task"
            raise EvalError(
                f"{manifest.path}: head {head!r} was trained on {target} classes {classes} but "
                f"the shards have {found}"
            )


def _samples(manifest: Manifest, split: str, check: Any = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of ``split`` in manifest order: raw whole images and their labels.

    Read with the training decoder (``SampleDecoder``) but without its crop: every pixel of
    every image is kept. With ``check`` (``bigmodel.data``'s ``ShardCheck``) each shard is
    hashed as it streams and compared with its sha256 in ``dataset.json`` at its end.
    """
    import webdataset as wds

    from bigmodel.data._decode import SampleDecoder, png_handler

    paths = manifest.shard_paths(split)
    if not paths:
        return iter(())
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(paths),  # every shard once, in order
        check.samples if check is not None else wds.tarfile_to_samples(),  # raw members
        wds.decode(png_handler),  # numpy arrays, ints, JSON
        wds.map(SampleDecoder(manifest)),  # tensors: image [C, H, W] unnormalised, labels, has
    )
    return iter(pipeline)


def _shard_check(manifest: Manifest, split: str) -> Any:
    from bigmodel.data._integrity import ShardCheck

    paths = manifest.shard_paths(split)
    shards = manifest.split(split).shards
    return ShardCheck({p: s.sha256 for p, s in zip(paths, shards, strict=True) if s.sha256})


def _batches(samples: Iterator[dict], batch_size: int, prep) -> Iterator[dict[str, Any]]:
    """Consecutive samples of one image size, up to ``batch_size``, collated.

    ``batch["normalised"]`` holds the images after the training-time intensity transform,
    applied per sample (a ``ct_window`` model reads each sample's own DICOM window); ``image``
    keeps the raw values for the pictures.
    """
    pending: list[dict] = []
    for sample in samples:
        sample["normalised"] = normalize(
            sample["image"], prep, sample.get("window"), sample.get("volume")
        )
        if pending and (
            len(pending) == batch_size or sample["image"].shape != pending[0]["image"].shape
        ):
            yield _collate(pending)
            pending = []
        pending.append(sample)
    if pending:
        yield _collate(pending)


def _collate(samples: list[dict]) -> dict[str, Any]:
    batch = collate(samples)
    batch["normalised"] = torch.stack([s["normalised"] for s in samples])
    return batch


# ------------------------------------------------------------------------------ records


class _Records:
    """What the per-sample, per-patient and bootstrap figures need, kept as the pass goes."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.cfg = loaded.config
        self.types = dict(loaded.preprocessing.head_types)
        self.keys: list[str] = []
        self.groups: list[str] = []
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.cls: list[torch.Tensor] = []
        self.has_cls: list[torch.Tensor] = []
        self.confusions: dict[str, list[np.ndarray]] = {}
        self.annotated_pixels = 0
        self.embeddings: dict[str, list[torch.Tensor]] = {}
        self.detections: dict[str, list[tuple]] = {}

    def add(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        self.keys += batch["key"]
        self.groups += batch["group"]
        if "cls" in batch:
            self.cls.append(batch["cls"])
            self.has_cls.append(batch["has"]["cls"])
        for head, out in outputs.items():
            kind = self.types[head]
            if kind == "classification":
                self.logits.setdefault(head, []).append(out.float().cpu())
            elif kind == "segmentation":
                self._segmentation(head, out, batch)
            elif kind == "retrieval":
                self.embeddings.setdefault(head, []).append(out.float().cpu())
            elif kind == "detection":
                shown = self.detections.setdefault(head, [])
                for i, det in enumerate(out):
                    truth = batch["boxes"][i]["boxes"]
                    if len(shown) < SHOW and len(truth):
                        shown.append(
                            (
                                batch["key"][i],
                                batch["image"][i].numpy(),
                                truth.numpy(),
                                det["boxes"].cpu().numpy(),
                                det["scores"].cpu().numpy(),
                            )
                        )

    def _segmentation(self, head: str, logits: torch.Tensor, batch: dict[str, Any]) -> None:
        cfg = self.cfg.model.heads[head]
        mask = batch[cfg.target]
        if logits.shape[-2:] != mask.shape[-2:]:
            raise RuntimeError(
                f"head {head!r}: logits {list(logits.shape)} do not cover masks {list(mask.shape)}"
            )
        k = cfg.num_classes
        pred = logits.argmax(dim=1).cpu()
        for i in range(len(mask)):
            valid = (mask[i] != cfg.ignore_index) & bool(batch["has"][cfg.target][i])
            self.annotated_pixels += int(valid.sum())
            index = mask[i][valid] * k + pred[i][valid]
            confusion = np.bincount(index.numpy(), minlength=k * k).reshape(k, k)
            self.confusions.setdefault(head, []).append(confusion)

    def patient_index(self) -> tuple[np.ndarray, list[str]]:
        names = sorted(set(self.groups))
        lookup = {g: i for i, g in enumerate(names)}
        return np.array([lookup[g] for g in self.groups], dtype=np.int64), names


# ------------------------------------------------------------------------------ statistics


def _classification_ci(
    head: str, rec: _Records, patient: np.ndarray, counts: np.ndarray
) -> dict[str, list[float] | None]:
    """Accuracy / balanced accuracy / AUROC intervals: the head's own metric on resampled data."""
    cfg = rec.cfg.model.heads[head]
    logits = torch.cat(rec.logits[head])
    target, has = torch.cat(rec.cls), torch.cat(rec.has_cls)
    with warnings.catch_warnings():
        # A replicate may draw patients of one class only: its AUROC is NaN, which the
        # percentile interval skips; torchmetrics' warning about it is noise here.
        warnings.simplefilter("ignore", UserWarning)
        figures = _replicates(head, cfg, logits, target, has, patient, counts)
    return {f"{head}/{k}": interval(np.array(v, dtype=float)) for k, v in figures.items()}


def _replicates(head, cfg, logits, target, has, patient, counts) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {}
    for row in counts:
        index = torch.from_numpy(np.repeat(np.arange(len(patient)), row[patient]))
        metric = ClassificationMetrics(head, cfg)
        metric.update(logits[index], {cfg.target: target[index], "has": {cfg.target: has[index]}})
        computed = metric.compute()
        for name in ("accuracy", "balanced_accuracy", "auroc"):
            figures.setdefault(name, []).append(computed[name])
    return figures


def _per_class_classification(head: str, rec: _Records, figures: dict, classes: list[str]):
    logits = torch.cat(rec.logits[head])
    target, has = torch.cat(rec.cls), torch.cat(rec.has_cls)
    keep = has & (target >= 0) if target.ndim == 1 else has
    rows, matrix = [], None
    if target.ndim == 1:
        pred = logits[keep].argmax(dim=1).numpy()
        truth = target[keep].numpy()
        k = len(classes)
        matrix = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
        for c, name in enumerate(classes):
            support, predicted = int(matrix[c].sum()), int(matrix[:, c].sum())
            rows.append(
                {
                    "class": name,
                    "support": support,
                    "sensitivity": matrix[c, c] / support if support else math.nan,
                    "precision": matrix[c, c] / predicted if predicted else math.nan,
                    "auroc": figures.get(f"{head}/auroc_{c}", math.nan),
                }
            )
    return rows, matrix


def _curves(head: str, rec: _Records, classes: list[str], multilabel: bool) -> dict:
    """One-vs-rest ROC and PR curves per class (torchmetrics' binary curves)."""
    from torchmetrics.functional.classification import (
        binary_average_precision,
        binary_precision_recall_curve,
        binary_roc,
    )

    logits = torch.cat(rec.logits[head])
    target, has = torch.cat(rec.cls), torch.cat(rec.has_cls)
    probs = logits.sigmoid() if multilabel else logits.softmax(dim=1)
    curves = {}
    for c, name in enumerate(classes):
        truth = target[:, c] if multilabel else (target == c).long()
        keep = has & (truth >= 0) & ((target >= 0) if target.ndim == 1 else True)
        truth, score = truth[keep], probs[keep, c]
        if truth.numel() == 0 or truth.min() == truth.max():
            continue  # one class only: no curve
        fpr, tpr, _ = binary_roc(score, truth)
        precision, recall, _ = binary_precision_recall_curve(score, truth)
        curves[name] = {
            "fpr": fpr.numpy(),
            "tpr": tpr.numpy(),
            "precision": precision.numpy(),
            "recall": recall.numpy(),
            "ap": float(binary_average_precision(score, truth)),
        }
    return curves


def _segmentation_tables(
    head: str,
    rec: _Records,
    patient: np.ndarray,
    names: list[str],
    classes: list[str],
    counts: np.ndarray,
) -> dict[str, Any]:
    per_sample = np.stack(rec.confusions[head])  # [N, K, K]
    per_patient = np.zeros((len(names), *per_sample.shape[1:]), dtype=np.int64)
    np.add.at(per_patient, patient, per_sample)
    total = per_sample.sum(axis=0)
    class_dice = dice(total)
    sample_dice = foreground_mean(dice(per_sample))
    patient_dice = foreground_mean(dice(per_patient))
    replicate_dice = dice(np.einsum("bp,pkl->bkl", counts, per_patient))
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
        "patient_dice": {n: float(d) for n, d in zip(names, patient_dice, strict=True)},
        "evaluated_pixels": int(total.sum()),
    }


def _retrieval_hits(head: str, rec: _Records) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine nearest neighbours of every sample among the others, and whether rank 1 is right.

    Labels are what the head was trained on (the class, or the patient for ``target: group``);
    a sample whose label no other sample shares cannot be answered and gets NaN, as in
    ``bigmodel.metrics`` (pytorch-metric-learning).
    """
    cfg = rec.cfg.model.heads[head]
    emb = torch.nn.functional.normalize(torch.cat(rec.embeddings[head]), dim=1)
    if cfg.target == "group":
        labels = np.unique(np.array(rec.groups), return_inverse=True)[1]
    else:
        labels = torch.cat(rec.cls).numpy()
    sims = emb @ emb.T
    sims.fill_diagonal_(-math.inf)
    order = sims.argsort(dim=1, descending=True)[:, : min(5, len(emb) - 1)].numpy()
    shared = np.array([(labels == label).sum() > 1 for label in labels])
    hit = (
        np.where(shared, labels[order[:, 0]] == labels, np.nan)
        if len(order[0])
        else shared * np.nan
    )
    return hit.astype(float), order, labels


# ------------------------------------------------------------------------------ the report


def evaluate_model(
    model: str | Path | LoadedModel,
    shards: str | Path,
    out: str | Path,
    split: str = "test",
    batch_size: int = 16,
    bootstrap: int = BOOTSTRAP,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model folder on a split of shards; writes the report into ``out``.

    Raises:
        ModelFolderError, ManifestError, EvalError: naming the file at fault.
    """
    from tqdm import tqdm

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    manifest = load_manifest(shards)
    _check_fit(loaded, manifest)
    prep = loaded.preprocessing
    total = manifest.split(split).num_samples
    out = Path(out)
    metrics = build_metrics(loaded.config.model)
    rec = _Records(loaded)
    bar = tqdm(total=total, desc=f"eval {split}", unit="img", disable=not progress)
    check = _shard_check(manifest, split)
    with torch.inference_mode():
        for batch in _batches(_samples(manifest, split, check), batch_size, prep):
            outputs = forward(loaded.model, batch["normalised"], prep)
            metrics.update(outputs, batch)
            rec.add(outputs, batch)
            bar.update(len(batch["key"]))
    bar.close()
    if check.damaged:
        raise EvalError(
            f"{sorted(check.damaged)[0]}: its bytes do not match the sha256 in {manifest.path} "
            f"(damaged after the build), so no report was written; run bigmodel-shard verify "
            f"{manifest.root} and rebuild the shard"
        )
    if not rec.keys:
        raise EvalError(f"{manifest.path}: split {split!r} has no samples")
    figures = metrics.compute()
    patient, names = rec.patient_index()
    counts = bootstrap_counts(len(names), bootstrap)
    report: dict[str, Any] = {
        "model": str(loaded.path),
        "model_name": loaded.card.get("name"),
        "shards": str(manifest.root),
        "split": split,
        "num_samples": len(rec.keys),
        "num_patients": len(names),
        "whole_image": f"sliding windows of {prep.image_size} px (Gaussian blend) where larger",
        "metrics": figures,
        "ci95": {},
        "ci_method": f"percentile bootstrap over patients, {bootstrap} replicates",
        "per_class": {},
        "per_patient": {},
        "plots": {},
    }
    per_sample: dict[str, list] = {"key": rec.keys, "patient": rec.groups}
    for head, kind in prep.head_types.items():
        cfg = loaded.config.model.heads[head]
        classes = prep.classes.get(head) or []
        if kind == "classification":
            multilabel = getattr(cfg, "multilabel", False)
            report["ci95"] |= _classification_ci(head, rec, patient, counts)
            rows, matrix = _per_class_classification(head, rec, figures, classes)
            report["per_class"][head] = rows
            probs = torch.cat(rec.logits[head])
            probs = (probs.sigmoid() if multilabel else probs.softmax(dim=1)).numpy()
            per_sample[f"{head}_predicted"] = [classes[int(k)] for k in probs.argmax(axis=1)]
            per_sample[f"{head}_prob_max"] = probs.max(axis=1).round(4).tolist()
            patient_probs = np.zeros((len(names), probs.shape[1]))
            np.add.at(patient_probs, patient, probs)
            patient_probs /= np.bincount(patient, minlength=len(names))[:, None]
            report["per_patient"][head] = {
                n: classes[int(p.argmax())] for n, p in zip(names, patient_probs, strict=True)
            }
            if matrix is not None:
                report["plots"][f"{head}_confusion"] = str(
                    _plots.confusion_matrix_png(
                        matrix, classes, f"{head} ({split})", out / f"{head}_confusion.png"
                    )
                )
            curves = _curves(head, rec, classes, multilabel)
            if curves:
                aurocs = {
                    c: figures.get(f"{head}/auroc_{i}", math.nan) for i, c in enumerate(classes)
                }
                report["plots"][f"{head}_roc_pr"] = str(
                    _plots.roc_pr_png(curves, aurocs, head, out / f"{head}_roc_pr.png")
                )
        elif kind == "segmentation":
            seg = _segmentation_tables(head, rec, patient, names, classes, counts)
            report["ci95"] |= seg["ci"]
            report["per_class"][head] = seg["rows"]
            report["per_patient"][head] = {"dice_mean_3d": seg["patient_dice"]}
            report[f"{head}_pixels"] = {
                "annotated": rec.annotated_pixels,
                "evaluated": seg["evaluated_pixels"],
            }
            per_sample[f"{head}_dice_mean"] = np.round(seg["sample_dice"], 4).tolist()
            report["plots"][f"{head}_overlays"] = str(
                _overlays(loaded, manifest, split, head, rec.keys, seg["sample_dice"], classes, out)
            )
        elif kind == "retrieval":
            hit, order, labels = _retrieval_hits(head, rec)
            weights = counts[:, patient]
            known = np.isfinite(hit)
            replicate = (weights[:, known] * hit[known]).sum(1) / np.maximum(
                weights[:, known].sum(1), 1
            )
            report["ci95"][f"{head}/recall@1"] = interval(replicate)
            per_sample[f"{head}_hit@1"] = [None if not np.isfinite(h) else bool(h) for h in hit]
            report["plots"][f"{head}_neighbours"] = str(
                _strips(manifest, split, head, rec, order, labels, out)
            )
        elif kind == "detection" and rec.detections.get(head):
            report["plots"][f"{head}_boxes"] = str(
                _plots.detection_png(rec.detections[head], head, out / f"{head}_boxes.png")
            )
            report["ci95"][f"{head}/map"] = None  # see docs/inference.md: no per-patient mAP
    # A picture with nothing to show (no labelled sample, one class only) is left out.
    report["plots"] = {k: v for k, v in report["plots"].items() if v != "None"}
    _write_csv(out / "per_sample.csv", per_sample)
    report["per_sample_csv"] = str(out / "per_sample.csv")
    write_json(out / "report.json", report)
    report["report"] = str(out / "report.json")
    return report


def _images_of(manifest: Manifest, split: str, wanted: set[str]) -> dict[str, dict]:
    """A second, cheap pass over the split for the few samples a picture shows (bounded memory)."""
    found = {}
    for sample in _samples(manifest, split):
        if sample["key"] in wanted:
            found[sample["key"]] = sample
            if len(found) == len(wanted):
                break
    return found


def _overlays(loaded, manifest, split, head, keys, sample_dice, classes, out: Path) -> Path | None:
    cfg = loaded.config.model.heads[head]
    scored = [i for i in np.argsort(sample_dice) if np.isfinite(sample_dice[i])]
    if not scored:
        return None
    picks = {"worst": scored[0], "median": scored[len(scored) // 2], "best": scored[-1]}
    samples = _images_of(manifest, split, {keys[i] for i in picks.values()})
    cases = []
    prep = loaded.preprocessing
    for label, index in picks.items():
        sample = samples[keys[index]]
        images = normalize(sample["image"][None], prep, sample.get("window"), sample.get("volume"))
        logits = forward(loaded.model, images, prep)[head]
        pred = logits.argmax(dim=1)[0].numpy()
        mask = sample[cfg.target].numpy()
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
        cases, len(classes), f"{head}: best / median / worst Dice", out / f"{head}_overlays.png"
    )


def _strips(manifest, split, head, rec: _Records, order, labels, out: Path) -> Path | None:
    queries = [i for i in range(len(rec.keys)) if (labels == labels[i]).sum() > 1][:SHOW]
    if not queries or order.shape[1] == 0:
        return None
    wanted = {rec.keys[j] for q in queries for j in (q, *order[q])}
    samples = _images_of(manifest, split, wanted)
    emb = torch.nn.functional.normalize(torch.cat(rec.embeddings[head]), dim=1)
    strips = []
    for q in queries:
        neighbours = [
            (
                rec.keys[j],
                samples[rec.keys[j]]["image"].numpy(),
                float(emb[q] @ emb[j]),
                bool(labels[j] == labels[q]),
            )
            for j in order[q]
        ]
        strips.append((rec.keys[q], samples[rec.keys[q]]["image"].numpy(), neighbours))
    return _plots.retrieval_png(strips, head, out / f"{head}_neighbours.png")


def _write_csv(path: Path, columns: dict[str, list]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(zip(*columns.values(), strict=True))

    atomic_write(path, write)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def print_report(report: dict[str, Any]) -> None:
    """The figures with their 95% intervals, and the per-class tables, as plain text."""
    print(f"{report['split']}: {report['num_samples']} samples, {report['num_patients']} patients")
    for key in sorted(report["metrics"]):
        if key.endswith("/count") or any(key.endswith(f"_{d}") for d in "0123456789"):
            continue
        ci = report["ci95"].get(key)
        interval = f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(f"  {key:32s} {_fmt(report['metrics'][key])}{interval}")
    for head, rows in report["per_class"].items():
        if not rows:
            continue
        columns = list(rows[0])
        print(f"\n  {head}: " + "  ".join(f"{c:>12s}" for c in columns))
        for row in rows:
            print("  " + " " * (len(head) + 2) + "  ".join(f"{_fmt(row[c]):>12s}" for c in columns))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bigmodel-eval``; exit 2 on bad input, naming the file."""
    parser = argparse.ArgumentParser(
        prog="bigmodel-eval",
        description="Evaluate a model folder on a split of shards on whole images: metrics with "
        "95%% bootstrap intervals over patients, per-class tables, plots and report.json.",
    )
    parser.add_argument("model", help="model folder (RUN/model) or models:/NAME@ALIAS")
    parser.add_argument("--shards", required=True, help="folder holding dataset.json")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--out", required=True, help="folder for report.json, CSVs and PNGs")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument(
        "--bootstrap", type=int, default=BOOTSTRAP, help="bootstrap replicates (0: no intervals)"
    )
    args = parser.parse_args(argv)
    try:
        report = evaluate_model(
            args.model, args.shards, args.out, args.split, args.batch_size, args.bootstrap
        )
    except (ModelFolderError, ManifestError, EvalError) as err:
        print(f"bigmodel-eval: {err}", file=sys.stderr)
        return 2
    print_report(report)
    print(f"\nreport: {report['report']}  per-sample: {report['per_sample_csv']}")
    for name, path in report["plots"].items():
        print(f"  plot {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
