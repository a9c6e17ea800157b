"""The small interface between the training loop and whatever runs it.

The engine knows nothing of Ray: ``launch/`` implements :class:`Session` with Ray Train
(``ray.train.report`` / ``ray.train.get_checkpoint``), tests implement it with plain
``torch.distributed`` (:class:`LocalSession`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Session(Protocol):
    """What the training loop needs from its runner."""

    @property
    def rank(self) -> int:
        """Global rank of this worker."""

    @property
    def local_rank(self) -> int:
        """Device index of this worker on its node."""

    @property
    def world_size(self) -> int:
        """Number of workers."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report metrics, and a checkpoint folder when one was just written.

        Called on every rank (saving and reporting are collective under Ray Train).
        """

    def latest_checkpoint(self) -> str | None:
        """Local folder of the checkpoint to resume from, or None for a fresh start."""


@dataclass
class LocalSession:
    """Session for plain ``torch.distributed`` runs (tests, single process).

    Reads rank and world size from the usual environment variables; keeps reported metrics in
    memory and remembers the last checkpoint folder, so a second run can resume from it.
    """

    resume_from: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(os.environ.get("RANK", 0))

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    @property
    def world_size(self) -> int:
        return int(os.environ.get("WORLD_SIZE", 1))

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is not None:
            self.checkpoints.append(str(Path(checkpoint_dir)))

    def latest_checkpoint(self) -> str | None:
        return self.resume_from
