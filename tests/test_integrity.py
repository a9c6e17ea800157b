"""Integrity on read: a shard whose payload changed after the build (tar headers intact) is named
by the loaders while they stream it; ``data.on_damaged_shard=skip`` drops it and counts it."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from test_data_pipeline import make_cfg, write_dataset

from bigmodel.data import DamagedShardError, load_manifest, make_eval_loader, make_train_loader


def _record_hashes(root: Path) -> None:
    """Put each shard's sha256 into dataset.json, as bigmodel-shard build does."""
    path = root / "dataset.json"
    manifest = json.loads(path.read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            shard["sha256"] = hashlib.sha256((root / shard["name"]).read_bytes()).hexdigest()
    path.write_text(json.dumps(manifest))


def _damage_payload(shard: Path) -> None:
    """Flip the last byte of the first image's pixel data; every tar header stays valid."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith("image.npy"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data + member.size - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with tarfile.open(shard) as tar:  # still a perfectly readable tar
        assert len(tar.getmembers()) > 0


@pytest.fixture
def damaged(tmp_path) -> Path:
    write_dataset(tmp_path, {"train": [6, 6, 6, 6], "val": [5, 5]}, size=8)
    _record_hashes(tmp_path)
    _damage_payload(tmp_path / "train-000001.tar")
    _damage_payload(tmp_path / "val-000000.tar")
    return tmp_path


def test_the_loader_names_a_damaged_shard_and_the_fix(damaged):
    cfg = make_cfg(shards=str(damaged), loader_workers=1, batch_size=2, shuffle_buffer=0)
    loader = make_train_loader(cfg, load_manifest(damaged), rank=0, world_size=1)
    with pytest.raises(DamagedShardError) as err:
        for _ in range(3):
            list(loader)
    message = str(err.value)
    assert "train-000001.tar" in message and "bigmodel-shard verify" in message
    assert "step" in message and "on_damaged_shard=skip" in message
    assert len(message.splitlines()) == 1  # one clear line, no worker traceback
    with pytest.raises(DamagedShardError, match=r"val-000000.tar"):
        list(make_eval_loader(cfg, load_manifest(damaged), 0, 1))


def test_skip_mode_drops_the_shard_and_counts_it(damaged, caplog):
    cfg = make_cfg(
        shards=str(damaged),
        loader_workers=1,
        batch_size=2,
        shuffle_buffer=0,
        on_damaged_shard="skip",
    )
    loader = make_train_loader(cfg, load_manifest(damaged), rank=0, world_size=1)
    damaged_name = str(damaged / "train-000001.tar")
    epochs = [list(loader) for _ in range(4)]
    assert all(len(e) == len(loader) for e in epochs)  # reports never count as batches
    assert loader.damaged_shards == 1
    assert "train-000001.tar" in caplog.text and "dropped for the rest of the run" in caplog.text
    # after the report, the damaged shard is never drawn again
    found_at = next(i for i, e in enumerate(epochs) if any(damaged_name in b["shards"] for b in e))
    for epoch in epochs[found_at + 1 :]:
        assert not any(damaged_name in b["shards"] for b in epoch)


def test_intact_shards_pass(tmp_path):
    write_dataset(tmp_path, {"train": [4, 4], "val": [3]}, size=8)
    _record_hashes(tmp_path)
    cfg = make_cfg(shards=str(tmp_path), loader_workers=0, batch_size=2)
    assert sum(len(b["key"]) for b in make_eval_loader(cfg, load_manifest(tmp_path), 0, 1)) == 3
    loader = make_train_loader(cfg, load_manifest(tmp_path), 0, 1)
    assert len(list(loader)) == len(loader) and loader.damaged_shards == 0


def test_training_stops_naming_the_shard(damaged, tmp_path):
    """The engine's train() on damaged shards ends with the loader's one-line error."""
    from bigmodel.engine import train
    from bigmodel.engine.session import LocalSession

    cfg = make_cfg(shards=str(damaged), loader_workers=1, batch_size=4, shuffle_buffer=0)
    cfg = cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"heads": {"diag": cfg.model.heads["diag"]}}),
            "train": cfg.train.model_copy(
                update={"epochs": 2, "eval_every": 0, "output_dir": str(tmp_path / "runs")}
            ),
        }
    )
    with pytest.raises(DamagedShardError, match=r"train-000001.tar.*resume from the checkpoint"):
        train(cfg, LocalSession())
