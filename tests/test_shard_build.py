"""bigmodel-shard build/verify/inspect on a generated nnU-Net folder made from nibabel's real MRI.

Round trips go through webdataset (what bigmodel/data uses) and plain ``tarfile``; resume,
parallel builds and Ray tasks must give byte-identical shards to a straight sequential build.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from sharding.build import STATE_DIR, BuildOptions, build_shards
from sharding.cli import main
from sharding.readers import NnUNetReader
from sharding.records import SourceError
from sharding.verify import load_manifest, verify_shards

ANAT = Path(data_path) / "anatomical.nii"  # real 33x41x25 int16 (big-endian) MRI
CASES = ["pat0_v0", "pat0_v1", "pat1_v0", "pat2_v0", "pat3_v0", "pat3_v1", "pat4_v0", "pat5_v0"]


def make_nnunet(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An nnU-Net v2 raw folder: 2 channels per case (real MRI and a shifted copy), 3 labels."""
    anat = nib.load(ANAT)
    base = np.asarray(anat.dataobj).astype(np.int16)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    truth = {}
    for i, case in enumerate(CASES):
        ch0 = base + np.int16(i)
        ch1 = np.roll(base, i + 1, axis=0)
        label = ((ch0 > 2000).astype(np.uint8) + (ch0 > 3000)).astype(np.uint8)
        for ch, arr in enumerate((ch0, ch1)):
            nib.save(
                nib.Nifti1Image(arr, anat.affine), root / "imagesTr" / f"{case}_{ch:04d}.nii.gz"
            )
        nib.save(nib.Nifti1Image(label, anat.affine), root / "labelsTr" / f"{case}.nii.gz")
        # readers give [C, D, H, W] with z first: (x, y, z) -> (z, y, x)
        truth[case] = (np.stack([ch0, ch1]).transpose(0, 3, 2, 1), label.transpose(2, 1, 0))
    spec = {
        "channel_names": {"0": "T1", "1": "T1shift"},
        "labels": {"background": 0, "tissue": 1, "bright": 2},
        "numTraining": len(CASES),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return truth


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("nnunet") / "Dataset001_Anat"
    return root, make_nnunet(root)


def _reader(root: Path) -> NnUNetReader:
    return NnUNetReader(str(root), group_regex=r"^(pat\d+)_")


OPTS = dict(max_shard_samples=16, progress=False, split_ratios=(0.6, 0.2, 0.2), seed=3)


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "shards"
    build_shards(_reader(source[0]), out, BuildOptions(**OPTS))
    return out


def _hashes(out: Path) -> dict[str, str]:
    manifest = load_manifest(out)
    return {s["name"]: s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]}


def test_round_trip_webdataset_and_tar(source, built):
    import webdataset as wds

    _, truth = source
    manifest = load_manifest(built)
    assert manifest["image"] == {
        "encoding": "npy",
        "dtype": "int16",
        "channels": 2,
        "channel_names": ["T1", "T1shift"],
        "modality": "T1+T1SHIFT",  # the reader's meta; picks data.intensity=auto's scheme
    }
    assert manifest["tasks"]["mask"]["classes"] == ["background", "tissue", "bright"]
    n_slices = sum(img.shape[1] for img, _ in truth.values())
    assert sum(sp["num_samples"] for sp in manifest["splits"].values()) == n_slices
    for split in manifest["splits"].values():
        assert all(s["num_samples"] <= 16 for s in split["shards"])
    urls = [str(built / s["name"]) for sp in manifest["splits"].values() for s in sp["shards"]]

    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l8"):
        case, z = sample["__key__"].rsplit("_z", 1)
        image, label = truth[case]
        np.testing.assert_array_equal(sample["image.npy"], image[:, int(z)])
        np.testing.assert_array_equal(sample["mask.png"], label[int(z)])
        assert sample["group"] == case.split("_")[0].encode()
        meta = sample["meta.json"]  # webdataset decodes .json
        assert meta["spacing"] == [2.0, 2.0] and meta["slice_index"] == int(z)
        seen += 1
    assert seen == n_slices

    with tarfile.open(built / urls[0].rsplit("/", 1)[-1]) as tar:  # plain tar, no webdataset
        members = {m.name: tar.extractfile(m).read() for m in tar}
    key = sorted(members)[0].split(".")[0]
    case, z = key.rsplit("_z", 1)
    arr = np.load(io.BytesIO(members[f"{key}.image.npy"]))
    np.testing.assert_array_equal(arr, truth[case][0][:, int(z)])


def test_splits_are_patient_disjoint_and_stats_sane(source, built):
    manifest = load_manifest(built)
    report = verify_shards(built)
    assert report.ok, report.format()
    groups = {}
    for split in ("train", "val", "test"):
        assert manifest["splits"][split]["num_samples"] > 0
        groups[split] = report.splits[split]["groups"]
    assert sum(groups.values()) == 6  # six patients, eight cases
    truth = source[1]
    all_ch0 = np.concatenate([img[0].ravel() for img, _ in truth.values()]).astype(np.float64)
    stats = manifest["stats"]
    assert len(stats["mean"]) == 2 and stats["p0_5"][0] < stats["mean"][0] < stats["p99_5"][0]
    assert abs(stats["mean"][0] - all_ch0.mean()) < 0.1 * all_ch0.std()  # train subset of cases


