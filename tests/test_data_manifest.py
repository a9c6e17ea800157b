"""load_manifest's errors and resolve_config's filling of channels and class counts."""

from __future__ import annotations

import json

import pytest
from test_data_pipeline import make_cfg, write_dataset

from bigmodel.config import Config, ConfigError
from bigmodel.data import ManifestError, load_manifest, resolve_config
from sharding import format as fmt


@pytest.fixture
def shards(tmp_path):
    write_dataset(tmp_path, {"train": [3, 2], "val": [2]}, channels=2)
    return tmp_path


def _edit(root, change):
    path = root / fmt.MANIFEST_NAME
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_typed_view(shards):
    manifest = load_manifest(shards)
    assert manifest.image.channels == 2 and manifest.mean == (10.0, 10.0)
    assert manifest.tasks["cls"].classes == ("a", "b", "c") and not manifest.tasks["cls"].multilabel
    assert manifest.split("train").num_samples == 5
    assert [s.num_samples for s in manifest.split("train").shards] == [3, 2]
    assert manifest.shard_paths("val") == [str(shards / "val-000000.tar")]
    with pytest.raises(ManifestError, match=r"no split 'test'.*\['train', 'val'\]"):
        manifest.split("test")
    (shards / "train-000001.tar").unlink()
    with pytest.raises(ManifestError, match=r"split 'train' lists shard\(s\) that are missing"):
        manifest.shard_paths("train")


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(ManifestError, match=r"dataset.json: no shard manifest.*data.shards"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.update(format_version=0), r"format_version is 0 but this reader needs 1"),
        (lambda m: m.pop("splits"), r"field splits is missing"),
        (lambda m: m["image"].update(channels="2"), r"field image.channels should be int"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("num_samples"), r"train.shards\[0\]"),
        (lambda m: m["splits"]["val"].update(num_samples=9), r"num_samples is 9 but its shards"),
        (lambda m: m["stats"].update(mean=[0.0]), r"stats.mean has 1 values for 2 channels"),
        (lambda m: m["tasks"].update(depth={"classes": ["x"]}), r"unknown task tasks.depth"),
        (lambda m: m["tasks"]["cls"].update(type="ordinal"), r"tasks.cls.type is 'ordinal'"),
    ],
)
def test_invalid_manifest_names_the_field(shards, change, message):
    _edit(shards, change)
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(shards)
    assert str(shards / "dataset.json") in str(err.value)


def test_not_json(shards):
    (shards / fmt.MANIFEST_NAME).write_text("{oops")
    with pytest.raises(ManifestError, match="not readable JSON"):
        load_manifest(shards)


def test_resolve_fills_channels_and_classes(shards):
    manifest = load_manifest(shards)
    cfg = Config.model_validate(
        {
            "model": {
                "heads": {
                    "diag": {"type": "classification"},
                    "seg": {"type": "segmentation"},
                    "det": {"type": "detection"},
                    "emb": {"type": "retrieval", "target": "cls"},
                    "patient": {"type": "retrieval", "target": "group"},
                }
            }
        }
    )
    resolved = resolve_config(cfg, manifest)
    heads = resolved.model.heads
    assert resolved.model.backbone.in_chans == 2
    assert [heads[n].num_classes for n in ("diag", "seg", "det", "emb", "patient")] == [
        3,
        3,
        2,
        3,
        5,
    ]
    assert cfg.model.backbone.in_chans is None  # the input config is left alone


def test_resolve_errors_name_the_head(shards):
    manifest = load_manifest(shards)
    cfg = make_cfg()
    cfg.model.heads["seg"].num_classes = 7
    with pytest.raises(
        ConfigError, match=r"model.heads.seg.num_classes is 7 but target 'mask' has 3"
    ):
        resolve_config(cfg, manifest)
    cfg = make_cfg()
    cfg.model.backbone.in_chans = 3
    with pytest.raises(ConfigError, match=r"model.backbone.in_chans is 3 .* 2 channels"):
        resolve_config(cfg, manifest)
    _edit(shards, lambda m: m["tasks"].pop("boxes"))
    with pytest.raises(ConfigError, match=r"model.heads.det.target is 'boxes' but .* no such task"):
        resolve_config(make_cfg(), load_manifest(shards))


def test_resolve_multilabel_follows_the_data(shards):
    _edit(shards, lambda m: m["tasks"]["cls"].update(type="multilabel"))
    manifest = load_manifest(shards)
    assert resolve_config(make_cfg(), manifest).model.heads["diag"].multilabel
    cfg = Config.model_validate(
        {"model": {"heads": {"diag": {"type": "classification", "multilabel": False}}}}
    )
    with pytest.raises(ConfigError, match=r"model.heads.diag.multilabel is False"):
        resolve_config(cfg, manifest)
