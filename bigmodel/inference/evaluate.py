"""``bigmodel-eval MODEL --shards DIR --split test --out DIR``: a report people can trust and read.

Every sample of the split is predicted on its whole image (``bigmodel.models.window``:
Gaussian-blended sliding windows where an image exceeds the training size, so every pixel and
every box counts), normalised exactly as in training (the model folder's ``preprocessing.json``).
The figures are the training-time ones (``bigmodel.metrics``), plus what each head's task
(:data:`bigmodel.tasks.TASKS`, ``Task.evaluation``) adds from its records of the pass:

* per-class tables (support, sensitivity, precision, AUROC; Dice and IoU per structure);
* per-sample and per-patient figures (a patient's Dice over all its slices, i.e. in 3D; its
  diagnosis from the mean probability of its slices) in ``per_sample.csv`` / ``per_patient.csv``;
* 95% bootstrap confidence intervals over patients (patients are the independent unit: slices of
  one patient are correlated, so resampling slices would make the intervals too narrow);
* pictures: confusion matrix, ROC and PR curves, segmentation overlays (best, median, worst
  sample), detection boxes against ground truth, retrieval query/neighbour strips;
* ``report.json`` with all of it.

This module is the pass and the command: samples come from ``bigmodel.data.SplitSamples``
(whole images with their stored pixels), the per-head records, tables and plots from the tasks
(``bigmodel/tasks/``), the bootstrap from ``bigmodel.tasks._stats``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.data import Manifest, ManifestError, SplitSamples, collate, load_manifest
from bigmodel.inference.files import atomic_write, write_json
from bigmodel.inference.forward import forward
from bigmodel.inference.loading import load_model
from bigmodel.metrics import build_metrics
from bigmodel.model_folder import LoadedModel, ModelFolderError
from bigmodel.preprocessing import normalize
from bigmodel.tasks import TASKS, EvalRun
from bigmodel.tasks._stats import bootstrap_counts

__all__ = ["EvalError", "evaluate_model", "main"]

BOOTSTRAP = 1000
"""Bootstrap replicates for the confidence intervals."""


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


def _batches(samples: Iterable[dict], batch_size: int, prep) -> Iterator[dict[str, Any]]:
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


def _samples_of(manifest: Manifest, split: str) -> Any:
    """``samples_of(keys)``: a second, cheap pass over the split for the few samples a picture
    shows (bounded memory)."""

    def samples_of(wanted: set[str]) -> dict[str, dict]:
        found = {}
        for sample in SplitSamples(manifest, split, verify=False):
            if sample["key"] in wanted:
                found[sample["key"]] = sample
                if len(found) == len(wanted):
                    break
        return found

    return samples_of


def _patient_index(groups: list[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(groups))
    lookup = {g: i for i, g in enumerate(names)}
    return np.array([lookup[g] for g in groups], dtype=np.int64), names


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
    records = {
        head: TASKS[cfg.type].evaluation(head, cfg, prep.classes.get(head) or [])
        for head, cfg in loaded.config.model.heads.items()
    }
    keys: list[str] = []
    groups: list[str] = []
    bar = tqdm(total=total, desc=f"eval {split}", unit="img", disable=not progress)
    samples = SplitSamples(manifest, split)
    with torch.inference_mode():
        for batch in _batches(samples, batch_size, prep):
            outputs = forward(loaded.model, batch["normalised"], prep)
            metrics.update(outputs, batch)
            keys += batch["key"]
            groups += batch["group"]
            for head, output in outputs.items():
                records[head].add(output, batch)
            bar.update(len(batch["key"]))
    bar.close()
    if samples.damaged:
        raise EvalError(
            f"{sorted(samples.damaged)[0]}: its bytes do not match the sha256 in {manifest.path} "
            f"(damaged after the build), so no report was written; run bigmodel-shard verify "
            f"{manifest.root} and rebuild the shard"
        )
    if not keys:
        raise EvalError(f"{manifest.path}: split {split!r} has no samples")
    figures = metrics.compute()
    patient, names = _patient_index(groups)

    def predict(sample: dict) -> dict[str, Any]:
        images = normalize(sample["image"][None], prep, sample.get("window"), sample.get("volume"))
        return forward(loaded.model, images, prep)

    run = EvalRun(
        split=split,
        out=out,
        figures=figures,
        keys=keys,
        groups=groups,
        patient=patient,
        patients=names,
        counts=bootstrap_counts(len(names), bootstrap),
        samples_of=_samples_of(manifest, split),
        predict=predict,
    )
    report: dict[str, Any] = {
        "model": str(loaded.path),
        "model_name": loaded.card.get("name"),
        "shards": str(manifest.root),
        "split": split,
        "num_samples": len(keys),
        "num_patients": len(names),
        "whole_image": f"sliding windows of {prep.image_size} px (Gaussian blend) where larger",
        "metrics": figures,
        "ci95": {},
        "ci_method": (
            f"percentile bootstrap over patients, {bootstrap} replicates"
            if bootstrap > 0
            else "none (--bootstrap 0)"
        ),
        "per_class": {},
        "per_patient": {},
        "plots": {},
    }
    per_sample: dict[str, list] = {"key": keys, "patient": groups}
    for record in records.values():
        record.report(run, report, per_sample)
    # A picture with nothing to show (no labelled sample, one class only) is left out.
    report["plots"] = {k: v for k, v in report["plots"].items() if v != "None"}
    _write_csv(out / "per_sample.csv", per_sample)
    report["per_sample_csv"] = str(out / "per_sample.csv")
    write_json(out / "report.json", report)
    report["report"] = str(out / "report.json")
    return report


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
