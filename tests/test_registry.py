"""MLflow tracking and the Model Registry against a real ``mlflow server`` process.

The server (SQLite backend, proxied artifacts, a free port, a temporary folder) is started once
for the module and killed at the end. A real training run (tiny shards, ``test_resnet``) goes
through the same ``tracked`` wrapper that every Ray Train worker uses, logs to the server and
registers its model folder; the registry commands then promote, roll back and resolve it, and
the last test stops the server and checks the error says so.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, clean_env, free_port
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import load_file
from test_data_pipeline import write_dataset

from bigmodel.config import ConfigError, config_from_dict
from bigmodel.engine import LocalSession, train
from bigmodel.inference.predict import main as predict_main
from bigmodel.model_folder import file_sha256, load_model
from bigmodel.registry import store, versions
from bigmodel.registry.cli import main as registry_main
from bigmodel.registry.tracking import RUN_RECORD, check_tracking, tracked

TASKS = {"cls": {"type": "multiclass", "classes": ["normal", "lesion"]}}


class MlflowServer:
    """``mlflow server`` in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        cmd = [
            str(BIN / "mlflow"),
            "server",
            f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
            f"--artifacts-destination={root / 'artifacts'}",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--workers=1",
        ]
        # no background job runner (7 huey processes the registry does not need)
        env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(key, None)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.log.read_text()[-3000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not come up:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the server's process group, then SIGKILL to whatever is left of it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, {"train": [6, 6], "val": [5]}, size=32, tasks=TASKS)
    return root


def _config(shards: Path, out: Path, name: str, uri: str, **tracking):
    return config_from_dict(
        {
            "name": name,
            "seed": 1,
            "data": {"shards": str(shards), "image_size": 32, "batch_size": 4, "loader_workers": 0},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {"diag": {"type": "classification", "target": "cls"}},
            },
            "optim": {"lr": 0.003, "lr_scaling": "none"},
            "train": {"epochs": 1, "steps_per_epoch": 3, "log_every": 1, "output_dir": str(out)},
            "tracking": {"enabled": True, "uri": uri, "experiment": "tests", **tracking},
        }
    )


@pytest.fixture(scope="module")
def trained(server, shards, tmp_path_factory):
    """Two tracked training runs, each registered as a version of ``tiny``."""
    out = tmp_path_factory.mktemp("runs")
    runs = []
    for name in ("first", "second"):
        cfg = _config(shards, out, name, server.uri, register_as="tiny", tags={"sweep": "s1"})
        check_tracking(cfg)
        with tracked(cfg, LocalSession()) as session:
            train(cfg, session)
        runs.append(out / name)
    return runs


def test_training_run_logs_params_metrics_files_and_lineage(server, shards, trained):
    record = json.loads((trained[0] / RUN_RECORD).read_text())
    assert record["registered"] == "models:/tiny/1" and "error" not in record
    client = MlflowClient(server.uri, server.uri)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.003"
    assert run.data.params["model.backbone.name"] == "test_resnet"
    # one loss value per optimizer step (log_every=1), and the validation figures
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert steps == [1, 2, 3]
    assert "val/diag/accuracy" in run.data.metrics
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "metrics.csv", "config.yaml", "model"} <= files
    model_files = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"model.safetensors", "config.yaml", "model_card.json"} <= model_files
    assert not any(name.endswith(".pkl") for name in model_files)  # no pickled classes

    info = versions.lineage("models:/tiny/1", server.uri)
    assert info["run_id"] == run.info.run_id and info["experiment"] == "tests"
    assert info["manifest_sha256"] == file_sha256(shards / "dataset.json")
    assert info["world_size"] == "1" and info["sweep"] == "s1"
    assert info["git_commit"] and float(info["training_time_s"]) > 0


