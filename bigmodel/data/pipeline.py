"""Shards to batches: the training and evaluation loaders.

Both loaders are a ``webdataset.DataPipeline`` of ordered stages (open_clip's ``get_wds_dataset``)
inside a plain ``torch.utils.data.DataLoader``; batching happens in the loader workers, so the
DataLoader only moves finished batches (``batch_size=None``). Batches follow the batch contract
in docs/contracts.md.

Training: the split's shards are dealt to ranks (``shards[rank::world_size]``) and then to loader
workers; each worker draws shards *with replacement* from its own share (weighted by sample
count, seeded by ``seed``/rank/worker/epoch) forever, and the loader cuts the stream at a fixed
number of batches per epoch computed from the manifest. So every rank takes exactly the same
number of steps whatever the shard sizes (an uneven last shard can never leave one rank waiting
in an all-reduce), and a rank or worker with no shard at all is refused up front. (The loader
cuts the epoch itself rather than with ``WebLoader.with_epoch`` so that it can carry the epoch
number into the workers and report ``len()``.) The price of resampling: within an epoch some
samples repeat and others are skipped, and a worker whose share of shards is small repeats it
more often; build shards of similar size, many more than ranks x loader workers.

Resuming mid-epoch (``TrainLoader.set_epoch(epoch, start_step)``): the stream is seeded by
(``seed``, rank, worker, epoch, start step), so a loader started at optimizer step ``s`` of an
epoch reads nothing of the ``s`` steps before it and yields only the epoch's remaining
``len - s * accumulation`` batches. Those batches are a fresh, deterministic draw for the rest of
the epoch: *not* the samples the interrupted attempt would have read after step ``s`` (that
would mean replaying its stream from the epoch start, reading, decoding and augmenting up to a
whole epoch of data before the first new step). Under resampling with replacement nothing is
lost by this: an epoch was never a permutation of the split, only ``len`` batches drawn from it,
and the remaining steps still draw from every shard of the rank with the same weights. A resume
at an epoch boundary (``start_step=0``) reads exactly the stream the uninterrupted run reads.

Class balance (``data.balance``): between reading and shuffling, each raw sample is kept with
probability (rarest class count) / (its class count), from the manifest's ``label_counts``, so
the classes of that head arrive in equal proportion. The label is read from the raw ``cls``
bytes, so rejected samples are read but never decoded or augmented; the price is reading
``n / (k x rarest count)`` samples per kept one (x3.3 for classes split 60/30/10).

3D (``model.backbone.spatial_dims=3``, ``--layout 3d`` shards): the same stages read whole
volumes; after decoding, each volume becomes ``data.samples_per_volume`` augmented patches of
``data.patch_size`` (``bigmodel/data/_volume.py``: MONAI's foreground-oversampling crops), seeded
from the same (seed, rank, worker, epoch, start step) stream seed, so the resume rules above
hold for patches too. Evaluation reads whole volumes; the engine's sliding window covers them.
Shards of the other layout than ``spatial_dims`` are refused up front in one line.

Evaluation: shards are dealt the same way but read once, in order, without resampling or
shuffling; the last batch of each worker may be short. Every sample is visited exactly once
across ranks, and each batch carries the samples' keys so this can be checked. Ranks may get
different numbers of batches (shards differ in size). We chose *not* to pad: the engine
evaluates with no collective per batch (plain forward of the unwrapped model, metrics that sync
once in ``compute()``, as torchmetrics does), so unequal counts cannot hang, and no sample is
counted twice. ``len(loader)`` and ``loader.num_samples`` give this rank's exact counts.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import random
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from bigmodel.config import Config
from bigmodel.data._augment import SampleTransform, collate
from bigmodel.data._decode import SampleDecoder, png_handler
from bigmodel.data._integrity import DAMAGED_KEY, DamagedShardError, ShardCheck, damaged_message
from bigmodel.data.manifest import (
    ClassBalance,
    Manifest,
    ManifestError,
    class_balance,
    data_intensity,
    layout_mismatch,
)
from sharding.format import CLS

log = logging.getLogger(__name__)

__all__ = [
    "DamagedShardError",
    "EvalLoader",
    "SplitSamples",
    "TrainLoader",
    "make_eval_loader",
    "make_train_loader",
    "train_batches_per_epoch",
]


def _stream_seed(*parts: Any) -> int:
    """A 64-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _shard_list(paths: list[str]) -> Iterator[dict]:
    """The split's shards as ``{"url": path}`` (``wds.SimpleShardList`` refuses an empty split)."""
    for path in paths:
        yield {"url": path}


