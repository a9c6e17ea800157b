"""``bigmodel-predict ... --ray``: bulk prediction over many studies with Ray Data.

Without ``--ray`` this entry point is ``bigmodel.inference.predict.main`` unchanged (no Ray is
imported). With it, the list of inputs becomes a Ray Dataset (one row per file or DICOM folder)
and ``map_batches`` runs a pool of actors, each holding one :class:`~bigmodel.inference.predict.
Predictor` (the model is loaded once per actor, on its GPU when the cluster has GPUs), calling
the same ``predict_file`` as the single-process path, so both write the same files: label maps
(PNG / NIfTI in the input's space) and one JSON summary per input. On a multi-node cluster,
``--out`` and the inputs must be on storage every node sees; ``models:/`` references are
resolved by each actor into its node's model cache.

    bigmodel-predict models:/chest-ct@production /data/studies/* --out /shared/preds --ray
    bigmodel-predict runs/demo/model scans/*.nii.gz --out preds --ray --actors 4
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bigmodel.inference.loading import load_model
from bigmodel.model_folder import ModelFolderError

__all__ = ["PredictActor", "main", "predict_with_ray"]


class PredictActor:
    """A Ray Data actor: one loaded model, predicting a batch of input files per call."""

    def __init__(self, model: str, out: str, batch_size: int, device: str) -> None:
        from bigmodel.inference.predict import Predictor

        if model.startswith("models:/"):
            from bigmodel.registry.versions import (
                resolve_model_uri,
            )  # downloads into this node's cache

            model = str(resolve_model_uri(model))
        self.predictor = Predictor(model, batch_size=batch_size, device=device)
        self.out = Path(out)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from bigmodel.preprocessing import InputError

        inputs, summaries, errors = [], [], []
        for path in batch["path"]:
            inputs.append(str(path))
            try:
                summary = self.predictor.predict_file(str(path), self.out)
                summaries.append(summary["summary_file"])
                errors.append("")
            except InputError as err:  # one bad study never stops the other thousands
                summaries.append("")
                errors.append(str(err))
        return {
            "input": np.array(inputs, dtype=object),
            "summary_file": np.array(summaries, dtype=object),
            "error": np.array(errors, dtype=object),
        }


def _connect(address: str | None) -> bool:
    """Join ``address`` / ``RAY_ADDRESS``, or start an embedded Ray; True when started here."""
    import ray  # here, not at the top: the single-process path never loads Ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, logging_level="WARNING")
        return False
    ray.init(address="local", num_cpus=os.cpu_count() or 1, logging_level="WARNING")
    return True


def predict_with_ray(
    model: str,
    inputs: Sequence[str],
    out: str | Path,
    batch_size: int = 16,
    actors: int | None = None,
    files_per_call: int = 4,
    cpus_per_actor: float = 1.0,
    address: str | None = None,
) -> list[dict[str, str]]:
    """Predict every input on a pool of Ray Data actors; one row per input, in input order.

    Each row has ``input``, ``summary_file`` (empty on failure) and ``error`` (empty on
    success). Actors take one GPU each when the cluster has GPUs, else ``cpus_per_actor`` CPUs.
    """
    import ray  # here, not at the top: the single-process path never loads Ray

    # absolute paths: actors run in their own working directories (other nodes, even)
    inputs = [str(Path(p).resolve()) for p in inputs]
    started = _connect(address)
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        cpus = ray.cluster_resources().get("CPU", 1.0)
        if actors is None:
            actors = int(gpus) if gpus >= 1 else max(1, int(cpus // cpus_per_actor))
        actors = max(1, min(actors, math.ceil(len(inputs) / files_per_call)))
        order = {p: i for i, p in enumerate(inputs)}
        # stages: input paths -> batches of paths -> actors' predict_file (writes the outputs)
        # -> one result row per input
        dataset = ray.data.from_items([{"path": p} for p in inputs])
        results = dataset.map_batches(
            PredictActor,
            fn_constructor_kwargs={
                "model": str(model),
                "out": str(Path(out).resolve()),
                "batch_size": batch_size,
                "device": "cuda" if gpus >= 1 else "cpu",
            },
            batch_size=files_per_call,
            batch_format="numpy",
            concurrency=actors,
            num_gpus=1 if gpus >= 1 else 0,
            num_cpus=cpus_per_actor,
        )
        rows = [{k: str(v) for k, v in row.items()} for row in results.take_all()]
    finally:
        if started:
            ray.shutdown()
    return sorted(rows, key=lambda row: order[row["input"]])


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bigmodel-predict --ray",
        description="Bulk prediction with Ray Data: the same outputs as bigmodel-predict.",
    )
    parser.add_argument("model", help="model folder (RUN/model) or models:/NAME@ALIAS")
    parser.add_argument("inputs", nargs="+", help="image, .nii/.nii.gz, .dcm, or a DICOM folder")
    parser.add_argument("--out", required=True, help="output folder (shared storage on a cluster)")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray (cluster ADDRESS, RAY_ADDRESS, or an embedded Ray)",
    )
    parser.add_argument("--actors", type=int, default=None, help="actors (default: GPUs, or CPUs)")
    parser.add_argument("--files-per-call", type=int, default=4, help="inputs per actor call")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor")
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)  # actors choose
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``bigmodel-predict``: the single-process CLI, or Ray Data with ``--ray``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--ray" or a.startswith("--ray=") for a in argv):
        from bigmodel.inference.predict import main as predict_main

        return predict_main(argv)
    args = _parse(argv)
    missing = [p for p in args.inputs if not Path(p).exists()]
    if missing:
        print(f"bigmodel-predict: input {missing[0]} does not exist", file=sys.stderr)
        return 2
    try:  # a bad model is one line here, not an actor crash on every node
        load_model(args.model)  # models:/ references are resolved (and cached) here too
    except (ModelFolderError, FileNotFoundError, ValueError) as err:
        print(f"bigmodel-predict: {err}", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = predict_with_ray(
        args.model,
        args.inputs,
        args.out,
        batch_size=args.batch_size,
        actors=args.actors,
        files_per_call=args.files_per_call,
        cpus_per_actor=args.cpus_per_actor,
        address=args.ray or None,
    )
    failed = [row for row in rows if row["error"]]
    for row in failed:
        print(f"bigmodel-predict: {row['error']}", file=sys.stderr)
    done = len(rows) - len(failed)
    print(f"bigmodel-predict: {done} of {len(rows)} input(s) predicted; outputs in {args.out}")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
