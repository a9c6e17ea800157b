"""The training loop and the distributed strategies (DDP, DeepSpeed ZeRO). Knows nothing of Ray.

``train(cfg, session)`` runs a whole run on one worker (docs/contracts.md); ``fit`` is the loop
itself on already-built pieces; ``Session`` / ``LocalSession`` are the runner interface.
A runner wraps a run in ``quiet_deprecated_collectives()`` to keep torch's deprecation line on
every ZeRO collective out of its log.
"""

from bigmodel.engine._strategy import quiet_deprecated_collectives
from bigmodel.engine.loop import NonFiniteLossError, evaluate, fit, train
from bigmodel.engine.session import LocalSession, Session

__all__ = [
    "LocalSession",
    "NonFiniteLossError",
    "Session",
    "evaluate",
    "fit",
    "quiet_deprecated_collectives",
    "train",
]
