"""Shards on object storage, end to end against a real S3-compatible server on loopback.

The server is moto's (``ThreadedMotoServer``, the session fixture ``s3_server`` in conftest.py);
every request below is real HTTP to it through s3fs/botocore, as against a bucket:

1. ``bigmodel-shard build --out s3://...`` (the CLI) writes the shard objects, then
   ``dataset.json``; ``bigmodel-shard verify s3://...`` passes; the same command again is a no-op.
2. Two gloo ranks run the engine's ``train`` with ``data.shards=s3://...`` (and a node-local
   ``data.cache_dir``): both ranks stream their shards from the server.
3. ``bigmodel-eval`` evaluates that model on the test split read from the server.
4. A damaged object (one byte flipped, same size) is named by ``verify`` and by the loader.
5. Bad input gives one line before Ray starts: a missing bucket (``bigmodel-train``, exit 2),
   missing credentials, a prefix without ``dataset.json``, a missing or resized shard object;
   an unreachable endpoint is retried, then named. No message carries the secret key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from _engine_tiny import free_port, set_dist_env

from launch._demo_data import MASK_CLASSES, write_demo_source
from sharding import storage

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.backbone.name=test_resnet",
    "model.heads.organs.decoder_channels=8",
    "model.heads.patient.embed_dim=8",
    "data.image_size=32",
    "data.batch_size=4",
    "data.loader_workers=1",
    "data.shuffle_buffer=8",
    "distributed.strategy=ddp",
    "distributed.zero_stage=0",
    "train.epochs=2",
    "train.steps_per_epoch=2",
    "train.eval_every=2",
    "train.log_every=1",
    "cluster.num_workers=2",
]


def _command(name: str):
    """The ``main`` of console script ``name``, as installed (run in this process: no second
    interpreter importing torch on a 2-core machine)."""
    from importlib.metadata import entry_points

    [script] = entry_points(group="console_scripts", name=name)
    return script.load()


def _run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _env(s3_server, **extra: str) -> dict[str, str]:
    env = {**os.environ, **s3_server.env, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The demo source (a real nibabel MR volume + 6 generated patients): its labels.csv."""
    return write_demo_source(tmp_path_factory.mktemp("source"), patients=6)


