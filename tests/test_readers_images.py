"""ImageFolderReader on a real image folder made from scikit-learn's digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from sharding.readers.images import ImageFolderReader
from sharding.records import SourceError


def _digits_folder(root: Path, per_class: int = 4, classes=(0, 1, 2)) -> dict[str, np.ndarray]:
    """root/CLASS/patPP_imgI.png from real digits; returns {relative path: pixels}."""
    digits = load_digits()
    written = {}
    for c in classes:
        picks = np.flatnonzero(digits.target == c)[:per_class]
        (root / f"digit{c}").mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(picks):
            pix = (digits.images[idx] * 15).astype(np.uint8)  # 0..16 -> 0..240
            rel = f"digit{c}/pat{i % 2:02d}_img{c}{i}.png"
            Image.fromarray(pix).save(root / rel)
            written[rel] = pix
    return written


def test_classes_labels_and_pixels(tmp_path):
    written = _digits_folder(tmp_path)
    reader = ImageFolderReader(str(tmp_path))
    items, schema = reader.scan()
    assert schema.to_json() == {
        "cls": {"type": "multiclass", "classes": ["digit0", "digit1", "digit2"]}
    }
    assert len(items) == len(written) == 12
    for it in items:
        rel = Path(it.paths["image"]).relative_to(tmp_path).as_posix()
        assert it.cls == int(rel[5])
        vol = reader.load(it)
        assert vol.image.dtype == np.uint8 and vol.image.shape == (1, 8, 8)
        np.testing.assert_array_equal(vol.image[0], written[rel])
        assert vol.meta["encoding"] == "png"
        assert "no patient ids" in vol.meta["group_note"]
    assert len({it.group for it in items}) == 12  # without grouping: one group per image


def test_group_regex_and_groups_csv(tmp_path):
    written = _digits_folder(tmp_path)
    items, _ = ImageFolderReader(str(tmp_path), group_regex=r"^pat(?P<patient>\d+)_").scan()
    assert sorted({it.group for it in items}) == ["00", "01"]
    reader = ImageFolderReader(str(tmp_path), group_regex=r"^(pat\d+)_")
    assert "group_note" not in reader.load(reader.scan()[0][0]).meta
    groups = tmp_path / "groups.csv"
    lines = [f"{rel},P{rel[-6:-4]}" for rel in written]  # by relative path
    groups.write_text("file,patient_id\n" + "\n".join(lines) + "\n")
    items, _ = ImageFolderReader(str(tmp_path), groups=str(groups)).scan()
    assert {it.group for it in items} == {f"P{rel[-6:-4]}" for rel in written}


def test_split_folders_rgb_and_16bit(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test" / "b").mkdir(parents=True)
    rgb = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "train" / "a" / "x.png")
    deep = rng.integers(0, 65535, (10, 12), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "test" / "b" / "y.png")
    Image.fromarray(rgb).save(tmp_path / "test" / "b" / "z.jpg", quality=95)
    reader = ImageFolderReader(str(tmp_path))
    items, schema = reader.scan()
    assert schema.cls["classes"] == ["a", "b"]
    by_id = {it.source_id: it for it in items}
    assert {k: (v.split, v.cls) for k, v in by_id.items()} == {
        "train-a-x": ("train", 0),
        "test-b-y": ("test", 1),
        "test-b-z": ("test", 1),
    }
    np.testing.assert_array_equal(reader.load(by_id["train-a-x"]).image, rgb.transpose(2, 0, 1))
    vol = reader.load(by_id["test-b-y"])
    assert vol.image.dtype == np.uint16 and vol.meta["encoding"] == "npy"
    np.testing.assert_array_equal(vol.image[0], deep)
    jpg = reader.load(by_id["test-b-z"]).image
    assert jpg.shape == (3, 10, 12) and jpg.dtype == np.uint8


def test_bad_input_errors(tmp_path):
    with pytest.raises(SourceError, match="valid options: groups"):
        ImageFolderReader(str(tmp_path), group="x")
    with pytest.raises(SourceError, match="no PNG/JPEG images"):
        ImageFolderReader(str(tmp_path)).scan()
    with pytest.raises(SourceError, match="no group"):
        ImageFolderReader(str(tmp_path), group_regex="pat")
    _digits_folder(tmp_path, per_class=1, classes=(0,))
    with pytest.raises(SourceError, match="does not match group_regex"):
        ImageFolderReader(str(tmp_path), group_regex=r"^case(\d+)").scan()
    groups = tmp_path / "groups.csv"
    groups.write_text("file,patient_id\nother.png,P1\n")
    with pytest.raises(SourceError, match="not listed in the groups CSV"):
        ImageFolderReader(str(tmp_path), groups=str(groups)).scan()
    (tmp_path / "digit0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    reader = ImageFolderReader(str(tmp_path))
    broken = next(it for it in reader.scan()[0] if it.paths["image"].endswith("broken.png"))
    with pytest.raises(SourceError, match="broken.png: unreadable image"):
        reader.load(broken)


def test_default_build_keeps_each_images_label_and_trains(tmp_path):
    """2D images are not slices of a volume: the default policy records their own labels, and a
    classification config resolves against the manifest (it was refused as volume-level)."""
    import json

    from bigmodel.config import load_config
    from bigmodel.data import load_manifest, resolve_config
    from sharding.cli import main as shard_main

    _digits_folder(tmp_path / "src")
    out = tmp_path / "shards"
    argv = ["build", "--source=imagefolder", f"--input={tmp_path / 'src'}", f"--out={out}"]
    assert shard_main([*argv, "--split-ratios=0.5,0.25,0.25", "--quiet"]) == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["tasks"]["cls"]["slice_labels"] == "copy"
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "classification.yaml",
        [f"data.shards={out}", "model.backbone.name=test_resnet"],
    )
    resolved = resolve_config(cfg, load_manifest(out))
    assert next(iter(resolved.model.heads.values())).num_classes == 3
