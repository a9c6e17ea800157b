"""``bigmodel-export RUN_OR_CHECKPOINT_OR_MODEL --out DIR``: a model a hospital pipeline can run.

The output folder is a complete model folder (fp32 safetensors, resolved config,
``preprocessing.json``, model card: what ``bigmodel-predict`` and the registry load) plus, on
request, the network as

* ``model.onnx`` (torch's dynamo ONNX exporter), checked with onnxruntime against the eager
  model on a batch before it is kept;
* ``model.pt2`` (``torch.export``), checked the same way after a save/load round trip;
* ``model.int8.onnx`` (``--int8``): ``model.onnx`` statically quantized by ONNX Runtime (QDQ,
  int8 per-channel weights, uint8 activations) with activation ranges calibrated on windows of
  the training split, normalised as in training; kept only when it agrees with ``model.onnx`` on
  held-out windows (Dice of the label maps, top-1 agreement, cosine of embeddings) at least as
  well as ``--int8-min-agreement`` asks. The figures go into ``export_report.json`` and the card.

Both graphs take normalised ``[N, C, S, S]`` windows (``S`` = the training image size, ``N``
free) and return one tensor per exportable head, named after the head: classification logits,
segmentation logits, retrieval embeddings. Preprocessing (``preprocessing.json``) and the
sliding window over larger images stay outside the graph. Detection heads are refused with the
reason; the other heads of the same model are exported.

The source may be a model folder, a run folder (its ``model/``, else its latest complete
checkpoint), a checkpoint folder (DDP, or DeepSpeed ZeRO partitions, consolidated to fp32 by
``bigmodel.engine.checkpoint.model_weights``: the weight average when the run kept one) or ``models:/name@alias``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.config import Config, ConfigError, load_config
from bigmodel.data import Manifest, ManifestError, SplitSamples, load_manifest
from bigmodel.engine.checkpoint import META, is_complete, model_weights
from bigmodel.inference._onnx_backend import INT8_FILE, ONNX_FILE, quantize_static_int8
from bigmodel.inference.loading import load_model
from bigmodel.model_folder import (
    CONFIG,
    WEIGHTS,
    LoadedModel,
    ModelFolderError,
    save_model,
    update_card,
)
from bigmodel.models.window import fit_to_size
from bigmodel.preprocessing import Preprocessing, normalize, preprocessing_from
from bigmodel.tasks import TASKS
from sharding.helpers import atomic_write

__all__ = ["ExportError", "Int8Options", "export", "exportable_heads", "main", "quantize_int8"]

FORMATS = ("safetensors", "onnx", "pt2")
ONNX_OPSET = 18
REPORT = "export_report.json"
# Agreement required between an exported graph and the eager model (fp32, same input).
ATOL, RTOL = 1e-4, 1e-3


class ExportError(ValueError):
    """A source that cannot be exported, or an export that does not match the eager model."""


class _Heads(nn.Module):
    """The exportable heads of a multi-task model as ``images -> tuple of tensors``.

    ONNX and ``torch.export`` want tensors in and out; the backbone runs once for all heads.
    """

    def __init__(self, model: nn.Module, heads: list[str]) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.heads = nn.ModuleDict({name: model.heads[name] for name in heads})

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone(images)
        size = (images.shape[-2], images.shape[-1])
        return tuple(head(features, size) for head in self.heads.values())


def exportable_heads(head_types: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Heads that export, and ``{head: reason}`` for the ones that do not (``Task.export_refusal``)."""
    reasons = {n: TASKS[t].export_refusal for n, t in head_types.items()}
    refused = {n: reason for n, reason in reasons.items() if reason is not None}
    return [n for n in head_types if n not in refused], refused


# ------------------------------------------------------------------------------ sources


def _find_config(directory: Path, explicit: str | None) -> Config:
    candidates = [Path(explicit)] if explicit else []
    candidates += [directory / CONFIG, directory.parent / CONFIG, directory.parent.parent / CONFIG]
    for path in candidates:
        if path.is_file():
            try:
                return load_config(path)
            except ConfigError as err:
                raise ExportError(f"{path}: {' '.join(str(err).split())}") from None
    raise ExportError(
        f"{directory}: no {CONFIG} beside the checkpoint or in its run folder; pass "
        f"--config RUN/config.yaml"
    )


