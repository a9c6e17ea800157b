"""Registered models, their versions and aliases, and the cache of downloaded versions.

Names used below: a *registered model* has numbered *versions*; an *alias* (``staging``,
``production``) points at one version. MLflow keeps no history of where an alias pointed, so
:func:`promote` records it in a registered-model tag (``bigmodel.alias_history.<alias>``) and
:func:`rollback` walks it back. A version's lineage tags (``bigmodel.*``, see
:mod:`bigmodel.registry.store`) are copied from the run's tags when the version is created.

Every change is made so that a failure leaves nothing half-written: a version whose upload or
creation fails is deleted again, with its registered model when this call created it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from bigmodel.registry.store import (
    LINEAGE_TAGS,
    MODEL_ARTIFACT,
    RegistryError,
    check_model_folder,
    connect,
    ensure_experiment,
    lineage_from_folder,
    log_metrics,
    log_model_folder,
    resolve_uri,
)

__all__ = [
    "RegistryError",
    "VersionRef",
    "default_cache",
    "lineage",
    "list_models",
    "model_versions",
    "parse_model_uri",
    "promote",
    "register_folder",
    "register_run",
    "resolve_model_uri",
    "rollback",
]

_HISTORY_TAG = "bigmodel.alias_history."
_HISTORY_KEEP = 50


# --------------------------------------------------------------------------------------------
# registering


def register_run(
    client: MlflowClient,
    run_id: str,
    name: str,
    artifact_path: str = MODEL_ARTIFACT,
    description: str | None = None,
) -> ModelVersion:
    """Register ``runs:/{run_id}/{artifact_path}`` as a new version of ``name``.

    The run's ``bigmodel.*`` lineage tags are copied to the version. When creating the version
    fails, whatever this call created is deleted again.
    """
    run = client.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("bigmodel.")}
    created_model = False
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="bigmodel model folders (safetensors)")
        created_model = True
    version = None
    try:
        version = client.create_model_version(
            name,
            f"runs:/{run_id}/{artifact_path}",
            run_id=run_id,
            tags=tags,
            description=description,
        )
        if version.status != "READY":
            raise RegistryError(
                f"model version {name}/{version.version} ended as {version.status}: "
                f"{version.status_message}"
            )
        return version
    except BaseException:
        if version is not None:
            with contextlib.suppress(Exception):
                client.delete_model_version(name, version.version)
        if created_model:
            with contextlib.suppress(Exception):
                client.delete_registered_model(name)
        raise


def register_folder(
    folder: str | Path,
    name: str,
    uri: str,
    experiment: str = "bigmodel",
    alias: str | None = None,
) -> ModelVersion:
    """Log a model folder in a new run of ``experiment`` and register it as a version of ``name``.

    For a folder that did not come from a tracked run (or came from another store). The run
    gets the folder's lineage tags and its card's metrics. On failure the run is deleted and no
    version is left behind.
    """
    folder = check_model_folder(folder)
    client = connect(uri, create=True)
    experiment_id = ensure_experiment(client, experiment, uri)
    tags = lineage_from_folder(folder)
    run = client.create_run(
        experiment_id,
        run_name=tags.get("bigmodel.run_name"),
        tags={**tags, "bigmodel.source": str(folder.resolve())},
    )
    run_id = run.info.run_id
    try:
        log_metrics(client, run_id, _card_metrics(folder), step=0)
        log_model_folder(client, run_id, folder)
        client.set_terminated(run_id, "FINISHED")
        version = register_run(client, run_id, name)
    except BaseException:
        with contextlib.suppress(Exception):
            client.delete_run(run_id)
        raise
    if alias:
        promote(name, version.version, alias, uri, client=client)
    return version


def _card_metrics(folder: Path) -> dict[str, float]:
    card = json.loads((folder / "model_card.json").read_text())
    return {
        k: float(v)
        for k, v in (card.get("metrics") or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


# --------------------------------------------------------------------------------------------
# references, aliases and history


@dataclass(frozen=True)
class VersionRef:
    """``models:/name@alias`` or ``models:/name/3``."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return (
            f"models:/{self.name}@{self.alias}"
            if self.alias
            else f"models:/{self.name}/{self.version}"
        )


