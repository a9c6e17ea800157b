"""NpzReader on MedMNIST-layout npz files made from scikit-learn's digits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.datasets import load_digits

from sharding.readers.npz import NpzReader
from sharding.records import SourceError


def _medmnist(path, compressed=True, **arrays):
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return str(path)


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return (d.images * 15).astype(np.uint8), d.target.astype(np.uint8)


def test_multiclass_splits_and_pixels(tmp_path, digits):
    images, targets = digits
    path = _medmnist(
        tmp_path / "digits.npz",
        train_images=images[:6],
        train_labels=targets[:6, None],
        val_images=images[6:8],
        val_labels=targets[6:8, None],
        test_images=images[8:10],
        test_labels=targets[8:10, None],
    )
    reader = NpzReader(path)
    items, schema = reader.scan()
    assert schema.cls == {"type": "multiclass", "classes": [str(i) for i in range(10)]}
    assert [it.split for it in items] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert [it.cls for it in items] == targets[:10].tolist()
    assert len({it.group for it in items}) == 10
    clone = pickle.loads(pickle.dumps(reader))  # as a worker process receives it
    for k, it in enumerate(items):
        vol = clone.load(it)
        assert vol.image.shape == (1, 8, 8) and vol.image.dtype == np.uint8
        np.testing.assert_array_equal(vol.image[0], images[k])
        assert vol.meta["encoding"] == "png" and "no patient ids" in vol.meta["group_note"]
    assert "_arrays" in vars(clone) and not pickle.loads(pickle.dumps(clone))._arrays


def test_multilabel_rgb_and_3d(tmp_path, digits):
    images, targets = digits
    multi = np.stack([targets[:4] % 2, targets[:4] > 4, targets[:4] == 0], axis=1).astype(np.uint8)
    rgb = np.stack([images[:4]] * 3, axis=-1)
    path = _medmnist(tmp_path / "rgb.npz", compressed=False, train_images=rgb, train_labels=multi)
    reader = NpzReader(path, classes="odd,big,zero")
    items, schema = reader.scan()
    assert schema.cls == {"type": "multilabel", "classes": ["odd", "big", "zero"]}
    assert [it.cls for it in items] == multi.tolist()
    for k in range(4):  # uncompressed members are memory-mapped
        np.testing.assert_array_equal(reader.load(items[k]).image, rgb[k].transpose(2, 0, 1))
    assert isinstance(reader._arrays["train_images"], np.memmap)
    vols = images[:8].reshape(2, 4, 8, 8)  # (N, D, H, W)
    path = _medmnist(tmp_path / "vol.npz", test_images=vols, test_labels=np.array([[0], [1]]))
    reader = NpzReader(path)
    items, _ = reader.scan()
    vol = reader.load(items[1])
    assert vol.image.shape == (1, 4, 8, 8) and vol.meta["encoding"] == "npy"
    np.testing.assert_array_equal(vol.image[0], vols[1])


def test_bad_input_errors(tmp_path, digits):
    images, targets = digits
    with pytest.raises(SourceError, match="npz file not found"):
        NpzReader(str(tmp_path / "none.npz")).scan()
    path = _medmnist(tmp_path / "a.npz", images=images[:2])
    with pytest.raises(SourceError, match="no train_images"):
        NpzReader(path).scan()
    path = _medmnist(tmp_path / "b.npz", train_images=images[:2])
    with pytest.raises(SourceError, match="has train_images but no train_labels"):
        NpzReader(path).scan()
    path = _medmnist(tmp_path / "c.npz", train_images=images[:2], train_labels=targets[:3])
    with pytest.raises(SourceError, match=r"train_labels has shape \(3, 1\)"):
        NpzReader(path).scan()
    path = _medmnist(tmp_path / "d.npz", train_images=images[:4], train_labels=targets[:4])
    with pytest.raises(SourceError, match="2 names for 4 classes"):
        NpzReader(path, classes="a,b").scan()
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="not a readable .npz"):
        NpzReader(str(tmp_path / "e.npz")).scan()
