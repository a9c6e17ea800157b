"""Optimizer and learning-rate schedule from the config (timm's implementations).

Large-batch rules live here: the learning rate is scaled from ``optim.reference_batch_size`` to
the global batch (``Config.scaled_lr``: linear or sqrt), norms and biases get no weight decay
(timm's ``filter_bias_and_bn``), and LARS leaves those same parameters unadapted (timm's
``always_adapt=False`` skips the trust ratio for groups without weight decay).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from bigmodel.config import Config

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """A timm optimizer over ``model`` at the scaled learning rate, norms and biases decay-free."""
    optim = cfg.optim
    kwargs: dict[str, Any] = {}
    if optim.name in ("sgd", "lars"):
        kwargs["momentum"] = optim.momentum
    else:  # adamw, lamb
        kwargs["betas"] = tuple(optim.betas)
    return create_optimizer_v2(
        model,
        opt=optim.name,
        lr=cfg.scaled_lr(),
        weight_decay=optim.weight_decay,
        filter_bias_and_bn=True,  # 1-D parameters (norms, biases) go to a weight_decay=0 group
        layer_decay=optim.layer_decay,  # timm scales each group's LR by its depth (lr_scale)
        foreach=False,  # identical arithmetic on every strategy (ZeRO flattens parameters)
        **kwargs,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> Scheduler:
    """Warmup, then cosine / step / constant; stepped per optimizer update with ``step_update``."""
    sched = cfg.schedule
    common = dict(
        warmup_t=sched.warmup_steps,
        warmup_lr_init=sched.warmup_lr,
        t_in_epochs=False,  # the schedule counts optimizer updates, not epochs
    )
    if sched.name == "cosine":
        return CosineLRScheduler(
            optimizer, t_initial=max(total_steps, 1), lr_min=sched.min_lr, **common
        )
    if sched.name == "step":
        return StepLRScheduler(
            optimizer,
            decay_t=sched.decay_steps,
            decay_rate=sched.decay_rate,
            warmup_prefix=False,
            **common,
        )
    # constant: a step schedule that never decays, so warmup behaves the same way
    return StepLRScheduler(
        optimizer, decay_t=max(total_steps, 1) + 1, decay_rate=1.0, warmup_prefix=False, **common
    )
