"""The engine's SyncBN on 3D networks: BatchNorm3d synchronised over gloo, InstanceNorm untouched.

``resnetN_3d`` normalises with BatchNorm3d, ``resenc3d`` (nnU-Net's layout) with InstanceNorm3d,
whose statistics are per sample and must stay local. Two gloo ranks each normalise half a batch
of volumes and must get what one BatchNorm3d gets on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _engine_tiny import free_port, set_dist_env

from bigmodel.config import BackboneConfig
from bigmodel.engine._syncbn import GlooSyncBatchNorm, convert_sync_batchnorm
from bigmodel.models import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _volumes() -> torch.Tensor:
    return torch.randn(4, 3, 4, 6, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1


def test_conversion_replaces_batchnorm3d_and_leaves_instance_norm():
    resnet = create_backbone(
        BackboneConfig(name="resnet10_3d", spatial_dims=3, in_chans=1, base_channels=4)
    )
    resenc = create_backbone(
        BackboneConfig(
            name="resenc3d", spatial_dims=3, in_chans=1, base_channels=4, out_indices=[0, 1]
        )
    )
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in resnet.modules())
    converted = convert_sync_batchnorm(resnet, torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in converted.modules())
    assert any(isinstance(m, GlooSyncBatchNorm) for m in converted.modules())
    instance = [m for m in resenc.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    kept = convert_sync_batchnorm(resenc, torch.device("cpu"))
    assert instance and [m for m in kept.modules() if isinstance(m, torch.nn.InstanceNorm3d)] == (
        instance
    )
    assert not any(isinstance(m, GlooSyncBatchNorm) for m in kept.modules())


def _rank(rank: int, port: int, queue) -> None:
    set_dist_env(rank, 2, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        norm = convert_sync_batchnorm(torch.nn.BatchNorm3d(3), torch.device("cpu"))
        x = _volumes()[rank * 2 : rank * 2 + 2].requires_grad_(True)
        out = norm(x)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        # numpy, pickled by value: torch would share the tensors' memory with an exiting process
        tensors = (out.detach(), x.grad, norm.running_mean, norm.running_var)
        queue.put((rank, *(t.numpy().copy() for t in tensors)))
    finally:
        dist.destroy_process_group()


def test_two_ranks_normalise_volumes_as_one_batch():
    # fork: the children inherit the imports (spawned ones re-import MONAI and timm, ~1 min)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    x = _volumes().requires_grad_(True)
    reference = torch.nn.BatchNorm3d(3)
    out = reference(x)
    (out[:2] * torch.arange(out[:2].numel()).view_as(out[:2])).sum().backward(retain_graph=True)
    (out[2:] * torch.arange(out[2:].numel()).view_as(out[2:])).sum().backward()
    parts = [[torch.from_numpy(a) for a in r[1:]] for r in results]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), out.detach())
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), x.grad)
    for part in parts:  # every rank's running statistics are the whole batch's
        torch.testing.assert_close(part[2], reference.running_mean)
        torch.testing.assert_close(part[3], reference.running_var)
