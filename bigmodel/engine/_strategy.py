"""Distribution applied to a plain, single-device model: in one place, in a stated order.

:func:`distribute` is the only function that turns a model into a distributed one (STYLE.md rule 1;
torchtitan's ``parallelize``). The returned :class:`Distributed` hides the few operations whose
implementation differs between PyTorch DDP and a DeepSpeed engine (backward, optimizer step,
accumulation), so the training loop reads the same for both.

DeepSpeed notes:
    * The optimizer is always a timm/torch optimizer passed to ``deepspeed.initialize``: DeepSpeed's
      fused CUDA optimizers do not run on CPU, and one optimizer code path keeps DDP and ZeRO
      numerically identical (``zero_allow_untested_optimizer`` / ``zero_force_ds_cpu_optimizer``
      allow it).
    * DeepSpeed counts micro-batches itself (``gradient_accumulation_steps``); ``backward``
      divides the loss by it, ``step`` applies the update on the accumulation boundary and also
      clips (``gradient_clipping``).
    * Mixed precision uses DeepSpeed's ``torch_autocast`` mode, not its ``bf16``/``fp16`` modes:
      parameters, BatchNorm statistics and optimizer state stay fp32 and the forward runs under
      ``torch.autocast``, as under DDP. The ``bf16``/``fp16`` modes cast the whole model, which
      leaves BatchNorm running statistics in bf16 (small moving-average updates round away) and
      makes the module's state dict low precision.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from timm.scheduler.scheduler import Scheduler
from timm.utils import distribute_bn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigmodel.config import Config, ConfigError
from bigmodel.engine import _deepspeed_hooks
from bigmodel.engine._optim import build_optimizer, build_scheduler
from bigmodel.engine._syncbn import convert_sync_batchnorm

__all__ = [
    "Distributed",
    "autocast_dtype",
    "deepspeed_config",
    "distribute",
    "init_distributed",
    "quiet_deprecated_collectives",
    "resolve_device",
]


def resolve_device(cfg: Config, local_rank: int) -> torch.device:
    """The device of this worker: its GPU when ``cluster.use_gpu`` and CUDA exist, else the CPU."""
    if cfg.cluster.use_gpu:
        if not torch.cuda.is_available():
            raise ConfigError(
                "cluster.use_gpu=true but CUDA is not available on this worker; "
                "set cluster.use_gpu=false for a CPU run"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _backend(cfg: Config, device: torch.device) -> str:
    if cfg.distributed.backend != "auto":
        if cfg.distributed.backend == "nccl" and device.type != "cuda":
            raise ConfigError("distributed.backend=nccl needs GPUs: use auto or gloo on CPU")
        return cfg.distributed.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    cfg: Config, rank: int, local_rank: int, world_size: int, device: torch.device
) -> None:
    """Initialise ``torch.distributed`` from the environment when the run has several workers.

    The collective timeout comes from ``distributed.timeout_s`` (never the library default). A
    process group that the runner already created (Ray Train does) is kept as it is.
    """
    # DeepSpeed reads the local rank from the environment only; runners do not all set it.
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if dist.is_initialized():
        return
    if world_size <= 1:
        if cfg.distributed.strategy == "deepspeed":
            # DeepSpeed needs a process group even alone; an in-memory store needs no port.
            dist.init_process_group(
                backend=_backend(cfg, device), store=dist.HashStore(), rank=0, world_size=1
            )
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"world size {world_size} but {', '.join(missing)} not set: start workers with "
            "torchrun, Ray Train (bigmodel-train) or set MASTER_ADDR/MASTER_PORT"
        )
    dist.init_process_group(
        backend=_backend(cfg, device),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=cfg.distributed.timeout_s),
    )


DEEPSPEED_BUCKET = 500_000_000
"""DeepSpeed's default ZeRO reduce/all-gather bucket size, in elements."""


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The autocast dtype of ``train.precision``; None for fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]


