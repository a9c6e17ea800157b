"""Shards against plain files, side by side: build throughput and read throughput.

One run generates a realistic source (int16 CT-like NIfTI volumes of 256 x 256 slices, uint8
label maps, a CSV of class labels and patient ids), then prints two tables:

1. **Build**: ``bigmodel-shard build`` (run as ``python -m sharding build``, NIfTI+CSV reader,
   ``--workers``) against ``tar`` archiving the same source files, in MB of
   source per second, and their ratio. The builder decodes, slices, checks, hashes and computes
   statistics; ``tar`` only copies bytes, so it is the ceiling for "writing the same files".
   The builder's fixed start-up (interpreter, imports, worker pool; timed on a one-slice
   source) is also shown subtracted, for the steady-state rate of large builds.
2. **Read**: one epoch of samples per second through (a) the shard pipeline
   (``bigmodel.data.make_eval_loader``), (b) a map-style loader reading the same samples from one
   file per member (``KEY.image.npy``, ``KEY.mask.png``, ...: the usual folder-of-files layout),
   and (c) the same samples held in memory (no I/O: the upper bound). All three use the same
   decode/normalise/crop code, batch size and loader worker count. Before each read pass the
   benchmark's own files are evicted from the page cache (``posix_fadvise DONTNEED``), so reads
   come from the disk, as on a training node that has not seen the data yet. The shard
   pipeline runs twice: as training reads (every shard's bytes hashed while streamed and checked
   against ``dataset.json``'s sha256) and with the check off, so its cost shows as a ratio.
3. **Resume**: seconds from creating the training loader to the first new batch when a run
   resumes at 90% of an epoch, replaying the epoch's stream up to the checkpoint (what the
   engine did before the data position was seeded) against starting the seeded stream at the
   step (``TrainLoader.set_epoch(epoch, start_step)``); cold page cache for both.
4. **Object storage**: the same shard pipeline (sha256 checked) reading the same shards from an
   S3-compatible server on loopback (moto's ``ThreadedMotoServer``, started here on 127.0.0.1,
   reached through s3fs as a bucket would be) against reading them from local disk (cold page
   cache), side by side; then a second epoch with ``data.cache_dir`` (served from the node-local
   copies the first remote epoch left). The server shares this machine's cores with the loader,
   so the ratio is a floor for a real object store's per-request cost, not its bandwidth.

Usage: ``python benchmarks/bench_shards.py [--quick] [--workers 2] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from bigmodel.config import Config
from bigmodel.data import (
    collate,
    data_intensity,
    load_manifest,
    make_eval_loader,
    make_train_loader,
)
from bigmodel.data._augment import SampleTransform
from bigmodel.data._decode import SampleDecoder, png_handler


def make_source(root: Path, volumes: int, slices: int, size: int) -> int:
    """Write ``volumes`` NIfTI volumes + masks + labels.csv; return the source bytes."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for v in range(volumes):
        # a body-like disc of soft tissue in air, with noise: compresses like real CT, not like zeros
        body = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
        image = np.where(body, 40, -1000)[..., None] + rng.normal(0, 30, (size, size, slices))
        mask = np.zeros((size, size, slices), np.uint8)
        mask[size // 3 : size // 2, size // 3 : size // 2, :] = 1 + v % 2
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), root / f"vol{v:03d}.nii")
        nib.save(nib.Nifti1Image(mask, affine), root / f"vol{v:03d}_mask.nii")
        rows.append([f"vol{v:03d}.nii", f"vol{v:03d}_mask.nii", f"P{v:03d}", "ab"[v % 2]])
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "patient_id", "label"])
        writer.writerows(rows)
    return sum(p.stat().st_size for p in root.iterdir())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _evict(paths: list[Path]) -> None:
    """Drop our own files from the page cache (no root, no effect on anyone else's files)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_build(src: Path, out: Path, workers: int) -> float:
    """Seconds of one ``bigmodel-shard build`` of ``src`` (the real CLI, in its own process)."""
    _evict(list(src.iterdir()))
    command = [
        sys.executable, "-m", "sharding", "build", "--source", "nifti",
        "--input", str(src / "labels.csv"), "--out", str(out),
        "--option", "mask_classes=background,organ,lesion", "--split-ratios", "1,0,0",
        "--workers", str(max(1, workers)), "--max-shard-samples", "64", "--quiet",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def bench_build(
    work: Path, src: Path, workers: int, source_bytes: int, startup: bool = True
) -> dict[str, float]:
    """Seconds and MB/s of the shard builder and of ``tar`` over the same source files.

    The builder's wall time includes a fixed start-up (interpreter, imports, worker pool) that
    users pay once per build; it is measured on a one-slice source and reported apart, so the
    steady-state rate (what matters for large datasets) is visible too.
    """
    build_s = _run_build(src, work / "shards", workers)
    startup_s = 0.0
    if startup:
        make_source(work / "tiny_source", volumes=1, slices=1, size=256)
        startup_s = _run_build(work / "tiny_source", work / "tiny_shards", workers)

    _evict(list(src.iterdir()))
    tar_path = work / "source.tar"
    start = time.perf_counter()
    subprocess.run(["tar", "cf", str(tar_path), "-C", str(src), "."], check=True)
    _fsync(tar_path)  # the builder fsyncs each shard; make tar pay for its write too
    tar_s = time.perf_counter() - start
    mb = source_bytes / 1e6
    return {
        "build_s": build_s,
        "startup_s": startup_s,
        "tar_s": tar_s,
        "build_mbs": mb / build_s,
        "steady_mbs": mb / max(build_s - startup_s, 1e-3),
        "tar_mbs": mb / tar_s,
    }


def _eval_cfg(size: int, batch_size: int, workers: int) -> Config:
    return Config.model_validate(
        {
            "data": {"image_size": size, "batch_size": batch_size, "loader_workers": workers},
            "model": {"heads": {"seg": {"type": "segmentation"}}},
        }
    )


class _Samples(Dataset):
    """Raw samples (``{"__key__", member: bytes}``) through the shard pipeline's decode steps."""

    def __init__(self, source: Any, cfg: Config, manifest) -> None:
        self.source = source  # a list of raw dicts (memory) or of member-file lists (files)
        self.decode = wds.Decoder([png_handler])
        self.to_tensors = SampleDecoder(manifest)
        self.transform = SampleTransform(cfg.data.image_size, data_intensity(cfg, manifest), None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raw = self.source[index]
        if isinstance(raw, tuple):  # (key, [member files]): read them now
            key, files = raw
            raw = {"__key__": key, **{f.name[len(key) + 1 :]: f.read_bytes() for f in files}}
        return self.transform(self.to_tensors(self.decode(raw)))


def _raw_samples(manifest) -> list[dict[str, Any]]:
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(manifest.shard_paths("train")), wds.tarfile_to_samples()
    )
    return [{k: v for k, v in s.items() if k != "__url__"} for s in pipeline]


