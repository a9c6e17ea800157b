"""Sweep files: every bad one fails up front with one line and starts nothing (no Ray here).

The shards are the demo's (a real nibabel MR volume + generated ones), so the metric check reads
a real manifest: heads diagnosis (classification), organs (segmentation), patient (retrieval).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import yaml

from launch._demo_data import MASK_CLASSES, write_demo_source
from sharding.build import BuildOptions, build_shards
from sharding.readers.nifti import NiftiCsvReader
from tune import cli
from tune.search import concurrency, make_scheduler, param_space
from tune.spec import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tune-spec")
    csv_path = write_demo_source(work / "source", patients=6)
    reader = NiftiCsvReader(str(csv_path), mask_classes=",".join(MASK_CLASSES))
    out = work / "shards"
    build_shards(
        reader, out, BuildOptions(max_shard_samples=6, use_source_split=True, progress=False)
    )
    return out


def _sweep(tmp_path: Path, shards: Path, **changes) -> Path:
    data = {
        "name": "t",
        "base": str(ROOT / "configs" / "demo.yaml"),
        "overrides": [f"data.shards={shards}", "cluster.num_workers=1"],
        "metric": "val/organs/dice_mean",
        "mode": "max",
        "num_samples": 4,
        "space": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "output_dir": str(tmp_path / "sweeps"),
    }
    data.update(changes)
    if "overrides" in changes:
        data["overrides"] = [f"data.shards={shards}", *changes["overrides"]]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_good_sweep_loads_and_builds_tune_objects(tmp_path, shards):
    sweep = load_sweep(_sweep(tmp_path, shards), ["train.epochs=4", "sweep.num_samples=6"])
    assert sweep.spec.num_samples == 6 and sweep.config.train.epochs == 4
    assert sweep.max_evaluations() == 4
    space = param_space(sweep)
    assert set(space) == {"optim.lr"} and space["optim.lr"].lower == pytest.approx(1e-4)
    scheduler = make_scheduler(sweep)
    assert type(scheduler).__name__ == "AsyncHyperBandScheduler"


BAD = [
    (
        {"space": {"optim.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}},
        "space key 'optim.lrr' is not a field",
    ),
    (
        {"space": {"optim": {"type": "choice", "values": [1]}}},
        "space key 'optim' is not a field",
    ),
    (
        {"space": {"optim.lr": {"type": "uniform", "low": 0.0, "high": 0.1}}},
        "value 0.0 is rejected by the training config: ",
    ),
    (
        {"space": {"optim.momentum": {"type": "uniform", "low": 0.5, "high": 1.5}}},
        "value 1.5 is rejected",
    ),
    (
        {"space": {"optim.name": {"type": "choice", "values": ["adamw", "rmsprop"]}}},
        "value 'rmsprop' is rejected by the training config: invalid config (space optim.name="
        "'rmsprop'): optim.name: Input should be",
    ),
    (
        {"space": {"data.batch_size": {"type": "uniform", "low": 8, "high": 64}}},
        "data.batch_size (uniform): value 28.72 is rejected",
    ),
    (
        {"space": {"optim.lr": {"type": "loguniform", "low": 1e-2, "high": 1e-4}}},
        "low 0.01 must be below high 0.0001",
    ),
    (
        {"space": {"optim.lr": {"type": "loguniform", "low": 0.0, "high": 1e-2}}},
        "must be > 0 for a log scale",
    ),
    (
        {"space": {"optim.lr": {"type": "quniform", "low": 0.1, "high": 0.2, "q": 0.5}}},
        "q 0.5 is wider than the range",
    ),
    (
        {"space": {"train.epochs": {"type": "randint", "low": 3, "high": 3}}},
        "low 3 must be below high 3 (high is exclusive)",
    ),
    (
        {"space": {"optim.lr": {"type": "choice", "values": []}}},
        "values is empty",
    ),
    (
        {"space": {"optim.lr": {"type": "normal", "low": 1, "high": 2}}},
        "invalid sweep file",
    ),
    ({"metric": "val/diagnosis/dice_mean"}, "metric 'val/diagnosis/dice_mean' is not reported"),
    ({"metric": "val/lesions/map"}, "is not reported by heads ['diagnosis', 'organs', 'patient']"),
    (
        {"overrides": ["train.eval_every=0"]},
        "no evaluation runs: train.eval_every=0",
    ),
    (
        {"overrides": ["data.shards=/nonexistent/shards"]},
        "base config data: /nonexistent/shards/dataset.json: no shard manifest",
    ),
    ({"searcher": "tpe"}, "searcher: Input should be 'optuna', 'random' or 'grid'"),
    (
        {"space": {"optim.lr": {"type": "grid", "values": [1e-3, 1e-2]}}},
        "which Optuna's TPE cannot sample",
    ),
    (
        {
            "searcher": "grid",
            "space": {"optim.lr": {"type": "choice", "values": [1e-3, 1e-2]}},
        },
        "searcher grid needs every space entry to be type: grid",
    ),
    ({"scheduler": {"type": "pbt"}}, "scheduler pbt is refused: population based training"),
    ({"base": "configs/nope.yaml"}, "base config configs/nope.yaml does not exist"),
    ({"overrides": ["optim.name=rmsprop"]}, "base config: invalid config"),
    ({"num_samples": 0}, "num_samples: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m[:40] for _, m in BAD])
def test_each_bad_sweep_names_its_problem_in_one_line(tmp_path, shards, changes, message):
    with pytest.raises(SweepError) as info:
        load_sweep(_sweep(tmp_path, shards, **changes))
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_the_cli_exits_2_with_one_line_and_starts_nothing(tmp_path, shards, capsys):
    path = _sweep(tmp_path, shards, metric="val/organs/auroc")
    assert cli.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigmodel-tune: ") and "\n" not in err
    assert "metric 'val/organs/auroc' is not reported" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists()  # no sweep folder, no trial


def test_the_cli_refuses_to_overwrite_or_resume_nothing(tmp_path, shards, capsys):
    path = _sweep(tmp_path, shards)
    assert cli.main([str(path), "--resume"]) == 2
    assert "holds no sweep to continue" in capsys.readouterr().err
    (tmp_path / "sweeps" / "t" / "tune").mkdir(parents=True)
    assert cli.main([str(path)]) == 2
    assert "already holds a sweep: pass --resume" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_resources_per_trial_are_checked_against_the_cluster(tmp_path, shards):
    sweep = load_sweep(_sweep(tmp_path, shards), ["cluster.num_workers=4"])
    node = {"CPU": 2.0}
    with pytest.raises(
        SweepError, match=r"one trial needs 4 CPU \(4 workers x 1\) but the cluster has 2"
    ):
        concurrency(sweep, node, node, [node])
    sweep = load_sweep(_sweep(tmp_path, shards), ["cluster.cpus_per_worker=8"])
    two_nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    with pytest.raises(SweepError, match="one worker needs 8 CPU but the largest node has 4"):
        concurrency(sweep, {"CPU": 8.0}, {"CPU": 8.0}, two_nodes)
    gpu = load_sweep(_sweep(tmp_path, shards), ["cluster.use_gpu=true"])
    with pytest.raises(SweepError, match="needs 1 GPU"):
        concurrency(gpu, {"CPU": 8.0}, {"CPU": 8.0}, [{"CPU": 8.0}])


def test_concurrency_follows_the_free_resources_and_says_why(tmp_path, shards):
    sweep = load_sweep(_sweep(tmp_path, shards), ["cluster.num_workers=2"])
    total = {"CPU": 16.0, "GPU": 0.0}
    n, why = concurrency(sweep, total, {"CPU": 7.0}, [total])
    assert n == 3 and "7 free CPU / 2 per trial (2 workers x 1)" in why
    n, why = concurrency(sweep, total, {"CPU": 16.0}, [total])
    assert n == 4 and "all 4 trials fit at once" in why
    n, why = concurrency(sweep, total, {"CPU": 1.0}, [total])
    assert n == 1 and "busy" in why
    fixed = load_sweep(_sweep(tmp_path, shards, max_concurrent_trials=2))
    assert concurrency(fixed, total, {"CPU": 16.0}, [total])[0] == 2


@pytest.mark.parametrize("name", ["classification", "segmentation", "multitask", "demo"])
def test_ready_sweep_files_validate(name):
    sweep = load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml", check_data=False)
    assert sweep.spec.metric.startswith("val/")
    assert sweep.max_evaluations() > sweep.spec.scheduler.grace_period
    assert sweep.config.cluster.use_gpu == (name != "demo")
