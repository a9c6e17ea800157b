"""Split assignment, one-pass statistics, shard size caps and error pickling."""

from __future__ import annotations

import pickle
import random
import tarfile

import numpy as np
import pytest

from sharding._stats import RESERVOIR, ChannelStats
from sharding._writer import ShardSink, sample_tar_bytes, tar_file_bytes
from sharding.records import SourceError, SourceItem
from sharding.splits import assign_splits, parse_ratios, split_counts


def _items(n_patients: int, per_patient: int = 3) -> list[SourceItem]:
    return [
        SourceItem(f"p{p}_s{s}", f"p{p}", {"image": f"/d/p{p}_s{s}.nii"})
        for p in range(n_patients)
        for s in range(per_patient)
    ]


def test_splits_keep_patients_together_and_ignore_item_order():
    items = _items(50)
    a = assign_splits(items, (0.7, 0.2, 0.1), seed=1)
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert assign_splits(shuffled, (0.7, 0.2, 0.1), seed=1) == a
    per_patient = {}
    for it in items:
        per_patient.setdefault(it.group, set()).add(a[it.source_id])
    assert all(len(s) == 1 for s in per_patient.values())
    counts = {s: sum(1 for v in per_patient.values() if v == {s}) for s in ("train", "val", "test")}
    assert counts == {"train": 35, "val": 10, "test": 5}
    assert assign_splits(items, (0.7, 0.2, 0.1), seed=2) != a  # the seed matters


def test_tiny_dataset_still_gets_every_split_and_ratio_errors():
    assert split_counts(3, (0.8, 0.1, 0.1)) == [1, 1, 1]
    assert split_counts(10, (1, 0, 0)) == [10, 0, 0]
    assert parse_ratios("8,1,1") == pytest.approx((0.8, 0.1, 0.1))
    with pytest.raises(SourceError, match="--split-ratios"):
        parse_ratios("0.8,0.2")


def test_source_split_kept_and_conflicts_rejected():
    items = _items(6, 2)
    items[0].split = items[1].split = "test"
    a = assign_splits(items, seed=0, use_source_split=True)
    assert a["p0_s0"] == a["p0_s1"] == "test"
    items[1].split = "train"
    with pytest.raises(SourceError, match="patient 'p0' is in the source's 'test' and 'train'"):
        assign_splits(items, use_source_split=True)


def test_stats_exact_moments_order_free_percentiles_close():
    rng = np.random.default_rng(0)
    images = [rng.normal(100, 20, (2, 40, 50)) for _ in range(12)]
    a, b = ChannelStats(2), ChannelStats(2)
    for i, img in enumerate(images):
        a.add_image(f"k{i}", img)
    for i in reversed(range(12)):  # other order, merged in pieces
        part = ChannelStats(2)
        part.add_image(f"k{i}", images[i])
        b.merge(ChannelStats.from_state(part.to_state()))
    sa, sb = a.summary(), b.summary()
    assert sa["p0_5"] == sb["p0_5"] and sa["p99_5"] == sb["p99_5"]  # same kept pixels
    allpix = np.concatenate([im.reshape(2, -1) for im in images], axis=1)
    np.testing.assert_allclose(sa["mean"], allpix.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(sb["std"], allpix.std(axis=1), rtol=1e-10)
    assert a.values.shape == (2, RESERVOIR)
    true_hi = np.percentile(allpix, 99.5, axis=1)
    np.testing.assert_allclose(sa["p99_5"], true_hi, rtol=0.03)


def test_shards_respect_byte_and_sample_caps(tmp_path):
    sample = {"__key__": "a", "image.npy": b"x" * 9000, "group": b"p"}
    size = sample_tar_bytes(sample)  # 2 headers + 9216 + 512
    cap = tar_file_bytes(3 * size)
    sink = ShardSink(tmp_path, "train", max_bytes=cap, max_samples=100)
    done = []
    for i in range(10):
        done.append(sink.add({**sample, "__key__": f"k{i:02d}"}))
    done.append(sink.finish())
    shards = [d for d in done if d]
    assert [s["num_samples"] for s in shards] == [3, 3, 3, 1]
    for s in shards:
        path = tmp_path / s["name"]
        assert path.stat().st_size == s["bytes"] <= cap
        with tarfile.open(path) as tar:
            assert all(m.pax_headers == {} for m in tar)  # plain ustar members
    assert not list(tmp_path.glob(".*.tmp"))


def test_source_error_survives_pickling():
    err = pickle.loads(pickle.dumps(SourceError("a.nii", "broken", "fix it")))
    assert (err.file, err.problem, err.fix) == ("a.nii", "broken", "fix it")
    assert str(err) == "a.nii: broken (fix it)"
