"""Checks run on the driver before Ray starts: every input mistake is one line and exit code 2.

Without them a missing shard folder or a misspelt backbone starts Ray, the controller and the
workers, and comes back as pages of tracebacks around the one useful sentence. Each check here
reuses the library's own validation (``load_manifest``, ``resolve_config``, ``timm.is_model``,
``resolve_pretrained_file``, ``check_pretrained``), so the driver and the workers cannot disagree
about what is valid.

Remote shard locations (``s3://bucket/prefix``, any fsspec URL) are checked here too, with
the credentials and endpoint of the driver's environment: the bucket is reachable, its
``dataset.json`` is valid, and every shard object of the splits the run reads is present with
the size the manifest records (one listing request per split, no object downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path

from bigmodel.config import Config, ConfigError
from sharding import storage
from sharding.helpers import one_line

__all__ = ["PreflightError", "check", "problems"]


class PreflightError(ConfigError):
    """One or more problems found before starting Ray; ``str()`` has one line per problem."""


def _check_backbone(cfg: Config) -> list[str]:
    import timm

    from bigmodel.models import resolve_pretrained_file

    backbone = cfg.model.backbone
    if not timm.is_model(backbone.name):
        stem = backbone.name.split(".")[0]
        close = timm.list_models(f"*{stem[:12]}*")[:6] or timm.list_models(f"{stem[:4]}*")[:6]
        hint = f"close names: {', '.join(close)}" if close else "see timm.list_models()"
        return [f"model.backbone.name={backbone.name!r} is not a timm model ({hint})"]
    if backbone.pretrained is not None:
        try:
            resolve_pretrained_file(backbone.pretrained, backbone.name)
        except ConfigError as err:
            return [one_line(err)]
    return []


def _check_data(cfg: Config) -> list[str]:
    """Shard folder, manifest, splits and their shard files, head targets in the manifest."""
    from bigmodel.data import ManifestError, load_manifest, resolve_config
    from bigmodel.tasks import TASKS

    data = cfg.data
    if not data.shards:
        return ["data.shards is not set: point it at a folder from `bigmodel-shard build`"]
    root: str | Path = data.shards
    if not storage.is_remote(data.shards):
        root = storage.local_path(data.shards)
        if not root.is_dir():
            return [
                f"data.shards={data.shards!r}: no such folder; build it with `bigmodel-shard "
                f"build --out {data.shards} ...` or fix the path"
            ]
    try:
        manifest = load_manifest(root)
    except (ManifestError, ConfigError, OSError) as err:
        return [one_line(err)]
    found: list[str] = []
    splits = [data.train_split]
    if cfg.train.eval_every:
        splits.append(data.val_split)
    for split in splits:
        try:
            manifest.shard_paths(split)  # the split exists and every shard file is there
        except (ManifestError, OSError) as err:
            fix = " (or set train.eval_every=0)" if split == data.val_split else ""
            found.append(one_line(err) + fix)
    for name, head in cfg.model.heads.items():
        if head.target not in TASKS[head.type].targets:
            found.append(
                f"model.heads.{name}.target={head.target!r} cannot train a {head.type} head; "
                f"allowed: {', '.join(TASKS[head.type].targets)}"
            )
    if found:
        return found
    try:
        resolved = resolve_config(cfg, manifest)  # head targets, class counts and channels agree
    except (ConfigError, ManifestError) as err:
        return [one_line(err)]
    return _check_weights(resolved)


def _check_weights(cfg: Config) -> list[str]:
    """A pretrained file fits the backbone key by key (``in_chans`` now from the manifest).

    Skipped where :func:`_check_backbone` already named the backbone or the file.
    """
    import timm

    from bigmodel.models import check_pretrained, resolve_pretrained_file

    backbone = cfg.model.backbone
    if backbone.pretrained is None or not timm.is_model(backbone.name):
        return []
    try:
        resolve_pretrained_file(backbone.pretrained, backbone.name)
    except ConfigError:
        return []
    try:
        check_pretrained(backbone)
    except ConfigError as err:
        return [one_line(err)]
    return []


def _check_resources(cfg: Config, embedded: bool) -> list[str]:
    """GPUs an embedded Ray would not have (a cluster's are checked once connected)."""
    if not (embedded and cfg.cluster.use_gpu):
        return []
    import torch

    need = cfg.cluster.num_workers * cfg.cluster.gpus_per_worker
    have = torch.cuda.device_count()
    if have < need:
        return [
            f"cluster.use_gpu=true needs {cfg.cluster.num_workers} x "
            f"{cfg.cluster.gpus_per_worker:g} GPUs but this machine has {have}; set "
            "cluster.use_gpu=false, lower cluster.num_workers, or pass a cluster address"
        ]
    return []


def problems(cfg: Config, address: str | None = None) -> list[str]:
    """Every problem found in ``cfg`` that would fail the run, one line each (empty: go).

    ``cfg`` has its paths resolved (``launch.train.resolve_paths``); ``address`` is the
    ``--address`` given, if any: without one (nor ``cluster.address``/``RAY_ADDRESS``) the run
    starts an embedded Ray on this machine, whose GPUs are counted here.
    """
    embedded = not (address or cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    found = _check_backbone(cfg)
    found += _check_data(cfg)
    found += _check_resources(cfg, embedded)
    return found


def notes(cfg: Config) -> list[str]:
    """Warnings that do not stop the run (a validation split too small to rank checkpoints)."""
    from bigmodel.data import load_manifest, validation_note

    try:
        note = validation_note(cfg, load_manifest(cfg.data.shards))
    except Exception:  # noqa: BLE001 - a manifest problem is check()'s to report, not ours
        return []
    return [note] if note else []


def check(cfg: Config, address: str | None = None) -> None:
    """Raise :class:`PreflightError` listing :func:`problems`, if there are any."""
    found = problems(cfg, address)
    if found:
        raise PreflightError("\n".join(found))