def _write_files(samples: list[dict[str, Any]], folder: Path) -> list[tuple[str, list[Path]]]:
    folder.mkdir()
    index = []
    for sample in samples:
        key = sample["__key__"]
        files = []
        for member, data in sample.items():
            if member.startswith("__"):
                continue
            path = folder / f"{key}.{member}"
            path.write_bytes(data)
            files.append(path)
        index.append((key, files))
    return index


def _epoch(loader: Any) -> tuple[int, float]:
    start = time.perf_counter()
    count = sum(len(batch["key"]) for batch in loader)
    return count, time.perf_counter() - start


def bench_read(out: Path, workers: int, batch_size: int, repeats: int) -> dict[str, float]:
    """Samples/s of one epoch: shard pipeline, one-file-per-member loader, decode from memory."""
    manifest = load_manifest(out / "shards")
    cfg = _eval_cfg(256, batch_size, workers)
    samples = _raw_samples(manifest)
    files = _write_files(samples, out / "files")
    shard_files = [Path(p) for p in manifest.shard_paths("train")]
    member_files = [f for _, fs in files for f in fs]

    def loader(source: Any) -> DataLoader:
        return DataLoader(
            _Samples(source, cfg, manifest),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
        )

    # The same manifest without sha256: the loaders then read shards unchecked.
    unchecked = dataclasses.replace(
        manifest,
        splits={
            name: dataclasses.replace(
                split, shards=tuple(dataclasses.replace(s, sha256="") for s in split.shards)
            )
            for name, split in manifest.splits.items()
        },
    )
    runs = {
        "shards": (lambda: make_eval_loader(cfg, manifest, 0, 1, split="train"), shard_files),
        "unchecked": (
            lambda: make_eval_loader(cfg, unchecked, 0, 1, split="train"),
            shard_files,
        ),
        "files": (lambda: loader(files), member_files),
        "memory": (lambda: loader(samples), []),
    }
    result: dict[str, float] = {"samples": len(samples)}
    for name, (make, paths) in runs.items():
        best = float("inf")
        for _ in range(repeats):
            _evict(paths)
            count, seconds = _epoch(make())
            if count != len(samples):
                raise RuntimeError(f"{name} loader yielded {count} samples, not {len(samples)}")
            best = min(best, seconds)
        result[name] = len(samples) / best
    return result


