"""Synchronised BatchNorm that works over gloo, for CPU workers.

``torch.nn.SyncBatchNorm`` refuses CPU tensors (its kernels are CUDA-only), yet CPU runs (tests,
laptops, CI) must take the same code path as GPU runs. :class:`GlooSyncBatchNorm` computes the
batch statistics across all ranks with plain ``torch.distributed`` collectives, which gloo
supports, and has a hand-written backward (a ``torch.autograd.Function``, like torch's own
``SyncBatchNorm``): autograd cannot differentiate through ``all_reduce``, and the input gradient
of a synchronised BatchNorm depends on every rank's gradient sums, so they are all-reduced in the
backward pass too. On CUDA, :func:`convert_sync_batchnorm` uses torch's implementation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlooSyncBatchNorm", "GlooSyncBatchNormAct", "convert_sync_batchnorm"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch statistics over all ranks in forward; gradient sums over all ranks in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dims = _reduce_dims(x)
        x32 = x.float()
        count = torch.tensor([x32.numel() // x32.shape[1]], dtype=torch.float32, device=x.device)
        # Per-rank mean/variance (numerically stable), gathered and combined with the parallel
        # variance formula; summing raw sum/sum-of-squares would lose precision.
        var, mean = torch.var_mean(x32, dim=dims, unbiased=False)
        local = torch.cat([mean, var, count])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)  # syncs all ranks
        stats = torch.stack(gathered)  # [world, 2C + 1]
        channels = mean.numel()
        means, variances, counts = (
            stats[:, :channels],
            stats[:, channels : 2 * channels],
            stats[:, -1:],
        )
        total = counts.sum()
        if total <= 1:
            raise ValueError(
                f"SyncBatchNorm needs more than one value per channel across ranks (got {int(total)})"
            )
        global_mean = (means * counts).sum(0) / total
        global_var = ((variances + (means - global_mean) ** 2) * counts).sum(0) / total
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(global_mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = global_var * total / (total - 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(global_var + eps)
        x_hat = (x32 - global_mean.view(shape)) * invstd.view(shape)
        y = x_hat
        if weight is not None:
            y = y * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(x_hat, invstd, weight, total)
        ctx.group = group
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, invstd, weight, total = ctx.saved_tensors
        dims = _reduce_dims(grad_out)
        g = grad_out.float()
        channels = invstd.numel()
        shape = [1, channels] + [1] * (g.dim() - 2)
        # Local sums: the affine gradients are local (DDP / DeepSpeed average them like any
        # other parameter gradient, as torch's SyncBatchNorm does).
        sum_dy = g.sum(dims)
        sum_dy_xhat = (g * x_hat).sum(dims)
        grad_weight = sum_dy_xhat if weight is not None else None
        grad_bias = sum_dy if ctx.has_bias else None
        # The input gradient needs the sums over every rank's samples: one all-reduce.
        sums = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(sums, group=ctx.group)  # syncs all ranks
        mean_dy = (sums[:channels] / total).view(shape)
        mean_dy_xhat = (sums[channels:] / total).view(shape)
        scale = invstd.view(shape)
        if weight is not None:
            scale = scale * weight.float().view(shape)
        grad_x = (g - mean_dy - x_hat * mean_dy_xhat) * scale
        return (
            grad_x.to(grad_out.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(weight.dtype),
            None,
            None,
            None,
            None,
            None,
        )


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics span all ranks of ``process_group`` (any backend)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in _BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None)
        group = self.process_group or dist.group.WORLD
        need_sync = (
            use_batch_stats
            and self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(group) > 1
        )
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None
        if not need_sync:
            return F.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                use_batch_stats,
                momentum,
                self.eps,
            )
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, momentum, group
        )


class GlooSyncBatchNormAct(GlooSyncBatchNorm):
    """Synchronised version of timm's ``BatchNormAct2d`` (norm, then its drop and activation)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = super().forward(input)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def _convert_to_gloo(module: nn.Module, process_group: dist.ProcessGroup | None) -> nn.Module:
    """Mirror of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for :class:`GlooSyncBatchNorm`."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        cls = GlooSyncBatchNormAct if isinstance(module, BatchNormAct2d) else GlooSyncBatchNorm
        out = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if isinstance(module, BatchNormAct2d):
            out.act = module.act
            out.drop = module.drop
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _convert_to_gloo(child, process_group))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer by a synchronised one: torch's on CUDA, ours elsewhere.

    timm's converter is used on CUDA because it also handles timm's fused ``BatchNormAct2d``.
    """
    if device.type == "cuda":
        return timm_convert_sync_batchnorm(module)
    return _convert_to_gloo(module, None)
