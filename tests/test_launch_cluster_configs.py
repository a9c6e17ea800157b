"""The cluster launcher YAML, the KubeRay RayJob and the shipped configs are valid and consistent.

A manifest that parses but asks for 8 GPU workers on pods with 4 GPUs in total, or whose
entrypoint the schema rejects, would only fail on the cluster: these checks catch it here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

from bigmodel.config import Config, load_config
from launch import _ray_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "launch" / "cluster"


def _entrypoint_config(command: str) -> Config:
    """Validate a ``bigmodel-train CONFIG key=value ...`` command line against the schema."""
    argv = shlex.split(command)
    assert argv[0] == "bigmodel-train", command
    config, *overrides = argv[1:]
    assert not any(a.startswith("-") for a in overrides), command
    return load_config(ROOT / config, overrides)


def _k8s_quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _docs_cluster_commands() -> list[str]:
    """``bigmodel-train ...`` lines of the cluster ``ray job submit`` examples in docs/launch.md."""
    text = (ROOT / "docs" / "launch.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if "ray job submit" in line and "cluster.use_gpu=true" in line:
            commands.append(line.split(" -- ", 1)[1].strip())
    return commands


def test_cluster_launcher_yaml_passes_rays_schema():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(fillout_defaults(config))
    gpu_nodes = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_nodes, "the cluster launcher config has no GPU worker type"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU", 1) == 0, "training workers must not land on the head"
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2


def test_schema_check_catches_a_broken_launcher_yaml():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 4}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(fillout_defaults(config))


def test_documented_cluster_job_fits_the_launcher_cluster():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    worker = config["available_node_types"]["gpu_worker"]
    total_gpus = worker["resources"]["GPU"] * worker["max_workers"]
    commands = _docs_cluster_commands()
    assert commands, "docs/launch.md shows no cluster `ray job submit` line"
    for command in commands:
        cfg = _entrypoint_config(command)
        assert cfg.cluster.use_gpu
        assert cfg.cluster.num_workers * cfg.cluster.gpus_per_worker <= total_gpus
        assert (
            cfg.cluster.cpus_per_worker * min(cfg.cluster.num_workers, 4)
            <= worker["resources"]["CPU"]
        )
        assert _ray_config.is_uri(cfg.cluster.storage_path or ""), command
        # Multi-node (several GPU nodes) with this storage passes the driver's check.
        _ray_config.check_storage(cfg, [{"Alive": True, "Resources": worker["resources"]}] * 2)


def test_rayjob_manifest_entrypoint_validates_and_fits_the_pods():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["authOptions"]["mode"] == "token"
    assert cluster_spec["rayVersion"] == "2.60.0"
    cfg = _entrypoint_config(spec["entrypoint"])
    assert cfg.cluster.use_gpu
    assert cfg.distributed.strategy == "deepspeed"
    assert _ray_config.is_uri(cfg.cluster.storage_path or "")

    gpu_slots = 0
    for group in cluster_spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        per_pod = gpus // max(cfg.cluster.gpus_per_worker, 1e-9)
        assert cfg.cluster.cpus_per_worker * per_pod <= _k8s_quantity(limits["cpu"])
        gpu_slots += int(per_pod) * group["replicas"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cfg.cluster.num_workers <= gpu_slots
    head_params = cluster_spec["headGroupSpec"]["rayStartParams"]
    assert str(head_params.get("num-cpus")) == "0"
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.model.heads
    assert re.fullmatch(r"[A-Za-z0-9_\-]+", cfg.name), "run names end up in folder names"
