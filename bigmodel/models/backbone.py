"""The shared backbone: any timm model as a multi-scale feature extractor.

timm's ``features_only=True`` gives every architecture the same small contract (STYLE.md rule 3):
a list of feature maps plus ``feature_info.channels()`` and ``.reduction()``. Heads are written
against that contract only, so a ResNet, ConvNeXt, HRNet, EfficientNet or ViT can be swapped by
name. Pretrained weights come only from a local file or folder: training clusters are often
offline, and a silent download at run time would make runs irreproducible.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import timm
import torch
from timm.layers import BatchNormAct2d
from timm.utils.model import freeze
from torch import Tensor, nn

from bigmodel.config import BackboneConfig, ConfigError

__all__ = ["Backbone", "create_backbone", "resolve_pretrained_file"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Preferred names when a folder holds several weight files (Hugging Face / timm conventions).
PREFERRED_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth")
# Values of backbone.pretrained that ask for a download instead of naming a file.
HUB_WORDS = {"true", "yes", "1", "hub", "imagenet", "default", "timm", "download"}


def _download_hint(model_name: str) -> str:
    hub_id = ""
    with suppress(RuntimeError, AttributeError, ValueError):
        hub_id = timm.models.get_pretrained_cfg(model_name).hf_hub_id or ""
    hub_id = hub_id or f"timm/{model_name}"
    return (
        "bigmodel never downloads weights at run time. On a machine with internet run "
        f"`huggingface-cli download {hub_id} model.safetensors --local-dir weights/{model_name}` "
        f"(or save `timm.create_model('{model_name}', pretrained=True).state_dict()` with "
        "safetensors), copy the folder next to the run, and set "
        f"backbone.pretrained=weights/{model_name}/model.safetensors (a file or its folder)."
    )


def resolve_pretrained_file(pretrained: str, model_name: str) -> Path:
    """Turn ``backbone.pretrained`` into one local weights file, or fail saying how to pass one.

    A folder must hold exactly one weights file, or one of the conventional names
    (``model.safetensors``, ``pytorch_model.bin``, ``model.pth``).
    """
    path = Path(pretrained).expanduser()
    lowered = pretrained.strip().lower()
    if not path.exists():
        looks_like_a_name = "/" not in pretrained and not lowered.endswith(WEIGHT_SUFFIXES)
        if (
            looks_like_a_name
            or lowered in HUB_WORDS
            or lowered.startswith(("hf-hub:", "hf_hub:", "timm/", "http://", "https://"))
        ):
            raise ConfigError(
                f"backbone.pretrained={pretrained!r} asks for a download from the model hub. "
                + _download_hint(model_name)
            )
        raise ConfigError(
            f"backbone.pretrained={pretrained!r}: no such file or folder. "
            + _download_hint(model_name)
        )
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise ConfigError(
                f"backbone.pretrained={pretrained!r} is not a weights file; expected one of "
                f"{', '.join(WEIGHT_SUFFIXES)}"
            )
        return path
    for name in PREFERRED_WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(
        p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ConfigError(
            f"backbone.pretrained={pretrained!r} is a folder without a weights file "
            f"({', '.join(WEIGHT_SUFFIXES)}). " + _download_hint(model_name)
        )
    raise ConfigError(
        f"backbone.pretrained={pretrained!r} holds several weights files "
        f"({', '.join(p.name for p in candidates)}); name the file itself"
    )


@contextmanager
def _capture_timm_load_log() -> Iterator[list[logging.LogRecord]]:
    """Collect timm's weight-loading log records.

    timm loads non-strictly as soon as it drops the classifier (always, for ``features_only``) and
    only *logs* missing and unexpected keys; catching those lines is how a weights file for the
    wrong architecture becomes an error instead of a silently half-random backbone.
    """
    logger = logging.getLogger("timm.models._builder")
    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Collect(level=logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _create_timm_features(cfg: BackboneConfig) -> nn.Module:
    if cfg.in_chans is None:
        raise ConfigError(
            "model.backbone.in_chans is not set: fill it from the dataset manifest with "
            "bigmodel.data.resolve_config(cfg, manifest) or set backbone.in_chans=N"
        )
    if not timm.is_model(cfg.name):
        close = timm.list_models(f"*{cfg.name.split('.')[0][:12]}*")[:8]
        raise ConfigError(
            f"model.backbone.name={cfg.name!r} is not a timm model"
            + (f"; close names: {', '.join(close)}" if close else "; see timm.list_models()")
        )
    kwargs: dict = {"features_only": True, "in_chans": cfg.in_chans, "pretrained": False}
    if cfg.out_indices is not None:
        kwargs["out_indices"] = tuple(cfg.out_indices)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    weights = None
    if cfg.pretrained is not None:
        weights = resolve_pretrained_file(cfg.pretrained, cfg.name)
        # timm reads the file, adapts the stem to in_chans (adapt_input_conv), drops the classifier.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    with _capture_timm_load_log() as records:
        try:
            model = timm.create_model(cfg.name, **kwargs)
        except RuntimeError as err:  # load_state_dict: shapes that do not fit
            if weights is None:
                raise
            raise ConfigError(
                f"backbone.pretrained={cfg.pretrained!r} does not fit timm model {cfg.name!r}: {err}"
            ) from None
        except (IndexError, ValueError, AssertionError) as err:  # e.g. out_indices out of range
            raise ConfigError(f"model.backbone ({cfg.name}): {err}") from None
    if weights is None:
        return model
    # timm drops the classifier from the file on purpose (features only): not a mismatch.
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
    classifiers = (pretrained_cfg.classifier if pretrained_cfg else None) or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    mismatch = []
    for record in records:
        message = record.getMessage()
        # Only missing keys matter: unexpected ones are parts the feature extractor does not
        # use (e.g. EfficientNet's conv_head), so they are simply not loaded.
        found = re.match(r"Missing keys \((.*?)\)", message)
        if found:
            keys = [k for k in found.group(1).split(", ") if not k.startswith(classifiers)]
            if keys:
                mismatch.append(f"weights missing from the file: {', '.join(keys)[:300]}")
        elif message.startswith("Unable to convert"):
            mismatch.append(message)
    if mismatch:
        raise ConfigError(
            f"backbone.pretrained={str(weights)!r} does not fit timm model {cfg.name!r} ("
            + "; ".join(mismatch)
            + "). Save the weights of the same architecture (timm.create_model(name).state_dict())."
        )
    return model


def _feature_module_path(model: nn.Module, name: str) -> str | None:
    """Where the module that produces feature level ``name`` lives in the wrapped model."""
    modules = dict(model.named_modules())
    # FeatureListNet flattens "stages.0" to "stages_0"; FeatureGetterNet nests it under "model".
    for candidate in (name, name.replace(".", "_"), f"model.{name}"):
        if candidate in modules:
            return candidate
    return None


class Backbone(nn.Module):
    """A timm ``features_only`` model with the switches of :class:`BackboneConfig` applied.

    ``forward`` returns the list of feature maps (one per level, ``channels[i]`` channels at
    1/``reductions[i]`` of the input size); :meth:`pool` turns them into one pooled embedding.
    """

    def __init__(self, model: nn.Module, cfg: BackboneConfig) -> None:
        super().__init__()
        self.model = model
        self.name = cfg.name
        self.channels: list[int] = list(model.feature_info.channels())
        self.reductions: list[int] = list(model.feature_info.reduction())
        self.channels_last = cfg.channels_last
        if cfg.grad_checkpointing:
            self._enable_grad_checkpointing()
        if cfg.freeze == "all":
            # Frozen BatchNorm too: its running statistics must not drift while the heads train.
            freeze(self.model)
        elif cfg.freeze == "stages":
            if cfg.freeze_stages < 1:
                raise ConfigError(
                    "backbone.freeze=stages needs backbone.freeze_stages >= 1 (how many to freeze)"
                )
            self.freeze_stages(cfg.freeze_stages)
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def num_features(self) -> int:
        """Channels of the pooled embedding (the last feature level)."""
        return self.channels[-1]

    def _enable_grad_checkpointing(self) -> None:
        target = self.model
        if not hasattr(target, "set_grad_checkpointing") and hasattr(target, "model"):
            target = target.model  # FeatureGetterNet (ViTs) wraps the model itself
        try:
            target.set_grad_checkpointing(True)
        except (AssertionError, AttributeError, NotImplementedError) as err:
            raise ConfigError(
                f"backbone.grad_checkpointing: timm's {self.name} does not support gradient "
                f"checkpointing ({err or 'no set_grad_checkpointing'}); set "
                "backbone.grad_checkpointing=false"
            ) from None

    def freeze_stages(self, num_stages: int) -> None:
        """Freeze everything up to and including the module of feature level ``num_stages - 1``.

        A stage is what produces one feature level (its stem included for the first). timm
        modules register parameters in execution order, so the frozen part is a prefix of
        ``named_parameters()`` ending with the last parameter of that level's module.
        """
        names = self.model.feature_info.module_name()
        if num_stages > len(names):
            raise ConfigError(
                f"backbone.freeze_stages={num_stages} but {self.name} has {len(names)} feature "
                f"levels; use at most {len(names)} or backbone.freeze=all"
            )
        path = _feature_module_path(self.model, names[num_stages - 1])
        if path is None:
            raise ConfigError(
                f"backbone.freeze=stages is not supported for {self.name} (cannot locate its "
                f"feature module {names[num_stages - 1]!r}); use backbone.freeze=all"
            )
        params = [n for n, _ in self.model.named_parameters()]
        last = max(i for i, n in enumerate(params) if n.startswith(path + "."))
        frozen = set(params[: last + 1])
        for name, param in self.model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        norms = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.BatchNorm2d, BatchNormAct2d))
            and all(f"{name}.{p}" in frozen for p, _ in module.named_parameters())
        ]
        if norms:
            freeze(self.model, norms)  # BatchNorm -> FrozenBatchNorm2d (timm)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps, finest first."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return list(self.model(images))

    @staticmethod
    def pool(features: list[Tensor]) -> Tensor:
        """Global average of the last (coarsest) feature map: ``[B, num_features]``."""
        return features[-1].mean(dim=(-2, -1))


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named in ``cfg``; configuration mistakes raise :class:`ConfigError`."""
    return Backbone(_create_timm_features(cfg), cfg)