def bench_resume(out: Path, workers: int, batch_size: int) -> dict[str, float]:
    """Seconds to the first new training batch after resuming late in an epoch.

    ``replay`` iterates the epoch's batches before the checkpoint (each read, decoded and
    augmented) and then takes one; ``seeded`` starts the stream at the step and takes one.
    """
    manifest = load_manifest(out / "shards")
    split = manifest.split("train")
    steps = max(2, split.num_samples // batch_size)
    start = steps * 9 // 10
    cfg = Config.model_validate(
        {
            "data": {
                "image_size": 256,
                "batch_size": batch_size,
                "loader_workers": min(workers, len(split.shards)),
            },
            "model": {"heads": {"seg": {"type": "segmentation"}}},
            "train": {"steps_per_epoch": steps},
        }
    )
    shard_files = [Path(p) for p in manifest.shard_paths("train")]
    result: dict[str, float] = {"steps": steps, "start": start}
    for name in ("replay", "seeded"):
        _evict(shard_files)
        tick = time.perf_counter()
        loader = make_train_loader(cfg, manifest, 0, 1)
        loader.set_epoch(0, start_step=start if name == "seeded" else 0)
        batches = iter(loader)
        if name == "replay":
            for _ in range(start):
                next(batches)
        next(batches)
        result[name] = time.perf_counter() - tick
        del batches, loader  # stop its workers before the next run
    return result


def bench_remote(out: Path, workers: int, batch_size: int) -> dict[str, float]:
    """Samples/s of one epoch of the shard pipeline: local disk vs a loopback S3 server."""
    import logging

    from moto.server import ThreadedMotoServer

    from sharding import storage

    local = load_manifest(out / "shards")
    shard_files = [Path(p) for p in local.shard_paths("train")]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=f"http://{host}:{port}",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        url = "s3://bench/shards"
        fs, _ = storage.filesystem(url)
        fs.mkdir("bench")
        for path in [*shard_files, out / "shards" / "dataset.json"]:
            storage.put_file(path, storage.join(url, path.name))
        remote = load_manifest(url)
        samples = remote.split("train").num_samples
        cfg = _eval_cfg(256, batch_size, workers)
        cached = cfg.model_copy(deep=True)
        cached.data.cache_dir = str(out / "cache")
        result: dict[str, float] = {"samples": samples}
        for name, config, manifest in (
            ("local", cfg, local),
            ("s3", cfg, remote),
            ("s3_fill", cached, remote),  # first epoch with a cache: streams and keeps copies
            ("s3_cached", cached, remote),  # second epoch: the node-local copies
        ):
            _evict(shard_files + list((out / "cache").rglob("*.tar")))
            count, seconds = _epoch(make_eval_loader(config, manifest, 0, 1, split="train"))
            if count != samples:
                raise RuntimeError(f"{name}: {count} samples, not {samples}")
            result[name] = samples / seconds
        result["mb"] = sum(p.stat().st_size for p in shard_files) / 1e6
        return result
    finally:
        server.stop()
        os.environ.clear()
        os.environ.update(saved)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both benchmarks and print the tables; return the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--workers", type=int, default=2, help="build and loader workers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="work folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    volumes, slices, repeats = (2, 6, 1) if args.quick else (6, 64, 2)
    torch.set_num_threads(1)  # the loader workers do the work; keep the main process out of it
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        source_bytes = make_source(work / "source", volumes, slices, 256)
        build = bench_build(work, work / "source", args.workers, source_bytes, not args.quick)
        read = bench_read(work, args.workers, args.batch_size, repeats)
        resume = bench_resume(work, args.workers, args.batch_size)
        remote = bench_remote(work, args.workers, args.batch_size)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"source: {volumes} NIfTI volumes x {slices} slices of 256x256 int16 + uint8 masks "
        f"({source_bytes / 1e6:.1f} MB); {args.workers} workers; batch {args.batch_size}; "
        f"{'cold' if hasattr(os, 'posix_fadvise') else 'warm'} page cache"
    )
    print(f"{'build':<34}{'seconds':>10}{'MB/s':>10}{'ratio':>8}")
    print(
        f"{'  tar (copy the source files)':<34}{build['tar_s']:>10.2f}{build['tar_mbs']:>10.1f}{1:>8.2f}"
    )
    print(
        f"{'  bigmodel-shard build':<34}{build['build_s']:>10.2f}{build['build_mbs']:>10.1f}"
        f"{build['build_mbs'] / build['tar_mbs']:>8.2f}"
    )
    if build["startup_s"]:
        print(
            f"{'    less start-up (' + format(build['startup_s'], '.1f') + ' s)':<34}"
            f"{build['build_s'] - build['startup_s']:>10.2f}{build['steady_mbs']:>10.1f}"
            f"{build['steady_mbs'] / build['tar_mbs']:>8.2f}"
        )
    print(
        f"{'read (one epoch, ' + str(int(read['samples'])) + ' samples)':<34}{'samples/s':>10}{'ratio':>18}"
    )
    for name, label in (
        ("files", "  one file per member"),
        ("shards", "  shard pipeline (sha256 checked)"),
        ("unchecked", "  shard pipeline, no sha256 check"),
        ("memory", "  decode from memory (bound)"),
    ):
        print(f"{label:<34}{read[name]:>10.1f}{read[name] / read['files']:>18.2f}")
    print(f"shards reach {read['shards'] / read['memory']:.0%} of the in-memory bound")
    print(
        f"sha256 check on read: {read['shards'] / read['unchecked']:.2f}x the unchecked "
        f"throughput ({1 - read['shards'] / read['unchecked']:+.1%} cost)"
    )
    print(
        f"resume at step {int(resume['start'])} of {int(resume['steps'])}: first new batch after "
        f"{resume['replay']:.2f} s (replay) vs {resume['seeded']:.2f} s (seeded), "
        f"{resume['replay'] / resume['seeded']:.1f}x"
    )
    print(
        f"{'object storage (' + format(remote['mb'], '.0f') + ' MB of shards)':<34}"
        f"{'samples/s':>10}{'ratio':>18}"
    )
    for name, label in (
        ("local", "  shard pipeline, local disk"),
        ("s3", "  same, s3:// (loopback server)"),
        ("s3_fill", "  s3:// + cache_dir, 1st epoch"),
        ("s3_cached", "  s3:// + cache_dir, 2nd epoch"),
    ):
        print(f"{label:<34}{remote[name]:>10.1f}{remote[name] / remote['local']:>18.2f}")
    return {"build": build, "read": read, "resume": resume, "remote": remote}


if __name__ == "__main__":
    main(sys.argv[1:])