def _split_by_rank(src: Iterable[dict], rank: int, world_size: int) -> Iterator[dict]:
    """Keep every ``world_size``-th shard starting at ``rank``.

    webdataset's ``split_by_node`` reads the rank from the environment or torch.distributed;
    taking it as an argument lets the caller (and the tests) state it.
    """
    yield from itertools.islice(src, rank, None, world_size)


def _resample(
    src: Iterable[dict],
    counts: dict[str, int],
    seed: int,
    rank: int,
    position: _SharedPosition,
    check: ShardCheck | None = None,
) -> Iterator[dict]:
    """Draw this worker's shards with replacement, forever.

    Seeded by seed/rank/worker and the position (epoch, start step) the main process set.
    ``wds.ResampledShards`` draws from the whole list with its own epoch counter, which restarts
    in every fresh worker process; here the position comes from the main process (shared values)
    and the draw is limited to the shards this worker was dealt.
    """
    urls = [item["url"] for item in src]
    weights = [counts[url] for url in urls]
    if not urls or sum(weights) == 0:
        raise ManifestError(
            f"rank {rank} loader worker {_worker_id()} got no samples to train on; rebuild the "
            f"shards with more (smaller) shards or lower data.loader_workers"
        )
    stream_seed = _stream_seed(seed, rank, _worker_id(), *position.seed_parts())
    if get_worker_info() is not None:
        # Seeds this worker process's torch RNG, which the augmentations draw from; the main
        # process (loader_workers=0) keeps its own RNG untouched.
        torch.manual_seed(stream_seed)
    rng = random.Random(stream_seed)
    while True:
        if check is not None and check.damaged:  # skipped shards are never drawn again
            weights = [counts[u] if u not in check.damaged else 0 for u in urls]
            if sum(weights) == 0:
                raise DamagedShardError(
                    f"rank {rank} loader worker {_worker_id()}: every shard it reads is damaged "
                    f"({sorted(check.damaged)[:3]}); run bigmodel-shard verify and rebuild"
                )
        yield {"url": rng.choices(urls, weights)[0]}


