"""The one place that reaches into Ray's private modules, for what no public API does.

Each hook names what it touches, why, and the public API that was looked for. Ray moves its
private modules between releases without notice: :func:`check` raises, naming the Ray version
and the missing attribute, when what a hook touches is gone, and ``tests/test_private_hooks.py``
calls it, so an upgrade that moves it fails a test rather than silently changing behaviour.
``tests/test_import_rules.py`` allows ``ray._private`` in this module only.

Hooks:
    * the driver's handler of forwarded worker output (:func:`console_handler`,
      :func:`replace_console_handler`). ``ray.init`` registers ``print_to_stdstream`` under the
      name ``ray_print_logs`` on ``ray._private.worker.global_worker_stdstream_dispatcher``; it
      prints every line the workers and the Ray Train controller write. The public settings are
      all or nothing (``ray.init(log_to_driver=False)`` drops bigmodel's own progress lines
      too; ``LoggingConfig`` formats the workers' logging, not what the driver prints), so
      ``launch._worker.route_ray_console`` wraps the handler to keep bigmodel's lines on the
      console and send the rest to a file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

__all__ = ["PRINT_HANDLER", "check", "console_handler", "replace_console_handler"]

PRINT_HANDLER = "ray_print_logs"
"""Name under which ``ray.init`` registers the driver's printer of forwarded worker output."""

Handler = Callable[[dict[str, Any]], None]


def _dispatcher() -> Any:
    from ray._private import worker as ray_worker

    return ray_worker.global_worker_stdstream_dispatcher


def check() -> None:
    """Raise naming Ray's version when an attribute the hooks use is gone (an upgrade moved it).

    What ``ray.init`` registers is checked by the test, which starts Ray.
    """
    try:
        dispatcher = _dispatcher()
    except (ImportError, AttributeError) as err:
        raise RuntimeError(
            f"Ray {ray.__version__}: ray._private.worker.global_worker_stdstream_dispatcher is "
            f"gone ({err}); update launch/_ray_hooks.py"
        ) from None
    for name in ("handlers", "add_handler", "remove_handler"):
        if not hasattr(dispatcher, name):
            raise RuntimeError(
                f"Ray {ray.__version__}: the worker output dispatcher has no {name!r}; update "
                f"launch/_ray_hooks.py"
            )


def console_handler() -> Handler | None:
    """The handler printing forwarded worker output on this driver (None before ``ray.init``)."""
    return dict(_dispatcher().handlers).get(PRINT_HANDLER)


def replace_console_handler(handler: Handler) -> None:
    """Print forwarded worker output through ``handler`` instead of Ray's own printer."""
    dispatcher = _dispatcher()
    dispatcher.remove_handler(PRINT_HANDLER)
    dispatcher.add_handler(PRINT_HANDLER, handler)
