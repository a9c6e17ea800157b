"""Task losses, each tolerant of partial labels.

Every loss takes ``(output, target, has)`` where ``has`` (``bool [B]`` or None) says which samples
carry the task's label, and returns the mean loss over the labelled samples, or ``None`` when the
batch holds no usable label (the multi-task model then adds ``0 * output.sum()`` so the head gets
an exact zero gradient). Library losses are used wherever one exists: ``F.cross_entropy``
(label smoothing, class weights, ignore index), torchvision's ``sigmoid_focal_loss``,
pytorch-metric-learning's metric losses; detection losses are computed by torchvision's detectors.
Which loss a head type gets is its entry in the task table (``bigmodel.tasks.TASKS``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from bigmodel.config import (
    ClassificationHeadConfig,
    ConfigError,
    ContrastiveHeadConfig,
    DetectionHeadConfig,
    RetrievalHeadConfig,
    SegmentationHeadConfig,
)

__all__ = [
    "METRIC_LOSSES",
    "AccumulationWindow",
    "ClassificationLoss",
    "ContrastiveLoss",
    "DetectionLoss",
    "RetrievalLoss",
    "SegmentationLoss",
    "soft_dice_loss",
    "softmax_focal_loss",
]


def softmax_focal_loss(
    logits: Tensor, target: Tensor, gamma: float, weight: Tensor | None = None
) -> Tensor:
    """Per-sample multi-class focal loss ``(1 - p_t)^gamma * CE``.

    Written here because torchvision only ships the sigmoid (one-vs-rest) focal loss; this is the
    softmax form of Lin et al. (2017), with optional per-class weights like ``F.cross_entropy``.
    """
    ce = F.cross_entropy(logits, target, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1.0 - p_t) ** gamma * ce
    if weight is not None:
        loss = loss * weight[target]
    return loss


def soft_dice_loss(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Multi-class soft Dice loss, ``1 - mean over classes of 2|P∩Y| / (|P| + |Y|)``.

    Written here because neither torchvision nor torchmetrics has a differentiable Dice loss
    (torchmetrics' Dice is a metric) and monai is not a dependency. Ignored pixels are excluded
    from both the prediction and the target sums; classes absent from both score 1 (no penalty).
    """
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # [B, 1, *spatial]
    probs = logits.float().softmax(dim=1) * valid
    one_hot = F.one_hot(target.clamp(0, num_classes - 1), num_classes)  # [B, *spatial, K]
    one_hot = one_hot.movedim(-1, 1).to(probs.dtype) * valid
    dims = (0, *range(2, probs.ndim))  # the batch and every spatial dimension
    intersection = (probs * one_hot).sum(dims)
    cardinality = probs.sum(dims) + one_hot.sum(dims)
    eps = 1e-6
    dice = (2.0 * intersection + eps) / (cardinality + eps)
    return 1.0 - dice.mean()


def _per_class(name: str, values: list[float] | None, num_classes: int | None) -> Tensor | None:
    """``values`` as a float tensor (None when unset), refused unless one per class."""
    if values is None:
        return None
    if num_classes is not None and len(values) != num_classes:
        raise ConfigError(
            f"{name} has {len(values)} entries but num_classes is {num_classes}: give one "
            "weight per class"
        )
    return torch.tensor(values, dtype=torch.float32)