def _latest_checkpoint(run: Path) -> Path | None:
    done = [p for p in sorted((run / "checkpoints").glob("step_*")) if is_complete(p)]
    return done[-1] if done else None


def _from_checkpoint(
    directory: Path, config: str | None, shards: str | None
) -> tuple[dict, Config, Preprocessing, Path | None, dict]:
    cfg = _find_config(directory, config)
    shards_dir = shards or cfg.data.shards
    try:
        manifest = load_manifest(shards_dir)
    except ManifestError as err:
        raise ExportError(
            f"{err}; the preprocessing record needs the training shards' dataset.json: pass "
            f"--shards DIR"
        ) from None
    try:
        state, weights = model_weights(directory)  # the weight average when the run kept one
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as err:
        raise ExportError(f"{directory}: cannot consolidate the weights ({err})") from None
    meta = json.loads((directory / META).read_text())
    extra = {
        "exported_from": str(directory),
        "checkpoint_step": meta.get("step"),
        "checkpoint_weights": weights,
        "trained_world_size": meta.get("world_size"),
        "trained_strategy": meta.get("strategy"),
        "trained_zero_stage": meta.get("zero_stage"),
    }
    return state, cfg, preprocessing_from(cfg, manifest), manifest.path, extra


def load_source(
    source: str, config: str | None = None, shards: str | None = None
) -> tuple[dict, Config, Preprocessing, Path | None, dict, dict]:
    """Weights, config, preprocessing, manifest path, card extras and metrics of any source."""
    path = Path(source).expanduser()
    if not source.startswith("models:/") and not path.exists():
        raise ExportError(f"{path}: no such run, checkpoint or model folder")
    if not source.startswith("models:/") and (path / "checkpoints").is_dir():
        if not (path / "model" / WEIGHTS).is_file():
            latest = _latest_checkpoint(path)
            if latest is None:
                raise ExportError(f"{path}: a run folder without model/ or complete checkpoints")
            path = latest
        else:
            path = path / "model"
    if not source.startswith("models:/") and is_complete(path):
        state, cfg, prep, manifest, extra = _from_checkpoint(path, config, shards)
        return state, cfg, prep, manifest, extra, {}
    try:
        loaded = load_model(source if source.startswith("models:/") else path)
    except ModelFolderError as err:
        raise ExportError(str(err)) from None
    card = loaded.card
    manifest = Path(card["dataset_manifest"]) if card.get("dataset_manifest") else None
    # The training-time card (manifest hash, git commit, metrics) travels with the weights.
    extra = {k: v for k, v in card.items() if k != "created"} | {"exported_from": str(loaded.path)}
    return (
        loaded.model.state_dict(),
        loaded.config,
        loaded.preprocessing,
        manifest if manifest is not None and manifest.is_file() else None,
        extra,
        dict(card.get("metrics") or {}),
    )


# ------------------------------------------------------------------------------ formats


def _check(name: str, outputs: Sequence[Any], reference: Sequence[torch.Tensor], heads) -> dict:
    diffs = {}
    for head, got, want in zip(heads, outputs, reference, strict=True):
        got = torch.as_tensor(got)
        diff = (got - want).abs()
        diffs[head] = float(diff.max())
        if not bool((diff <= ATOL + RTOL * want.abs()).all()):
            raise ExportError(
                f"{name}: head {head!r} differs from the eager model by up to {diffs[head]:.2e} "
                f"(tolerance {ATOL} + {RTOL} x |value|); not kept"
            )
    return diffs


def _export_onnx(module: _Heads, example: torch.Tensor, path: Path, heads: list[str]) -> dict:
    import onnxruntime as ort

    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=["images"],
        output_names=heads,
        dynamic_shapes={"images": {0: batch}},
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
        # One self-contained file unless the weights pass protobuf's 2 GB limit.
        external_data=sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5e9,
    )
    probe = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=_gen())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})
    with torch.no_grad():
        want = module(probe)
    return {"opset": ONNX_OPSET, "max_abs_diff": _check("ONNX", got, want, heads)}


