"""``make demo`` (``python -m launch.demo``): the whole product in a few minutes on 2 CPU cores.

1. source data: a real MR volume from nibabel's test data plus generated MR-like volumes, as
   NIfTI files and a ``labels.csv`` (diagnosis, patient id, label maps);
2. ``bigmodel-shard build`` -> WebDataset shards + ``dataset.json``, then ``verify`` and
   ``inspect`` (summary table and a sample grid);
3. ``bigmodel-train configs/demo.yaml``: 2 Ray Train workers on an embedded Ray, DeepSpeed
   ZeRO-2, one backbone with classification + segmentation + retrieval heads, evaluated on the
   validation split every epoch, checkpoints reported to Ray Train, the final model saved;
4. the saved model is loaded back and evaluated on the held-out test split on whole images
   (``bigmodel-eval``: figures with bootstrap intervals, tables and plots);
5. it predicts on the real NIfTI volume (``bigmodel-predict``): a label volume in the input's
   space and a JSON summary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bigmodel.config import load_config
from bigmodel.data import load_manifest
from bigmodel.inference.evaluate import evaluate_model
from bigmodel.inference.predict import Predictor
from bigmodel.tasks import TASKS
from launch import train as train_cli
from launch._demo_data import DEMO_PATIENTS, MASK_CLASSES, write_demo_source
from sharding.helpers import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def _banner(step: int, text: str) -> None:
    print(f"\n=== [{step}/5] {text}", flush=True)


def _shard_command() -> list[str]:
    """``bigmodel-shard`` from this environment (``python -m sharding`` if not installed)."""
    script = Path(sys.executable).parent / "bigmodel-shard"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sharding"]


def _run(cmd: list[str]) -> None:
    shown = ["bigmodel-shard", *cmd[1:]] if cmd[0].endswith("bigmodel-shard") else cmd
    print("$ " + " ".join(shown), flush=True)
    subprocess.run(cmd, check=True)


def build_demo_shards(out: Path, world_size: int, loader_workers: int) -> Path:
    """Steps 1-2: write the source data, shard it, verify and inspect the shards."""
    _banner(
        1,
        f"source data: nibabel's anatomical.nii (real MR) + {DEMO_PATIENTS} generated "
        "MR-like patients",
    )
    csv_path = write_demo_source(out / "source")
    print(f"wrote {csv_path} and {len(list((out / 'source').glob('*.nii*')))} NIfTI files")

    _banner(2, "shards: bigmodel-shard build / verify / inspect")
    shards = out / "shards"
    shard = _shard_command()
    _run(
        [
            *shard,
            "build",
            "--source",
            "nifti",
            "--input",
            str(csv_path),
            "--out",
            str(shards),
            "--option",
            f"mask_classes={','.join(MASK_CLASSES)}",
            "--layout",
            "2d",
            "--axis",
            "z",
            "--use-source-split",
            "--max-shard-samples",
            "8",
            "--seed",
            "0",
            "--name",
            "demo",
        ]
    )
    _run(
        [
            *shard,
            "verify",
            str(shards),
            "--world-size",
            str(world_size),
            "--loader-workers",
            str(loader_workers),
        ]
    )
    _run([*shard, "inspect", str(shards), "--show", "16", "--out", str(out / "samples.png")])
    return shards


# What each headline figure means, in one line (per-class figures are named by their class).
MEANINGS = {
    "accuracy": "share of test slices whose predicted diagnosis is right",
    "balanced_accuracy": "accuracy averaged over the diagnoses (0.5 = chance for two)",
    "auroc": "how well the scores rank lesion above normal (0.5 = chance, 1 = perfect)",
    "dice_mean": "mask overlap 2|P&T|/(|P|+|T|), mean over foreground classes (1 = perfect)",
    "iou_mean": "mask intersection over union, mean over foreground classes",
    "recall@1": "share of slices whose nearest other slice is from the same patient",
    "recall@5": "... within the 5 nearest slices",
    "recall@10": "... within the 10 nearest slices",
    "map@r": "mean average precision of same-patient slices among the R nearest",
    "count": "slices scored (pixels for segmentation)",
}


def format_results(results: dict[str, float], manifest) -> str:
    """``test/<head>/<figure>  value  meaning`` per line; per-class figures named by class."""
    lines = []
    for key in sorted(results):
        head, _, figure = key.rpartition("/")
        base, _, index = figure.rpartition("_")
        meaning = MEANINGS.get(figure, "")
        if not meaning and index.isdigit() and base in ("dice", "iou", "auroc"):
            task = "mask" if base in ("dice", "iou") else "cls"
            classes = manifest.tasks[task].classes if task in manifest.tasks else ()
            name = classes[int(index)] if int(index) < len(classes) else index
            meaning = f"{base} of class {name!r} alone"
        value = results[key]
        shown = f"{value:10.0f}" if figure == "count" else f"{value:10.4f}"
        lines.append(f"  test/{key:28s}{shown}  {meaning}")
    return "\n".join(lines)


def evaluate_saved_model(
    model_dir: Path, shards: Path, out: Path, split: str = "test"
) -> dict[str, float]:
    """Step 4: ``bigmodel-eval``'s library call on ``model/``: whole-image figures on ``split``,
    with the report (intervals, tables, plots) written into ``out``."""
    return evaluate_model(model_dir, shards, out, split=split, bootstrap=200)["metrics"]


def predict_real_volume(model_dir: Path, volume: Path, out: Path) -> dict:
    """Step 5: ``bigmodel-predict``'s library call on a real NIfTI volume."""
    return Predictor(model_dir).predict_file(volume, out)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m launch.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.perf_counter()
    out = Path(args.out).resolve()
    cfg = load_config(DEMO_CONFIG)
    shards = build_demo_shards(out, cfg.cluster.num_workers, cfg.data.loader_workers)

    runs = out / "runs"
    # A rerun of the demo trains from scratch (the same name would otherwise resume the run).
    for old in (runs / cfg.name, runs / "ray_results" / cfg.name):
        if old.exists():
            shutil.rmtree(old)
    _banner(
        3,
        f"training: {cfg.cluster.num_workers} Ray Train workers, DeepSpeed "
        f"ZeRO-{cfg.distributed.zero_stage}, heads {', '.join(cfg.model.heads)}",
    )
    train_argv = [str(DEMO_CONFIG), f"data.shards={shards}", f"train.output_dir={runs}"]
    print("$ bigmodel-train " + " ".join(train_argv), flush=True)
    status = train_cli.main(train_argv)
    if status != 0:
        return status

    _banner(4, "evaluation of the saved model on the held-out test split")
    run_dir = runs / cfg.name
    results = evaluate_saved_model(run_dir / "model", shards, run_dir / "eval")
    print(format_results(results, load_manifest(shards)))
    report = run_dir / "test_metrics.json"
    atomic_write_json(report, results, sort_keys=True)

    volume = out / "source" / "anatomical.nii"
    _banner(5, f"prediction on a real NIfTI volume: bigmodel-predict {run_dir / 'model'} {volume}")
    prediction = predict_real_volume(run_dir / "model", volume, out / "predictions")
    for head, entry in prediction["heads"].items():  # each task says what its output means
        print(f"  {entry['type']:15s} {TASKS[entry['type']].one_line(head, entry) or head}")

    print(f"\nDone in {time.perf_counter() - start:.0f} s. Results:")
    print(f"  shards + manifest:    {shards} (dataset.json), sample grid {out / 'samples.png'}")
    print(f"  run folder:           {run_dir}")
    print(
        f"  metrics + curves:     {run_dir / 'metrics.csv'}, {run_dir / 'curves.png'}, {run_dir / 'tb'}"
    )
    print(f"  checkpoints (Ray):    {runs / 'ray_results' / cfg.name}")
    print(
        f"  saved model:          {run_dir / 'model'} (model.safetensors, config.yaml, model_card.json)"
    )
    print(f"  test metrics:         {run_dir / 'test_metrics.json'}")
    print(f"  evaluation report:    {run_dir / 'eval' / 'report.json'} (+ tables, PNG plots)")
    organs = prediction["heads"]["organs"]["output"]
    print(f"  NIfTI prediction:     {organs}, {prediction['summary_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