class ClassificationLoss(nn.Module):
    """Cross-entropy (label smoothing, class weights) or BCE for multi-label; focal as an option.

    Multi-class targets are ``int64 [B]``, multi-label ``float [B, K]`` with 0/1 and ``-1`` where
    the label is unknown; unknown entries are masked out of the mean.
    """

    def __init__(self, cfg: ClassificationHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        for per_class in ("class_weights", "pos_weight"):
            if getattr(cfg, per_class) == "balanced":  # numbers come from the data's counts
                raise ConfigError(
                    f"{per_class}=balanced is computed from the dataset manifest's label_counts: "
                    f"build the loss from bigmodel.data.resolve_config(cfg, manifest)"
                )
        weights = _per_class("class_weights", cfg.class_weights, cfg.num_classes)
        self.register_buffer("class_weights", weights, persistent=False)
        if cfg.pos_weight is not None and not cfg.multilabel:
            raise ConfigError(
                "pos_weight weighs the positive term of multi-label (sigmoid) heads; set "
                "multilabel: true, or use class_weights for a multi-class head"
            )
        pos_weight = _per_class("pos_weight", cfg.pos_weight, cfg.num_classes)
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(self, logits: Tensor, target: Tensor, has: Tensor | None = None) -> Tensor | None:
        """Mean loss over labelled samples (multi-label: labelled entries); None if none."""
        if self.cfg.multilabel:
            return self._multilabel(logits, target, has)
        if target.dim() != 1:
            raise ValueError(
                f"multi-class classification expects cls targets of shape [B], got "
                f"{tuple(target.shape)}; set multilabel: true for multi-hot labels"
            )
        valid = target >= 0
        if has is not None:
            valid = valid & has
        if not bool(valid.any()):
            return None
        logits, target = logits[valid], target[valid]
        if self.cfg.focal:
            per_sample = softmax_focal_loss(
                logits, target, self.cfg.focal_gamma, self.class_weights
            )
            if self.class_weights is None:
                return per_sample.mean()
            # weighted mean, as F.cross_entropy(weight=...): gamma=0 gives exactly that loss
            return per_sample.sum() / self.class_weights[target].sum()
        return F.cross_entropy(
            logits, target, weight=self.class_weights, label_smoothing=self.cfg.label_smoothing
        )

    def _multilabel(self, logits: Tensor, target: Tensor, has: Tensor | None) -> Tensor | None:
        if target.shape != logits.shape:
            raise ValueError(
                f"multi-label classification expects cls targets of shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        known = target >= 0
        if has is not None:
            known = known & has.unsqueeze(1)
        if not bool(known.any()):
            return None
        target = target.clamp(min=0).to(logits.dtype)
        if self.cfg.focal:
            # alpha=-1: no foreground/background re-weighting; class_weights do that job here.
            per_entry = sigmoid_focal_loss(
                logits, target, alpha=-1, gamma=self.cfg.focal_gamma, reduction="none"
            )
        else:
            # pos_weight scales only the positive term (BCEWithLogits), so rare findings weigh
            # more without weighting their many negatives alike
            per_entry = F.binary_cross_entropy_with_logits(
                logits, target, pos_weight=self.pos_weight, reduction="none"
            )
        if self.class_weights is not None:
            per_entry = per_entry * self.class_weights
        return per_entry[known].mean()


class SegmentationLoss(nn.Module):
    """Cross-entropy plus ``dice_weight`` x soft Dice, both skipping ``ignore_index`` pixels."""

    def __init__(self, cfg: SegmentationHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, logits: Tensor, mask: Tensor, has: Tensor | None = None) -> Tensor | None:
        """Mean loss over annotated pixels of labelled samples; None if there are none."""
        if mask.shape[1:] != logits.shape[2:]:
            raise ValueError(
                f"segmentation mask is {tuple(mask.shape[1:])} but logits are "
                f"{tuple(logits.shape[2:])}: masks must have the image's size"
            )
        ignore = self.cfg.ignore_index
        if has is not None:
            has = has.view(-1, *(1,) * (mask.ndim - 1))  # one flag per sample, over its pixels
            mask = torch.where(has, mask, torch.full_like(mask, ignore))
        if not bool((mask != ignore).any()):
            return None
        loss = F.cross_entropy(logits, mask, ignore_index=ignore)
        if self.cfg.dice_weight > 0:
            loss = loss + self.cfg.dice_weight * soft_dice_loss(logits, mask, ignore)
        return loss


METRIC_LOSSES = {
    "supcon": lambda cfg, dim: pml_losses.SupConLoss(temperature=cfg.temperature),
    # pytorch-metric-learning takes the ArcFace margin in degrees; the config's is in radians
    # (the paper's m=0.5).
    "arcface": lambda cfg, dim: pml_losses.ArcFaceLoss(
        num_classes=cfg.num_classes, embedding_size=dim, margin=math.degrees(cfg.margin)
    ),
    "triplet": lambda cfg, dim: pml_losses.TripletMarginLoss(margin=cfg.margin),
}


def _labels_as_ints(target: Tensor | Sequence[str], device: torch.device) -> Tensor:
    """Class indices as they are, or string ids (patients) as stable non-negative integers.

    Strings are hashed (blake2b, 62 bits), not numbered per batch, so the same patient gets the
    same label on every rank when labels are gathered across ranks.
    """
    if isinstance(target, Tensor):
        if target.dim() != 1:
            raise ValueError(
                f"retrieval expects one label per sample ([B]), got {tuple(target.shape)}"
            )
        return target.to(device=device, dtype=torch.long)
    ids = [
        int.from_bytes(hashlib.blake2b(str(t).encode(), digest_size=8).digest(), "big") >> 2
        for t in target
    ]
    return torch.tensor(ids, dtype=torch.long, device=device)


def _gather_with_grad(embeddings: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
    """Every rank's embeddings (with gradients), labels and mask, in rank order.

    open_clip's ``gather_features`` (gather_with_grad): each rank then computes the loss of the
    whole global batch, with positives and negatives from every rank. The all-gather's backward
    sums the identical losses' gradients over ranks (x world size) and DDP/ZeRO average over
    ranks (/ world size), so the parameters get exactly the gradient of the global-batch loss.
    Every rank must call it with the same batch size (train loaders drop partial batches).
    """
    world = dist.get_world_size()
    all_embeddings = torch.cat(dist_nn.all_gather(embeddings))
    parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(parts, labels)
    masks = [torch.empty_like(valid) for _ in range(world)]
    dist.all_gather(masks, valid)
    return all_embeddings, torch.cat(parts), torch.cat(masks)


class AccumulationWindow:
    """The embeddings of one accumulation window, for a loss that sees the whole window.

    open_clip's ``accum_freq``: the engine runs every micro-batch of the window once without
    gradients, while ``slot`` is None, and the loss records its (rank-gathered) embeddings,
    labels and mask; then it reruns micro-batch ``slot`` with gradients and the loss puts the
    live embeddings in that slot, between the recorded ones of the others.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.slot: int | None = None
        self.recorded: list[tuple[Tensor, Tensor, Tensor]] = []

    def splice(self, embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The window's embeddings (slot ``self.slot`` live), labels and mask."""
        parts = [e if i != self.slot else embeddings for i, (e, _, _) in enumerate(self.recorded)]
        labels = torch.cat([labels for _, labels, _ in self.recorded])
        valid = torch.cat([valid for _, _, valid in self.recorded])
        return torch.cat(parts), labels, valid


class RetrievalLoss(nn.Module):
    """A pytorch-metric-learning loss on the embeddings; same label = positive pair.

    Labels are class indices (``-1`` = unknown) or string ids such as patient groups.
    ArcFace holds a learnable class-centre matrix, which is why losses are modules that live
    inside the model (the optimizer and DDP see their parameters).
    """

    def __init__(self, cfg: RetrievalHeadConfig) -> None:
        super().__init__()
        if cfg.metric_loss == "arcface" and cfg.num_classes is None:
            raise ConfigError(
                "retrieval metric_loss=arcface needs num_classes (one centre per class); "
                "use target: cls with a class task, or metric_loss: supcon / triplet"
            )
        if cfg.metric_loss == "arcface" and cfg.across_accumulation:
            raise ConfigError(
                "retrieval across_accumulation: ArcFace compares each sample with learned class "
                "centres, not with the batch, so a larger window changes nothing; unset it"
            )
        self.cfg = cfg
        self.loss = METRIC_LOSSES[cfg.metric_loss](cfg, cfg.embed_dim)
        self.window: AccumulationWindow | None = None
        """Set by the engine while it accumulates a window (``across_accumulation``)."""

    def forward(
        self, embeddings: Tensor, target: Tensor | Sequence[str], has: Tensor | None = None
    ) -> Tensor | None:
        """Metric loss over labelled samples; None with fewer than two of them.

        In a distributed training step the loss sees the global batch: embeddings are gathered
        from every rank with gradients (:func:`_gather_with_grad`), so contrastive negatives and
        same-patient positives on other ranks count, as with one worker and the whole batch.
        With an accumulation window (:class:`AccumulationWindow`) the other micro-batches'
        recorded embeddings count too.
        """
        labels = _labels_as_ints(target, embeddings.device)
        valid = labels >= 0
        if has is not None:
            valid = valid & has.to(valid.device)
        # The loss runs in fp32: its exponentials overflow in half precision.
        embeddings = embeddings.float()
        window = self.window
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        if distributed and (torch.is_grad_enabled() or window is not None):
            embeddings, labels, valid = _gather_with_grad(embeddings, labels, valid)
        if window is not None and window.slot is None:  # the no-grad pass: record this slot
            window.recorded.append((embeddings.detach(), labels, valid))
            return None
        if window is not None:
            embeddings, labels, valid = window.splice(embeddings)
        if int(valid.sum()) < 2:
            return None
        loss = self.loss(embeddings[valid], labels[valid])
        if window is not None:
            # The value stays the window's loss; the gradient is x slots: this micro-step
            # carries only its slot's share of the window loss's gradient, and the engine
            # divides every micro-batch's loss by the accumulation steps.
            loss = loss + (window.slots - 1) * (loss - loss.detach())
        return loss


class ContrastiveLoss(RetrievalLoss):
    """NT-Xent (SimCLR) over the views of the batch: the views of one sample are the positives.

    The batch holds ``B`` samples' first views, then their second views (docs/contracts.md,
    ``data.views``), so row ``i`` and row ``i + B`` are one positive pair and every other row
    of the global batch is a negative. No label is read: the pair ids come from the layout and
    are offset per rank and per accumulation slot, so they stay distinct where the inherited
    rank gather (with gradients) and accumulation window concatenate them.
    """

    def __init__(self, cfg: ContrastiveHeadConfig) -> None:
        nn.Module.__init__(self)
        self.cfg = cfg
        self.loss = pml_losses.NTXentLoss(temperature=cfg.temperature)
        self.window = None

    def forward(self, embeddings: Tensor, target=None, has: Tensor | None = None) -> Tensor | None:
        """NT-Xent of the views ``[2B, D]``; ``target`` and ``has`` are not read."""
        rows = len(embeddings)
        if rows % 2:
            raise ValueError(
                f"a contrastive head needs both views of each sample, got {rows} rows: set "
                "data.views=2 (the batch then holds the first views, then the second views)"
            )
        samples = rows // 2
        window = self.window
        if window is None:
            slot = 0
        else:  # the recording pass appends slot len(recorded); the rerun knows its slot
            slot = window.slot if window.slot is not None else len(window.recorded)
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        block = slot * world + rank
        pairs = torch.arange(samples, device=embeddings.device).repeat(2) + block * samples
        return super().forward(embeddings, pairs, None)


class DetectionLoss(nn.Module):
    """Sum of the loss terms torchvision's detector computed in its forward pass."""

    def __init__(self, cfg: DetectionHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, loss_terms: dict[str, Tensor], target=None, has=None) -> Tensor | None:
        """Total detection loss (classification + box regression [+ RPN, masks])."""
        if not loss_terms:
            return None
        return sum(loss_terms.values())
