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
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from timm.scheduler.scheduler import Scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigmodel.config import Config, ConfigError
from bigmodel.engine._optim import build_optimizer, build_scheduler
from bigmodel.engine._syncbn import convert_sync_batchnorm

__all__ = [
    "Distributed",
    "autocast_dtype",
    "deepspeed_config",
    "distribute",
    "init_distributed",
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


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The autocast dtype of ``train.precision``; None for fp32."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config generated from our schema; ``distributed.deepspeed_overrides`` last."""
    dcfg = cfg.distributed
    zero: dict[str, Any] = {"stage": dcfg.zero_stage}
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
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "initial_scale_power": 16},
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
    scaler: torch.amp.GradScaler | None = None
    engine: Any = None  # deepspeed.DeepSpeedEngine when strategy == "deepspeed"

    @property
    def zero_stage(self) -> int:
        return self.engine.zero_optimization_stage() if self.engine is not None else 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context for the forward pass (a no-op in fp32).

        DeepSpeed bf16/fp16 casts the whole model to that dtype (fp32 master weights live in its
        optimizer), so it runs without autocast, on inputs cast by :meth:`inputs`.
        """
        if self.amp_dtype is None or self.engine is not None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the dtype the first layer expects.

        A DeepSpeed engine in bf16/fp16 holds its parameters in that dtype (autocast leaves
        some layers, e.g. BatchNorm, in the input's dtype), so inputs are cast to it; DDP keeps
        fp32 parameters and lets autocast choose.
        """
        if self.engine is not None and self.amp_dtype is not None:
            return images.to(self.amp_dtype)
        return images

    @contextlib.contextmanager
    def micro_batch(self, is_last: bool) -> Iterator[None]:
        """Context for one micro-batch; DDP skips its gradient all-reduce until the last one."""
        if self.strategy == "ddp" and self.world_size > 1 and not is_last:
            with self.model.no_sync():  # trade: no communication until the window's last backward
                yield
        else:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss, scaled for accumulation (and fp16 loss scaling)."""
        if self.engine is not None:
            self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
            self._advance_micro_batch()
            return
        loss = loss / self.accumulation_steps
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def skip_backward(self) -> None:
        """Stand in for the backward of a skipped (non-finite) micro-batch.

        DDP needs nothing (the window's gradients are dropped). DeepSpeed schedules its gradient
        reductions on its own micro-batch count, so every rank still runs a backward, of a
        surrogate with exactly zero gradients (parameters times zero), to keep that schedule.
        """
        if self.engine is None:
            return
        if self.zero_stage == 3:
            raise RuntimeError(
                "non-finite loss under ZeRO-3: partitioned parameters cannot take a surrogate "
                "backward; lower optim.lr, enable optim.grad_clip or use zero_stage <= 2"
            )
        params = [p for p in self.module.parameters() if p.requires_grad]
        surrogate = sum((p * 0.0).sum() for p in params)
        self.engine.backward(surrogate)
        self._advance_micro_batch()

    def _advance_micro_batch(self) -> None:
        # DeepSpeed wants engine.step() after every backward; off the accumulation boundary it
        # only counts the micro-batch. The boundary's step is optimizer_step().
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def optimizer_step(self, apply: bool = True) -> float | None:
        """End of an accumulation window: unscale, clip, step, zero; returns the gradient norm.

        ``apply=False`` skips the window's update (a micro-batch had a non-finite loss). DDP
        drops the gradients. DeepSpeed must still take its boundary step (its reductions and
        counters are collective), so it steps with a zero learning rate: no parameter moves
        with any timm/torch optimizer (all scale their update and decoupled decay by the LR);
        momentum buffers see one zero-gradient update.
        """
        if self.engine is not None:
            if not self.engine.is_gradient_accumulation_boundary():
                raise RuntimeError("optimizer_step() off DeepSpeed's accumulation boundary")
            saved = [group["lr"] for group in self.optimizer.param_groups]
            if not apply:
                for group in self.optimizer.param_groups:
                    group["lr"] = 0.0
            self.engine.step()  # reduces (ZeRO), clips and applies the update
            for group, lr in zip(self.optimizer.param_groups, saved, strict=True):
                group["lr"] = lr
            norm = self.engine.get_global_grad_norm()
            return None if norm is None or not apply else float(norm)
        if not apply:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.grad_clip is not None:
            norm = float(nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on inf/NaN gradients
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def _match_norm_buffers(model: nn.Module, dtype: torch.dtype) -> None:
    """Give BatchNorm running statistics the parameters' low-precision dtype.

    DeepSpeed bf16/fp16 casts parameters but keeps buffers in fp32, and the BatchNorm kernels
    (CPU, and CUDA without cuDNN's mixed path) refuse bf16 weights with fp32 statistics.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.data = module.running_mean.data.to(dtype)
            module.running_var.data = module.running_var.data.to(dtype)


def distribute(
    model: nn.Module, cfg: Config, world_size: int, device: torch.device, total_steps: int
) -> Distributed:
    """Make ``model`` a distributed training model, applying in this order:

    1. SyncBN: BatchNorm layers become synchronised ones (torch's on CUDA, the gloo-capable one
       on CPU) when ``train.sync_bn`` and world size > 1. Before wrapping, because DeepSpeed
       captures the parameters at ``initialize`` and DDP registers hooks on them.
    2. Device and memory format (``backbone.channels_last``).
    3. Optimizer (timm) over the plain model's parameters, at the scaled LR; then the scheduler.
    4. Wrapping: DDP (``distributed.strategy=ddp``, world size > 1), or ``deepspeed.initialize``
       with the config from :func:`deepspeed_config` (also on one worker: ZeRO-0 is then plain
       training with DeepSpeed's checkpoint format).
    """
    if cfg.train.sync_bn and world_size > 1:
        model = convert_sync_batchnorm(model, device)
    memory_format = (
        torch.channels_last if cfg.model.backbone.channels_last else torch.contiguous_format
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
    )
    if cfg.distributed.strategy == "deepspeed":
        import deepspeed  # only here: importing deepspeed is slow and probes accelerators

        # ZeRO calls torch's all_gather_into_tensor / reduce_scatter_tensor, which torch 2.14
        # marks deprecated with a FutureWarning on every call: one line per step per rank.
        warnings.filterwarnings(
            "ignore",
            message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )
        deepspeed.init_distributed(
            dist_backend=_backend(cfg, device),
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=cfg.distributed.timeout_s),
            verbose=False,
        )
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size)
        )
        if common["amp_dtype"] is not None:
            _match_norm_buffers(model, common["amp_dtype"])
        return Distributed(strategy="deepspeed", model=engine, engine=engine, **common)

    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    wrapped: nn.Module = model
    if world_size > 1:
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.distributed.find_unused_parameters,
        )
    return Distributed(strategy="ddp", model=wrapped, scaler=scaler, **common)