def test_promote_rollback_and_resolve_through_the_server(server, trained, tmp_path, capsys):
    uri = ["--uri", server.uri]
    assert registry_main([*uri, "promote", "tiny", "1", "--alias", "production"]) == 0
    assert registry_main([*uri, "promote", "tiny", "2", "--alias", "production"]) == 0
    cache = tmp_path / "cache"
    folder = versions.resolve_model_uri("models:/tiny@production", server.uri, cache)
    assert folder.parent.name == "tiny" and folder.name == "2"
    second = load_file(str(trained[1] / "model" / "model.safetensors"))
    for key, value in load_file(str(folder / "model.safetensors")).items():
        torch.testing.assert_close(value, second[key], rtol=0, atol=0)

    assert registry_main([*uri, "rollback", "tiny", "--alias", "production"]) == 0
    assert "version 2 -> 1" in capsys.readouterr().out
    folder = versions.resolve_model_uri("models:/tiny@production", server.uri, cache)
    assert folder.name == "1"
    loaded = load_model(folder)  # the downloaded version loads like a run's model folder
    first = load_file(str(trained[0] / "model" / "model.safetensors"))
    state = loaded.model.state_dict()
    for key, value in first.items():
        torch.testing.assert_close(state[key].cpu(), value, rtol=0, atol=0)
    # nothing earlier than version 1 to roll back to: a one-line error, exit code 2
    assert registry_main([*uri, "rollback", "tiny", "--alias", "production"]) == 2
    assert "no earlier version" in capsys.readouterr().err

    assert registry_main([*uri, "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "@production=1" in out
    assert registry_main([*uri, "show", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "@production" in out and "diag/accuracy" in out
    assert registry_main([*uri, "lineage", "models:/tiny@production"]) == 0
    assert "manifest_sha256" in capsys.readouterr().out


def test_predict_loads_models_alias_through_the_server(server, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("BIGMODEL_MODEL_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(image)
    assert (
        predict_main(["models:/tiny@production", str(image), "--out", str(tmp_path / "out")]) == 0
    )
    summary = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert summary["model"].startswith(str(tmp_path / "cache"))
    assert set(summary["heads"]["diag"]["probabilities"]) == {"normal", "lesion"}


def test_register_a_folder_and_refuse_a_broken_one(server, trained, tmp_path, capsys):
    uri = ["--uri", server.uri]
    model = trained[0] / "model"
    assert (
        registry_main([*uri, "register", str(model), "--name", "copy", "--alias", "staging"]) == 0
    )
    assert "models:/copy/1 as @staging" in capsys.readouterr().out
    client = MlflowClient(server.uri, server.uri)
    runs_before = len(client.search_runs([client.get_experiment_by_name("bigmodel").experiment_id]))

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "model_card.json"):
        (broken / name).write_bytes((model / name).read_bytes())
    assert registry_main([*uri, "register", str(broken), "--name", "broken"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: missing" in err and len(err.strip().splitlines()) == 1
    # nothing half-written: no registered model, no new run
    assert [m.name for m in client.search_registered_models()] == ["copy", "tiny"]
    experiment = client.get_experiment_by_name("bigmodel").experiment_id
    assert len(client.search_runs([experiment])) == runs_before


def test_tracking_off_never_imports_mlflow():
    """The tracking hooks load MLflow only when tracking is on.

    (Importing MONAI, which bigmodel.models.window does, imports MLflow by itself; this
    checks the hooks that bigmodel-train adds: the config, ``tracked`` and the fold driver.)
    """
    code = """
import sys
from bigmodel.config import config_from_dict
from bigmodel.registry.tracking import tracked
import launch._folds
class Session:
    rank = 0
cfg = config_from_dict({"model": {"heads": {"d": {"type": "classification"}}}})
with tracked(cfg, Session()) as session:
    assert isinstance(session, Session)
sys.exit(1 if "mlflow" in sys.modules else 0)
"""
    assert (
        subprocess.run([sys.executable, "-c", code], env=clean_env(), timeout=120).returncode == 0
    )


def test_stopped_server_is_one_clear_error(server, shards, tmp_path, capsys, monkeypatch):
    server.stop()
    cfg = _config(shards, tmp_path, "down", server.uri)
    with pytest.raises(ConfigError) as err:
        check_tracking(cfg)
    message = str(err.value)
    assert "not reachable" in message and f"tracking.uri={server.uri}" in message
    assert len(message.splitlines()) == 1
    assert registry_main(["--uri", server.uri, "list"]) == 2
    err_line = capsys.readouterr().err.strip()
    assert "not reachable" in err_line and server.uri in err_line and "\n" not in err_line
    with pytest.raises(store.RegistryError, match="not reachable"):
        versions.resolve_model_uri("models:/tiny@production", server.uri, tmp_path / "c")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    assert (
        predict_main(
            ["models:/tiny@production", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    err_line = capsys.readouterr().err.strip()
    assert "not reachable" in err_line and "\n" not in err_line
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_refused_credentials_are_one_clear_error(shards, tmp_path):
    """A server answering 401 (MLflow's basic-auth app needs Flask-WTF, absent here)."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{httpd.server_port}"
        with pytest.raises(ConfigError) as err:
            check_tracking(_config(shards, tmp_path, "refused", uri))
        message = str(err.value)
        assert "refused the credentials (HTTP 401" in message and f"tracking.uri={uri}" in message
        assert "MLFLOW_TRACKING_USERNAME" in message and len(message.splitlines()) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_worker_that_cannot_reach_mlflow_trains_untracked(shards, tmp_path):
    """The driver's check passed but the server went away: training goes on, mlflow.json says so."""
    cfg = _config(shards, tmp_path, "lost", f"http://127.0.0.1:{free_port()}")
    session = LocalSession()
    with tracked(cfg, session) as inside:
        assert inside is session
    record = json.loads((tmp_path / "lost" / RUN_RECORD).read_text())
    assert "not reachable" in record["error"]


def test_register_as_needs_tracking_on(shards, tmp_path):
    with pytest.raises(ConfigError, match="tracking.register_as needs tracking.enabled=true"):
        config_from_dict(
            {
                **_config(shards, tmp_path, "x", "sqlite:///x.db").to_dict(),
                "tracking": {"register_as": "m"},
            }
        )