@pytest.mark.ray
def test_same_command_same_bytes_sequential_pool_and_ray(source, built, tmp_path, ray_head):
    root, _ = source
    pooled = tmp_path / "pool"
    build_shards(_reader(root), pooled, BuildOptions(**OPTS, workers=2))
    assert _hashes(pooled) == _hashes(built)

    # --ray against the session's Ray head (tests/conftest.py), as a user would run it
    by_ray = tmp_path / "ray"
    cmd = [
        str(Path(sys.executable).parent / "bigmodel-shard"),
        "build",
        "--source=nnunet",
        f"--input={root}",
        f"--out={by_ray}",
        r"-o=group_regex=^(pat\d+)_",
        "--max-shard-samples=16",
        "--split-ratios=0.6,0.2,0.2",
        "--seed=3",
        "--quiet",
        f"--ray={ray_head.gcs_address}",
    ]
    done = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _hashes(by_ray) == _hashes(built)


def test_resume_after_interruption_skips_finished_shards(source, built, tmp_path):
    src = tmp_path / "src"
    make_nnunet(src)
    bad = src / "imagesTr" / "pat3_v0_0001.nii.gz"  # sorted 5th of 8 cases
    good = bad.read_bytes()
    bad.write_bytes(b"not a nifti")
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="pat3_v0_0001"):  # raised from a pool worker
        build_shards(_reader(src), out, BuildOptions(**OPTS, workers=2))
    assert not (out / "dataset.json").exists()
    assert (out / STATE_DIR).is_dir()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert finished, "shards before the bad case must be kept"

    bad.write_bytes(good)  # the operator fixes the file and reruns the same command
    manifest = build_shards(_reader(src), out, BuildOptions(**OPTS))
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert not (out / STATE_DIR).exists()
    # identical to the uninterrupted build (the source path differs, the content must not)
    assert _hashes(out) == _hashes(built)
    assert manifest["stats"] == load_manifest(built)["stats"]
    again = build_shards(_reader(src), out, BuildOptions(**OPTS))
    assert again["created_by"] == manifest["created_by"]  # complete: nothing redone


def test_skip_bad_records_file_and_reason(source, tmp_path):
    src = tmp_path / "src"
    make_nnunet(src)
    bad = src / "labelsTr" / "pat1_v0.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), bad)  # wrong grid
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="does not match image shape"):
        build_shards(_reader(src), out, BuildOptions(**OPTS))
    out2 = tmp_path / "out2"
    manifest = build_shards(_reader(src), out2, BuildOptions(**OPTS, skip_bad=True))
    assert [s["file"] for s in manifest["skipped"]] == [str(bad)]
    assert "mask shape" in manifest["skipped"][0]["reason"]
    assert verify_shards(out2).ok


def test_verify_catches_corruption_and_too_few_shards(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    few = verify_shards(copy, world_size=4, loader_workers=4)
    assert not few.ok
    assert any("needs at least 16" in e and "--max-shard-samples" in e for e in few.errors)

    shard = sorted(copy.glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF  # inside the first member's payload
    shard.write_bytes(bytes(data))
    report = verify_shards(copy)
    assert not report.ok
    assert any(shard.name in e and "sha256 mismatch" in e for e in report.errors)


def test_verify_catches_patient_in_two_splits(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    manifest = json.loads((copy / "dataset.json").read_text())
    val = manifest["splits"]["val"]
    manifest["splits"]["test"]["shards"] += val["shards"]  # a val shard also listed as test
    manifest["splits"]["test"]["num_samples"] += val["num_samples"]
    (copy / "dataset.json").write_text(json.dumps(manifest))
    report = verify_shards(copy)
    assert any("in both val and test" in e for e in report.errors), report.errors
    assert any("duplicate sample key" in e for e in report.errors)


def test_out_dir_holding_another_dataset(source, built, tmp_path):
    with pytest.raises(SourceError, match="holds another dataset"):
        build_shards(_reader(source[0]), built, BuildOptions(**{**OPTS, "seed": 4}))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(SourceError, match="not empty"):
        build_shards(_reader(source[0]), junk, BuildOptions(**OPTS))


def test_cli_build_inspect_and_errors(source, tmp_path, capsys):
    root, _ = source
    out = tmp_path / "cli"
    argv = ["build", "--source", "nnunet", "--input", str(root), "--out", str(out)]
    rc = main(argv + ["-o", "group_regex=^(pat\\d+)_", "--layout", "2.5d", "--quiet"])
    assert rc == 0
    manifest = load_manifest(out)
    assert manifest["image"]["channels"] == 6 and manifest["layout"] == "2.5d"
    assert manifest["created_by"]["command"].startswith("bigmodel-shard build --source nnunet")
    assert main(["verify", str(out)]) == 0
    grid = tmp_path / "grid.png"
    assert main(["inspect", str(out), "--show", "4", "--out", str(grid)]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "tissue" in text and grid.stat().st_size > 1000

    assert main(argv[:-1] + [str(tmp_path / "x"), "-o", "nope=1"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "group_regex" in err and "Traceback" not in err


def test_cli_process_exit_code_names_file(tmp_path):
    missing = tmp_path / "no_such_dataset"
    missing.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sharding",
            "build",
            "--source",
            "nnunet",
            "--input",
            str(missing),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert str(missing / "dataset.json") in proc.stderr
    assert "Traceback" not in proc.stderr
