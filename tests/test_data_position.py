"""The training data position: a resumed epoch starts at its step by seeding, with no replay.

Shards are real webdataset tars written by the data tests' ``write_dataset``. What a loader
reads is counted by the samples that reach the decoder (``SampleDecoder.__call__`` wrapped in
place, ``loader_workers=0`` so it runs in this process): replaying the skipped steps would decode
them too, whatever the machine's speed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data_pipeline import write_dataset

from bigmodel.config import Config, config_from_dict
from bigmodel.data import load_manifest, make_train_loader
from bigmodel.data._decode import SampleDecoder
from bigmodel.engine import LocalSession, train

TASKS = {"cls": {"type": "multiclass", "classes": ["normal", "lesion"]}}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, {"train": [8, 8, 8, 8], "val": [3]}, size=16, tasks=TASKS)
    return root


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """The keys of every sample decoded in this process, in order."""
    keys: list[str] = []
    original = SampleDecoder.__call__

    def counting(self, sample):
        keys.append(sample["__key__"])
        return original(self, sample)

    monkeypatch.setattr(SampleDecoder, "__call__", counting)
    return keys


def _config(shards: Path, out: Path | str = "", name: str = "run", workers: int = 0) -> Config:
    return config_from_dict(
        {
            "name": name,
            "seed": 5,
            "data": {
                "shards": str(shards),
                "image_size": 16,
                "batch_size": 2,
                "shuffle_buffer": 4,
                "loader_workers": workers,
            },
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {"diag": {"type": "classification", "target": "cls"}},
            },
            "optim": {"name": "sgd", "lr": 0.01, "lr_scaling": "none", "accumulation_steps": 2},
            "schedule": {"name": "constant"},
            "train": {
                "epochs": 1,
                "steps_per_epoch": 4,
                "log_every": 1,
                "eval_every": 0,
                "checkpoint_every": 1,
                "output_dir": str(out),
            },
        }
    )


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_loader_started_mid_epoch_reads_only_the_remaining_steps(shards: Path, decoded: list):
    cfg = _config(shards)
    manifest = load_manifest(shards)
    loader = make_train_loader(cfg, manifest, rank=0, world_size=1)
    assert len(loader) == 8 and loader.steps_per_epoch == 4  # 4 steps x 2 micro-batches

    loader.set_epoch(1, start_step=3)
    resumed = list(loader)
    # only the last step's 2 micro-batches of 2 samples: nothing of steps 1-3 was decoded
    # (+ 1: wds.batched closes a batch when the next sample arrives, so it reads one ahead)
    assert len(resumed) == 8 - 3 * 2
    assert len(decoded) == 2 * 2 + 1
    assert decoded[:4] == _keys(resumed)
    # the integrity bookkeeping names the global optimizer step they fed (epoch 1, step 4)
    assert {s for steps in loader.integrity.used.values() for s in steps} == {1 * 4 + 4}
    # the position moves on to the start of the next epoch
    assert (loader.epoch, loader.start_step) == (2, 0)

    decoded.clear()
    again = make_train_loader(cfg, manifest, rank=0, world_size=1)
    again.set_epoch(1, start_step=3)
    assert _keys(list(again)) == _keys(resumed)  # deterministic for the same (epoch, step)
    start = make_train_loader(cfg, manifest, rank=0, world_size=1)
    start.set_epoch(1)
    whole = list(start)
    assert len(whole) == 8
    assert _keys(whole[-2:]) != _keys(resumed)  # a fresh draw, not the tail of the epoch start

    with pytest.raises(ValueError, match="start_step=4 is outside the epoch's 4"):
        loader.set_epoch(0, start_step=4)


def test_workers_resume_deterministically_then_follow_the_epoch(shards: Path):
    """Loader workers (persistent) read the step too; augmentation is seeded by it."""
    cfg = _config(shards, workers=2)
    manifest = load_manifest(shards)

    def resumed() -> tuple[list[dict], list[dict]]:
        loader = make_train_loader(cfg, manifest, rank=0, world_size=1)
        loader.set_epoch(0, start_step=1)
        return list(loader), list(loader)  # the rest of epoch 0, then all of epoch 1

    (rest, following), (rest2, _) = resumed(), resumed()
    assert len(rest) == 6 and len(following) == 8
    for a, b in zip(rest, rest2, strict=True):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
    fresh = make_train_loader(cfg, manifest, rank=0, world_size=1)
    fresh.set_epoch(1)
    assert _keys(following) == _keys(list(fresh))  # the next epoch starts at step 0 again


def test_train_resumes_mid_epoch_without_replaying(shards: Path, tmp_path: Path, decoded: list):
    full = LocalSession()
    train(_config(shards, tmp_path, "full"), full)
    assert len(decoded) == 4 * 2 * 2 + 1  # 4 steps x 2 micro-batches x 2 samples (+ 1 ahead)
    decoded.clear()

    resumed = LocalSession(resume_from=str(tmp_path / "full/checkpoints/step_0000002"))
    figures = train(_config(shards, tmp_path, "resumed"), resumed)
    # steps 3 and 4 only: replaying the epoch up to the checkpoint would decode twice as many
    assert len(decoded) == 2 * 2 * 2 + 1
    assert figures["step"] == 4.0
    assert [Path(c).name for c in resumed.checkpoints] == ["step_0000003", "step_0000004"]


def test_resume_past_the_end_of_a_shorter_epoch_goes_on_with_the_next(tmp_path: Path):
    """A checkpoint at step 3 of 4, resumed where an epoch has 2 steps (e.g. more workers)."""
    from _engine_tiny import run_fit, tiny_config

    cfg = tiny_config(tmp_path, "long", train={"epochs": 2, "checkpoint_every": 1})
    run_fit(cfg, 0, 1, batches=4)
    resumed = tiny_config(tmp_path, "short", train={"epochs": 2, "checkpoint_every": 1})
    figures, session = run_fit(
        resumed, 0, 1, batches=2, resume_from=str(tmp_path / "long/checkpoints/step_0000003")
    )
    # epoch 0 is over (3 >= 2 steps); epoch 1 runs its 2 steps
    assert figures["step"] == 5.0
    assert [Path(c).name for c in session.checkpoints] == ["step_0000004", "step_0000005"]


def test_resume_past_the_end_of_the_last_epoch_still_evaluates_and_reports(tmp_path: Path):
    """A checkpoint at step 3 of a 4-step epoch, resumed where the (last) epoch has 2 steps:
    no step is left, but the final evaluation, report and model card are still owed."""
    from _engine_tiny import run_fit, tiny_config

    train = {"epochs": 1, "checkpoint_every": 1, "eval_every": 1}
    run_fit(tiny_config(tmp_path, "long", train=train), 0, 1, batches=4, eval_total=6)
    figures, session = run_fit(
        tiny_config(tmp_path, "short", train=train),
        0,
        1,
        batches=2,
        resume_from=str(tmp_path / "long/checkpoints/step_0000003"),
        eval_total=6,
    )
    assert session.history, "the resumed run reported nothing"
    last = session.history[-1]
    assert last["step"] == 3.0 and last["val/num_samples"] == 6.0
    assert "val/diag/accuracy" in figures
    card = json.loads((tmp_path / "short" / "model" / "model_card.json").read_text())
    assert "val/diag/accuracy" in json.dumps(card)
