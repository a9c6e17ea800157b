"""Ray Train settings from our config, the storage check and the CLI's front door (no Ray started)."""

from __future__ import annotations

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
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = cfg_with(f"train.output_dir={tmp_path}", "name=exp1", "cluster.max_failures=2")
    run = _ray_config.run_config(cfg)
    assert run.name == "exp1"
    assert run.failure_config.max_failures == 2
    assert run.storage_path == str(tmp_path / "ray_results")
    assert run.worker_runtime_env == {"env_vars": {"DS_ACCELERATOR": "cpu"}}
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


def test_multi_node_storage_must_be_shared(tmp_path):
    nodes = [node(), node()]
    _ray_config.check_storage(cfg_with("cluster.storage_path=s3://b/ray"), nodes)
    _ray_config.check_storage(cfg_with("cluster.storage_path=gs://b/ray"), nodes)
    with pytest.raises(ConfigError, match="scheme 'ftp'"):
        _ray_config.check_storage(cfg_with("cluster.storage_path=ftp://host/ray"), nodes)
    mounts = tmp_path / "mounts"
    shared = tmp_path / "nfs"
    mounts.write_text(
        f"overlay / overlay rw 0 0\nserver:/export {shared} nfs4 rw,relatime 0 0\n"
        f"tmpfs {tmp_path / 'scratch'} tmpfs rw 0 0\n"
    )
    ok = cfg_with(f"cluster.storage_path={shared / 'ray'}")
    _ray_config.check_storage(ok, nodes, mounts=str(mounts))
    local = cfg_with(f"cluster.storage_path={tmp_path / 'scratch' / 'ray'}")
    with pytest.raises(ConfigError, match="local 'tmpfs' filesystem"):
        _ray_config.check_storage(local, nodes, mounts=str(mounts))


def test_real_mount_table_names_the_filesystem(tmp_path):
    assert _ray_config.mount_type(str(tmp_path)) not in ("unknown", "")


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
