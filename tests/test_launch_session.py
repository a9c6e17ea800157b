"""Resuming from remote storage: each rank downloads only the checkpoint files it loads.

No cloud here: the checkpoint folder is seen through non-local pyarrow filesystems (a
``SubTreeFileSystem`` over the local disk, and fsspec's in-memory filesystem behind
``PyFileSystem(FSSpecHandler(...))``), wrapped in a real ``ray.train.Checkpoint``, which is what
``ray.train.get_checkpoint()`` hands a worker on s3:// or gs://. The folders hold tiny files named
as DeepSpeed and the engine name them. No Ray is started.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import fsspec
import pyarrow.fs
import pytest
import ray.train
from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem, SubTreeFileSystem
from ray.train import Checkpoint

from launch._worker import quiet_worker_logs
from launch.session import _is_local, checkpoint_files, download_for_rank

WORLD = 3


def layout(strategy: str, zero_stage: int, world_size: int = WORLD) -> dict[str, bytes]:
    """Files of one checkpoint as the engine writes it (content: the file's own name)."""
    names = ["trainer.pt", *(f"rng/rank_{r:05d}.pt" for r in range(world_size))]
    if strategy == "ddp":
        names.append("model.pt")
    elif zero_stage == 3:
        for r in range(world_size):
            names += [
                f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
            ]
    else:
        names.append("ds/mp_rank_00_model_states.pt")
        names += [f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
    files = {name: name.encode() for name in names}
    meta = {"step": 6, "world_size": world_size, "strategy": strategy, "zero_stage": zero_stage}
    files["meta.json"] = json.dumps(meta).encode()
    return files


def write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@pytest.fixture
def remote(tmp_path):
    """``put(files)``: a checkpoint on a non-local filesystem rooted at ``tmp_path/bucket``."""

    def put(files: dict[str, bytes]) -> Checkpoint:
        write(tmp_path / "bucket" / "runs" / "step_0000006", files)
        fs = SubTreeFileSystem(str(tmp_path / "bucket"), LocalFileSystem())
        return Checkpoint("runs/step_0000006", filesystem=fs)

    return put


def downloaded(target: Path) -> set[str]:
    return {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("strategy", "stage", "own"),
    [
        ("ddp", 0, lambda r: {"model.pt"}),
        (
            "deepspeed",
            2,
            lambda r: {
                "ds/mp_rank_00_model_states.pt",
                f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
            },
        ),
        (
            "deepspeed",
            3,
            lambda r: {
                f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
            },
        ),
    ],
    ids=["ddp", "zero2", "zero3"],
)
def test_each_rank_downloads_only_what_it_loads(remote, tmp_path, strategy, stage, own):
    files = layout(strategy, stage)
    checkpoint = remote(files)
    assert not _is_local(checkpoint)  # RaySession would download, not read in place
    for rank in range(WORLD):
        target = tmp_path / "local" / f"rank{rank}" / "step_0000006"
        assert download_for_rank(checkpoint, target, rank, WORLD) == target
        common = {"meta.json", "trainer.pt", f"rng/rank_{rank:05d}.pt"}
        assert downloaded(target) == common | own(rank), f"rank {rank}"
        for name in downloaded(target):
            assert (target / name).read_bytes() == files[name]  # copied, not just named
        assert not target.with_name("step_0000006.partial").exists()


def test_rank_1_does_not_take_rank_10s_partition(remote, tmp_path):
    """``zero_pp_rank_1_`` is a prefix of ``zero_pp_rank_10_``: the pattern must not match it."""
    checkpoint = remote(layout("deepspeed", 2, world_size=12))
    target = tmp_path / "local" / "step_0000006"
    download_for_rank(checkpoint, target, 1, 12)
    partitions = {n for n in downloaded(target) if "zero_pp_rank" in n}
    assert partitions == {"ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"}


def test_zero_resume_on_another_world_size_downloads_every_partition(remote, tmp_path):
    """Resharding ZeRO optimizer state reads all partitions; DDP still needs only its own RNG."""
    files = layout("deepspeed", 2)
    target = download_for_rank(remote(files), tmp_path / "local" / "zero", 0, 1)
    assert downloaded(target) == set(files)
    ddp = download_for_rank(remote(layout("ddp", 0)), tmp_path / "local" / "ddp", 0, 1)
    assert downloaded(ddp) == {"meta.json", "trainer.pt", "rng/rank_00000.pt", "model.pt"}


def test_checkpoint_without_meta_is_copied_whole_for_the_engine_to_refuse(remote, tmp_path):
    files = layout("deepspeed", 2)
    del files["meta.json"]
    target = download_for_rank(remote(files), tmp_path / "local" / "step", 0, WORLD)
    assert downloaded(target) == set(files)


def test_download_through_an_fsspec_filesystem_replaces_a_stale_folder(tmp_path):
    """fsspec's in-memory store behind pyarrow (how gcsfs/adlfs-backed storage is seen)."""
    memory = fsspec.filesystem("memory")
    files = layout("deepspeed", 3)
    for name, data in files.items():
        memory.pipe_file(f"/bucket/step_0000009/{name}", data)
    try:
        checkpoint = Checkpoint(
            "/bucket/step_0000009", filesystem=PyFileSystem(FSSpecHandler(memory))
        )
        assert checkpoint_files(checkpoint.filesystem, checkpoint.path) == sorted(files)
        target = tmp_path / "rank2" / "step_0000009"
        target.mkdir(parents=True)
        (target / "stale.pt").write_bytes(b"from an earlier attempt")
        download_for_rank(checkpoint, target, 2, WORLD)
        assert downloaded(target) == {
            "meta.json",
            "trainer.pt",
            "rng/rank_00002.pt",
            "ds/zero_pp_rank_2_mp_rank_00_model_states.pt",
            "ds/zero_pp_rank_2_mp_rank_00_optim_states.pt",
        }
    finally:
        memory.rm("/bucket", recursive=True)


def test_local_checkpoints_are_read_in_place(tmp_path):
    assert _is_local(Checkpoint(str(tmp_path), filesystem=pyarrow.fs.LocalFileSystem()))


def test_ray_train_report_loggers_are_quieted_without_private_imports():
    """Ray Train V2 names some loggers after their file; the public package path finds them."""
    package = os.path.dirname(ray.train.__file__)
    probe = logging.getLogger(os.path.join(package, "v2", "some_module.py"))
    probe.setLevel(logging.INFO)
    quieted = quiet_worker_logs()
    assert probe.name in quieted and probe.level == logging.WARNING
    # the report logger Ray Train V2 really has (its worker context module) is among them
    assert any(name.endswith(os.path.join("execution", "context.py")) for name in quieted)
    assert all(name.startswith(package + os.sep) for name in quieted)  # nobody else's loggers


def test_bf16_partitions_are_this_ranks_too(remote, tmp_path):
    """Under bf16 DeepSpeed prefixes the optimizer partitions with ``bf16_``."""
    files = {
        (n.replace("ds/zero_pp", "ds/bf16_zero_pp") if "optim_states" in n else n): data
        for n, data in layout("deepspeed", 2).items()
    }
    target = download_for_rank(remote(files), tmp_path / "local" / "bf16", 2, WORLD)
    assert {n for n in downloaded(target) if n.startswith("ds/")} == {
        "ds/mp_rank_00_model_states.pt",
        "ds/bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt",
    }
