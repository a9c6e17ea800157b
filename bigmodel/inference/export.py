"""``bigmodel-export RUN_OR_CHECKPOINT_OR_MODEL --out DIR``: a model a hospital pipeline can run.

The output folder is a complete model folder (fp32 safetensors, resolved config,
``preprocessing.json``, model card: what ``bigmodel-predict`` and the registry load) plus, on
request, the network as

* ``model.onnx`` (torch's dynamo ONNX exporter), checked with onnxruntime against the eager
  model on a batch before it is kept;
* ``model.pt2`` (``torch.export``), checked the same way after a save/load round trip.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.config import Config, ConfigError, load_config
from bigmodel.data import ManifestError, load_manifest
from bigmodel.engine.checkpoint import META, is_complete, model_weights
from bigmodel.inference.loading import load_model
from bigmodel.model_folder import CONFIG, WEIGHTS, ModelFolderError, save_model
from bigmodel.preprocessing import Preprocessing, preprocessing_from
from bigmodel.tasks import TASKS

__all__ = ["ExportError", "export", "exportable_heads", "main"]

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


def export(
    source: str,
    out: str | Path,
    formats: Sequence[str] = FORMATS,
    config: str | None = None,
    shards: str | None = None,
    log: Any = None,
) -> dict:
    """Write the export of ``source`` into ``out`` (atomically); returns the export report.

    Raises:
        ExportError: the source cannot be read, or an exported graph does not match eager.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"--format {','.join(unknown)}: unknown; choose from {FORMATS}")
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
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    try:
        report = export(args.source, args.out, formats, args.config, args.shards)
    except (ExportError, ModelFolderError) as err:
        print(f"bigmodel-export: {err}", file=sys.stderr)
        return 2
    print(f"exported to {args.out}:")
    for fmt, details in report["formats"].items():
        diff = details.get("max_abs_diff")
        check = f"  max |diff| vs eager {max(diff.values()):.1e}" if diff else ""
        print(f"  {fmt:12s} {details['file']}{check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