def _seeded_shuffle(
    src: Iterable[dict], bufsize: int, seed: int, rank: int, position: _SharedPosition
) -> Iterator[dict]:
    """``wds.shuffle`` seeded by rank/worker/position (its default seed is time-based)."""
    rng = random.Random(_stream_seed(seed, rank, _worker_id(), *position.seed_parts(), "shuffle"))
    yield from wds.shuffle(bufsize, initial=max(1, bufsize // 2), rng=rng)(src)


def _balanced(
    src: Iterable[dict],
    balance: ClassBalance,
    seed: int,
    rank: int,
    position: _SharedPosition,
) -> Iterator[dict]:
    """Keep each raw sample with its class's probability (``data.balance``), before decoding.

    Rejection rather than per-class streams: the shards mix classes, and a resampled stream of
    them thinned per sample stays seeded and endless with nothing else to build.
    """
    rng = random.Random(_stream_seed(seed, rank, _worker_id(), *position.seed_parts(), "balance"))
    for sample in src:
        label = sample.get(CLS)  # raw bytes of the multi-class label (b"2"); absent: unlabelled
        keep = balance.keep_unlabelled
        if label is not None:
            index = int(label)
            # an index out of range is kept: the decoder names the sample
            keep = balance.keep[index] if 0 <= index < len(balance.keep) else 1.0
        if rng.random() < keep:
            yield sample


def _check_layout(cfg: Config, manifest: Manifest) -> int:
    """The run's spatial dims, when the shards' layout fits them (one line naming both if not)."""
    spatial_dims = cfg.model.backbone.spatial_dims
    problem = layout_mismatch(manifest, spatial_dims)
    if problem is not None:
        raise ManifestError(problem)
    return spatial_dims


def _patches(
    src: Iterable[dict],
    transform: Any,
    seed: int,
    rank: int,
    position: _SharedPosition,
) -> Iterator[dict]:
    """3D: each decoded volume as ``data.samples_per_volume`` augmented patches.

    The patch sampler and augmentations (MONAI's, each with its own generator) are seeded from
    this worker's stream seed when the stream (re)starts, so a resumed loader draws the same
    patches as a fresh one at the same position.
    """
    transform.set_random_state(
        _stream_seed(seed, rank, _worker_id(), *position.seed_parts(), "patches")
    )
    for sample in src:
        yield from transform(sample)


def _volume_transform(cfg: Config, manifest: Manifest, train: bool) -> Any:
    # Imported here, not at the top: ``import monai`` takes seconds that 2D runs never need.
    from bigmodel.data._volume import VolumePatches, VolumeTransform

    intensity = data_intensity(cfg, manifest)
    if not train:
        return VolumeTransform(intensity)
    mask = manifest.tasks.get("mask")
    return VolumePatches(cfg.data, intensity, len(mask.classes) if mask is not None else 0)


def _transform(cfg: Config, manifest: Manifest, train: bool) -> SampleTransform:
    return SampleTransform(
        cfg.data.image_size,
        data_intensity(cfg, manifest),
        cfg.data.augment if train else None,
        boxes="boxes" in manifest.tasks,
        resize=cfg.data.resize,
        resize_tolerance=cfg.data.resize_tolerance,
        views=cfg.data.views or 1,
    )


def _shard_check(cfg: Config, paths: list[str], shards: Iterable[Any]) -> ShardCheck:
    digests = {path: s.sha256 for path, s in zip(paths, shards, strict=True) if s.sha256}
    return ShardCheck(digests, cfg.data.on_damaged_shard, cfg.data.cache_dir)


def train_batches_per_epoch(cfg: Config, manifest: Manifest, world_size: int) -> int:
    """Loader batches each rank yields per epoch (micro-batches, counting accumulation).

    ``train.steps_per_epoch`` when set, else one pass over the split's samples by the global
    batch (at least one optimizer step); in 3D a sample is a patch, ``data.samples_per_volume``
    per volume.
    """
    accumulation = cfg.optim.accumulation_steps
    if cfg.train.steps_per_epoch is not None:
        return cfg.train.steps_per_epoch * accumulation
    samples = manifest.split(cfg.data.train_split).num_samples
    if cfg.model.backbone.spatial_dims == 3:
        samples *= cfg.data.samples_per_volume  # a 3D training sample is a patch
    steps = samples // (cfg.data.batch_size * world_size * accumulation)
    return max(1, steps) * accumulation


class _SharedPosition:
    """Where the next ``iter()`` starts: epoch and optimizer step within it.

    The main process sets it and loader workers read it when their stream (re)starts
    (open_clip's SharedEpoch, with the step added for mid-epoch resumes).
    """

    def __init__(self) -> None:
        # No lock: only the main process writes, and a lock would tie the values to one
        # multiprocessing start method (a fork-made lock cannot reach spawned workers).
        self.epoch = multiprocessing.Value("i", 0, lock=False)
        self.step = multiprocessing.Value("i", 0, lock=False)

    def get(self) -> tuple[int, int]:
        return self.epoch.value, self.step.value

    def seed_parts(self) -> tuple[int, ...]:
        """What the position adds to a stream seed: the epoch, and the step when not 0 (so an
        epoch start draws the same stream whether or not the run was ever resumed)."""
        epoch, step = self.get()
        return (epoch, step) if step else (epoch,)

    def set(self, epoch: int, step: int = 0) -> None:
        self.epoch.value, self.step.value = epoch, step


class _Integrity:
    """Main-process side of the shard check: which steps used a shard, and what to do when one
    is reported damaged (see ``_integrity.py``)."""

    def __init__(self, root: Any, mode: str, accumulation: int = 1) -> None:
        self.root, self.mode, self.accumulation = root, mode, accumulation
        self.used: dict[str, list[int]] = {}
        self.damaged: list[str] = []

    def note(self, batch: dict[str, Any], step: int) -> None:
        for shard in batch.get("shards", ()):
            steps = self.used.setdefault(shard, [])
            if not steps or steps[-1] != step:
                steps.append(step)

    def damaged_batch(self, batch: Any) -> bool:
        """True for a worker's damage report (handled here: raise or warn), False otherwise."""
        if not (isinstance(batch, dict) and DAMAGED_KEY in batch):
            return False
        report = batch[DAMAGED_KEY]
        message = damaged_message(report, self.used.get(report["shard"], []), self.root, self.mode)
        if self.mode == "stop":
            raise DamagedShardError(message)
        self.damaged.append(report["shard"])
        log.warning("%s", message)
        return True


class TrainLoader:
    """Endless resampled batches, cut into epochs of a fixed number of batches.

    Each ``iter()`` is one epoch of ``len(self)`` batches; the epoch number advances by itself
    after each one, or is set with :meth:`set_epoch`, which also takes the optimizer step to
    start at when resuming mid-epoch (then ``iter()`` yields only the epoch's remaining batches).
    """

    def __init__(
        self, loader: DataLoader, batches: int, position: _SharedPosition, integrity: _Integrity
    ) -> None:
        self.loader = loader
        self.batches = batches
        self._position = position
        self.integrity = integrity

    @property
    def epoch(self) -> int:
        """The epoch the next ``iter()`` yields."""
        return self._position.epoch.value

    @property
    def start_step(self) -> int:
        """Optimizer steps of the epoch the next ``iter()`` skips (0 but on a resume)."""
        return self._position.step.value

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (``len(self)`` counts micro-batches)."""
        return self.batches // self.integrity.accumulation

    @property
    def damaged_shards(self) -> int:
        """Shards dropped so far as damaged (``data.on_damaged_shard=skip``)."""
        return len(self.integrity.damaged)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Start the next ``iter()`` at optimizer step ``start_step`` of ``epoch``.

        Shard draws, shuffle and augmentation are seeded by (epoch, start_step); the next
        ``iter()`` yields ``len(self) - start_step * accumulation`` batches, a fresh draw for
        the rest of the epoch (see the module docstring), and reads nothing for the steps
        before ``start_step``.
        """
        if start_step < 0 or (start_step > 0 and start_step >= self.steps_per_epoch):
            raise ValueError(
                f"start_step={start_step} is outside the epoch's {self.steps_per_epoch} "
                f"optimizer steps"
            )
        self._position.set(epoch, start_step)

    def __len__(self) -> int:
        """Micro-batches of a whole epoch (a resumed ``iter()`` yields fewer)."""
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Workers read the shared position when their stream (re)starts inside iter(self.loader).
        accumulation = self.integrity.accumulation
        epoch, start_step = self._position.get()
        first_step = epoch * self.steps_per_epoch + start_step
        remaining = self.batches - start_step * accumulation
        count = 0
        for batch in self.loader:
            if self.integrity.damaged_batch(batch):
                continue  # a report, not a batch: the epoch still has its batches
            # the optimizer step this batch feeds (1-based, as the engine counts)
            self.integrity.note(batch, first_step + count // accumulation + 1)
            yield batch
            count += 1
            if count == remaining:
                break
        self._position.set(epoch + 1)


class EvalLoader:
    """One ordered pass over this rank's shards; ``len()`` is this rank's exact batch count."""

    def __init__(
        self, loader: DataLoader, batches: int, num_samples: int, integrity: _Integrity
    ) -> None:
        self.loader = loader
        self.batches = batches
        self.num_samples = num_samples
        """Samples this rank yields per pass (from the manifest's per-shard counts)."""
        self.integrity = integrity

    @property
    def damaged_shards(self) -> int:
        """Shards reported damaged so far (skip mode; their samples were already evaluated)."""
        return len(self.integrity.damaged)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if not self.integrity.damaged_batch(batch):
                yield batch


def _data_loader(pipeline: wds.DataPipeline, workers: int) -> DataLoader:
    return DataLoader(
        pipeline,
        batch_size=None,  # the pipeline batches inside each worker
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def make_train_loader(
    cfg: Config,
    manifest: Manifest,
    rank: int,
    world_size: int,
    batches_per_epoch: int | None = None,
) -> TrainLoader:
    """Training batches for ``rank`` of ``world_size``: resampled, shuffled, augmented.

    Args:
        cfg: the run config (``data.*``, ``seed``; ``train.steps_per_epoch``).
        manifest: the shard folder's manifest.
        rank: global rank of this training worker.
        world_size: number of training workers.
        batches_per_epoch: override of :func:`train_batches_per_epoch`.

    Raises:
        ManifestError: the split has fewer shards than ranks x loader workers (some would get
            none), or the shards' layout does not fit ``model.backbone.spatial_dims``.
    """
    spatial_dims = _check_layout(cfg, manifest)
    data = cfg.data
    split = manifest.split(data.train_split)
    workers = data.loader_workers
    needed = world_size * max(1, workers)
    if len(split.shards) < needed:
        raise ManifestError(
            f"{manifest.path}: split {data.train_split!r} has {len(split.shards)} shard(s) but "
            f"{world_size} rank(s) x {max(1, workers)} loader worker(s) need at least {needed} "
            f"(one each): rebuild with more shards (a smaller per-shard sample/byte cap) or set "
            f"data.loader_workers={max(0, len(split.shards) // world_size)}"
        )
    paths = manifest.shard_paths(data.train_split)
    counts = {path: shard.num_samples for path, shard in zip(paths, split.shards, strict=True)}
    check = _shard_check(cfg, paths, split.shards)
    position = _SharedPosition()
    balance = class_balance(cfg, manifest)
    if balance is not None:
        log.info(
            "data.balance=%s: keeping %s of each class; %.1f samples read per sample kept",
            data.balance,
            ", ".join(f"{p:.3f}" for p in balance.keep),
            balance.read_per_kept,
        )
    stages = [
        # every shard of the split, in manifest order: {"url": path}
        partial(_shard_list, paths),
        # this rank's shards
        partial(_split_by_rank, rank=rank, world_size=world_size),
        # this loader worker's shards
        wds.split_by_worker,
        # endless seeded draws from them, weighted by sample count
        partial(_resample, counts=counts, seed=cfg.seed, rank=rank, position=position, check=check),
        # raw samples: {"__key__", "__url__", "image.npy": bytes, "cls": bytes, ...}; each
        # shard streamed (local file, or object store through fsspec, cached per node with
        # data.cache_dir), its bytes hashed as they stream and checked against dataset.json
        check.samples,
        # data.balance: the same raw samples, thinned so that the head's classes come equally
        partial(_balanced, balance=balance, seed=cfg.seed, rank=rank, position=position)
        if balance is not None
        else None,
        # the same samples in shuffled order
        partial(
            _seeded_shuffle,
            bufsize=data.shuffle_buffer,
            seed=cfg.seed,
            rank=rank,
            position=position,
        )
        if data.shuffle_buffer > 1
        else None,
        # numpy arrays, ints, JSON objects (group still bytes)
        wds.decode(png_handler),
        # tensors, absent labels filled, has flags: images [C, H, W] (3D: volumes [C, D, H, W])
        wds.map(SampleDecoder(manifest, spatial_dims)),
        # 2D: intensities preprocessed (data.intensity), resized (data.resize), flipped,
        # cropped/padded to image_size, intensity-jittered; data.views=2: two such views
        # (random resized crops), masks and boxes dropped
        wds.map(_transform(cfg, manifest, train=True))
        if spatial_dims == 2
        # 3D: intensities preprocessed per volume, then data.samples_per_volume patches of
        # data.patch_size per volume (a share data.foreground_ratio centred on foreground),
        # each augmented (data.augment3d)
        else partial(
            _patches,
            transform=_volume_transform(cfg, manifest, train=True),
            seed=cfg.seed,
            rank=rank,
            position=position,
        ),
        # batches per docs/contracts.md (data.views=2: 2 x batch_size rows, views stacked)
        wds.batched(data.batch_size, collation_fn=collate, partial=False),
        # the same batches, with a damage report after a shard whose hash did not match
        check.reports,
    ]
    pipeline = wds.DataPipeline(*stages)
    batches = batches_per_epoch or train_batches_per_epoch(cfg, manifest, world_size)
    integrity = _Integrity(manifest.root, data.on_damaged_shard, cfg.optim.accumulation_steps)
    return TrainLoader(_data_loader(pipeline, workers), batches, position, integrity)


def make_eval_loader(
    cfg: Config, manifest: Manifest, rank: int, world_size: int, split: str | None = None
) -> EvalLoader:
    """Evaluation batches for ``rank``: each sample of ``split`` exactly once across ranks.

    Args:
        cfg: the run config (``data.*``).
        manifest: the shard folder's manifest.
        rank: global rank of this worker.
        world_size: number of workers.
        split: split to read; ``data.val_split`` when None.
    """
    spatial_dims = _check_layout(cfg, manifest)
    data = cfg.data
    split = split or data.val_split
    shards = manifest.split(split).shards
    paths = manifest.shard_paths(split)
    check = _shard_check(cfg, paths, shards)
    mine = list(range(rank, len(shards), world_size))
    # Never more workers than shards: a worker without a shard would only cost a process.
    workers = min(data.loader_workers, len(mine))
    batch_size = data.eval_batch_size or data.batch_size
    # Each worker batches its own shards, so the count is per worker (short last batches).
    batches = sum(
        -(-sum(shards[i].num_samples for i in mine[w :: max(1, workers)]) // batch_size)
        for w in range(max(1, workers))
    )
    stages = [
        # every shard of the split, in manifest order: {"url": path}
        partial(_shard_list, paths),
        # this rank's shards
        partial(_split_by_rank, rank=rank, world_size=world_size),
        # this loader worker's shards
        wds.split_by_worker,
        # raw samples, in shard order (no shuffle: order does not matter for metrics), each
        # shard hashed as it streams and checked at its end
        check.samples,
        # numpy arrays, ints, JSON objects (group still bytes)
        wds.decode(png_handler),
        # tensors, absent labels filled, has flags
        wds.map(SampleDecoder(manifest, spatial_dims)),
        # intensities preprocessed; whole images (data.resize=fit: resized as in training), in
        # 3D whole volumes (the engine's sliding window covers them)
        wds.map(
            _transform(cfg, manifest, train=False)
            if spatial_dims == 2
            else _volume_transform(cfg, manifest, train=False)
        ),
        # batches per docs/contracts.md; the last one of each worker may be short
        wds.batched(batch_size, collation_fn=collate, partial=True),
        # the same batches, with a damage report after a shard whose hash did not match
        check.reports,
    ]
    num_samples = sum(shards[i].num_samples for i in mine)
    integrity = _Integrity(manifest.root, data.on_damaged_shard)
    loader = _data_loader(wds.DataPipeline(*stages), workers)
    return EvalLoader(loader, batches, num_samples, integrity)


class SplitSamples:
    """Every sample of ``split`` once, in manifest order, decoded but not transformed.

    Whole images with their stored pixels (``image`` not normalised, cropped or resized), their
    labels, ``has`` flags, ``window`` and ``volume``: what ``bigmodel-eval`` needs to normalise
    per sample and to draw its pictures. With ``verify`` each shard is hashed as it streams;
    :attr:`damaged` names the shards whose bytes do not match ``dataset.json``, known once the
    pass is over. Iterating again reads the split again (a picture's few samples).
    """

    def __init__(self, manifest: Manifest, split: str, verify: bool = True) -> None:
        self.manifest = manifest
        self.paths = manifest.shard_paths(split)
        shards = manifest.split(split).shards
        digests = {p: s.sha256 for p, s in zip(self.paths, shards, strict=True) if s.sha256}
        self.check = ShardCheck(digests if verify else {})

    @property
    def damaged(self) -> set[str]:
        """Shards whose bytes did not hash to their sha256 in ``dataset.json`` (so far)."""
        return self.check.damaged

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.paths:
            return iter(())
        stages = [
            # every shard of the split once, in manifest order: {"url": path}
            partial(_shard_list, self.paths),
            # raw samples, each shard hashed as it streams (verify) and checked at its end
            self.check.samples,
            # numpy arrays, ints, JSON objects
            wds.decode(png_handler),
            # tensors: image [C, H, W] as stored, labels, has flags
            wds.map(SampleDecoder(self.manifest)),
        ]
        return iter(wds.DataPipeline(*stages))