def _export_pt2(module: _Heads, example: torch.Tensor, path: Path, heads: list[str]) -> dict:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(path))
    probe = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=_gen())
    with torch.no_grad():
        got = torch.export.load(str(path)).module()(probe)
        want = module(probe)
    return {"max_abs_diff": _check("torch.export", got, want, heads)}


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------------------ int8


@dataclass(frozen=True)
class Int8Options:
    """How ``model.onnx`` is quantized to ``model.int8.onnx`` and how it is checked."""

    shards: str | None = None
    """Shards to calibrate and check on (default: the training shards of the model)."""
    calibration_split: str = "train"
    """Split whose windows set the activation ranges."""
    calibration_samples: int = 64
    """Windows of ``image_size`` (one or more per image, spread over the split) to calibrate on."""
    check_split: str | None = None
    """Held-out split the int8 graph is compared on (default: ``val``, else ``test``)."""
    check_samples: int = 32
    """Held-out images (every window of each) the int8 graph is compared on."""
    min_agreement: float = 0.95
    """Lowest agreement with fp32 kept, per head: Dice (label maps), top-1 (classes), cosine."""
    per_channel: bool = True
    """One weight scale per output channel (per-tensor: one per weight)."""
    exclude_heads: tuple[str, ...] = ()
    """Heads whose nodes stay fp32 (a head that int8 hurts, e.g. a small segmentation decoder)."""


def _windows(image: torch.Tensor, prep: Preprocessing, rng: np.random.Generator | None, count: int):
    """``[n, C, S, S]`` windows of one normalised image ``[C, H, W]``, as inference sees them.

    ``resize=fit``: the fitted image (one window). Otherwise the image is centre-padded with 0 to
    at least ``S`` and cut into windows: ``count`` at random places (``rng``, as training cropped)
    or, without ``rng``, the sliding-window grid (overlap 0.5) that whole-image inference uses.
    """
    size = prep.image_size
    if prep.resize == "fit":
        return fit_to_size(image[None], size)
    height, width = image.shape[-2:]
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if pad_h or pad_w:
        image = torch.nn.functional.pad(
            image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        )
    height, width = image.shape[-2:]

    def grid(side: int) -> list[int]:
        steps = list(range(0, side - size + 1, max(1, size // 2)))
        return steps if steps[-1] == side - size else [*steps, side - size]

    if rng is None:
        places = [(y, x) for y in grid(height) for x in grid(width)]
    else:
        places = [
            (int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1)))
            for _ in range(count)
        ]
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in places])