def _build(source: Path, url: str, *extra: str) -> list[str]:
    return [
        "build", "--source", "nifti", "--input", str(source), "--out", url,
        "--use-source-split", "--max-shard-samples", "6", "--quiet",
        "-o", f"mask_classes={','.join(MASK_CLASSES)}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def remote(s3_server, source, tmp_path_factory) -> str:
    """Demo shards built straight to ``s3://remote-shards/demo`` by the CLI (its own process)."""
    url = s3_server.bucket("remote-shards") + "/demo"
    stage = tmp_path_factory.mktemp("stage")
    command = [sys.executable, "-m", "sharding", *_build(source, url, "--stage", str(stage))]
    done = _run(command, _env(s3_server))
    assert done.returncode == 0, done.stderr[-2000:]
    return url


def test_build_writes_objects_then_manifest_and_verify_passes(remote, s3_server, tmp_path):
    sizes = storage.list_sizes(remote)
    manifest = json.loads(storage.read_bytes(storage.join(remote, "dataset.json")))
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert len(shards) >= 4 and "dataset.json" in sizes
    assert {s["name"]: s["bytes"] for s in shards} == {
        n: b for n, b in sizes.items() if n != "dataset.json"
    }
    verify = [sys.executable, "-m", "sharding", "verify", remote, "--world-size", "2"]
    done = _run(verify, _env(s3_server))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{remote}: OK" in done.stdout
    # the same build again: the prefix's manifest has the same fingerprint, nothing is rebuilt
    again = _run([*_build_args(manifest), "--stage", str(tmp_path / "stage")], _env(s3_server))
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stderr and not (tmp_path / "stage").exists()


def test_build_refuses_a_missing_bucket_or_a_foreign_prefix_and_redoes_an_upload(
    remote, source, s3_server, capsys
):
    from sharding.cli import main

    assert main(_build(source, "s3://no-such-bucket/demo")) == 2
    assert capsys.readouterr().err.splitlines() == [
        "bigmodel-shard: error: s3://no-such-bucket/demo: bucket 'no-such-bucket' does not exist "
        "(create it, or fix the bucket name in the URL)"
    ]
    bucket = s3_server.bucket("build-checks")
    fs, path = storage.filesystem(f"{bucket}/notes/readme.txt")
    fs.pipe_file(path, b"not a shard")
    assert main(_build(source, f"{bucket}/notes")) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "is not empty and holds no bigmodel-shard build (['readme.txt'])" in line
    # shards without dataset.json: an interrupted upload, which the same command finishes
    _copy_prefix(remote, f"{bucket}/resume", drop="dataset.json")
    assert main(_build(source, f"{bucket}/resume")) == 0
    resumed = json.loads(storage.read_bytes(f"{bucket}/resume/dataset.json"))
    original = json.loads(storage.read_bytes(f"{remote}/dataset.json"))
    assert resumed["splits"] == original["splits"]  # the same shards, byte for byte (sha256)


def _build_args(manifest: dict) -> list[str]:
    """The recorded ``bigmodel-shard build ...`` command, run as ``python -m sharding``."""
    import shlex

    args = shlex.split(manifest["created_by"]["command"])[1:]
    return [sys.executable, "-m", "sharding", *(a for a in args if a != "--quiet")]


def _train_rank(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    """One gloo rank of the engine's ``train`` (run by ``mp.spawn``)."""
    import torch

    from bigmodel.config import load_config
    from bigmodel.engine import LocalSession, train

    torch.set_num_threads(1)
    set_dist_env(rank, world_size, port)
    train(load_config(ROOT / "configs" / "demo.yaml", overrides), LocalSession())


@pytest.fixture(scope="module")
def trained(remote, tmp_path_factory) -> Path:
    """A 2-rank run on the remote shards, with a per-node shard cache; its run folder."""
    work = tmp_path_factory.mktemp("train")
    overrides = [
        *TINY,
        "name=remote",
        f"data.shards={remote}",
        f"data.cache_dir={work / 'cache'}",
        "data.loader_workers=0",  # the ranks read the bucket themselves: two processes, not four
        "train.steps_per_epoch=1",
        "train.eval_every=0",  # evaluation from the bucket is bigmodel-eval's test
        f"train.output_dir={work / 'runs'}",
    ]
    mp.spawn(_train_rank, args=(2, free_port(), overrides), nprocs=2, join=True)
    return work


def test_two_workers_train_from_the_bucket(trained, remote):
    run = trained / "runs" / "remote"
    assert (run / "model" / "model.safetensors").is_file()
    card = json.loads((run / "model" / "model_card.json").read_text())
    manifest = storage.read_bytes(storage.join(remote, "dataset.json"))
    import hashlib

    assert card["dataset_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert card["dataset_manifest"] == f"{remote}/dataset.json"
    # epoch 2 and evaluation found the shards each rank had read whole in the node cache
    cached = sorted(p.name for p in (trained / "cache").rglob("*.tar"))
    assert cached and all(name in storage.list_sizes(remote) for name in cached)
    assert not list((trained / "cache").rglob("*.tmp"))  # no half-read shard was kept


def test_evaluate_from_the_bucket(trained, remote, tmp_path, capsys):
    model = trained / "runs" / "remote" / "model"
    args = [
        str(model), "--shards", remote, "--split", "test",
        "--out", str(tmp_path / "eval"), "--batch-size", "4",
    ]  # fmt: skip
    assert _command("bigmodel-eval")(args) == 0, capsys.readouterr().err[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    manifest = json.loads(storage.read_bytes(storage.join(remote, "dataset.json")))
    assert report["num_samples"] == manifest["splits"]["test"]["num_samples"]


def _copy_prefix(src: str, dst: str, damage: str | None = None, drop: str | None = None) -> None:
    """Copy every object of ``src`` to ``dst``, flipping one byte in the middle of ``damage``
    (same size: only the sha256 can tell) and leaving ``drop`` out."""
    for name in storage.list_sizes(src):
        if name == drop:
            continue
        data = bytearray(storage.read_bytes(storage.join(src, name)))
        if name == damage:
            data[len(data) // 2] ^= 0xFF
        fs, path = storage.filesystem(storage.join(dst, name))
        fs.pipe_file(path, bytes(data))


def test_a_damaged_object_is_named(remote, s3_server, tmp_path):
    from bigmodel.config import load_config
    from bigmodel.data import DamagedShardError, load_manifest, make_eval_loader

    damaged_url = remote.replace("/demo", "/damaged")
    manifest = json.loads(storage.read_bytes(storage.join(remote, "dataset.json")))
    victim = manifest["splits"]["test"]["shards"][0]["name"]
    _copy_prefix(remote, damaged_url, damage=victim)
    done = _run([sys.executable, "-m", "sharding", "verify", damaged_url], _env(s3_server))
    assert done.returncode == 1
    assert f"{victim}: sha256 mismatch" in done.stdout
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, f"data.shards={damaged_url}"])
    cfg.data.loader_workers = 0
    cfg.data.cache_dir = str(tmp_path / "cache")
    loader = make_eval_loader(cfg, load_manifest(damaged_url), 0, 1, split="test")
    with pytest.raises(DamagedShardError) as err:
        list(loader)
    assert f"{damaged_url}/dataset.json" in str(err.value) and victim in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.tar*"))  # a damaged shard is never cached


def _preflight(shards: str) -> list[str]:
    from bigmodel.config import load_config
    from launch._preflight import problems

    cfg = load_config(ROOT / "configs" / "demo.yaml", [*TINY, f"data.shards={shards}"])
    return problems(cfg)


def test_bad_remote_input_is_one_line_before_ray(remote, s3_server, monkeypatch, capsys):
    import ray

    secret = s3_server.env["AWS_SECRET_ACCESS_KEY"]
    # a bucket that does not exist: bigmodel-train stops before Ray starts, exit code 2
    args = [str(ROOT / "configs" / "demo.yaml"), *TINY, "data.shards=s3://no-such-bucket/demo"]
    assert _command("bigmodel-train")(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "bigmodel-train: s3://no-such-bucket/demo/dataset.json: bucket 'no-such-bucket' does not "
        "exist (create it, or fix the bucket name in the URL)"
    ]
    assert not ray.is_initialized() and secret not in err

    # a prefix without dataset.json (an unfinished upload), a missing and a resized shard
    s3_server.bucket("bad-shards")
    assert _preflight("s3://bad-shards/empty") == [
        "s3://bad-shards/empty/dataset.json: no shard manifest under this prefix (set "
        "data.shards to the prefix holding dataset.json, or build one with bigmodel-shard build "
        "--out s3://bad-shards/empty)"
    ]
    manifest = json.loads(storage.read_bytes(storage.join(remote, "dataset.json")))
    first = manifest["splits"]["train"]["shards"][0]["name"]
    _copy_prefix(remote, "s3://bad-shards/missing", drop=first)
    [line] = _preflight("s3://bad-shards/missing")
    assert "s3://bad-shards/missing/dataset.json: split 'train'" in line
    assert f"missing: ['{first}']" in line and "--out s3://bad-shards/missing" in line
    _copy_prefix(remote, "s3://bad-shards/resized")
    fs, path = storage.filesystem(f"s3://bad-shards/resized/{first}")
    fs.pipe_file(path, b"truncated")
    [line] = _preflight("s3://bad-shards/resized")
    assert f"{first} (9 bytes, manifest says" in line and "wrong size" in line

    # no credentials anywhere in the environment
    import s3fs

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        [line] = _preflight(remote)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert line.startswith(f"{remote}/dataset.json: no credentials for s3://")
    assert "AWS_ACCESS_KEY_ID" in line and secret not in line


def test_an_unreachable_endpoint_is_retried_then_named(s3_server, monkeypatch):
    import s3fs

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    monkeypatch.setenv("BIGMODEL_STORAGE_BACKOFF_S", "0.01")
    assert storage.retrying(flaky, "s3://b/k") == "ok" and len(calls) == 3

    # a real endpoint nobody listens on: botocore's own attempt, ours, then one line
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("BIGMODEL_STORAGE_RETRIES", "2")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        [line] = _preflight("s3://remote-shards/demo")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert line.startswith("s3://remote-shards/demo/dataset.json: ")
    assert "after 2 attempt(s)" in line and "AWS_ENDPOINT_URL_S3" in line
