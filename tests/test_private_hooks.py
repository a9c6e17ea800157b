"""The private hooks of Ray and DeepSpeed still touch what they hook (fails loudly on upgrades).

``launch/_ray_hooks.py`` and ``bigmodel/engine/_deepspeed_hooks.py`` are the only modules that
reach into private parts of Ray and DeepSpeed (``tests/test_import_rules.py`` keeps it so). An
upgrade that moves what they touch fails here, naming the version and the name, instead of
silently bringing back pages of Ray console output, a minute-long C++ build, or an earlier
engine's precision settings.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from conftest import clean_env

from bigmodel.engine import _deepspeed_hooks, quiet_deprecated_collectives
from launch import _ray_hooks


def test_deepspeed_hooks_find_what_they_change():
    _deepspeed_hooks.check()


def test_deepspeed_autocast_state_is_reset():
    import torch
    from deepspeed.runtime import torch_autocast as ds_autocast

    ds_autocast.TORCH_AUTOCAST_INITIALIZED = True
    ds_autocast.TORCH_AUTOCAST_DTYPE = torch.float16
    _deepspeed_hooks.reset_torch_autocast_state()
    assert ds_autocast.TORCH_AUTOCAST_INITIALIZED is False
    assert ds_autocast.TORCH_AUTOCAST_DTYPE is None


def test_cpu_shm_comm_is_not_built():
    from deepspeed.comm.torch import build_shm_op

    _deepspeed_hooks.skip_cpu_shm_comm_build()
    assert build_shm_op() is None  # no JIT build: the op reads as incompatible


def test_ray_hooks_find_the_dispatcher():
    _ray_hooks.check()


@pytest.mark.ray
def test_ray_init_registers_the_console_handler_the_hook_replaces():
    """In a fresh process: ``ray.init`` registers the handler under the name the hook uses."""
    code = """
import ray
from launch import _ray_hooks
ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
try:
    original = _ray_hooks.console_handler()
    assert original is not None, "ray.init registered no handler named " + _ray_hooks.PRINT_HANDLER
    def handler(data):
        pass
    _ray_hooks.replace_console_handler(handler)
    assert _ray_hooks.console_handler() is handler
finally:
    ray.shutdown()
"""
    result = subprocess.run(
        [sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_deprecated_collective_warnings_are_hidden_only_inside_the_block():
    message = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use x instead."
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_deprecated_collectives():
            warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn(message, FutureWarning, stacklevel=1)
    assert len(seen) == 1  # only the one outside the block
    assert warnings.filters == before
