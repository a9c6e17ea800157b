"""MLflow tracking of a training run: a sink beside the engine's own logs, rank 0 only.

With ``tracking.enabled`` the driver checks the store before Ray starts (:func:`check_tracking`:
a server that is down or refuses the credentials is one error naming ``tracking.uri``), and each
worker runs the engine through :func:`tracked`, which on rank 0 wraps the session so that every
``report`` (the figures of a log step, and the validation figures) is also logged to an MLflow
run at its optimizer step. When training ends, rank 0 logs ``curves.png``, ``metrics.csv``,
``config.yaml`` and the model folder (as plain files under ``model/``), the lineage tags, and
registers the folder when ``tracking.register_as`` is set. ``{run}/mlflow.json`` records the run
id, so a resumed run (same name, or a Ray Train restart) continues the same MLflow run.

MLflow is imported only when tracking is on: a run with it off never loads it. A failure to log
while training is a warning, not the end of a run that may have hours of GPU time in it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigmodel.config import Config, ConfigError
from sharding.helpers import atomic_write_json

if TYPE_CHECKING:  # importing bigmodel.engine loads DeepSpeed; the driver's check needs none
    from bigmodel.engine.session import Session

__all__ = [
    "RUN_RECORD",
    "TrackedSession",
    "check_tracking",
    "log_summary_run",
    "tracked",
    "tracking_uri",
]

log = logging.getLogger(__name__)

RUN_RECORD = "mlflow.json"
"""File in the run folder naming the MLflow run (and registered version) of this run."""


def tracking_uri(cfg: Config) -> str:
    """``tracking.uri`` with ``{output_dir}`` filled in (``train.output_dir``, made absolute)."""
    return cfg.tracking.uri.replace(
        "{output_dir}", str(Path(cfg.train.output_dir).expanduser().resolve())
    )


def check_tracking(cfg: Config) -> str:
    """On the driver, before Ray starts: the store answers and the experiment exists.

    Returns the experiment id.

    Raises:
        ConfigError: one line naming ``tracking.uri`` when the server is down or refuses the
            credentials, or the experiment cannot be created there.
    """
    from mlflow.exceptions import MlflowException

    from bigmodel.registry import store  # loads mlflow: only when tracking is on

    uri = tracking_uri(cfg)
    try:
        client = store.connect(uri, setting="tracking.uri", create=True)
        return store.ensure_experiment(client, cfg.tracking.experiment, uri)
    except store.RegistryError as err:
        raise ConfigError(str(err)) from None
    except MlflowException as err:
        first = str(err.message).splitlines()[0]
        raise ConfigError(
            f"tracking.experiment={cfg.tracking.experiment!r} at tracking.uri={uri}: {first}"
        ) from None


def log_summary_run(
    cfg: Config, name: str, metrics: dict[str, float], files: list[Path], tags: dict[str, str]
) -> str:
    """One finished MLflow run holding a summary (e.g. cross-validation mean ± std); its id."""
    from bigmodel.registry import store  # loads mlflow: only when tracking is on

    uri = tracking_uri(cfg)
    client = store.connect(uri, setting="tracking.uri", create=True)
    experiment_id = store.ensure_experiment(client, cfg.tracking.experiment, uri)
    run_id = client.create_run(
        experiment_id, run_name=name, tags={**cfg.tracking.tags, **tags}
    ).info.run_id
    store.log_metrics(client, run_id, metrics, step=0)
    for path in files:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}`` (MLflow params are flat strings)."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(data) if isinstance(data, list | dict) else str(data)}


class TrackedSession:
    """A :class:`~bigmodel.engine.session.Session` that also logs reports to an MLflow run.

    Used on rank 0 only; everything the engine asks of a session goes to ``inner`` unchanged.
    """

    def __init__(self, inner: Session, cfg: Config) -> None:
        from mlflow.entities import Param

        from bigmodel.registry import store  # loads mlflow: only when tracking is on

        self.inner = inner
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        self.run_dir = Path(cfg.train.output_dir) / cfg.name
        self.client = store.connect(self.uri, setting="tracking.uri", create=True)
        experiment_id = store.ensure_experiment(self.client, cfg.tracking.experiment, self.uri)
        self.run_id = self._resumable_run()
        logged: dict[str, str] = {}
        if self.run_id is None:
            tags = {"bigmodel.run_dir": str(self.run_dir), **cfg.tracking.tags}
            if "sweep" in cfg.tracking.tags:
                tags["bigmodel.sweep"] = cfg.tracking.tags["sweep"]
            run = self.client.create_run(experiment_id, run_name=cfg.name, tags=tags)
            self.run_id = run.info.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
        self._write_record({"run_id": self.run_id, "uri": self.uri, "experiment_id": experiment_id})
        # MLflow refuses to change a logged param: a resumed run logs only the new ones.
        params = [Param(k, v[:6000]) for k, v in _flatten(cfg.to_dict()).items() if k not in logged]
        for start in range(0, len(params), 100):  # at most 100 params per request
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self._warned = False

    # --- the Session interface, delegated
    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def local_rank(self) -> int:
        return self.inner.local_rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def latest_checkpoint(self) -> str | None:
        return self.inner.latest_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Report to the runner, then log the numeric figures at their optimizer step."""
        self.inner.report(metrics, checkpoint_dir)
        from bigmodel.registry.store import log_metrics

        figures = {
            k: float(v)
            for k, v in metrics.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        try:
            log_metrics(self.client, self.run_id, figures, step=int(metrics.get("step", 0)))
        except Exception as err:  # the run goes on; the figures stay in metrics.csv
            if not self._warned:
                log.warning(
                    "MLflow: logging metrics to %s failed (%s); training goes on", self.uri, err
                )
                self._warned = True

    # --- the end of the run
    def finish(self, status: str, seconds: float) -> None:
        """Log files, lineage and the model folder; register it; close the MLflow run."""
        from bigmodel.registry import store, versions

        record: dict[str, Any] = {"run_id": self.run_id, "uri": self.uri}
        try:
            for name in ("curves.png", "metrics.csv", "config.yaml"):
                if (self.run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.run_dir / name))
            model_dir = self.run_dir / "model"
            if status == "FINISHED" and model_dir.is_dir():
                tags = store.lineage_from_folder(model_dir, seconds, self.world_size)
                for key, value in tags.items():
                    self.client.set_tag(self.run_id, key, value)
                store.log_model_folder(self.client, self.run_id, model_dir)
            self.client.set_terminated(self.run_id, status)
            name = self.cfg.tracking.register_as
            if status == "FINISHED" and name and model_dir.is_dir():
                version = versions.register_run(self.client, self.run_id, name)
                record["registered"] = f"models:/{name}/{version.version}"
        except Exception as err:
            record["error"] = f"{type(err).__name__}: {err}"
            log.error("MLflow: finishing run %s at %s failed: %s", self.run_id, self.uri, err)
            with contextlib.suppress(Exception):
                self.client.set_terminated(self.run_id, "FAILED")
        self._write_record(record)

    def _resumable_run(self) -> str | None:
        """The run id recorded by an earlier attempt of this run against the same store."""
        path = self.run_dir / RUN_RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("uri") != self.uri:
            return None
        try:
            run = self.client.get_run(record["run_id"])
        except Exception:
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def _write_record(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.run_dir / RUN_RECORD, record, indent=1)


@contextlib.contextmanager
def tracked(cfg: Config, session: Session) -> Iterator[Session]:
    """``session``, wrapped in a :class:`TrackedSession` on rank 0 when tracking is on.

    On leaving, the MLflow run is finished (``FINISHED``, or ``FAILED`` with the exception
    propagating).
    """
    if not cfg.tracking.enabled or session.rank != 0:
        yield session
        return
    try:
        run = TrackedSession(session, cfg)
    except Exception as err:  # the driver's check passed: train anyway, say so in mlflow.json
        log.error(
            "MLflow: cannot open a run at %s (%s); training without tracking", cfg.tracking.uri, err
        )
        record = {"uri": tracking_uri(cfg), "error": f"no MLflow run: {type(err).__name__}: {err}"}
        path = Path(cfg.train.output_dir) / cfg.name / RUN_RECORD
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        yield session
        return
    started = time.perf_counter()
    try:
        yield run
    except BaseException:
        run.finish("FAILED", time.perf_counter() - started)
        raise
    run.finish("FINISHED", time.perf_counter() - started)
