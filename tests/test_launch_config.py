"""Ray Train settings from our config, the storage check and the CLI's front door.

No Ray is started here except by the ``ray``-marked probe test, on the session's head."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bigmodel.config import ConfigError, load_config
from launch import _ray_config
from launch._progress import format_report
from launch.session import plain_metrics
from launch.train import main, resolve_paths

MINIMAL = ["model.heads={diag: {type: classification}}"]


def cfg_with(*overrides: str):
    return load_config(None, [*MINIMAL, *overrides])


def node(cpu: float = 8.0, gpu: float = 0.0, alive: bool = True) -> dict:
    """One entry of ``ray.nodes()`` (the fields the storage check reads)."""
    resources = {"CPU": cpu}
    if gpu:
        resources["GPU"] = gpu
    return {"Alive": alive, "Resources": resources, "NodeManagerAddress": "10.0.0.1"}


def test_scaling_config_reserves_cpus_and_gpus_per_worker():
    cpu = _ray_config.scaling_config(cfg_with("cluster.num_workers=3", "cluster.cpus_per_worker=2"))
    assert cpu.num_workers == 3
    assert not cpu.use_gpu
    assert cpu.resources_per_worker == {"CPU": 2.0}
    gpu = _ray_config.scaling_config(
        cfg_with("cluster.num_workers=8", "cluster.use_gpu=true", "cluster.gpus_per_worker=0.5")
    )
    assert gpu.use_gpu
    assert gpu.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}


def test_collective_backend_and_timeout_come_from_the_config():
    cpu = _ray_config.torch_config(cfg_with("distributed.timeout_s=123"))
    assert (cpu.backend, cpu.timeout_s) == ("gloo", 123)
    gpu = _ray_config.torch_config(cfg_with("cluster.use_gpu=true"))
    assert (gpu.backend, gpu.timeout_s) == ("nccl", 1800)
    forced = _ray_config.torch_config(cfg_with("cluster.use_gpu=true", "distributed.backend=gloo"))
    assert forced.backend == "gloo"


def test_run_config_failures_storage_and_env(tmp_path, monkeypatch):
    # the forwarded set is exactly what the driver has: clear the rest, whatever the shell set
    for key in _ray_config.FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("NOT_FORWARDED", "1")
    cfg = cfg_with(f"train.output_dir={tmp_path}", "name=exp1", "cluster.max_failures=2")
    run = _ray_config.run_config(cfg)
    assert run.name == "exp1"
    assert run.failure_config.max_failures == 2
    assert run.storage_path == str(tmp_path / "ray_results")
    assert run.worker_runtime_env == {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "3"}}
    assert run.checkpoint_config.num_to_keep is None  # every checkpoint unless asked
    kept = _ray_config.run_config(cfg_with("train.keep_checkpoints=3"))
    assert kept.checkpoint_config.num_to_keep == 3
    s3 = _ray_config.run_config(cfg_with("cluster.storage_path=s3://bucket/ray"))
    assert s3.storage_path == "s3://bucket/ray"


def test_single_node_may_keep_checkpoints_on_local_disk(tmp_path):
    _ray_config.check_storage(cfg_with("cluster.num_workers=2"), [node(cpu=4)])
    local = cfg_with("cluster.num_workers=2", f"cluster.storage_path={tmp_path}")
    _ray_config.check_storage(local, [node(cpu=4), node(alive=False)])


def test_multi_node_without_storage_is_rejected_with_the_fix():
    with pytest.raises(ConfigError, match=r"cluster\.storage_path is unset.*2 nodes.*s3://"):
        _ray_config.check_storage(cfg_with("cluster.num_workers=2"), [node(), node()])


def test_request_larger_than_the_only_node_counts_as_multi_node():
    cfg = cfg_with("cluster.num_workers=8", "cluster.use_gpu=true")
    with pytest.raises(ConfigError, match="spans several nodes"):
        _ray_config.check_storage(cfg, [node(cpu=0)])  # a head with --num-cpus=0


def test_multi_node_storage_must_be_visible_on_every_node(tmp_path):
    nodes = [node(), {**node(), "NodeManagerAddress": "10.0.0.2", "NodeID": "abcdef0123"}]
    never = lambda path, alive: pytest.fail("URIs are not probed")  # noqa: E731
    _ray_config.check_storage(cfg_with("cluster.storage_path=s3://b/ray"), nodes, never)
    _ray_config.check_storage(cfg_with("cluster.storage_path=gs://b/ray"), nodes, never)
    with pytest.raises(ConfigError, match="scheme 'ftp'"):
        _ray_config.check_storage(cfg_with("cluster.storage_path=ftp://host/ray"), nodes, never)
    probed = []

    def probe(path, alive):
        probed.append((path, len(alive)))
        return [_ray_config._node_name(alive[1])]

    shared = cfg_with(f"cluster.storage_path=file://{tmp_path}/ray")
    with pytest.raises(
        ConfigError, match=r"not be read back on node\(s\) 10\.0\.0\.2 \(node abcdef01\)"
    ):
        _ray_config.check_storage(shared, [*nodes, node(alive=False)], probe)
    assert probed == [(str(tmp_path / "ray"), 2)]  # the resolved path, alive nodes only
    _ray_config.check_storage(shared, nodes, lambda path, alive: [])  # every node sees it


@pytest.mark.ray
def test_sentinel_probe_runs_one_task_per_node(ray_head, tmp_path, repo_root):
    """On the session's real head: the node reads the driver's token; a wrong token or a missing
    file (what a node with its own local disk at that path would see) names the node."""
    script = f"""
import json
from pathlib import Path
import ray
from launch import _ray_config as rc
ray.init(address="{ray_head.gcs_address}", logging_level="ERROR")
nodes = [n for n in ray.nodes() if n["Alive"]]
Path("{tmp_path}/other").write_text("another token")
print(json.dumps({{
    "shared": rc.blind_nodes("{tmp_path}/ray", nodes),
    "other": rc.nodes_not_reading("{tmp_path}/other", "the driver's token", nodes),
    "missing": rc.nodes_not_reading("{tmp_path}/missing", "the driver's token", nodes),
    "names": [rc._node_name(n) for n in nodes],
}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo_root,
        env=ray_head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shared"] == [] and len(result["names"]) == 1
    assert result["other"] == result["names"] and result["missing"] == result["names"]
    assert not list((tmp_path / "ray").glob(".bigmodel-storage-check-*"))  # sentinel removed


def test_metrics_become_plain_python_values():
    out = plain_metrics(
        {"loss": torch.tensor(0.5), "step": np.int64(3), "lr": np.float32(0.1), "v": [1, 2]}
    )
    assert out == {"loss": 0.5, "step": 3, "lr": pytest.approx(0.1), "v": [1, 2]}
    assert type(out["step"]) is int and type(out["loss"]) is float


def test_cli_rejects_bad_override_naming_the_field(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"heads": {"d": {"type": "classification"}}}}))
    assert main([str(path), "cluster.num_wrkers=2"]) == 2
    assert "cluster.num_wrkers" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_prints_the_resolved_config_with_absolute_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"heads": {"d": {"type": "classification"}}}}))
    assert main([str(path), "train.output_dir=out", "data.shards=sh", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["output_dir"] == str(tmp_path / "out")
    assert printed["data"]["shards"] == str(tmp_path / "sh")


def test_resolve_paths_leaves_uris_alone():
    cfg = resolve_paths(cfg_with("data.shards=s3://bucket/shards"))
    assert cfg.data.shards == "s3://bucket/shards"
    assert Path(cfg.train.output_dir).is_absolute()


def test_relative_cache_dir_is_resolved_where_the_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_paths(cfg_with("data.shards=s3://bucket/shards", "data.cache_dir=cache"))
    assert cfg.data.cache_dir == str(tmp_path.resolve() / "cache")
    assert resolve_paths(cfg_with("data.shards=s3://b/s")).data.cache_dir is None


def test_progress_line_names_step_figures_and_checkpoint():
    line = format_report(
        {
            "step": 14.0,
            "epoch": 1.0,
            "loss/total": 1.94705,
            "lr": 5e-4,
            "val/organs/dice_mean": 0.43201,
            "val/organs/count": 99.0,
            "memory_mb": 1700.0,
        },
        "step_0000014",
    )
    assert line == (
        "bigmodel: step 14 epoch 1 | loss/total 1.947 | lr 0.0005 | "
        "val/organs/dice_mean 0.432 | checkpoint step_0000014"
    )


def test_trainer_polls_workers_often_unless_the_user_chose(monkeypatch, tmp_path):
    """Ray Train reads the poll interval from the driver's environment when the run starts
    (and passes it on to the controller); a value the user set is kept."""
    import os

    from launch.train import build_trainer

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
        [f"train.output_dir={tmp_path}"],
    )
    monkeypatch.delenv(_ray_config.POLL_ENV, raising=False)
    build_trainer(cfg)
    assert os.environ[_ray_config.POLL_ENV] == _ray_config.POLL_INTERVAL_S
    monkeypatch.setenv(_ray_config.POLL_ENV, "3")
    build_trainer(cfg)
    assert os.environ[_ray_config.POLL_ENV] == "3"