def parse_model_uri(text: str) -> VersionRef:
    """``models:/name@alias``, ``models:/name/3``, or the same without ``models:/``."""
    body = text[len("models:/") :] if text.startswith("models:/") else text
    if "@" in body:
        name, _, alias = body.partition("@")
        if name and alias and "/" not in alias:
            return VersionRef(name, alias=alias)
    else:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return VersionRef(name, version=version)
    raise RegistryError(
        f"{text!r} is not a model reference; use models:/NAME@ALIAS or models:/NAME/VERSION"
    )


def _get_version(client: MlflowClient, ref: VersionRef) -> ModelVersion:
    try:
        if ref.alias:
            return client.get_model_version_by_alias(ref.name, ref.alias)
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise RegistryError(
                f"{ref}: not in the registry ({err.message.splitlines()[0]})"
            ) from None
        raise


def _history(client: MlflowClient, name: str, alias: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(_HISTORY_TAG + alias, "[]"))


def promote(
    name: str, version: str | int, alias: str, uri: str, client: MlflowClient | None = None
) -> str | None:
    """Point ``name@alias`` at ``version``; returns the version it pointed at before (or None).

    The alias's history is recorded first; if moving the alias then fails, the history is put
    back, so history and alias never disagree.
    """
    client = client or connect(uri)
    version = str(version)
    _get_version(client, VersionRef(name, version=version))  # exists, or a clear error
    try:
        previous = client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        previous = None
    old = _history(client, name, alias)
    history = list(old)
    if previous is not None and (not history or history[-1] != previous):
        history.append(previous)  # the alias was moved outside bigmodel-registry
    history = [v for v in history if v != version] + [version]
    client.set_registered_model_tag(
        name, _HISTORY_TAG + alias, json.dumps(history[-_HISTORY_KEEP:])
    )
    try:
        client.set_registered_model_alias(name, alias, version)
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_registered_model_tag(name, _HISTORY_TAG + alias, json.dumps(old))
        raise
    return previous


def rollback(name: str, alias: str, uri: str, to: str | int | None = None) -> tuple[str, str]:
    """Move ``name@alias`` back to the version it pointed at before (or to ``to``).

    Returns ``(from_version, to_version)``.
    """
    client = connect(uri)
    current = _get_version(client, VersionRef(name, alias=alias)).version
    history = _history(client, name, alias)
    if to is None:
        earlier = [v for v in history if v != current]
        if not earlier:
            raise RegistryError(
                f"models:/{name}@{alias} has no earlier version to roll back to (history: "
                f"{history or [current]}); name one with --to VERSION"
            )
        target = earlier[-1]
        history = history[: history.index(target) + 1]
    else:
        target = str(to)
        _get_version(client, VersionRef(name, version=target))
        history = [v for v in history if v != target] + [target]
    client.set_registered_model_tag(name, _HISTORY_TAG + alias, json.dumps(history))
    client.set_registered_model_alias(name, alias, target)
    return current, target


# --------------------------------------------------------------------------------------------
# reading


def list_models(uri: str) -> list[dict[str, Any]]:
    """Every registered model: name, latest version, aliases, last update."""
    client = connect(uri)
    rows = []
    for model in client.search_registered_models(max_results=1000):
        versions = [int(v.version) for v in client.search_model_versions(f"name='{model.name}'")]
        rows.append(
            {
                "name": model.name,
                "versions": len(versions),
                "latest": max(versions) if versions else None,
                "aliases": dict(sorted(model.aliases.items())),
                "updated": model.last_updated_timestamp,
            }
        )
    return sorted(rows, key=lambda r: r["name"])


