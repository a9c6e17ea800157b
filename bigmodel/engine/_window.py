"""Contrastive losses across an accumulation window (open_clip's ``accum_freq``).

Gradient accumulation makes a larger batch for losses that are means over samples, but a
contrastive loss compares samples with each other: accumulated naively, each micro-batch only
sees its own negatives. With ``across_accumulation`` on a retrieval head, the training loop reads
the window's ``k`` micro-batches first and :meth:`ContrastiveWindow.embed` runs them once without
gradients while the losses record their embeddings; then each micro-batch is run again with
gradients and its loss is computed over the whole window, its own slot live and the others
recorded (``bigmodel.tasks.losses.AccumulationWindow``). The sum of the ``k`` micro-steps' gradients is
then the gradient of one batch ``k`` times larger.

For the recorded embeddings to equal the live ones, each rerun starts from the RNG state its
recording pass started from (dropout, drop-path), and the recording pass leaves no trace in the
model: buffers (BatchNorm running statistics) are restored after it. In training mode BatchNorm
normalises a micro-batch by its own statistics in both passes, so they agree there too (but, as
for any accumulation, differ from one batch ``k`` times larger).

The price: one more forward per micro-batch, without activations kept, and the window's inputs
held at once.
"""

from __future__ import annotations

from typing import Any

import torch

from bigmodel.engine._strategy import Distributed
from bigmodel.tasks.losses import AccumulationWindow, RetrievalLoss


class ContrastiveWindow:
    """The retrieval losses of ``dm`` that see the whole accumulation window (may be none)."""

    def __init__(self, dm: Distributed, accumulation: int) -> None:
        self.dm = dm
        self.losses = [
            m
            for m in dm.module.modules()
            if isinstance(m, RetrievalLoss) and m.cfg.across_accumulation
        ]
        if accumulation < 2:
            self.losses = []  # one micro-batch is already the whole window
        self._rng: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __bool__(self) -> bool:
        return bool(self.losses)

    @torch.no_grad()
    def embed(self, batches: list[dict[str, Any]]) -> None:
        """Run every micro-batch once without gradients; the losses record their embeddings."""
        module, device = self.dm.module, self.dm.device
        buffers = [b.detach().clone() for b in module.buffers()]
        for loss in self.losses:
            loss.window = AccumulationWindow(len(batches))
        self._rng = []
        for batch in batches:
            cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            self._rng.append((torch.get_rng_state(), cuda))
            with self.dm.autocast():
                module(batch["image"], batch)  # the plain module: no DDP hooks or syncs
        for saved, live in zip(buffers, module.buffers(), strict=True):
            live.copy_(saved)  # BatchNorm statistics as if the pass had not run

    def enter(self, slot: int) -> None:
        """Prepare the rerun of micro-batch ``slot`` with gradients."""
        cpu, cuda = self._rng[slot]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.dm.device)
        for loss in self.losses:
            loss.window.slot = slot

    def close(self) -> None:
        """End of the window: the losses see single micro-batches again."""
        for loss in self.losses:
            loss.window = None
