"""Class imbalance from the manifest: ``balanced`` loss weights and the balanced training stream.

Shards are real webdataset tars with an imbalanced ``cls`` (60/30/10 samples, plus unlabelled
ones) and the ``label_counts`` that ``bigmodel-shard build`` records in ``dataset.json``.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from sklearn.utils.class_weight import compute_class_weight

from bigmodel.config import Config, ConfigError, config_from_dict, load_config
from bigmodel.data import load_manifest, make_train_loader, resolve_config
from bigmodel.tasks.losses import ClassificationLoss
from sharding import format as fmt

COUNTS = [60, 30, 10]
UNLABELLED = 20


def _write(root: Path, multilabel: bool = False, counts: bool = True) -> list:
    """Four shards of 30 samples: class c appears COUNTS[c] times, 20 have no cls at all."""
    rng = np.random.default_rng(0)
    k = len(COUNTS)
    labels: list = [c for c, n in enumerate(COUNTS) for _ in range(n)] + [None] * UNLABELLED
    rng.shuffle(labels)
    if multilabel:  # class c positive in COUNTS[c] samples; a sample may have several
        labels = [[int(i < n) for n in COUNTS] for i in range(100)] + [None] * UNLABELLED
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(4):
        name = fmt.shard_name("train", s)
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(s * 30, s * 30 + 30):
                buf = io.BytesIO()
                np.save(buf, rng.integers(0, 100, (1, 16, 16), dtype=np.int16))
                sample = {"__key__": f"case{i:03d}", fmt.IMAGE_NPY: buf.getvalue()}
                sample[fmt.GROUP] = f"patient{i % 9}".encode()
                if labels[i] is not None and multilabel:
                    sample[fmt.CLS_MULTI] = json.dumps(labels[i]).encode()
                elif labels[i] is not None:
                    sample[fmt.CLS] = str(labels[i]).encode()
                sink.write(sample)
        shards.append({"name": name, "num_samples": 30, "bytes": 0, "sha256": ""})
    split = {"num_samples": 120, "num_groups": 9, "shards": shards}
    if counts:
        split["label_counts"] = {"cls": COUNTS}
    cls_type = "multilabel" if multilabel else "multiclass"
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "name": "imbalanced",
        "layout": "2d",
        "image": {"encoding": "npy", "dtype": "int16", "channels": 1},
        "tasks": {"cls": {"type": cls_type, "classes": [f"c{c}" for c in range(k)]}},
        "stats": {"mean": [50.0], "std": [30.0]},
        "splits": {"train": split},
    }
    (root / fmt.MANIFEST_NAME).write_text(json.dumps(manifest))
    return labels


def _config(root: Path, head: dict | None = None, **data) -> Config:
    return config_from_dict(
        {
            "data": {
                "shards": str(root),
                "image_size": 16,
                "batch_size": 10,
                "loader_workers": 0,
                "shuffle_buffer": 20,
                **data,
            },
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {"diag": {"type": "classification", **(head or {})}},
            },
            "train": {"steps_per_epoch": 30},
        }
    )


def test_balanced_class_weights_match_scikit_learn_and_are_saved(tmp_path: Path):
    labels = _write(tmp_path / "shards")
    manifest = load_manifest(tmp_path / "shards")
    cfg = resolve_config(_config(tmp_path / "shards", {"class_weights": "balanced"}), manifest)

    known = np.array([c for c in labels if c is not None])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=known)
    np.testing.assert_allclose(cfg.model.heads["diag"].class_weights, expected, rtol=1e-5)
    # the resolved config (what a run saves as config.yaml) records the numbers
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").model.heads["diag"].class_weights == [
        pytest.approx(w, rel=1e-5) for w in expected
    ]


def test_balanced_pos_weight_is_negatives_over_positives(tmp_path: Path):
    _write(tmp_path, multilabel=True)
    head = {"pos_weight": "balanced"}
    cfg = resolve_config(_config(tmp_path, head), load_manifest(tmp_path))
    assert cfg.model.heads["diag"].multilabel
    assert cfg.model.heads["diag"].pos_weight == pytest.approx([60 / 60, 90 / 30, 110 / 10])


@pytest.mark.parametrize(
    ("head", "data", "write", "error"),
    [
        (
            {"class_weights": "balanced"},
            {},
            {"counts": False},
            r"model\.heads\.diag\.class_weights=balanced needs per-class counts but .* no "
            r"label_counts for 'cls' in split 'train'",
        ),
        (
            {"class_weights": "balanced"},
            {},
            {"multilabel": True},
            r"model\.heads\.diag\.class_weights=balanced is for multi-class heads.*pos_weight",
        ),
        (
            {"pos_weight": "balanced"},
            {},
            {},
            r"model\.heads\.diag\.pos_weight=balanced is for multi-label heads",
        ),
        ({}, {"balance": "seg"}, {}, r"data\.balance='seg' is not a head; heads: \['diag'\]"),
        ({}, {"balance": "diag"}, {"counts": False}, r"data\.balance='diag' needs per-class"),
        ({}, {"balance": "diag"}, {"multilabel": True}, r"data\.balance='diag' names a multi"),
    ],
)
def test_balance_options_fail_naming_the_field(tmp_path, head, data, write, error):
    _write(tmp_path, **write)
    with pytest.raises(ConfigError, match=error):
        resolve_config(_config(tmp_path, head, **data), load_manifest(tmp_path))


def test_unresolved_balanced_weights_are_refused_by_the_loss(tmp_path: Path):
    head = _config(tmp_path, {"class_weights": "balanced", "num_classes": 3}).model.heads["diag"]
    with pytest.raises(ConfigError, match="class_weights=balanced is computed from the dataset"):
        ClassificationLoss(head)


def test_balanced_stream_draws_classes_uniformly(tmp_path: Path):
    _write(tmp_path)
    manifest = load_manifest(tmp_path)

    def frequencies(**data) -> dict:
        cfg = resolve_config(_config(tmp_path, **data), manifest)
        batches = list(make_train_loader(cfg, manifest, rank=0, world_size=1))
        labels = Counter(int(c) for b in batches for c in b["cls"])
        total = sum(labels.values())
        return {c: labels[c] / total for c in (-1, 0, 1, 2)}

    plain, balanced = frequencies(), frequencies(balance="diag")
    assert plain[2] < 0.15 and plain[0] > 0.4  # 60/30/10 of the labelled samples, as written
    labelled = 1 - balanced[-1]
    for c in range(3):
        assert balanced[c] / labelled == pytest.approx(1 / 3, abs=0.06), balanced
    # unlabelled samples keep their share of the stream (20 of 120)
    assert balanced[-1] == pytest.approx(UNLABELLED / 120, abs=0.06)
