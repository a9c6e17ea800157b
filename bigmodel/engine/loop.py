"""The training loop: one function that reads top to bottom (STYLE.md rule 5).

:func:`train` builds the pieces from the config (manifest, model, loaders, metrics) and calls
:func:`fit`, which runs the loop on this worker: micro-batches are accumulated, the window is
stepped (clip, optimizer, schedule), figures are logged, checkpoints written and the model
evaluated, in that order. Distribution is applied once, in ``_strategy.distribute``; the loop
talks to its runner only through :class:`~bigmodel.engine.session.Session`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn

from bigmodel.config import Config
from bigmodel.data import (
    load_manifest,
    make_eval_loader,
    make_train_loader,
    resolve_config,
    validation_note,
)
from bigmodel.engine._logging import RunLogger, StepTimer
from bigmodel.engine._strategy import (
    Distributed,
    distribute,
    init_distributed,
    resolve_device,
)
from bigmodel.engine._window import ContrastiveWindow
from bigmodel.engine.checkpoint import (
    CheckpointClock,
    TrainState,
    checkpoint_dir,
    checkpoint_due,
    full_state_dict,
    load_checkpoint,
    loads_universal,
    prune_checkpoints,
    read_meta,
    save_checkpoint,
    set_rng_state,
)
from bigmodel.engine.session import Session
from bigmodel.metrics import build_metrics
from bigmodel.model_folder import save_model
from bigmodel.models import build_model
from bigmodel.models.window import whole_image_outputs

__all__ = ["NonFiniteLossError", "evaluate", "fit", "train"]

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """More non-finite losses than ``train.max_nonfinite``: the run is stopped."""


def train(cfg: Config, session: Session) -> dict[str, float]:
    """Run a whole training run on this worker from the config (call it on every rank).

    Reads the shards' manifest, fills the model's channels and class counts from it, builds the
    model, loaders and metrics, and runs :func:`fit`. Returns the final figures.
    """
    manifest = load_manifest(cfg.data.shards)
    cfg = resolve_config(cfg, manifest)
    rank, world_size = session.rank, session.world_size
    train_loader = make_train_loader(cfg, manifest, rank, world_size)
    steps_per_epoch = len(train_loader) // cfg.optim.accumulation_steps
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"steps_per_epoch": steps_per_epoch})}
    )
    eval_loader = None
    if cfg.train.eval_every and cfg.data.val_split in manifest.splits:
        eval_loader = make_eval_loader(cfg, manifest, rank, world_size)
        note = validation_note(cfg, manifest)
        if rank == 0 and note:
            log.warning(note)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model)
    metrics = build_metrics(cfg.model) if eval_loader is not None else None
    return fit(
        cfg,
        session,
        model,
        train_loader,
        eval_loader,
        metrics,
        manifest_path=manifest.path,  # a URL string for shards on object storage
    )


def fit(
    cfg: Config,
    session: Session,
    model: nn.Module,
    train_loader: Any,
    eval_loader: Iterable[dict[str, Any]] | None = None,
    metrics: Any = None,
    manifest_path: Path | str | None = None,
) -> dict[str, float]:
    """Train ``model`` on this worker and return the final figures.

    Args:
        cfg: the resolved run config.
        session: rank, world size, reporting and checkpoints.
        model: a plain single-device model following the model contract (``forward(images,
            batch) -> {"loss", "losses", "outputs"}``).
        train_loader: yields ``len(train_loader)`` batches per ``iter()``, the same count on
            every rank; ``set_epoch(epoch, start_step)`` chooses the epoch's data and the
            optimizer step it starts at, after which ``iter()`` yields only the remaining
            ``len - start_step * accumulation`` batches (the resumable data position).
        eval_loader: batches of this rank's share of the validation split (each sample once
            across ranks); None disables evaluation.
        metrics: a ``MetricSet`` (``update``/``compute``/``reset``) used with ``eval_loader``.
        manifest_path: the shards' ``dataset.json``, hashed into the model card.
    """
    if eval_loader is not None and metrics is None:
        raise ValueError("fit: an eval_loader needs metrics (bigmodel.metrics.build_metrics)")
    rank, world_size = session.rank, session.world_size
    device = resolve_device(cfg, session.local_rank)
    init_distributed(cfg, rank, session.local_rank, world_size, device)
    accumulation = cfg.optim.accumulation_steps
    steps_per_epoch = _steps_per_epoch(len(train_loader), accumulation, device)
    total_steps = cfg.train.epochs * steps_per_epoch
    run_dir = Path(cfg.train.output_dir) / cfg.name
    if rank == 0:
        cfg.save(run_dir / "config.yaml")  # the resolved config, beside the checkpoints

    resume_from = session.latest_checkpoint()
    # Read before distribute: a ZeRO resume on another world size reshards the optimizer state
    # through DeepSpeed's universal checkpoint, a mode the engine fixes at initialize.
    universal = resume_from is not None and loads_universal(read_meta(resume_from), cfg, world_size)
    dm = distribute(model, cfg, world_size, device, total_steps, load_universal=universal)
    if metrics is not None:
        metrics = metrics.to(device)
    window = ContrastiveWindow(dm, accumulation)  # empty unless a loss sees whole windows
    # The weight average that evaluation scores and model/ holds (train.ema_decay); every rank
    # keeps the same one, since every rank holds the same weights after a step (ZeRO-1/2 too).
    ema = _make_ema(dm, cfg)
    state, rng = TrainState(), None
    if resume_from is not None:
        state, rng = load_checkpoint(
            dm, resume_from, rank, world_size, cfg.seed, run_dir, session.local_rank, ema
        )
        log.info("rank %d resumed from %s at step %d", rank, resume_from, state.step)
    # a resumed run drops the rows a crashed attempt logged after its checkpoint
    logger = RunLogger(run_dir, rank, world_size, device, resume_step=state.step)
    clock = CheckpointClock(device)  # train.checkpoint_interval_s counts from here
    figures: dict[str, float] = {}

    with logger.phase("loop"):
        for epoch in range(state.epoch, cfg.train.epochs):
            start = state.step_in_epoch if epoch == state.epoch else 0
            if start >= steps_per_epoch:
                # A checkpoint from longer epochs (fewer workers: more steps per epoch) taken
                # past this epoch's end: the epoch is over; go on with the next one, and if it
                # was the last, give the final figures no attempt gave (the checkpoint came first)
                log.warning(
                    "resumed at step %d of epoch %d, which now has %d steps: starting epoch %d",
                    *(start, epoch, steps_per_epoch, epoch + 1),
                )
                if epoch == cfg.train.epochs - 1:
                    with logger.phase("eval"):
                        figures = _final_report(
                            dm, cfg, session, logger, state, eval_loader, metrics, ema
                        )
                continue
            # Data position: a resumed epoch starts at its checkpointed step with a stream
            # seeded by (epoch, step), yielding only the remaining batches.
            train_loader.set_epoch(epoch, start_step=start)
            batches = iter(train_loader)
            if rng is not None:
                set_rng_state(rng)  # before the first batch, so it sees the saved RNG
                rng = None
            dm.model.train()
            logger.timer = StepTimer()
            for step_in_epoch in range(start + 1, steps_per_epoch + 1):
                grad_norm, applied = _train_step(dm, batches, window, logger, device)
                _count_skipped_step(state, applied, cfg)
                state.step += 1
                state.step_in_epoch = step_in_epoch
                if ema is not None:
                    ema.update(dm.module, step=state.step)  # one fused lerp over the weights
                dm.scheduler.step_update(state.step)  # the LR of the next update
                epoch_done = step_in_epoch == steps_per_epoch
                run_done = epoch_done and epoch == cfg.train.epochs - 1

                # --- log (one all-reduce per log step)
                report: dict[str, float] = {}
                if state.step % cfg.train.log_every == 0 or run_done:
                    figures = logger.step_figures(dm.lr(), grad_norm if applied else None)
                    figures["nonfinite_skipped"] = float(state.nonfinite)
                    # shards dropped for a sha256 mismatch (data.on_damaged_shard=skip)
                    damaged = getattr(train_loader, "damaged_shards", 0)
                    figures["data/damaged_shards"] = float(damaged)
                    logger.write(state.step, epoch, figures)
                    report.update(figures)

                # --- evaluate at the end of every eval_every-th epoch (and of the run); with
                # train.best_metric, model/ keeps the best evaluated weights
                if epoch_done and eval_loader is not None and _eval_due(cfg, epoch, run_done):
                    with logger.phase("eval"):
                        report.update(
                            _evaluate(dm, cfg, eval_loader, metrics, ema, logger, state, epoch)
                        )
                        if _improves(cfg, report, state.best_score):
                            state.best_score = report[cfg.train.best_metric]
                            card = {**figures, **report, "step": float(state.step)}
                            _save_model_folder(dm, cfg, run_dir, card, manifest_path, ema)
                    dm.model.train()

                # --- checkpoint (the checkpoint module decides when)
                saved = None
                since = clock.seconds() if epoch_done else 0.0  # the same on every rank
                if checkpoint_due(cfg.train, state.step, epoch_done, run_done, since):
                    if epoch_done:  # the position is "start of the next epoch"
                        state.epoch, state.step_in_epoch = epoch + 1, 0
                    with logger.phase("checkpoint_write"):
                        _sync_norm_buffers(dm, ema)  # every rank saves the same statistics
                        directory = checkpoint_dir(run_dir, state.step)
                        saved = save_checkpoint(dm, directory, state, rank, world_size, ema)
                    clock.restart()
                if report or saved is not None:
                    report.update(step=float(state.step), epoch=float(epoch))
                    with logger.phase("report"):  # a barrier; Ray copies a checkpoint here
                        session.report(report, str(saved) if saved is not None else None)
                if saved is not None and cfg.train.keep_checkpoints:
                    # after report: Ray has copied the folder to storage
                    prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
                figures.update(report)
            state.epoch, state.step_in_epoch = epoch + 1, 0

    logger.write_phases(state.step, cfg.train.epochs - 1)
    if cfg.train.best_metric is None or state.best_score is None:
        _sync_norm_buffers(dm, ema)
        _save_model_folder(dm, cfg, run_dir, figures, manifest_path, ema)
    logger.close()
    return figures


def _train_step(
    dm: Distributed,
    batches: Iterator[dict[str, Any]],
    window: ContrastiveWindow,
    logger: RunLogger,
    device: torch.device,
) -> tuple[float, bool]:
    """One optimizer step: forward + backward over the accumulation window, then the update.

    Returns the gradient norm and whether the update was applied (a non-finite norm on any rank
    skips it on every rank). No device sync until ``optimizer_step``, which reads the norm on the
    host: the one sync per step.
    """
    accumulation = dm.accumulation_steps
    held: list[dict[str, Any]] = []
    if window:
        # contrastive losses over the whole window (retrieval across_accumulation): read the
        # window's micro-batches first and embed them once without gradients
        with logger.phase("data_wait"):
            held = [_to_device(next(batches), device) for _ in range(accumulation)]
        window.embed(held)
    for micro in range(accumulation):
        with logger.phase("data_wait"):
            logger.timer.data_started()
            batch = held[micro] if window else next(batches)
            logger.timer.data_done(len(batch["image"]))
        batch = _to_device(batch, device)
        if window:
            window.enter(micro)  # this micro-batch live, the others as recorded
        with dm.micro_batch(is_last=micro == accumulation - 1):  # DDP: all-reduce on the last
            with dm.autocast():
                out = dm.model(batch["image"], batch)
            dm.backward(out["loss"])
        logger.add_losses(out["losses"], out["loss"])
    window.close()
    # DeepSpeed: reduce-scatter, clip, step; DDP: unscale, clip, step
    return dm.optimizer_step()


def _count_skipped_step(state: TrainState, applied: bool, cfg: Config) -> None:
    """Count a skipped (non-finite) step; stop the run past ``train.max_nonfinite``."""
    if applied:
        return
    state.nonfinite += 1
    if state.nonfinite > cfg.train.max_nonfinite:
        raise NonFiniteLossError(
            f"{state.nonfinite} optimizer steps skipped for a non-finite gradient norm "
            f"(train.max_nonfinite={cfg.train.max_nonfinite}) by step {state.step + 1}: lower "
            f"optim.lr, enable optim.grad_clip, use train.precision=fp32/bf16, or check the data"
        )


def _eval_due(cfg: Config, epoch: int, run_done: bool) -> bool:
    """Evaluate at the end of every ``train.eval_every``-th epoch, and of the run."""
    every = cfg.train.eval_every
    return bool(every) and ((epoch + 1) % every == 0 or run_done)


def _evaluate(
    dm: Distributed,
    cfg: Config,
    eval_loader: Iterable[dict[str, Any]],
    metrics: Any,
    ema: nn.Module | None,
    logger: RunLogger,
    state: TrainState,
    epoch: int,
) -> dict[str, float]:
    """Score the evaluated model (the weight average, or the trained weights); ``val/*`` figures."""
    _sync_norm_buffers(dm, ema)  # ranks evaluate the same model (no-op with SyncBN)
    evaluated = ema.module if ema is not None else dm.module
    results = evaluate(dm, eval_loader, metrics, cfg, evaluated)
    logger.write(state.step, epoch, results, prefix="val/")
    return {f"val/{k}": v for k, v in results.items()}


def _final_report(
    dm: Distributed,
    cfg: Config,
    session: Session,
    logger: RunLogger,
    state: TrainState,
    eval_loader: Iterable[dict[str, Any]] | None,
    metrics: Any,
    ema: nn.Module | None,
) -> dict[str, float]:
    """The end-of-run evaluation and report of a run resumed past its last step.

    A checkpoint from fewer workers (longer epochs) can lie past the end of the last epoch on
    more workers: no step is left, yet the run still owes its final figures to the log, to the
    runner (a sweep trial reports them) and to the model card.
    """
    report: dict[str, float] = {}
    if eval_loader is not None and cfg.train.eval_every:
        report = _evaluate(dm, cfg, eval_loader, metrics, ema, logger, state, cfg.train.epochs - 1)
    report.update(step=float(state.step), epoch=float(cfg.train.epochs - 1))
    session.report(report, None)
    return report


def _improves(cfg: Config, report: dict[str, float], best: float | None) -> bool:
    """True when ``train.best_metric`` in this evaluation's report beats ``best``."""
    name = cfg.train.best_metric
    if name is None:
        return False
    if name not in report:
        raise ValueError(
            f"train.best_metric={name!r} is not a reported figure; this step reports "
            f"{', '.join(sorted(report))}"
        )
    value = report[name]
    if best is None:
        return True
    return value > best if cfg.train.best_mode == "max" else value < best


def _sync_norm_buffers(dm: Distributed, ema: nn.Module | None) -> None:
    """Average BatchNorm statistics across ranks, of the model and of its weight average."""
    dm.sync_norm_buffers()
    if ema is not None and dm.average_norm_buffers:
        distribute_bn(ema.module, dm.world_size, reduce=True)


def _make_ema(dm: Distributed, cfg: Config) -> nn.Module | None:
    """timm's ``ModelEmaV3`` of the plain model (``train.ema_decay``), on the model's device.

    timm's warmup (``use_warmup``: decay ``1 - (1 + step) ** -2/3``, capped at ``ema_decay``)
    makes the average follow a short run closely and a long one slowly, so one default fits
    runs of a few hundred and of many thousand steps.
    """
    if cfg.train.ema_decay is None:
        return None
    ema = ModelEmaV3(dm.module, decay=cfg.train.ema_decay, use_warmup=True)
    ema.requires_grad_(False)
    return ema


def _save_model_folder(
    dm: Distributed,
    cfg: Config,
    run_dir: Path,
    figures: dict[str, float],
    manifest_path: Path | str | None,
    ema: nn.Module | None = None,
) -> None:
    """Write ``model/`` from the current weights, or their average (fp32). Collective: call it
    on every rank."""
    if ema is not None:  # ZeRO-1/2 or DDP: whole weights on every rank, rank 0 writes
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            weights = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
            save_model(weights, cfg, run_dir / "model", figures, manifest_path)
        return
    weights = full_state_dict(dm)  # gathers the partitions under ZeRO-3
    if weights is not None:
        save_model(weights, cfg, run_dir / "model", figures, manifest_path)


@torch.no_grad()
def evaluate(
    dm: Distributed,
    loader: Iterable[dict[str, Any]],
    metrics: Any,
    cfg: Config,
    module: nn.Module | None = None,
) -> dict[str, float]:
    """Metrics over the validation split, each sample exactly once across ranks.

    ``module`` is the model scored (the weight average with ``train.ema_decay``); by default
    the plain model being trained.

    Forwards the plain (unwrapped) model, so no collective runs per batch and ranks with fewer
    batches cannot hang, except under ZeRO-3, where every forward gathers parameters from all
    ranks: there, ranks that run out of batches repeat their last one (without counting it)
    until the longest rank is done. The sample keys are gathered once at the end to check that
    no sample was seen twice and, when the loader knows its count, that none was missed.
    """
    module = module if module is not None else dm.module
    module.eval()
    metrics.reset()
    roi = _window_size(cfg)
    device = dm.device
    zero3 = dm.zero_stage == 3
    local_batches = len(loader) if hasattr(loader, "__len__") else None
    rounds = local_batches
    if zero3:
        rounds = _all_reduce_int(local_batches, device, dist.ReduceOp.MAX)
    keys: list[str] = []
    last_images = None
    iterator = iter(loader)
    for index in itertools.count():
        if rounds is not None and index >= rounds:
            break
        batch = next(iterator, None)
        if batch is None:
            if rounds is None or not zero3:
                break
            if last_images is None:
                last_images = torch.zeros(1, cfg.model.backbone.in_chans or 3, *roi)
            with dm.autocast():  # joins other ranks' gathers (as many forwards as a batch)
                whole_image_outputs(module, last_images.to(device), roi)
            continue
        batch = _to_device(batch, device)
        with dm.autocast():
            # Whole images (volumes): sliding windows (segmentation, detection) with Gaussian
            # blending where they exceed the training size, so every pixel and every box counts
            # (bigmodel/models/window.py).
            outputs = whole_image_outputs(module, batch["image"], roi)
        metrics.update(outputs, batch)
        keys.extend(batch["key"])
        last_images = batch["image"][:1]
    results = metrics.compute()  # collective: torchmetrics syncs states across ranks
    results["num_samples"] = float(_check_exactly_once(keys, getattr(loader, "num_samples", None)))
    return results


def _window_size(cfg: Config) -> tuple[int, ...]:
    """The training input's sides, the sliding window's: ``data.patch_size`` in 3D."""
    if cfg.model.backbone.spatial_dims == 3:
        if cfg.data.patch_size is None:
            raise ValueError("data.patch_size is needed to evaluate a 3D model (its window)")
        return tuple(cfg.data.patch_size)
    return (cfg.data.image_size,) * 2


def _check_exactly_once(keys: list[str], expected_local: int | None) -> int:
    """Raise if a sample was evaluated twice across ranks or one was missed; returns the count."""
    gathered = [keys]
    expected = expected_local
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, keys)  # once per evaluation, not per batch
        counts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(counts, expected_local)
        expected = None if any(c is None for c in counts) else sum(counts)
    everything = [k for part in gathered for k in part]
    duplicates = len(everything) - len(set(everything))
    if duplicates:
        raise RuntimeError(
            f"evaluation saw {duplicates} sample(s) more than once across ranks: the eval "
            f"loader must split shards by rank and worker without resampling"
        )
    if expected is not None and len(everything) != expected:
        raise RuntimeError(
            f"evaluation saw {len(everything)} samples but the manifest lists {expected}: a "
            f"shard was unreadable or not assigned to any rank"
        )
    return len(everything)


def _steps_per_epoch(batches: int, accumulation: int, device: torch.device) -> int:
    """Optimizer steps per epoch; refuses fewer batches than one window, or unequal ranks."""
    steps = batches // accumulation
    if steps < 1:
        raise ValueError(
            f"the train loader yields {batches} batches per epoch, fewer than "
            f"optim.accumulation_steps={accumulation}: lower it or raise train.steps_per_epoch"
        )
    _check_equal_steps(batches, device)
    return steps


def _check_equal_steps(batches: int, device: torch.device) -> None:
    """Fail fast if ranks would take different numbers of steps (DDP would hang)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    low = _all_reduce_int(batches, device, dist.ReduceOp.MIN)
    high = _all_reduce_int(batches, device, dist.ReduceOp.MAX)
    if low != high:
        raise RuntimeError(
            f"train loaders yield between {low} and {high} batches per epoch on different "
            f"ranks: every rank must take the same number of steps (use a fixed epoch length)"
        )


def _all_reduce_int(value: int, device: torch.device, op: dist.ReduceOp) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def _to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``; other values are kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch
