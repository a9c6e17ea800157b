"""One typed configuration schema for every bigmodel run.

A run is described by a YAML file validated against :class:`Config`, plus dotted ``key=value``
overrides from the command line (``train.epochs=3 model.heads.diagnosis.loss_weight=0.5``).
Unknown keys, wrong types and values outside the allowed set fail at once with the dotted name of
the field. Every run writes its resolved ``config.yaml`` beside its checkpoints.

Naming rules used throughout the project:
    * ``rank`` is the global rank, ``local_rank`` the device index on one node.
    * ``batch_size`` is per worker; ``global_batch_size`` is
      ``batch_size * num_workers * accumulation_steps``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Augment3dConfig",
    "AugmentConfig",
    "BackboneConfig",
    "ClassificationHeadConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "ContrastiveHeadConfig",
    "DataConfig",
    "DetectionHeadConfig",
    "DistributedConfig",
    "HEAD_CONFIGS",
    "HeadConfig",
    "ModelConfig",
    "OptimConfig",
    "RetrievalHeadConfig",
    "ScheduleConfig",
    "SegmentationHeadConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "auto_loader_workers",
    "check_heads",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and the fix."""


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


# --------------------------------------------------------------------------------------------
# data


class AugmentConfig(_Strict):
    """Training-time augmentation; masks and boxes are transformed with the image."""

    hflip: float = 0.5
    """Probability of a horizontal flip."""
    vflip: float = 0.0
    """Probability of a vertical flip."""
    random_crop: bool = True
    """Random crop (after padding when needed) to ``data.image_size``; centre crop when False."""
    intensity_jitter: float = 0.1
    """Scale and shift of normalised intensities, drawn from [-x, x]; 0 disables."""


class Augment3dConfig(_Strict):
    """Training-time augmentation of 3D patches (MONAI transforms; masks follow the image).

    Defaults are nnU-Net's kinds of augmentation at a lighter dose (its rotations reach 30
    degrees and its scaling 0.7-1.4): mirroring on every axis, a small rotation and scaling,
    gamma, Gaussian noise. ``data.augment.intensity_jitter`` applies to 3D patches too.
    """

    flip: float = Field(0.5, ge=0.0, le=1.0)
    """Probability of mirroring each axis (D, H and W drawn separately); 0 disables."""
    affine_prob: float = Field(0.2, ge=0.0, le=1.0)
    """Probability of one random rotation + scaling (``RandAffined``) of a patch."""
    rotate_deg: float = Field(15.0, ge=0.0)
    """Largest rotation about each axis, in degrees."""
    scale: float = Field(0.15, ge=0.0, lt=1.0)
    """Largest relative zoom (a patch is scaled by 1 +- x per axis)."""
    gamma_prob: float = Field(0.3, ge=0.0, le=1.0)
    """Probability of a gamma change of contrast (``RandAdjustContrastd``, gamma 0.7-1.5)."""
    noise_prob: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of additive Gaussian noise (``RandGaussianNoised``)."""
    noise_std: float = Field(0.1, ge=0.0)
    """Largest standard deviation of that noise (normalised intensities)."""


class DataConfig(_Strict):
    """Where the shards are and how batches are made from them."""

    shards: str = ""
    """Directory holding ``dataset.json`` and the tar shards (from ``bigmodel-shard build``): a
    local folder or an object-store prefix (``s3://bucket/prefix``, ``gs://...``, any fsspec
    URL; credentials and endpoint from the environment, e.g. ``AWS_ENDPOINT_URL_S3``)."""
    cache_dir: str | None = None
    """Node-local folder (the same path on every node; a relative one is resolved where
    ``bigmodel-train`` runs) keeping a copy of each remote shard
    after its first complete, verified read, so later epochs read local disk; None streams every
    epoch from the object store. Local shards are never copied."""
    image_size: int = Field(224, gt=0)
    """Side of the square crop fed to the model, in pixels."""
    batch_size: int = Field(32, gt=0)
    """Samples per worker per step (before gradient accumulation)."""
    eval_batch_size: int | None = None
    """Samples per worker per evaluation step; ``batch_size`` when unset."""
    loader_workers: int = Field(0, ge=0)
    """DataLoader worker processes per training worker. Unset, it follows
    ``cluster.cpus_per_worker`` (:func:`auto_loader_workers`): none on a worker of 1-2 CPUs,
    where the step already uses every core and a loader process only preempts it, then one per
    CPU beyond two, at most 8."""
    shuffle_buffer: int = Field(1000, ge=0)
    """Samples held in the shuffle buffer (0 disables shuffling). Unset in 3D, where a sample is
    a whole volume: :data:`VOLUME_SHUFFLE_BUFFER`."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "val"
    """Split used for evaluation during training."""
    normalize: Literal["manifest", "none"] = "manifest"
    """``none`` turns intensity preprocessing off whatever ``intensity`` says (older configs);
    ``manifest`` applies ``intensity``."""
    intensity: str = "auto"
    """Intensity preprocessing (``bigmodel/data/intensity.py``): ``ct`` (clip to the foreground
    0.5/99.5 percentiles, z-score; nnU-Net), ``ct_window`` (the DICOM window of each sample),
    ``ct_window:NAME`` or ``ct_window:C,W``, ``mr`` (z-score with the statistics of the sample's
    whole volume, recorded at shard time; ``mr:nonzero``/``mr:all`` force the region), ``image``
    (z-score of each 2D sample alone), ``dataset`` (manifest mean/std), ``none``; ``auto`` picks
    by the manifest's modality (CT, MR, else dataset)."""
    resize: Literal["none", "fit"] = "none"
    """``fit``: scale every image so its longer side is ``image_size`` (aspect kept), pad to a
    square, in training and evaluation; ``none``: train on ``image_size`` crops and evaluate
    whole images (sliding windows when larger than ``image_size``)."""
    resize_tolerance: float = Field(2.0, ge=1.0)
    """``resize=fit``: largest factor by which the resize may change the pixel spacing; beyond it
    the run is refused (shrinking 2048 px radiographs to 224 px loses the detail findings need)."""
    on_damaged_shard: Literal["stop", "skip"] = "stop"
    """A shard whose bytes do not match its sha256 in ``dataset.json``: ``stop`` the run naming
    it, or ``skip`` it with a warning (counted in the metrics as ``data/damaged_shards``)."""
    balance: str | None = None
    """Name of a multi-class classification head whose classes the training stream draws in
    equal proportion: each sample is kept with probability (rarest class count) / (its class
    count), from the training split's ``label_counts`` in ``dataset.json``; samples without that
    label keep their share. The price: reading ``n / (k x rarest count)`` samples per kept one
    (decoding only the kept ones). None: the data's own class frequencies."""
    augment: AugmentConfig = AugmentConfig()
    """Training-time augmentation."""
    views: int | None = Field(None, ge=1, le=2)
    """Independently augmented views of each training image (2D): 2 stacks them along the batch
    (docs/contracts.md), which a contrastive head needs, with a random resized crop instead of
    the random crop; unset: 2 with a contrastive head, else 1. Evaluation reads one view."""
    patch_size: list[int] | None = None
    """3D (``model.backbone.spatial_dims=3``): the ``[D, H, W]`` patch sampled from each volume
    in training, and the window of the sliding-window evaluation (Gaussian blending, overlap
    0.5). Volumes smaller than the patch are padded (images with 0, the normalised mean; masks
    with the ignore value). Each side must be a multiple of the backbone's coarsest reduction.
    Needed in 3D; unused in 2D (``image_size``)."""
    foreground_ratio: float = Field(0.33, ge=0.0, le=1.0)
    """3D: share of patches centred on a foreground (labelled, non-background) voxel, the others
    on a background voxel (MONAI's ``RandCropByPosNegLabeld``; nnU-Net's one third). Volumes
    without a labelled foreground voxel are cropped uniformly."""
    foreground_classes: bool = False
    """3D: centre the foreground patches on a class drawn uniformly among the mask classes
    present in the volume (``RandCropByLabelClassesd``: rare classes get as many patches as
    common ones) instead of on any foreground voxel."""
    samples_per_volume: int = Field(2, ge=1)
    """3D: patches drawn from each volume read, so a volume is decoded once per visit, not once
    per patch. A training sample (``batch_size``, ``steps_per_epoch``) is a patch."""
    augment3d: Augment3dConfig = Augment3dConfig()
    """3D: training-time augmentation of the patches."""

    @field_validator("patch_size")
    @classmethod
    def _three_sides(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) != 3 or min(value) < 1):
            raise ValueError(
                f"data.patch_size={value}: give three positive sides [D, H, W], e.g. [64, 128, 128]"
            )
        return value


# --------------------------------------------------------------------------------------------
# model


class BackboneConfig(_Strict):
    """The shared feature extractor: a timm model (2D) or one of MONAI's 3D encoders.

    ``spatial_dims`` is the one switch between 2D and 3D (MONAI's habit: one field passed through
    the networks and heads, not 2D and 3D copies of them). 2D backbones are timm models
    (``features_only``); 3D backbones are the names in :attr:`BACKBONES_3D`, built from MONAI's
    networks (``bigmodel.models.backbone3d``).
    """

    BACKBONES_3D: ClassVar[tuple[str, ...]] = (
        "resenc3d",
        "swinunetr3d",
        "resnet10_3d",
        "resnet18_3d",
        "resnet34_3d",
        "resnet50_3d",
    )
    """The 3D backbones: ``resenc3d`` (the residual encoder of MONAI's DynUNet, nnU-Net's
    3d_fullres layout), ``swinunetr3d`` (SwinUNETR's Swin transformer encoder, ``swinViT``) and
    ``resnetN_3d`` (MONAI's 3D ResNets, MedicalNet's layout)."""

    name: str = "resnet50"
    """With ``spatial_dims=2``: any timm model name (``timm.list_models()``), e.g. resnet50,
    convnext_tiny, vit_base_patch16_224. With ``spatial_dims=3``: one of :attr:`BACKBONES_3D`."""
    spatial_dims: Literal[2, 3] = 2
    """2: images ``[C, H, W]`` into a timm backbone; 3: volumes ``[C, D, H, W]`` into a 3D one."""
    pretrained: str | None = None
    """Local weights file or folder (.safetensors/.pth/.bin). Nothing is downloaded at run time."""
    in_chans: int | None = Field(None, gt=0)
    """Input channels; taken from the dataset manifest when unset."""
    out_indices: list[int] | None = None
    """Feature levels to return; the backbone's default levels when unset. ``resenc3d`` builds
    its levels up to the deepest one asked for (nnU-Net's depth: 6 levels when unset)."""
    base_channels: int | None = Field(None, gt=0)
    """3D backbones only: channels of the finest level, doubled per level (``resenc3d``: nnU-Net's
    32, capped at 320; ``swinunetr3d``: SwinUNETR's ``feature_size`` 48, a multiple of 12;
    ``resnetN_3d``: 64). Unset: those defaults."""
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    """Stochastic depth rate (timm models and ``swinunetr3d``)."""
    activation_checkpointing: bool = False
    """Trade compute for memory: keep only each stage's input in the forward pass and recompute
    the stage's activations in the backward pass. One switch for 2D and 3D, because it is the
    same thing in both: timm's ``set_grad_checkpointing`` on a timm model, ``torch.utils.checkpoint``
    per stage on ``resenc3d`` and ``resnetN_3d``, MONAI's ``use_checkpoint`` on ``swinunetr3d``.
    Activations, not model state, are what fill memory in 3D (ZeRO shards only model state).
    ``grad_checkpointing`` (the earlier, timm-named key) is read as this field."""
    channels_last: bool = False
    """Use the NHWC memory format (NDHWC in 3D; faster convolutions on tensor cores)."""
    freeze: Literal["none", "all", "stages"] = "none"
    """Freeze nothing, the whole backbone, or its first ``freeze_stages`` stages."""
    freeze_stages: int = Field(0, ge=0)
    """Number of leading stages frozen when ``freeze=stages``."""

    @model_validator(mode="before")
    @classmethod
    def _read_grad_checkpointing(cls, data: Any) -> Any:
        """Accept ``grad_checkpointing`` (saved configs and model folders) as the new name."""
        if not isinstance(data, dict) or "grad_checkpointing" not in data:
            return data
        data = dict(data)
        old = data.pop("grad_checkpointing")
        if data.setdefault("activation_checkpointing", old) != old:
            raise ValueError(
                "model.backbone.grad_checkpointing and model.backbone.activation_checkpointing "
                "disagree; they are one switch: keep only activation_checkpointing"
            )
        return data

    @model_validator(mode="after")
    def _name_fits_spatial_dims(self) -> BackboneConfig:
        is_3d = self.name in self.BACKBONES_3D
        if is_3d and self.spatial_dims == 2:
            raise ValueError(
                f"model.backbone.name={self.name} is a 3D backbone but model.backbone."
                "spatial_dims=2: set model.backbone.spatial_dims=3 (volumes), or name a timm "
                "model for 2D images"
            )
        if not is_3d and self.spatial_dims == 3:
            raise ValueError(
                f"model.backbone.spatial_dims=3 but model.backbone.name={self.name} is not a 3D "
                f"backbone (timm models are 2D): name one of {', '.join(self.BACKBONES_3D)}, or "
                "set model.backbone.spatial_dims=2"
            )
        if self.base_channels is not None and not is_3d:
            raise ValueError(
                f"model.backbone.base_channels is for the 3D backbones; timm model {self.name} "
                "has its own widths (unset base_channels)"
            )
        return self


class _HeadBase(_Strict):
    """What every head config has, and the facts :func:`check_heads` checks for its type.

    The facts are class attributes (not fields): the config schema checks a head without torch,
    and the task table (:data:`bigmodel.tasks.TASKS`, above the schema) reads them from here.
    """

    targets: ClassVar[tuple[str, ...]] = ("cls",)
    """Batch fields the head can learn from (its ``target`` must be one of them)."""
    min_classes: ClassVar[int] = 1
    """Fewest ``num_classes`` that make sense for this head type."""
    classes_note: ClassVar[str] = ""
    """Why ``min_classes`` is what it is, appended to the error refusing fewer."""

    draws_by_class: ClassVar[bool] = False
    """Whether ``data.balance`` may name the head (its samples carry one class to draw by)."""
    pretrains_backbone: ClassVar[bool] = False
    """Whether the head exists to train the backbone (self-supervised): its labels come from
    the images themselves (``data.views``), the shards need none, and the model folder also
    holds ``backbone.safetensors`` for ``model.backbone.pretrained``."""

    def needs_classes(self) -> bool:
        """Whether the head needs ``num_classes`` (filled from the manifest) to be built."""
        return True

    def fit_to_data(
        self,
        field: str,
        source: str,
        label_type: str,
        train_counts: Callable[[str], tuple[int, ...]],
        train_samples: Callable[[], int],
    ) -> None:
        """Settle the options that the training data decides (``bigmodel.data.resolve_config``).

        Args:
            field: the head's dotted name, ``model.heads.NAME``, for errors.
            source: the manifest's path, for errors.
            label_type: the manifest's type of the head's target (``multiclass``, ...; or "").
            train_counts: ``train_counts(option)``: per-class counts of the target in the
                training split (raises naming ``option`` when there are none).
            train_samples: ``train_samples()``: the training split's sample count.
        """

    loss_weight: float = Field(1.0, ge=0.0)
    """Weight of this head's loss in the total."""
    target: str = "cls"
    """Sample field holding this head's labels: ``cls``, ``mask``, ``boxes`` or ``group``."""
    num_classes: int | None = Field(None, gt=0)
    """Number of classes; taken from the dataset manifest when unset."""


class ClassificationHeadConfig(_HeadBase):
    """Pooled features -> linear classifier."""

    type: Literal["classification"] = "classification"
    multilabel: bool = False
    """Independent sigmoid per class (BCE; missing labels are masked) instead of softmax."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the multi-class cross-entropy."""
    focal: bool = False
    """Use focal loss instead of (binary) cross-entropy."""
    focal_gamma: float = Field(2.0, ge=0.0)
    """Focusing parameter of the focal loss."""
    class_weights: list[float] | Literal["balanced"] | None = None
    """Per-class loss weights (length ``num_classes``). ``balanced`` (multi-class): n / (k x
    count of the class) from the training split's ``label_counts`` in ``dataset.json``, like
    scikit-learn's ``class_weight='balanced'``; resolved to the list when the config is resolved
    against the manifest (the saved ``config.yaml`` records the numbers)."""
    pos_weight: list[float] | Literal["balanced"] | None = None
    """Multi-label: weight of each class's positive term (BCE ``pos_weight``; e.g. negatives /
    positives per class), leaving its negatives at 1; length ``num_classes``. ``balanced``:
    (samples - positives) / positives per class from ``label_counts`` (the manifest counts
    positives only, so a sample whose label is unknown counts as a negative)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout before the classifier."""

    draws_by_class: ClassVar[bool] = True

    def fit_to_data(
        self,
        field: str,
        source: str,
        label_type: str,
        train_counts: Callable[[str], tuple[int, ...]],
        train_samples: Callable[[], int],
    ) -> None:
        """``multilabel`` from the manifest; ``balanced`` class or positive weights from counts."""
        if self.target == "cls":
            # Only one value can work (cls is int64 [B] or float32 [B, K]), so the data decides
            # unless the user set it explicitly to the other one.
            multilabel = label_type == "multilabel"
            if "multilabel" in self.model_fields_set and self.multilabel != multilabel:
                raise ConfigError(
                    f"{field}.multilabel is {self.multilabel} but tasks.cls in {source} is "
                    f"{label_type}; unset it"
                )
            self.multilabel = multilabel
        if self.class_weights == "balanced":
            if self.multilabel:
                raise ConfigError(
                    f"{field}.class_weights=balanced is for multi-class heads; a multi-label head "
                    f"weighs rare findings with {field}.pos_weight=balanced"
                )
            counts = train_counts(f"{field}.class_weights=balanced")
            n, k = sum(counts), len(counts)  # scikit-learn's compute_class_weight("balanced")
            self.class_weights = [round(n / (k * count), 6) for count in counts]
        if self.pos_weight == "balanced":
            if not self.multilabel:
                raise ConfigError(
                    f"{field}.pos_weight=balanced is for multi-label heads; a multi-class head "
                    f"uses {field}.class_weights=balanced"
                )
            counts = train_counts(f"{field}.pos_weight=balanced")
            # label_counts holds positives only: every other sample of the split is a negative
            n = train_samples()
            self.pos_weight = [round((n - count) / count, 6) for count in counts]


class SegmentationHeadConfig(_HeadBase):
    """A decoder over the backbone's feature levels; logits at input resolution."""

    targets: ClassVar[tuple[str, ...]] = ("mask",)
    min_classes: ClassVar[int] = 2
    classes_note: ClassVar[str] = "segmentation counts background as class 0"

    type: Literal["segmentation"] = "segmentation"
    target: str = "mask"
    decoder: Literal["unet", "fpn"] = "unet"
    """``unet``: segmentation_models_pytorch's U-Net decoder (skips at every level, up to full
    resolution; the medical-imaging default). ``fpn``: a light FPN over the levels of stride >= 4,
    merged at stride 4 (cheaper; coarser borders)."""
    decoder_channels: int = Field(128, gt=0)
    """``unet``: channels of the coarsest decoder block, halved per block (at least 16).
    ``fpn``: channels of every pyramid level."""
    ignore_index: int = 255
    """Mask value excluded from loss and metrics."""
    dice_weight: float = Field(1.0, ge=0.0)
    """Weight of the Dice term relative to cross-entropy."""


class DetectionHeadConfig(_HeadBase):
    """torchvision detector (RetinaNet, Faster R-CNN, Mask R-CNN) on the shared backbone + FPN."""

    targets: ClassVar[tuple[str, ...]] = ("boxes",)

    type: Literal["detection"] = "detection"
    target: str = "boxes"
    detector: Literal["retinanet", "fasterrcnn", "maskrcnn"] = "retinanet"
    """Which torchvision detector to attach."""
    fpn_channels: int = Field(128, gt=0)
    """Channels of the detection FPN."""
    score_threshold: float = Field(0.05, ge=0.0, le=1.0)
    """Minimum score of a reported detection."""
    detections_per_image: int = Field(100, gt=0)
    """Maximum detections kept per image."""
    anchor_sizes: list[float] | None = None
    """Anchor side (px) per detection level (stride >= 4), finest first; 4 x stride when unset."""
    rois_per_image: int = Field(512, gt=0)
    """Faster/Mask R-CNN: proposals sampled per image for the box-head loss (torchvision: 512)."""


class RetrievalHeadConfig(_HeadBase):
    """Projection to an L2-normalised embedding trained with a metric-learning loss."""

    targets: ClassVar[tuple[str, ...]] = ("cls", "group")

    def needs_classes(self) -> bool:
        """Retrieval trained on patient groups has no class list; only ArcFace needs one."""
        return self.metric_loss == "arcface"

    type: Literal["retrieval"] = "retrieval"
    embed_dim: int = Field(128, gt=0)
    """Dimension of the embedding."""
    metric_loss: Literal["supcon", "arcface", "triplet"] = "supcon"
    """Metric-learning loss (pytorch-metric-learning)."""
    temperature: float = Field(0.1, gt=0.0)
    """Temperature of the supervised contrastive loss."""
    margin: float = Field(0.2, ge=0.0)
    """Margin of the triplet / ArcFace losses."""
    across_accumulation: bool = False
    """supcon/triplet with ``optim.accumulation_steps`` > 1: each micro-batch's loss sees the
    embeddings of the whole accumulation window (and every rank), so accumulation makes one
    larger contrastive batch (open_clip's ``accum_freq``). The window's micro-batches are read
    first and embedded once without gradients, then each is recomputed with gradients against
    the others: one more forward per micro-batch, and the window's inputs held in memory."""


class ContrastiveHeadConfig(_HeadBase):
    """Self-supervised pretraining (SimCLR): a projection MLP over the pooled features, trained
    with NT-Xent so that the two augmented views of a sample (``data.views``) embed close and
    every other image of the global batch far. It needs no labels; what is kept is the
    backbone (``backbone.safetensors`` in the model folder)."""

    targets: ClassVar[tuple[str, ...]] = ("group",)
    pretrains_backbone: ClassVar[bool] = True

    def needs_classes(self) -> bool:
        """The positive of a view is the other view of its own sample: no classes."""
        return False

    type: Literal["contrastive"] = "contrastive"
    target: str = "group"
    """Fixed, and not read as labels: the positive pairs are the batch's rows by the views
    layout (row ``i`` and ``i + B``); ``group`` is a field every sample has."""
    projection_dim: int = Field(128, gt=0)
    """Output dimension of the projection MLP (what NT-Xent compares)."""
    hidden_dim: int | None = Field(None, gt=0)
    """Hidden width of the projection MLP; the backbone's pooled width when unset (SimCLR)."""
    temperature: float = Field(0.1, gt=0.0)
    """Temperature of NT-Xent (SimCLR: 0.1 for large batches, up to 0.5 for small ones)."""
    across_accumulation: bool = False
    """With ``optim.accumulation_steps`` > 1: each micro-batch's loss sees the views of the whole
    accumulation window as negatives (as ``retrieval.across_accumulation``)."""

    @model_validator(mode="after")
    def _no_labels(self) -> ContrastiveHeadConfig:
        if self.num_classes is not None:
            raise ValueError(
                "a contrastive head has no classes (its positive is the other view of the same "
                "image); remove num_classes, or add a classification head for labels"
            )
        if self.target != "group":
            raise ValueError(
                f"target={self.target!r}: a contrastive head learns from the sample's second view "
                "and reads no labels; remove target (or use a retrieval head to learn from "
                "cls/group labels)"
            )
        return self


HeadConfig = Annotated[
    Union[
        ClassificationHeadConfig,
        SegmentationHeadConfig,
        DetectionHeadConfig,
        RetrievalHeadConfig,
        ContrastiveHeadConfig,
    ],
    Field(discriminator="type"),
]

HEAD_CONFIGS: dict[str, type[_HeadBase]] = {
    cls.model_fields["type"].default: cls for cls in get_args(get_args(HeadConfig)[0])
}
"""Every head config class by its ``type``: the schema's half of the task table, torch-free."""


class ModelConfig(_Strict):
    """One backbone and any set of named heads."""

    backbone: BackboneConfig = BackboneConfig()
    """The shared feature extractor."""
    heads: dict[str, HeadConfig] = Field(default_factory=dict)
    """Task heads by name; each entry's ``type`` selects its schema."""

    @model_validator(mode="after")
    def _at_least_one_head(self) -> ModelConfig:
        if not self.heads:
            raise ValueError(
                "model.heads is empty: add at least one head, e.g. "
                "heads: {diagnosis: {type: classification, target: cls}}"
            )
        return self


# --------------------------------------------------------------------------------------------
# optimisation


class OptimConfig(_Strict):
    """Optimizer and large-batch settings (timm optimizers)."""

    name: Literal["sgd", "adamw", "lamb", "lars"] = "adamw"
    """timm optimizer name."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate at ``reference_batch_size``; scaled to the global batch by ``lr_scaling``."""
    reference_batch_size: int = Field(256, gt=0)
    """Global batch size at which ``lr`` was tuned."""
    lr_scaling: Literal["auto", "none", "linear", "sqrt"] = "auto"
    """How ``lr`` scales with global_batch_size / reference_batch_size; ``auto``: sqrt for the
    adaptive optimizers (adamw, lamb), linear for sgd and lars (timm's rule)."""
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    """Layer-wise LR decay for fine-tuning (timm): each layer's LR is this factor times the
    next deeper one's; None disables."""
    weight_decay: float = Field(0.05, ge=0.0)
    """Decoupled weight decay; never applied to norms and biases."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """Momentum for SGD and LARS."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/LAMB betas."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this value (None disables)."""
    accumulation_steps: int = Field(1, gt=0)
    """Micro-batches accumulated per optimizer step."""


class ScheduleConfig(_Strict):
    """Learning-rate schedule (timm schedulers), stepped per optimizer update."""

    name: Literal["cosine", "step", "constant"] = "cosine"
    """Schedule after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from ``warmup_lr`` to the scaled lr, in optimizer steps."""
    warmup_lr: float = Field(1e-6, ge=0.0)
    """Learning rate at step 0 of the warmup."""
    min_lr: float = Field(0.0, ge=0.0)
    """Floor of the cosine schedule."""
    decay_steps: int = Field(1000, gt=0)
    """Period of the step schedule, in optimizer steps."""
    decay_rate: float = Field(0.1, gt=0.0)
    """Multiplier applied every ``decay_steps`` by the step schedule."""


# --------------------------------------------------------------------------------------------
# training loop


class TrainConfig(_Strict):
    """Length of the run, precision, logging and checkpoint cadence."""

    epochs: int = Field(10, gt=0)
    """Passes over the training split (epoch length comes from the manifest's sample count)."""
    steps_per_epoch: int | None = Field(None, gt=0)
    """Optimizer steps per epoch; derived from the manifest and the global batch when unset."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype; fp16 uses a gradient scaler."""
    sync_bn: bool = True
    """Convert BatchNorm to synchronised BatchNorm when world size > 1."""
    log_every: int = Field(10, gt=0)
    """Log metrics every N optimizer steps."""
    eval_every: int = Field(1, ge=0)
    """Evaluate every N epochs (0 disables evaluation during training)."""
    checkpoint_every: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps; 0: at the end of an epoch, as often as
    ``checkpoint_interval_s`` allows. The end of the run is always checkpointed."""
    checkpoint_interval_s: float = Field(300.0, ge=0.0)
    """With ``checkpoint_every=0``: the end of an epoch is checkpointed once this many seconds
    have passed since the last checkpoint (or the start of this attempt); 0 checkpoints every
    epoch. A lost worker costs at most this much training; short epochs do not each pay for a
    checkpoint write and its copy to storage."""
    max_nonfinite: int = Field(10, ge=0)
    """Stop the run after this many optimizer steps skipped for a non-finite gradient norm
    (a NaN/inf loss or gradient on any rank; with fp16 also the loss scaler's overflow steps)."""
    keep_checkpoints: int | None = Field(None, gt=0)
    """Keep only the newest K checkpoints (local folders and Ray's storage); None keeps all."""
    best_metric: str | None = None
    """Reported figure (e.g. ``val/diag/accuracy``) that picks the evaluation whose weights go
    to ``model/``; None saves the weights at the end of the run."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a higher or a lower ``best_metric`` is better."""
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)
    """Keep an exponential moving average of the weights and buffers (timm's ``ModelEmaV3``
    with its warmup, so a short run's average starts short: decay ``1 - (1 + step) ** -2/3``
    until it reaches this value). Evaluation scores the average, ``best_metric`` ranks it and
    ``model/`` holds it: one step's weights under a high learning rate are noise around it.
    None trains and saves the raw weights. ZeRO-3 partitions the parameters, so there the
    default is None and a value is refused."""
    output_dir: str = "runs"
    """Where runs write config.yaml, logs, curves and checkpoints (a local folder)."""


class DistributedConfig(_Strict):
    """Data-parallel strategy; applied once, in ``bigmodel.engine``."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """PyTorch DDP, or a DeepSpeed engine."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage (deepspeed strategy only)."""
    offload_optimizer: bool = False
    """ZeRO: keep optimizer state in CPU memory (stage >= 1)."""
    offload_params: bool = False
    """ZeRO-3: keep parameters in CPU memory."""
    deepspeed_overrides: dict[str, Any] = Field(default_factory=dict)
    """Entries merged last into the generated DeepSpeed config."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend; ``auto`` is nccl on GPU and gloo on CPU."""
    timeout_s: int = Field(1800, gt=0)
    """Timeout of collective operations, in seconds."""
    find_unused_parameters: bool = False
    """DDP: tolerate parameters that get no gradient in a step."""

    @model_validator(mode="after")
    def _zero_needs_deepspeed(self) -> DistributedConfig:
        if self.strategy == "ddp" and (
            self.zero_stage or self.offload_optimizer or self.offload_params
        ):
            raise ValueError("distributed.zero_stage/offload_* need distributed.strategy=deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
        return self


class ClusterConfig(_Strict):
    """Where and on what the run executes (read by ``launch/``)."""

    address: str | None = None
    """Ray cluster address; ``RAY_ADDRESS`` or an embedded local Ray when unset."""
    num_workers: int = Field(1, gt=0)
    """Training workers (one process each, one GPU each when use_gpu)."""
    use_gpu: bool = False
    """Give each worker a GPU."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per worker."""
    gpus_per_worker: float = Field(1.0, ge=0.0)
    """GPUs reserved per worker when use_gpu."""
    storage_path: str | None = None
    """Shared storage for checkpoints (s3://, gs://, or an NFS path); required on multi-node."""
    max_failures: int = Field(0, ge=-1)
    """Restarts from the last checkpoint after a worker failure (-1: unlimited)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers' placement group: PACK fills a node before the next (fast
    intra-node collectives); SPREAD spreads them; STRICT_SPREAD puts every worker on its own
    node (one worker per machine, or a multi-node test); STRICT_PACK all on one node."""


class TrackingConfig(_Strict):
    """MLflow tracking of a run (params, per-step metrics, curves, the model folder), rank 0 only."""

    enabled: bool = False
    """Log the run to MLflow; checked on the driver before Ray starts."""
    uri: str = "sqlite:///{output_dir}/mlflow.db"
    """MLflow tracking URI; ``{output_dir}`` is ``train.output_dir``. The default is a local
    SQLite store beside the runs (artifacts in ``{output_dir}/mlartifacts``); on a cluster point
    it at a server every worker reaches, e.g. ``http://mlflow:5000``."""
    experiment: str = "bigmodel"
    """MLflow experiment the run is logged under (created when missing)."""
    register_as: str | None = None
    """Register the finished model folder as a new version of this registered model."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra run tags, copied to a registered version; ``sweep`` names the sweep in lineage."""

    @model_validator(mode="after")
    def _register_needs_tracking(self) -> TrackingConfig:
        if self.register_as and not self.enabled:
            raise ValueError("tracking.register_as needs tracking.enabled=true")
        return self


VOLUME_SHUFFLE_BUFFER = 16
"""``data.shuffle_buffer`` when unset in 3D: the buffer holds whole decoded volumes (a CT of
512 x 512 x 300 float32 voxels is 300 MB), so the 2D default of 1000 would not fit in memory."""


def auto_loader_workers(cpus_per_worker: float) -> int:
    """DataLoader workers for a training worker of ``cpus_per_worker`` CPUs.

    The step's own threads use every CPU the worker reserves; each loader process competes with
    them. Measured on a 2-CPU worker (resnet18 + U-Net, 128 px slices, batch 8), two loader
    workers made the step 20% slower than loading in the training process, whose reading and
    augmentation took under 1% of the step. One worker per CPU beyond two, at most 8.
    """
    return max(0, min(8, int(cpus_per_worker) - 2))


class Config(_Strict):
    """A complete run."""

    name: str = "run"
    """Run name; the run folder is ``{train.output_dir}/{name}``."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""
    data: DataConfig = DataConfig()
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _data_defaults_fit_the_run(self) -> Config:
        """Data defaults that depend on the rest of the run; a value the user set is kept, and
        a chosen one stays unmarked as set (it is still the schema's choice)."""
        chosen = {"loader_workers": auto_loader_workers(self.cluster.cpus_per_worker)}
        if self.model.backbone.spatial_dims == 3:
            chosen["shuffle_buffer"] = VOLUME_SHUFFLE_BUFFER
        update = {
            name: value
            for name, value in chosen.items()
            if name not in self.data.model_fields_set and getattr(self.data, name) != value
        }
        if update:
            data = self.data.model_copy(update=update)
            data.model_fields_set.difference_update(update)
            self.data = data
        return self

    @model_validator(mode="after")
    def _views_fit_the_heads(self) -> Config:
        """Two views for a contrastive head, and only for heads whose labels survive them."""
        pretrain = [n for n, h in self.model.heads.items() if h.pretrains_backbone]
        views = self.data.views
        if views is None:
            views = 2 if pretrain else 1
            data = self.data.model_copy(update={"views": views})
            data.model_fields_set.discard("views")
            self.data = data
        if pretrain and views < 2:
            raise ValueError(
                f"model.heads.{pretrain[0]} is contrastive and needs two views of each image: "
                "set data.views=2 (or leave it unset)"
            )
        if views > 1:
            if self.model.backbone.spatial_dims == 3:
                raise ValueError("data.views=2 is 2D only for now; set data.views=1")
            dense = [n for n, h in self.model.heads.items() if h.target in ("mask", "boxes")]
            if dense:
                raise ValueError(
                    f"data.views=2 crops each view differently, so model.heads.{dense[0]}'s "
                    f"{self.model.heads[dense[0]].target} would not fit them; train it in a "
                    "separate run (from the pretrained backbone) or set data.views=1"
                )
        return self

    @model_validator(mode="after")
    def _ema_fits_strategy(self) -> Config:
        if self.train.ema_decay is not None and self.distributed.zero_stage == 3:
            if "ema_decay" in self.train.model_fields_set:
                raise ValueError(
                    "train.ema_decay: the weight average needs whole parameters on every rank, "
                    "and ZeRO-3 partitions them; set train.ema_decay=null or "
                    "distributed.zero_stage=2"
                )
            # the default: ZeRO-3 runs train and save the raw weights
            self.train = self.train.model_copy(update={"ema_decay": None})
        return self

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers."""
        return self.data.batch_size * self.cluster.num_workers * self.optim.accumulation_steps

    def scaled_lr(self) -> float:
        """``optim.lr`` scaled from ``reference_batch_size`` to the global batch."""
        ratio = self.global_batch_size / self.optim.reference_batch_size
        rule = self.optim.lr_scaling
        if rule == "auto":
            rule = "sqrt" if self.optim.name in ("adamw", "lamb") else "linear"
        if rule == "linear":
            return self.optim.lr * ratio
        if rule == "sqrt":
            return self.optim.lr * ratio**0.5
        return self.optim.lr

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, ready for YAML."""
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


# --------------------------------------------------------------------------------------------
# loading


def check_heads(model: ModelConfig, resolved: bool = False) -> None:
    """Check every head against the facts of its type; the error names the field.

    The facts (``targets``, ``min_classes``, ``needs_classes``) are class attributes of the head
    configs, which the task table (:data:`bigmodel.tasks.TASKS`) reads too. Run when a config is
    loaded (target, class counts and per-class lists, where set) and again when the model is
    built with ``resolved=True``: then a head that needs ``num_classes`` must have it, filled
    from the dataset manifest by ``bigmodel.data.resolve_config``.

    Raises:
        ConfigError: the first head that cannot be built, naming ``model.heads.NAME.FIELD``.
    """
    for name, head in model.heads.items():
        field = f"model.heads.{name}"
        if head.target not in head.targets:
            raise ConfigError(
                f"{field}.target={head.target!r} cannot train a {head.type} head; allowed: "
                f"{', '.join(head.targets)}"
            )
        if resolved and head.num_classes is None and head.needs_classes():
            raise ConfigError(
                f"{field}.num_classes is not set: fill it from the dataset manifest with "
                f"bigmodel.data.resolve_config(cfg, manifest) or set {field}.num_classes=N"
            )
        if head.num_classes is not None and head.num_classes < head.min_classes:
            note = f" ({head.classes_note})" if head.classes_note else ""
            raise ConfigError(
                f"{field}.num_classes={head.num_classes}: a {head.type} head needs at least "
                f"{head.min_classes}{note}"
            )
        for per_class in ("class_weights", "pos_weight"):
            values = getattr(head, per_class, None)
            known = isinstance(values, list) and head.num_classes is not None
            if known and len(values) != head.num_classes:
                raise ConfigError(
                    f"{field}.{per_class} has {len(values)} entries for "
                    f"num_classes={head.num_classes}: give one per class"
                )


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied.

    Values are parsed as YAML (``3`` is an int, ``[1, 2]`` a list, ``null`` None). Keys that do
    not exist are still set here; validation then rejects them with the field's name.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.epochs=3)"
            )
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has an empty key part")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a nested dict into a :class:`Config`; errors name the dotted field."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    try:
        check_heads(cfg.model)
    except ConfigError as err:
        raise ConfigError(f"invalid config ({source}):\n  {err}") from None
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
        source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " + overrides"
    return config_from_dict(data, source)
