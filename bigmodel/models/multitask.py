"""One backbone, any set of task heads, one weighted loss.

The backbone runs once per batch; every head reads the same list of feature maps. A batch may
carry labels for some tasks only: a head without labels contributes ``0 * (its output sum)``, so
its parameters stay in the autograd graph (DDP needs every parameter to get a gradient each
step) while the gradient they receive is exactly zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bigmodel.config import HeadConfig
from bigmodel.models.backbone import Backbone

__all__ = ["MultiTaskModel"]


def _zero_loss(head: nn.Module, output: Any) -> Tensor:
    """A zero that touches every parameter of ``head`` (exact zero gradient, DDP-safe)."""
    if isinstance(output, Tensor):
        return output.sum() * 0.0
    # Detection has no tensor output in training; use its parameters directly.
    return sum(p.sum() for p in head.parameters() if p.requires_grad) * 0.0


class MultiTaskModel(nn.Module):
    """``forward(images, batch=None) -> {"outputs", "losses", "loss"}`` (docs/contracts.md).

    Single-device model code: it never asks for its rank (STYLE.md rule 1).
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: dict[str, nn.Module],
        criteria: dict[str, nn.Module],
        head_configs: dict[str, HeadConfig],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        # Losses are modules because some hold parameters (ArcFace class centres).
        self.criteria = nn.ModuleDict(criteria)
        self.head_configs = dict(head_configs)

    @staticmethod
    def _labels(field: str, batch: dict[str, Any]) -> tuple[Any, Tensor | None]:
        """The head's target from the batch and which samples carry it (None: all do)."""
        if field not in batch:
            return None, None
        has = batch.get("has", {}).get(field)
        return batch[field], has

    def forward(self, images: Tensor, batch: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run the backbone once and every head; with ``batch``, also the weighted losses.

        In eval mode detection reports boxes and no loss (torchvision computes detection losses
        only in training mode), so ``losses`` then lacks detection heads.
        """
        features = self.backbone(images)
        image_size = tuple(int(n) for n in images.shape[2:])  # (H, W) or (D, H, W)
        outputs: dict[str, Any] = {}
        losses: dict[str, Tensor] = {}
        for name, head in self.heads.items():
            cfg = self.head_configs[name]
            target, has = self._labels(cfg.target, batch) if batch is not None else (None, None)
            if head.needs_targets:
                output, loss = self._run_detection(name, head, features, image_size, target, has)
                outputs[name] = output
                if batch is None or not self.training:
                    continue
            else:
                output = head(features, image_size)
                outputs[name] = output
                if batch is None:
                    continue
                loss = self.criteria[name](output, target, has) if target is not None else None
            if loss is None:
                loss = _zero_loss(head, output)
            losses[name] = cfg.loss_weight * loss
        result: dict[str, Any] = {"outputs": outputs}
        if batch is not None:
            result["losses"] = losses
            result["loss"] = sum(losses.values()) if losses else images.new_zeros(())
        return result

    def _run_detection(
        self,
        name: str,
        head: nn.Module,
        features: list[Tensor],
        image_size: tuple[int, ...],
        target: list[dict[str, Tensor]] | None,
        has: Tensor | None,
    ) -> tuple[Any, Tensor | None]:
        """Eval: detections. Training: ``({}, loss)`` over the images that carry boxes."""
        if not self.training:
            return head(features, image_size), None
        if target is None:
            return {}, None
        keep = list(range(len(target))) if has is None else has.nonzero().flatten().tolist()
        if not keep:
            return {}, None
        if len(keep) < len(target):
            index = torch.tensor(keep, device=features[0].device)
            features = [f.index_select(0, index) for f in features]
        terms = head(features, image_size, [target[i] for i in keep])
        return {}, self.criteria[name](terms)