def _split_windows(
    manifest: Manifest, split: str, prep: Preprocessing, images: int, per_image: int, seed: int
) -> np.ndarray:
    """Windows of ``images`` images spread evenly over ``split``, normalised as in training.

    ``per_image`` > 0: that many random windows per image (calibration); 0: every window of the
    sliding-window grid (the held-out check).
    """
    total = manifest.split(split).num_samples
    stride = max(1, total // max(1, images))
    rng = np.random.default_rng(seed) if per_image else None
    chosen: list[torch.Tensor] = []
    for index, sample in enumerate(SplitSamples(manifest, split, verify=False)):
        if index % stride:
            continue
        image = normalize(sample["image"], prep, sample.get("window"), sample.get("volume"))
        chosen.append(_windows(image, prep, rng, per_image))
        if len(chosen) == images:
            break
    if not chosen:
        raise ExportError(f"{manifest.path}: split {split!r} has no samples to quantize with")
    windows = torch.cat(chosen).float().numpy()
    return windows[: images * per_image] if per_image else windows


def _agreement(got: np.ndarray, want: np.ndarray, has_classes: bool) -> tuple[str, float]:
    """How far int8 outputs ``got`` agree with fp32 ``want`` (``Task.to_numpy`` of each).

    Label maps (integers): mean Dice over the labels > 0 either map holds (1.0 when both are all
    background). Scores of a head with classes: top-1 agreement. Embeddings: mean cosine.
    """
    if np.issubdtype(want.dtype, np.integer):
        labels = [k for k in np.union1d(np.unique(got), np.unique(want)) if k > 0]
        dice = [
            2 * np.sum((got == k) & (want == k)) / (np.sum(got == k) + np.sum(want == k))
            for k in labels
        ]
        return "dice", float(np.mean(dice)) if dice else 1.0
    if has_classes:
        return "top1_agreement", float(np.mean(got.argmax(axis=1) == want.argmax(axis=1)))
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    return "cosine", float(np.mean(np.sum(got * want, axis=1) / np.maximum(norms, 1e-12)))


def _run(session: Any, windows: np.ndarray, batch: int = 16) -> list[np.ndarray]:
    """Every output of ``session`` for ``windows``, run ``batch`` windows at a time."""
    name = session.get_inputs()[0].name
    parts = [
        session.run(None, {name: windows[i : i + batch]}) for i in range(0, len(windows), batch)
    ]
    return [np.concatenate(chunks) for chunks in zip(*parts, strict=True)]


def quantize_int8(
    folder: str | Path,
    options: Int8Options = Int8Options(),
    loaded: LoadedModel | None = None,
    log: Any = None,
) -> dict:
    """Add ``model.int8.onnx`` to an exported model folder holding ``model.onnx``.

    Calibrates on ``options.calibration_split``, compares int8 with fp32 on held-out windows of
    ``options.check_split`` and keeps the file (written under a temporary name, then renamed)
    only when every head agrees at least ``options.min_agreement``. Returns the report entry,
    also recorded in ``export_report.json`` (when the folder has one) and the model card.

    Raises:
        ExportError: no shards or splits to calibrate on, or agreement below the threshold
            (then no int8 file is left behind).
    """
    import onnxruntime as ort

    log = log or (lambda line: print(line, file=sys.stderr))
    folder = Path(folder)
    loaded = loaded or load_model(folder)
    prep = loaded.preprocessing
    fp32 = folder / ONNX_FILE
    if not fp32.is_file():
        raise ExportError(f"{fp32}: missing; --int8 quantizes the fp32 graph: add --format onnx")
    unknown = sorted(set(options.exclude_heads) - set(prep.head_types))
    if unknown:
        raise ExportError(f"--int8-exclude-head {','.join(unknown)}: no such head")
    shards = str(options.shards or loaded.card.get("dataset_manifest") or loaded.config.data.shards)
    if shards.endswith(".json"):  # the card names the manifest file; a URL keeps its scheme
        shards = shards.rsplit("/", 1)[0]
    try:
        manifest = load_manifest(shards)
    except ManifestError as err:
        raise ExportError(
            f"{err}; --int8 calibrates on shards: pass --calibration-shards DIR"
        ) from None
    check_split = options.check_split or next(
        (s for s in ("val", "test") if s in manifest.splits), None
    )
    for split in (options.calibration_split, check_split):
        if split is None or split not in manifest.splits:
            raise ExportError(
                f"{manifest.path}: no split {split or 'val/test'!r} to "
                f"{'calibrate' if split == options.calibration_split else 'check'} int8 on "
                f"(splits: {sorted(manifest.splits)}); pass --calibration-split/--check-split"
            )
    started = time.perf_counter()
    count = options.calibration_samples
    images = min(count, manifest.split(options.calibration_split).num_samples)
    per_image = -(-count // max(1, images))  # ceil: small splits give several windows each
    calibration = _split_windows(manifest, options.calibration_split, prep, images, per_image, 0)
    calibration = calibration[:count]
    held_out = _split_windows(manifest, check_split, prep, options.check_samples, 0, 1)
    log(
        f"bigmodel-export: int8: calibrating on {len(calibration)} windows of "
        f"{options.calibration_split}, checking on {len(held_out)} windows of {check_split} ..."
    )
    target = folder / INT8_FILE
    details: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        details.update(
            quantize_static_int8(fp32, tmp, calibration, options.per_channel, options.exclude_heads)
        )
        sessions = [
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for path in (fp32, tmp)
        ]
        want, got = (_run(session, held_out) for session in sessions)
        outputs = [o.name for o in sessions[0].get_outputs()]
        agreement, max_diff, failing = {}, {}, {}
        for head, a, b in zip(outputs, got, want, strict=True):
            task, cfg = TASKS[prep.head_types[head]], loaded.config.model.heads[head]
            max_diff[head] = float(np.abs(a - b).max())
            figure, value = _agreement(
                task.to_numpy(torch.from_numpy(a), cfg),
                task.to_numpy(torch.from_numpy(b), cfg),
                bool(prep.classes.get(head)),
            )
            agreement[head] = {figure: round(value, 4)}
            if value < options.min_agreement:
                failing[head] = f"head {head!r} {figure} {value:.3f}"
        if failing:
            raise ExportError(
                f"int8 vs fp32 on {len(held_out)} held-out {check_split} windows: "
                f"{', '.join(failing.values())} below --int8-min-agreement "
                f"{options.min_agreement}; model.int8.onnx not kept (try more "
                f"--calibration-samples, "
                f"{'--int8-per-tensor' if options.per_channel else 'per-channel weights'}, or "
                f"--int8-exclude-head {next(iter(failing))})"
            )
        details.update(agreement=agreement, max_abs_logit_diff=max_diff)

    atomic_write(target, write)
    entry = {
        "file": INT8_FILE,
        "format": "QDQ",
        "weights": "int8 per-channel" if options.per_channel else "int8 per-tensor",
        "activations": "uint8 per-tensor (static, MinMax calibration)",
        "calibration": {
            "shards": str(manifest.root),
            "split": options.calibration_split,
            "windows": len(calibration),
        },
        "check": {"split": check_split, "windows": len(held_out)},
        "min_agreement": options.min_agreement,
        "excluded_heads": list(options.exclude_heads),
        **details,
        "bytes": target.stat().st_size,
        "fp32_bytes": fp32.stat().st_size,
        "seconds": round(time.perf_counter() - started, 1),
    }
    report_file = folder / REPORT
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        report["formats"]["int8"] = entry
        atomic_write(report_file, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    update_card(folder, {"int8": {k: entry[k] for k in ("file", "agreement", "check")}})
    return entry


def export(
    source: str,
    out: str | Path,
    formats: Sequence[str] = FORMATS,
    config: str | None = None,
    shards: str | None = None,
    log: Any = None,
    int8: Int8Options | None = None,
) -> dict:
    """Write the export of ``source`` into ``out`` (atomically); returns the export report.

    With ``int8`` the folder also gets ``model.int8.onnx`` (:func:`quantize_int8`; it needs
    ``onnx`` in ``formats``); when int8 misses its agreement threshold nothing is written.

    Raises:
        ExportError: the source cannot be read, an exported graph does not match eager, or the
            int8 graph does not agree with fp32.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"--format {','.join(unknown)}: unknown; choose from {FORMATS}")
    if int8 is not None and "onnx" not in formats:
        raise ExportError("--int8 quantizes model.onnx: add onnx to --format")
    out = Path(out).expanduser()
    state, cfg, prep, manifest, extra, metrics = load_source(source, config, shards)
    partial = out.with_name(f".{out.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    # The model folder first (it is what predict and the registry load), then the graphs.
    save_model(state, cfg, partial, metrics, manifest, extra, preprocessing=prep)
    try:
        loaded = load_model(partial)  # also proves the consolidated weights fit the config
        heads, refused = exportable_heads(prep.head_types)
        report: dict[str, Any] = {
            "source": source,
            "model_folder": str(out),
            "input": {
                "name": "images",
                "shape": ["N", prep.in_chans, prep.image_size, prep.image_size],
                "dtype": "float32",
                "note": "normalised as preprocessing.json says; larger images: sliding window",
            },
            "outputs": {h: prep.head_types[h] for h in heads},
            "refused": refused,
            "formats": {"safetensors": {"file": WEIGHTS}},
        }
        for head, reason in refused.items():
            log(f"bigmodel-export: head {head!r} ({prep.head_types[head]}) not exported: {reason}")
        graphs = [f for f in formats if f != "safetensors"]
        if graphs and not heads:
            raise ExportError(
                f"{source}: no head can be exported to {', '.join(graphs)} (only "
                f"{', '.join(sorted(set(prep.head_types.values())))} heads)"
            )
        module = _Heads(loaded.model, heads).eval()
        example = torch.randn(2, prep.in_chans, prep.image_size, prep.image_size, generator=_gen())
        for fmt, writer, name in (
            ("onnx", _export_onnx, "model.onnx"),
            ("pt2", _export_pt2, "model.pt2"),
        ):
            if fmt not in formats:
                continue
            started = time.perf_counter()
            log(f"bigmodel-export: {fmt} ({', '.join(heads)}) ...")
            details = writer(module, example, partial / name, heads)
            details.update(file=name, seconds=round(time.perf_counter() - started, 1))
            report["formats"][fmt] = details
        (partial / REPORT).write_text(json.dumps(report, indent=2))
        if int8 is not None:
            report["formats"]["int8"] = quantize_int8(partial, int8, loaded, log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bigmodel-export``; exit 2 on bad input or a failed check."""
    parser = argparse.ArgumentParser(
        prog="bigmodel-export",
        description="Export a run, checkpoint or model folder: fp32 safetensors model folder, "
        "ONNX (checked with onnxruntime) and torch.export .pt2.",
    )
    parser.add_argument("source", help="run folder, checkpoint folder, model folder or models:/")
    parser.add_argument("--out", required=True, help="output folder (replaced when complete)")
    parser.add_argument(
        "--format",
        default=",".join(FORMATS),
        help=f"comma-separated subset of {','.join(FORMATS)} (default: all)",
    )
    parser.add_argument("--config", help="the run's config.yaml (default: found near the source)")
    parser.add_argument("--shards", help="training shards (default: data.shards of the config)")
    quant = parser.add_argument_group("int8 (ONNX Runtime static quantization of model.onnx)")
    quant.add_argument("--int8", action="store_true", help="also write model.int8.onnx")
    quant.add_argument(
        "--calibration-shards", help="shards to calibrate and check on (default: training shards)"
    )
    quant.add_argument("--calibration-split", default="train", help="default: train")
    quant.add_argument("--calibration-samples", type=int, default=64, help="windows (default 64)")
    quant.add_argument("--check-split", help="held-out split (default: val, else test)")
    quant.add_argument("--check-samples", type=int, default=32, help="held-out images (32)")
    quant.add_argument(
        "--int8-min-agreement",
        type=float,
        default=0.95,
        help="lowest per-head agreement with fp32 kept: Dice, top-1 or cosine (default 0.95)",
    )
    quant.add_argument(
        "--int8-per-tensor", action="store_true", help="one scale per weight, not per channel"
    )
    quant.add_argument(
        "--int8-exclude-head", action="append", default=[], help="keep this head fp32 (repeat)"
    )
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    int8 = None
    if args.int8:
        if "onnx" not in formats:
            formats.append("onnx")  # the fp32 graph int8 is made from
        int8 = Int8Options(
            shards=args.calibration_shards,
            calibration_split=args.calibration_split,
            calibration_samples=args.calibration_samples,
            check_split=args.check_split,
            check_samples=args.check_samples,
            min_agreement=args.int8_min_agreement,
            per_channel=not args.int8_per_tensor,
            exclude_heads=tuple(args.int8_exclude_head),
        )
    try:
        report = export(args.source, args.out, formats, args.config, args.shards, int8=int8)
    except (ExportError, ModelFolderError) as err:
        print(f"bigmodel-export: {err}", file=sys.stderr)
        return 2
    print(f"exported to {args.out}:")
    for fmt, details in report["formats"].items():
        diff = details.get("max_abs_diff")
        check = f"  max |diff| vs eager {max(diff.values()):.1e}" if diff else ""
        if "agreement" in details:
            figures = ", ".join(
                f"{head} {name} {value:.4f}"
                for head, entry in details["agreement"].items()
                for name, value in entry.items()
            )
            size = f"{details['bytes'] / 1e6:.2f} MB (fp32 {details['fp32_bytes'] / 1e6:.2f} MB)"
            check = f"  {size}; vs fp32 on held-out {details['check']['split']}: {figures}"
        print(f"  {fmt:12s} {details['file']}{check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
