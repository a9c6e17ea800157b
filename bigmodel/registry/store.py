"""The MLflow store: connecting, experiments, model folders as artifacts, lineage tags.

What MLflow registers is the model folder itself (``model.safetensors``, ``config.yaml``,
``preprocessing.json``, ``model_card.json``), logged as plain run artifacts under ``model/``:
no pickled Python class ever enters the registry, and ``bigmodel.model_folder.load_model`` reads
a downloaded version exactly as it reads a run's ``model/`` folder.

*Lineage* is what made a model: its run, sweep, parent model, the dataset manifest's sha256, the
git commit, world size and training time; :func:`lineage_from_folder` reads it from a folder's
card and config as ``bigmodel.*`` tags, which :mod:`bigmodel.registry.versions` copies from the
run to the version when the version is created.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

__all__ = [
    "DEFAULT_URI",
    "LINEAGE_TAGS",
    "MODEL_ARTIFACT",
    "MODEL_FILES",
    "RegistryError",
    "check_model_folder",
    "connect",
    "ensure_experiment",
    "lineage_from_folder",
    "local_artifact_root",
    "log_metrics",
    "log_model_folder",
    "resolve_uri",
]


DEFAULT_URI = "sqlite:///{output_dir}/mlflow.db"
"""Embedded default (``tracking.uri``): a SQLite store beside the runs, artifacts next to it."""
MODEL_ARTIFACT = "model"
"""Artifact folder of a run that holds the model folder."""
MODEL_FILES = ("model.safetensors", "config.yaml", "preprocessing.json", "model_card.json")
"""Files a model folder must have to be registered or returned from the cache."""
LINEAGE_TAGS = (
    "run_name",
    "sweep",
    "parent_model",
    "manifest_sha256",
    "dataset",
    "git_commit",
    "world_size",
    "training_time_s",
    "train_split",
    "val_split",
)
"""Lineage fields, stored as ``bigmodel.<field>`` tags on runs and model versions."""


class RegistryError(ValueError):
    """The registry or tracking server cannot do what was asked; the message names the setting.

    A ``ValueError`` like the project's other input errors, so every CLI that takes a
    ``models:/`` reference prints it as one line and exits 2.
    """


# --------------------------------------------------------------------------------------------
# connecting


def resolve_uri(uri: str | None = None, output_dir: str | Path = "runs") -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else the local default.

    ``{output_dir}`` in the URI is replaced by the absolute ``output_dir`` (``train.output_dir``
    in a run, ``./runs`` on the command line).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    return uri.replace("{output_dir}", str(Path(output_dir).expanduser().resolve()))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def local_artifact_root(uri: str) -> str | None:
    """``{folder of the SQLite file}/mlartifacts`` as a file URI for a local store, else None.

    MLflow would otherwise put a SQLite store's artifacts in ``./mlruns`` of whatever folder the
    process happens to run in; a server decides for itself (``--artifacts-destination``).
    """
    path = _sqlite_path(uri)
    return (path.parent / "mlartifacts").as_uri() if path is not None else None


def _check_server(uri: str, setting: str, timeout: float) -> None:
    """One request without retries: a down server or refused credentials fail in seconds.

    MLflow's own client retries with exponential back-off for minutes before giving up; this
    check uses its request function (same credentials: ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``,
    ``MLFLOW_TRACKING_TOKEN``) with retries off.
    """
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/get-by-name",
            "GET",
            max_retries=0,
            timeout=timeout,
            params={"experiment_name": "Default"},
        )
    except Exception as err:  # requests' connection errors arrive wrapped in MlflowException
        reason = "connection refused" if "refused" in str(err).lower() else type(err).__name__
        raise RegistryError(
            f"MLflow tracking server at {uri} is not reachable ({setting}={uri}: {reason}); "
            f"start the server or fix {setting}"
        ) from None
    if response.status_code in (401, 403):
        raise RegistryError(
            f"MLflow tracking server at {uri} refused the credentials (HTTP "
            f"{response.status_code}, {setting}={uri}); set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    if response.status_code not in (200, 404):
        raise RegistryError(
            f"MLflow tracking server at {uri} answered HTTP {response.status_code} "
            f"({setting}={uri}); is it an MLflow server?"
        )


def connect(
    uri: str, setting: str = "--uri", create: bool = False, timeout: float = 10.0
) -> MlflowClient:
    """A client for ``uri`` (tracking and registry), checked before anything is written.

    Args:
        uri: a resolved tracking URI (:func:`resolve_uri`).
        setting: the option or config field the URI came from, named in errors.
        create: a local SQLite store may be created (training); reading commands refuse a
            store that does not exist rather than creating an empty one.
        timeout: seconds for the reachability check of a server.

    Raises:
        RegistryError: the server is down or refuses the credentials, or the local store is
            missing.
    """
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri, setting, timeout)
    elif scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None:
            raise RegistryError(f"{setting}={uri}: use sqlite:////absolute/path/mlflow.db")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise RegistryError(
                f"no MLflow store at {path} ({setting}={uri}); train with "
                f"tracking.enabled=true first, or point {setting} at your MLflow server"
            )
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (artifacts beside a local store) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_root(uri))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
            raise
        return client.get_experiment_by_name(name).experiment_id


# --------------------------------------------------------------------------------------------
# model folders and lineage


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` as a Path; an error naming the first missing file when it is no model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegistryError(f"{folder}: no such model folder (a run's model/ folder)")
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise RegistryError(
                f"{folder / name}: missing; a model folder holds {', '.join(MODEL_FILES)} "
                f"(bigmodel-train writes one into {{run}}/model)"
            )
    try:
        json.loads((folder / "model_card.json").read_text())
    except (OSError, ValueError) as err:
        raise RegistryError(f"{folder / 'model_card.json'}: not readable JSON ({err})") from None
    return folder


def lineage_from_folder(
    folder: str | Path, training_time_s: float | None = None, world_size: int | None = None
) -> dict[str, str]:
    """Lineage tags (``bigmodel.*``) from a model folder's card and resolved config."""
    folder = Path(folder)
    card = json.loads((folder / "model_card.json").read_text())
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    data, cluster = cfg.get("data", {}), cfg.get("cluster", {})
    values = {
        "run_name": cfg.get("name") or card.get("name"),
        "sweep": (cfg.get("tracking", {}).get("tags") or {}).get("sweep"),
        "parent_model": card.get("parent_model")
        or cfg.get("model", {}).get("backbone", {}).get("pretrained"),
        "manifest_sha256": card.get("dataset_manifest_sha256"),
        "dataset": card.get("dataset_manifest") or data.get("shards"),
        "git_commit": card.get("git_commit"),
        "world_size": world_size or card.get("world_size") or cluster.get("num_workers"),
        "training_time_s": training_time_s or card.get("training_time_s"),
        "train_split": data.get("train_split"),
        "val_split": data.get("val_split"),
    }
    out = {}
    for key, value in values.items():
        if value is not None:
            out[f"bigmodel.{key}"] = f"{value:.1f}" if isinstance(value, float) else str(value)
    return out


# --------------------------------------------------------------------------------------------
# logging


def log_model_folder(client: MlflowClient, run_id: str, folder: str | Path) -> None:
    """Upload a model folder as the run's ``model/`` artifacts (plain files, no pyfunc)."""
    client.log_artifacts(run_id, str(check_model_folder(folder)), MODEL_ARTIFACT)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric figures at ``step`` in batches (MLflow takes at most 1000 per request)."""
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    now = get_current_time_millis()
    items = [Metric(_metric_key(k), float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start : start + 1000], synchronous=True)


def _metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . / `` and space; anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)