def model_versions(name: str, uri: str) -> list[dict[str, Any]]:
    """The versions of ``name``, newest first, with aliases, run, lineage and final metrics."""
    client = connect(uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        raise RegistryError(f"no registered model {name!r} in {uri} ({err.error_code})") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in model.aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name='{name}'"):
        metrics = {}
        if v.run_id:
            with contextlib.suppress(MlflowException):
                metrics = client.get_run(v.run_id).data.metrics
        rows.append(
            {
                "version": int(v.version),
                "aliases": sorted(aliases.get(str(v.version), [])),
                "status": v.status,
                "run_id": v.run_id,
                "created": v.creation_timestamp,
                "metrics": metrics,
                "tags": dict(v.tags),
            }
        )
    return sorted(rows, key=lambda r: -r["version"])


def lineage(ref: str | VersionRef, uri: str) -> dict[str, Any]:
    """Where a version came from: run, experiment, sweep, parent model, data, code, scale."""
    ref = parse_model_uri(ref) if isinstance(ref, str) else ref
    client = connect(uri)
    version = _get_version(client, ref)
    out: dict[str, Any] = {"model": ref.name, "version": int(version.version)}
    out["aliases"] = sorted(version.aliases)
    out["run_id"] = version.run_id
    out["source"] = version.source
    tags = dict(version.tags)
    if version.run_id:
        with contextlib.suppress(MlflowException):
            run = client.get_run(version.run_id)
            out["experiment"] = client.get_experiment(run.info.experiment_id).name
            out["run_status"] = run.info.status
            tags = {**{k: v for k, v in run.data.tags.items() if k.startswith("bigmodel.")}, **tags}
            out["metrics"] = dict(sorted(run.data.metrics.items()))
    for key in LINEAGE_TAGS:
        out[key] = tags.get(f"bigmodel.{key}")
    return out


def default_cache() -> Path:
    """``BIGMODEL_MODEL_CACHE`` or ``~/.cache/bigmodel/models``."""
    return Path(os.environ.get("BIGMODEL_MODEL_CACHE", "~/.cache/bigmodel/models")).expanduser()


def resolve_model_uri(
    model: str | Path, uri: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local model folder for ``models:/name@alias`` / ``models:/name/3`` (or a folder path).

    Registered versions are immutable, so a version is downloaded once into
    ``{cache_dir}/{store}/{name}/{version}`` (under a temporary name, renamed when complete) and
    reused; an alias is looked up every time, so a promotion takes effect at the next call.

    Args:
        model: a registry reference, or a model folder (returned as it is).
        uri: tracking URI (``MLFLOW_TRACKING_URI`` or the local default when None).
        cache_dir: where downloaded versions are kept (:func:`default_cache` when None).

    Raises:
        RegistryError: the server is down, or the model/version/alias does not exist.
    """
    if not str(model).startswith("models:/"):
        return check_model_folder(model)
    ref = parse_model_uri(str(model))
    uri = resolve_uri(uri)
    client = connect(uri, setting="MLFLOW_TRACKING_URI")
    version = _get_version(client, ref)
    store = hashlib.sha256(uri.encode()).hexdigest()[:12]
    safe_name = re.sub(r"[^A-Za-z0-9_.\-]", "_", ref.name)
    target = Path(cache_dir or default_cache()) / store / safe_name / str(version.version)
    if target.is_dir():
        return check_model_folder(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}.", dir=target.parent))
    try:
        if version.run_id and version.source.startswith(f"runs:/{version.run_id}/"):
            path = version.source[len(f"runs:/{version.run_id}/") :]
            local = client.download_artifacts(version.run_id, path, str(tmp))
        else:
            from mlflow.artifacts import download_artifacts

            local = download_artifacts(
                artifact_uri=version.source, dst_path=str(tmp), tracking_uri=uri
            )
        check_model_folder(local)
        try:
            os.replace(local, target)
        except OSError:
            if not target.is_dir():  # a concurrent download won the rename: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return check_model_folder(target)
