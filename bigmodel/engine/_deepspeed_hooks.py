"""The one place that changes DeepSpeed's private state, for what no public API does.

Each hook names what it touches, why, and the public API that was looked for. DeepSpeed moves
its internals between releases without notice: :func:`check` raises, naming the DeepSpeed
version and the missing name, when what a hook touches is gone, and
``tests/test_private_hooks.py`` calls it, so an upgrade that moves it fails a test rather than
silently bringing back a minute-long build or a leaked precision setting.
``tests/test_import_rules.py`` allows these names in this module only.

Hooks:
    * :func:`skip_cpu_shm_comm_build`: on CPU, DeepSpeed's torch comm backend JIT-compiles a
      shared-memory all-reduce for CPU *inference* (``inference_all_reduce``) when it starts,
      about a minute of C++ build (and a compiler) on every fresh machine, for an op training
      never calls (ZeRO's collectives go through torch.distributed/gloo). Its
      ``build_shm_op`` asks ``deepspeed.ops.__compatible_ops__``; there is no setting or
      environment variable to skip it (``DS_BUILD_*`` only apply when installing), so the op
      is marked incompatible.
    * :func:`reset_torch_autocast_state`: DeepSpeed keeps its ``torch_autocast`` state in module
      globals of ``deepspeed.runtime.torch_autocast`` that only an enabled engine sets, and
      never clears them: a later fp32 engine in the same process (tests, sweeps) would inherit
      an earlier run's fp16 GradScaler and low-precision gradient communication. No public
      function resets them.
"""

from __future__ import annotations

__all__ = ["check", "reset_torch_autocast_state", "skip_cpu_shm_comm_build"]

SHM_COMM_OP = "deepspeed_shm_comm"
AUTOCAST_GLOBALS = ("TORCH_AUTOCAST_INITIALIZED", "TORCH_AUTOCAST_DTYPE")


def check() -> None:
    """Raise naming DeepSpeed's version when a name the hooks use is gone (an upgrade moved it)."""
    import importlib
    import inspect

    import deepspeed
    import deepspeed.ops
    from deepspeed.runtime import torch_autocast as ds_autocast

    # by name: the attribute deepspeed.comm.torch is torch itself (deepspeed.comm imports it)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    where = f"DeepSpeed {deepspeed.__version__}"
    fix = "update bigmodel/engine/_deepspeed_hooks.py"
    for name in AUTOCAST_GLOBALS:
        if not hasattr(ds_autocast, name):
            raise RuntimeError(f"{where}: deepspeed.runtime.torch_autocast.{name} is gone; {fix}")
    if SHM_COMM_OP not in deepspeed.ops.__compatible_ops__:
        raise RuntimeError(
            f"{where}: no {SHM_COMM_OP!r} in deepspeed.ops.__compatible_ops__; {fix}"
        )
    build = getattr(ds_comm_torch, "build_shm_op", None)
    if build is None or "__compatible_ops__" not in inspect.getsource(build):
        raise RuntimeError(
            f"{where}: deepspeed.comm.torch.build_shm_op no longer asks "
            f"deepspeed.ops.__compatible_ops__, so marking the op incompatible skips nothing; {fix}"
        )


def skip_cpu_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce unavailable, so it is never JIT-built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def reset_torch_autocast_state() -> None:
    """Forget an earlier engine's ``torch_autocast`` settings before a new engine starts."""
    from deepspeed.runtime import torch_autocast as ds_autocast

    ds_autocast.TORCH_AUTOCAST_INITIALIZED = False
    ds_autocast.TORCH_AUTOCAST_DTYPE = None