def deepspeed_config(
    cfg: Config, world_size: int, load_universal: bool = False, num_params: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed config generated from our schema; ``distributed.deepspeed_overrides`` last.

    Args:
        load_universal: the engine's ``load_checkpoint`` reads DeepSpeed's universal checkpoint
            layout (a ZeRO resume on another world size; ``checkpoint.loads_universal``).
        num_params: the model's parameter count; ZeRO's communication buckets are capped at it.
    """
    dcfg = cfg.distributed
    zero: dict[str, Any] = {"stage": dcfg.zero_stage}
    if num_params is not None:
        # ZeRO-1/2 allocate their reduce/all-gather buckets at full size (5e8 elements by
        # default) whatever the model: a bucket larger than the model is never filled, and on
        # CPU allocating and zeroing it costs ~20 s and ~1 GB per engine of several workers.
        # rounded up to a multiple of 256: ZeRO asserts the all-gather bucket is a multiple of
        # its 2-element (4-byte) alignment, and an odd parameter count is not
        bucket = min(DEEPSPEED_BUCKET, -(-max(num_params, 1) // 256) * 256)
        zero.update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if dcfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if dcfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.accumulation_steps,
        "train_batch_size": cfg.data.batch_size * cfg.optim.accumulation_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # timm optimizers (LARS, LAMB, AdamW)
        "zero_force_ds_cpu_optimizer": False,  # offload with a torch optimizer
        # fp32 parameters + torch.autocast in the forward (module notes); fp16 gets a GradScaler
        "torch_autocast": {
            "enabled": cfg.train.precision != "fp32",
            "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[
                cfg.train.precision
            ],
        },
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,  # the engine logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    return _merge(ds, dcfg.deepspeed_overrides)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Distributed:
    """A model ready to train on this worker, with the strategy-specific operations.

    Attributes:
        model: what the loop calls forward on (the DDP wrapper, the DeepSpeed engine or the model).
        module: the plain model inside (for state dicts and evaluation).
        optimizer: the timm optimizer (DeepSpeed wraps it; its ``param_groups`` stay shared).
        scheduler: the timm scheduler, stepped with ``step_update(optimizer_step)``.
    """

    strategy: str
    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler
    device: torch.device
    world_size: int
    accumulation_steps: int
    grad_clip: float | None
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    """DDP's loss scaler; enabled for fp16 only (a disabled one passes everything through)."""
    average_norm_buffers: bool = False
    """Average BatchNorm statistics across ranks before evaluating and saving (no SyncBN)."""
    engine: Any = None  # deepspeed.DeepSpeedEngine when strategy == "deepspeed"

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage() if self.engine is not None else 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass (a no-op in fp32).

        The same for DDP and DeepSpeed: parameters stay fp32 under both (DeepSpeed runs in its
        ``torch_autocast`` mode and applies the same autocast inside ``engine.forward``).
        """
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def micro_batch(self, is_last: bool) -> Iterator[None]:
        """Context for one micro-batch; DDP skips its gradient all-reduce until the last one."""
        if self.strategy == "ddp" and self.world_size > 1 and not is_last:
            with self.model.no_sync():  # trade: no communication until the window's last backward
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled for accumulation (and fp16 loss scaling).

        No check of the loss here: a non-finite loss shows up once per optimizer step in the
        gradient norm (:meth:`optimizer_step`), without a device sync per micro-batch.
        """
        if self.engine is not None:
            self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
            # DeepSpeed wants engine.step() after every backward; off the accumulation
            # boundary it only counts the micro-batch. The boundary's step is optimizer_step().
            if not self.engine.is_gradient_accumulation_boundary():
                self.engine.step()
            return
        self.scaler.scale(loss / self.accumulation_steps).backward()

    def optimizer_step(self) -> tuple[float, bool]:
        """End of an accumulation window: unscale, clip, step, zero.

        Returns the gradient norm and whether the update was applied. A non-finite norm (a NaN or
        inf loss or gradient on any rank) skips the update on every rank. The gradients are
        already averaged across ranks here, so every rank computes the same norm and takes the
        same decision without an extra collective; reading the norm on the host is the one
        device sync per optimizer step.
        """
        if self.engine is not None:
            return self._deepspeed_step()
        self.scaler.unscale_(self.optimizer)  # a no-op unless fp16
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.grad_clip is not None:
            norm = nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params])
        norm_value = float(norm)  # device sync: once per optimizer step
        applied = math.isfinite(norm_value)
        if applied:
            self.scaler.step(self.optimizer)  # fp16: the scaler may still skip an inf step
        self.scaler.update()  # fp16: a non-finite step lowers the loss scale
        self.optimizer.zero_grad(set_to_none=True)
        return norm_value, applied

    def _deepspeed_step(self) -> tuple[float, bool]:
        """DeepSpeed's boundary step; ZeRO-1/2/3 skip a non-finite step themselves.

        ZeRO-1/2/3 compute the global norm of the reduced gradients and treat a non-finite one
        as an overflow (no update, gradients cleared, norm reported as inf). ZeRO-0 steps the
        client optimizer directly, so the norm of the (already all-reduced) gradients is taken
        here and a non-finite window steps with zero gradients at a zero learning rate (its
        reductions and counters are collective, so every rank must still step).
        """
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("optimizer_step() off DeepSpeed's accumulation boundary")
        if self.zero_stage == 0:
            params = [p for p in self.module.parameters() if p.grad is not None]
            norm_value = float(nn.utils.get_total_norm([p.grad for p in params]))
            if math.isfinite(norm_value):
                self.engine.step()
                return norm_value, True
            saved = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] = 0.0
            for p in params:
                p.grad.zero_()
            self.engine.step()
            for group, lr in zip(self.optimizer.param_groups, saved, strict=True):
                group["lr"] = lr
            return norm_value, False
        self.engine.step()  # reduces (ZeRO), clips and applies the update
        norm = self.engine.get_global_grad_norm()
        norm_value = float("nan") if norm is None else float(norm)
        return norm_value, math.isfinite(norm_value)

    def sync_norm_buffers(self) -> None:
        """Average BatchNorm running statistics across ranks (timm's ``distribute_bn``).

        Without SyncBN each rank's statistics follow its own data, so ranks would evaluate and
        save different models; called before evaluation and before every save.
        """
        if self.average_norm_buffers:
            distribute_bn(self.module, self.world_size, reduce=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


DEPRECATED_COLLECTIVES = r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
"""Torch's FutureWarning on the collectives ZeRO calls every step (torch 2.14 deprecated them)."""


@contextlib.contextmanager
def quiet_deprecated_collectives() -> Iterator[None]:
    """Hide torch's deprecation warning on ZeRO's collectives inside the block (one run).

    ZeRO calls ``all_gather_into_tensor`` / ``reduce_scatter_tensor``, which torch marks
    deprecated with a FutureWarning: a line per call site per rank in every run's log. Scoped
    (``warnings.catch_warnings``) to the block its caller wraps around a whole run, not the
    process: the filters are as before when it ends.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)
        yield


def distribute(
    model: nn.Module,
    cfg: Config,
    world_size: int,
    device: torch.device,
    total_steps: int,
    load_universal: bool = False,
) -> Distributed:
    """Make ``model`` a distributed training model, applying in this order:

    1. SyncBN: BatchNorm layers become synchronised ones (torch's on CUDA, the gloo-capable one
       on CPU) when ``train.sync_bn`` and world size > 1. Before wrapping, because DeepSpeed
       captures the parameters at ``initialize`` and DDP registers hooks on them.
    2. Device and memory format (``backbone.channels_last``: ``channels_last_3d`` in 3D).
    3. Optimizer (timm) over the plain model's parameters, at the scaled LR; then the scheduler.
    4. Wrapping: DDP (``distributed.strategy=ddp``, world size > 1), or ``deepspeed.initialize``
       with the config from :func:`deepspeed_config` (also on one worker: ZeRO-0 is then plain
       training with DeepSpeed's checkpoint format). ``load_universal`` prepares the engine to
       resume from a universal checkpoint (resharded ZeRO state, ``checkpoint.loads_universal``).
    """
    if cfg.train.sync_bn and world_size > 1:
        model = convert_sync_batchnorm(model, device)
    backbone = cfg.model.backbone
    memory_format = torch.contiguous_format
    if backbone.channels_last:  # NHWC, or NDHWC for 3D (a 5D weight refuses channels_last)
        memory_format = (
            torch.channels_last_3d if backbone.spatial_dims == 3 else torch.channels_last
        )
    model = model.to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    common = dict(
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        world_size=world_size,
        accumulation_steps=cfg.optim.accumulation_steps,
        grad_clip=cfg.optim.grad_clip,
        amp_dtype=autocast_dtype(cfg),
        # one scaler, enabled for fp16 only; DeepSpeed's torch_autocast mode has its own
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16"),
        average_norm_buffers=world_size > 1 and not cfg.train.sync_bn,
    )
    if cfg.distributed.strategy == "deepspeed":
        import deepspeed  # only here: importing deepspeed is slow and probes accelerators

        if device.type == "cpu":
            # no minute-long JIT build of an inference-only CPU all-reduce (_deepspeed_hooks)
            _deepspeed_hooks.skip_cpu_shm_comm_build()
        deepspeed.init_distributed(
            dist_backend=_backend(cfg, device),
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=cfg.distributed.timeout_s),
            verbose=False,
        )
        # an earlier engine's torch_autocast settings must not leak into this one (tests, sweeps)
        _deepspeed_hooks.reset_torch_autocast_state()
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=deepspeed_config(
                cfg,
                world_size,
                load_universal,
                num_params=sum(p.numel() for p in model.parameters()),
            ),
        )
        return Distributed(strategy="deepspeed", model=engine, engine=engine, **common)

    wrapped: nn.Module = model
    if world_size > 1:
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.distributed.find_unused_parameters,
        )
    return Distributed(strategy="ddp", model=wrapped, **common)
