"""The shared backbone: any timm model (2D) or MONAI 3D encoder as a multi-scale feature extractor.

timm's ``features_only=True`` gives every architecture the same small contract (STYLE.md rule 3):
a list of feature maps plus ``feature_info.channels()`` and ``.reduction()``. Heads are written
against that contract only, so a ResNet, ConvNeXt, HRNet, EfficientNet or ViT can be swapped by
name. The 3D encoders (``backbone.spatial_dims=3``: nnU-Net's residual encoder, SwinUNETR's
Swin encoder, 3D ResNets; :mod:`bigmodel.models.backbone3d`) keep the same contract, so one
:class:`Backbone` wraps both. Pretrained weights come only from a local file or folder, checked
key by key: training clusters are often offline, and a silent download at run time would make
runs irreproducible.
"""

from __future__ import annotations

import logging
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from timm.layers import BatchNormAct2d
from timm.models import adapt_input_conv
from timm.utils.model import freeze
from torch import Tensor, nn

from bigmodel.config import BackboneConfig, ConfigError
from bigmodel.models.backbone3d import create_encoder_3d

__all__ = ["Backbone", "check_pretrained", "create_backbone", "resolve_pretrained_file"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Preferred names when a folder holds several weight files (Hugging Face / timm conventions).
PREFERRED_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth")
# Values of backbone.pretrained that ask for a download instead of naming a file.
HUB_WORDS = {"true", "yes", "1", "hub", "imagenet", "default", "timm", "download"}

_log = logging.getLogger(__name__)


def _download_hint(model_name: str) -> str:
    if model_name in BackboneConfig.BACKBONES_3D:
        return (
            "bigmodel never downloads weights at run time. Save the state dict of the network "
            f"{model_name} comes from (the MONAI DynUNet, SwinUNETR or ResNet, or bigmodel's "
            "backbone.model) with safetensors, copy it next to the run, and set "
            "backbone.pretrained=PATH (a file or its folder)."
        )
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


def _read_weights(path: Path) -> dict[str, Tensor]:
    """The state dict in a weights file, read without running code from it.

    timm's reader: safetensors, or ``torch.load(weights_only=True)`` (a pickle cannot execute
    anything), unwrapping ``state_dict``/``model`` containers and DDP's ``module.`` prefixes.
    """
    try:
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
        raise ConfigError(
            f"backbone.pretrained={str(path)!r} cannot be read as a state dict "
            f"({type(err).__name__}: {_first_line(err)}); save it with safetensors or "
            "torch.save(model.state_dict())"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(
            f"backbone.pretrained={str(path)!r} holds a {type(state).__name__}, not a state dict"
        )
    return state


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _reference_model(cfg: BackboneConfig) -> nn.Module:
    """The whole timm model, classifier removed, to compare a weights file with key by key.

    ``features_only`` models rename and drop modules (``stages.0`` becomes ``stages_0``,
    EfficientNet loses its last convolution), so the file is checked against the model it was
    saved from. Built on the meta device (shapes only: no memory, no initialisation) where the
    architecture allows it. A 3D encoder is its own reference: its keys are those of the MONAI
    network it comes from.
    """
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": cfg.in_chans}
    try:
        with torch.device("meta"):
            if cfg.spatial_dims == 3:
                return create_encoder_3d(cfg)
            return timm.create_model(cfg.name, **kwargs)
    except (RuntimeError, NotImplementedError, ValueError):  # e.g. .item() during init
        if cfg.spatial_dims == 3:
            return create_encoder_3d(cfg)
        return timm.create_model(cfg.name, **kwargs)


def _adapt_weights(
    state: dict[str, Tensor], reference: nn.Module, cfg: BackboneConfig
) -> dict[str, Tensor]:
    """Adapt a file's state dict as timm does when it loads pretrained weights.

    The architecture's checkpoint filter (timm's ``checkpoint_filter_fn`` convention: original
    checkpoints renamed to timm's keys, position embeddings resampled), then the first
    convolution summed or repeated to ``in_chans`` channels (``adapt_input_conv``).
    """
    module = sys.modules[type(reference).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, reference)
        except (KeyError, RuntimeError, ValueError, IndexError) as err:
            raise ConfigError(
                f"backbone.pretrained={cfg.pretrained!r} does not fit timm model {cfg.name!r}: "
                f"timm's checkpoint filter failed ({type(err).__name__}: {_first_line(err)})"
            ) from None
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
    first = (pretrained_cfg.first_conv if pretrained_cfg else None) or ()
    expected = reference.state_dict()
    for conv in (first,) if isinstance(first, str) else first:
        key = f"{conv}.weight"
        weight = state.get(key)
        if weight is None or key not in expected or weight.shape == expected[key].shape:
            continue
        if weight.ndim == 4 and weight.shape[1] != cfg.in_chans:
            # NotImplementedError (grouped stems): left as it is, the comparison names it
            with suppress(NotImplementedError):
                state[key] = adapt_input_conv(cfg.in_chans, weight, base_chans=weight.shape[1])
    return state


def _compare_weights(
    state: dict[str, Tensor], reference: nn.Module, cfg: BackboneConfig, path: Path
) -> dict[str, Tensor]:
    """The file's tensors the model loads; a file that does not fit is refused, naming keys.

    Missing, unexpected or differently shaped keys are errors, except the classifier the file
    may hold (a feature extractor has none) or, for a 3D encoder, the decoder of the whole MONAI
    network it was saved from: those are left out, with a warning.
    """
    expected = reference.state_dict()
    if cfg.spatial_dims == 3:
        heads = tuple(reference.decoder_prefixes)
        architecture = f"3D backbone {cfg.name!r}"
        fix = (
            "Save the weights of the same network with the same in_chans and base_channels: "
            "the encoder's (backbone.model) or the whole MONAI network's it comes from"
        )
    else:
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
        heads = (pretrained_cfg.classifier if pretrained_cfg else None) or ()
        heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
        architecture = f"timm model {cfg.name!r}"
        fix = (
            "Save the weights of the same architecture: "
            f"timm.create_model({cfg.name!r}).state_dict()"
        )
    unexpected = [k for k in state if k not in expected]
    classifier = [k for k in unexpected if heads and k.startswith(heads)]
    unexpected = [k for k in unexpected if k not in classifier]
    # BatchNorm fills a missing step counter itself (checkpoints of older PyTorch lack it).
    missing = [k for k in expected if k not in state and not k.endswith(".num_batches_tracked")]
    reshaped = [
        f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
        for k in state
        if k in expected and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)
    ]
    problems = [
        f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
        for what, keys in (
            ("missing from the file", missing),
            ("not in the model", unexpected),
            ("with another shape", reshaped),
        )
        if keys
    ]
    if problems:
        raise ConfigError(
            f"backbone.pretrained={str(path)!r} does not fit {architecture} "
            f"(in_chans={cfg.in_chans}): {'; '.join(problems)}. {fix}"
        )
    if classifier:
        _log.warning(
            "backbone.pretrained=%s: %s weights not loaded (features only): %s",
            path,
            "decoder" if cfg.spatial_dims == 3 else "classifier",
            ", ".join(classifier),
        )
    return {k: v for k, v in state.items() if k in expected}


def _load_pretrained_state(cfg: BackboneConfig) -> dict[str, Tensor]:
    """Read, adapt and check ``backbone.pretrained`` against the architecture, key by key.

    Only timm's weights are adapted (checkpoint filters, the stem summed to ``in_chans``); a 3D
    file must fit as it is.
    """
    _require_in_chans(cfg)
    path = resolve_pretrained_file(cfg.pretrained, cfg.name)
    reference = _reference_model(cfg)
    state = _read_weights(path)
    if cfg.spatial_dims == 2:
        state = _adapt_weights(state, reference, cfg)
    return _compare_weights(state, reference, cfg, path)


def check_pretrained(cfg: BackboneConfig) -> None:
    """Refuse ``cfg.pretrained`` unless it fits the backbone key by key (``in_chans`` set).

    What :func:`create_backbone` checks before loading, without building the model: the driver
    runs it before starting Ray, so a wrong weights file is one line there.
    """
    _load_pretrained_state(cfg)


@contextmanager
def _timm_load_report_off() -> Iterator[None]:
    """Silence timm's own report of the load, which the key-by-key check has replaced.

    Loading into a feature extractor that drops a model's last layers by design (EfficientNet's
    and MobileNetV3's ``conv_head``, HRNet's ``final_layer``) makes timm warn about "unexpected
    keys" on every run, although those keys were checked against the whole model and fit.
    """
    logger = logging.getLogger("timm.models._builder")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _require_in_chans(cfg: BackboneConfig) -> None:
    if cfg.in_chans is None:
        raise ConfigError(
            "model.backbone.in_chans is not set: fill it from the dataset manifest with "
            "bigmodel.data.resolve_config(cfg, manifest) or set backbone.in_chans=N"
        )


def _create_timm_features(cfg: BackboneConfig) -> nn.Module:
    _require_in_chans(cfg)
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
    if cfg.pretrained is not None:
        # Checked here key by key; timm then loads exactly these tensors into the model it
        # builds, before keeping only the feature levels (so the classifier is already out).
        state = _load_pretrained_state(cfg)
        pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
        overlay: dict = {"state_dict": state}
        if pretrained_cfg and pretrained_cfg.input_size:  # the stem is adapted already
            overlay["input_size"] = (cfg.in_chans, *pretrained_cfg.input_size[1:])
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        with _timm_load_report_off():
            return timm.create_model(cfg.name, **kwargs)
    except (IndexError, ValueError, AssertionError) as err:  # e.g. out_indices out of range
        raise ConfigError(f"model.backbone ({cfg.name}): {err}") from None


def _feature_module_path(model: nn.Module, name: str) -> str | None:
    """Where the module that produces feature level ``name`` lives in the wrapped model."""
    modules = dict(model.named_modules())
    # FeatureListNet flattens "stages.0" to "stages_0"; FeatureGetterNet nests it under "model".
    for candidate in (name, name.replace(".", "_"), f"model.{name}"):
        if candidate in modules:
            return candidate
    return None


class Backbone(nn.Module):
    """A timm ``features_only`` model or a 3D encoder, with the switches of :class:`BackboneConfig`.

    ``forward`` returns the list of feature maps (one per level, ``channels[i]`` channels at
    1/``reductions[i]`` of the input size along every spatial dimension, ``spatial_dims`` of
    them); :meth:`pool` turns them into one pooled embedding.
    """

    def __init__(self, model: nn.Module, cfg: BackboneConfig) -> None:
        super().__init__()
        self.model = model
        self.name = cfg.name
        self.spatial_dims = cfg.spatial_dims
        self.channels: list[int] = list(model.feature_info.channels())
        self.reductions: list[int] = list(model.feature_info.reduction())
        self.channels_last = cfg.channels_last
        if cfg.activation_checkpointing:
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
            self.to(memory_format=self.memory_format)
        self.train(self.training)  # frozen 3D BatchNorm into eval mode

    @property
    def num_features(self) -> int:
        """Channels of the pooled embedding (the last feature level)."""
        return self.channels[-1]

    @property
    def memory_format(self) -> torch.memory_format:
        """The channels-last format of this many spatial dimensions (NHWC or NDHWC)."""
        return torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d

    def train(self, mode: bool = True) -> Backbone:
        """Train mode, except frozen BatchNorm layers that timm cannot convert.

        timm turns frozen ``BatchNorm2d`` into ``FrozenBatchNorm2d``; a frozen ``BatchNorm3d``
        (the 3D ResNets) stays a BatchNorm kept in eval mode, so that its running statistics do
        not drift while the heads train.
        """
        super().train(mode)
        for module in self.model.modules():
            params = list(module.parameters(recurse=False))
            frozen = params and not any(p.requires_grad for p in params)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen:
                module.eval()
        return self

    def _enable_grad_checkpointing(self) -> None:
        target = self.model
        if not hasattr(target, "set_grad_checkpointing") and hasattr(target, "model"):
            target = target.model  # FeatureGetterNet (ViTs) wraps the model itself
        try:
            target.set_grad_checkpointing(True)
        except (AssertionError, AttributeError, NotImplementedError) as err:
            raise ConfigError(
                f"backbone.activation_checkpointing: timm's {self.name} does not support "
                f"gradient checkpointing ({err or 'no set_grad_checkpointing'}); set "
                "backbone.activation_checkpointing=false (its earlier name: "
                "backbone.grad_checkpointing=false)"
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
        self.train(self.training)  # frozen BatchNorm3d into eval mode

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps, finest first."""
        if self.channels_last:
            images = images.contiguous(memory_format=self.memory_format)
        return list(self.model(images))

    @staticmethod
    def pool(features: list[Tensor]) -> Tensor:
        """Global average of the last (coarsest) feature map over all its spatial dimensions:
        ``[B, num_features]``."""
        last = features[-1]
        return last.mean(dim=tuple(range(2, last.dim())))


def _create_encoder_3d(cfg: BackboneConfig) -> nn.Module:
    _require_in_chans(cfg)
    model = create_encoder_3d(cfg)
    if cfg.pretrained is not None:
        # Checked key by key first; what is left out (a decoder) was named in the warning.
        model.load_state_dict(_load_pretrained_state(cfg), strict=False)
    return model


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the backbone named in ``cfg``; configuration mistakes raise :class:`ConfigError`."""
    if cfg.spatial_dims == 3:
        return Backbone(_create_encoder_3d(cfg), cfg)
    return Backbone(_create_timm_features(cfg), cfg)
