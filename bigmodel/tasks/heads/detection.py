"""Detection head: torchvision's RetinaNet / Faster R-CNN / Mask R-CNN on the shared backbone.

The detectors are torchvision's own classes, built with an FPN over the shared backbone's
features in place of their backbone. Their ``forward`` cannot be used as is: it would run the
backbone again and resize the images with ``GeneralizedRCNNTransform``, while here the backbone
has already run once for all heads and the batch already has its final size. So the head calls
the detectors' parts (anchor generator, heads, RPN, RoI heads, loss and post-processing) in the
order their ``forward`` does, with an ``ImageList`` built directly.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

from bigmodel.config import ConfigError, DetectionHeadConfig

__all__ = ["DetectionHead", "detection_levels"]

# Anchor side per level is ANCHOR_STRIDE_MULTIPLE x the level's stride (RetinaNet / FPN papers:
# 32 px anchors on stride-8 maps).
ANCHOR_STRIDE_MULTIPLE = 4
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def detection_levels(reductions: list[int]) -> list[int]:
    """Backbone levels used for detection: stride 4 and coarser (stride-2 maps cost too much)."""
    levels = [i for i, r in enumerate(reductions) if r >= 4]
    return levels or list(range(len(reductions)))


def _anchor_sizes(
    reductions: list[int], retinanet: bool, bases: list[float] | None = None
) -> tuple[tuple[float, ...], ...]:
    """Anchor sides per level: ``bases`` when given, else 4 x stride."""
    if bases is not None and len(bases) != len(reductions):
        raise ConfigError(
            f"detection anchor_sizes has {len(bases)} entries but the backbone gives "
            f"{len(reductions)} detection levels (strides {reductions}); give one size per level"
        )
    sizes = []
    seen: dict[int, int] = {}
    for level, r in enumerate(reductions):
        # Equal strides (ViT feature levels) get doubling anchor sizes, like separate FPN levels.
        repeat = seen.get(r, 0)
        seen[r] = repeat + 1
        base = bases[level] if bases is not None else ANCHOR_STRIDE_MULTIPLE * r * 2**repeat
        if retinanet:  # three scales per octave, as torchvision's retinanet_resnet50_fpn
            sizes.append(tuple(float(base * 2 ** (i / 3)) for i in range(3)))
        else:
            sizes.append((float(base),))
    return tuple(sizes)


class _SharedFeaturesFPN(nn.Module):
    """torchvision FPN over the chosen backbone levels; stands in for the detector's backbone."""

    def __init__(self, channels: list[int], levels: list[int], out_channels: int) -> None:
        super().__init__()
        self.levels = levels
        self.out_channels = out_channels  # torchvision detectors read this attribute
        self.fpn = FeaturePyramidNetwork([channels[i] for i in levels], out_channels)

    def forward(self, features: list[Tensor]) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(j), features[i]) for j, i in enumerate(self.levels)))


class DetectionHead(nn.Module):
    """Boxes from the shared features; training returns torchvision's loss terms.

    Labels in the batch are 0-based. Faster/Mask R-CNN reserve class 0 for background, so
    labels are shifted by one on the way in and back on the way out. 2D only: 3D detection is
    refused when the head is built.
    """

    needs_targets = True

    def __init__(
        self,
        channels: list[int],
        reductions: list[int],
        cfg: DetectionHeadConfig,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ConfigError(
                f"a detection head is 2D only, but model.backbone.spatial_dims={spatial_dims}: "
                "torchvision's RetinaNet and Faster/Mask R-CNN have no 3D form, and MONAI's 3D "
                "RetinaNet is not wired in. Detect on 2D slices (a 2D backbone and 2D shards) "
                "or remove the head"
            )
        self.kind = cfg.detector
        levels = detection_levels(reductions)
        fpn = _SharedFeaturesFPN(channels, levels, cfg.fpn_channels)
        retinanet = cfg.detector == "retinanet"
        sizes = _anchor_sizes([reductions[i] for i in levels], retinanet, cfg.anchor_sizes)
        anchors = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))
        # The transform is never applied to images; only its postprocess() pastes Mask R-CNN
        # masks into the image (sizes are unchanged, so boxes are not rescaled).
        common: dict[str, Any] = {"min_size": 1, "max_size": 1 << 16}
        names = [str(j) for j in range(len(levels))]
        if retinanet:
            self.detector = RetinaNet(
                fpn,
                num_classes=cfg.num_classes,
                anchor_generator=anchors,
                score_thresh=cfg.score_threshold,
                detections_per_img=cfg.detections_per_image,
                **common,
            )
        else:
            # Box and mask heads scale with the FPN width; at fpn_channels=256 they are exactly
            # torchvision's defaults (1024-d box MLP, four 256-channel mask convs).
            width = cfg.fpn_channels
            extra: dict[str, Any] = {
                "box_head": TwoMLPHead(width * 7 * 7, 4 * width),
                "box_predictor": FastRCNNPredictor(4 * width, cfg.num_classes + 1),
            }
            rcnn = FasterRCNN
            if cfg.detector == "maskrcnn":
                rcnn = MaskRCNN
                extra["mask_roi_pool"] = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
                extra["mask_head"] = MaskRCNNHeads(width, (width,) * 4, dilation=1)
                extra["mask_predictor"] = MaskRCNNPredictor(width, width, cfg.num_classes + 1)
            self.detector = rcnn(
                fpn,
                num_classes=None,  # given by box_predictor: num_classes + background
                rpn_anchor_generator=anchors,
                box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
                box_score_thresh=cfg.score_threshold,
                box_detections_per_img=cfg.detections_per_image,
                box_batch_size_per_image=cfg.rois_per_image,
                **extra,
                **common,
            )

    def forward(
        self,
        features: list[Tensor],
        image_size: tuple[int, int],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training (with targets): loss terms. Eval: ``{"boxes", "scores", "labels"}`` per image.

        In training mode without targets there is nothing to compute; an empty dict is returned.
        """
        if self.training and targets is None:
            return {}
        batch = features[0].shape[0]
        maps = self.detector.backbone(features)  # the FPN, under autocast when it is on
        # Everything after the FPN runs in fp32: torchvision makes anchors in the features'
        # dtype, and bf16 (8-bit mantissa) would round box coordinates by 2-4 px at 512 px.
        maps = OrderedDict((k, v.float()) for k, v in maps.items())
        # Anchors and proposal clipping need only the batch's image size, not the pixels.
        images = ImageList(maps["0"].new_empty((batch, 0, *image_size)), [image_size] * batch)
        if targets is not None:
            targets = self._prepare_targets(targets, features[0].device)
        with torch.autocast(features[0].device.type, enabled=False):
            if self.kind == "retinanet":
                return self._retinanet(maps, images, targets)
            return self._rcnn(maps, images, targets)

    def _prepare_targets(self, targets: list[dict[str, Tensor]], device) -> list[dict[str, Tensor]]:
        prepared = []
        for i, target in enumerate(targets):
            boxes = target["boxes"].to(device=device, dtype=torch.float32)
            if boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(
                    f"boxes target {i}: expected [N, 4] xyxy, got {tuple(boxes.shape)}"
                )
            degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
            if bool(degenerate.any()):
                bad = boxes[degenerate][0].tolist()
                raise ValueError(f"boxes target {i}: box {bad} has no area (need x2 > x1, y2 > y1)")
            labels = target["labels"].to(device=device, dtype=torch.int64)
            item = {"boxes": boxes, "labels": labels if self.kind == "retinanet" else labels + 1}
            if self.kind == "maskrcnn":
                if "masks" not in target:
                    raise ValueError(
                        f"boxes target {i} has no 'masks': detector=maskrcnn needs per-instance "
                        "masks (uint8 [N, H, W]); use detector=fasterrcnn for boxes only"
                    )
                item["masks"] = target["masks"].to(device)
            prepared.append(item)
        return prepared

    def _retinanet(self, maps, images, targets):
        det = self.detector
        feats = list(maps.values())
        head_outputs = det.head(feats)
        anchors = det.anchor_generator(images, feats)
        if targets is not None and self.training:
            return det.compute_loss(targets, head_outputs, anchors)
        # Split the flat per-anchor outputs per level, as RetinaNet.forward does.
        per_level = [f.shape[-2] * f.shape[-1] for f in feats]
        per_anchor = head_outputs["cls_logits"].shape[1] // sum(per_level)
        per_level = [n * per_anchor for n in per_level]
        split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return det.postprocess_detections(split_outputs, split_anchors, images.image_sizes)

    def _rcnn(self, maps, images, targets):
        det = self.detector
        targets = targets if self.training else None
        proposals, rpn_losses = det.rpn(images, maps, targets)
        detections, roi_losses = det.roi_heads(maps, proposals, images.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        detections = det.transform.postprocess(detections, images.image_sizes, images.image_sizes)
        for d in detections:
            d["labels"] = d["labels"] - 1
        return detections
