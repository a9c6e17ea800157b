"""``bigmodel-predict --ray``: Ray Data actors write the same files as the single-process path.

A tiny classification + segmentation model is trained in-process on generated shards; three
real scikit-learn digits (PNG) and one corrupt PNG are predicted once by
``bigmodel.inference.predict`` and once through ``launch.predict --ray`` (an embedded Ray in a
subprocess, two actors). The label maps must be byte-identical and the JSON summaries equal; the
corrupt input is reported without stopping the others.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN
from PIL import Image
from sklearn.datasets import load_digits
from test_data_pipeline import write_dataset

from bigmodel.config import config_from_dict
from bigmodel.engine import LocalSession, train
from bigmodel.inference.predict import main as predict_main

TASKS = {
    "cls": {"type": "multiclass", "classes": ["normal", "lesion"]},
    "mask": {"classes": ["background", "organ", "lesion"]},
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict-ray")
    write_dataset(root / "shards", {"train": [6, 6], "val": [4]}, size=32, tasks=TASKS)
    cfg = config_from_dict(
        {
            "name": "tiny",
            "data": {"shards": str(root / "shards"), "image_size": 32, "batch_size": 4},
            "model": {
                "backbone": {"name": "test_resnet"},
                "heads": {
                    "diag": {"type": "classification", "target": "cls"},
                    "seg": {"type": "segmentation", "target": "mask", "decoder_channels": 8},
                },
            },
            "train": {"epochs": 1, "steps_per_epoch": 1, "output_dir": str(root / "runs")},
        }
    ).model_copy(deep=True)
    cfg.data.loader_workers = 0
    train(cfg, LocalSession())
    return root / "runs" / "tiny" / "model"


def _inputs(folder: Path) -> list[str]:
    folder.mkdir()
    digits = load_digits()
    paths = []
    for i in range(3):
        pix = np.kron(digits.images[i] * 15, np.ones((5, 5))).astype(np.uint8)  # 40x40
        Image.fromarray(pix).save(folder / f"digit{i}.png")
        paths.append(str(folder / f"digit{i}.png"))
    (folder / "broken.png").write_bytes(b"not a png")
    return [*paths, str(folder / "broken.png")]


def _comparable(path: Path) -> dict:
    summary = json.loads(path.read_text())
    summary.pop("seconds", None)
    summary.pop("summary_file", None)
    for head in summary["heads"].values():
        if "output" in head:
            head["output"] = Path(head["output"]).name
    return summary


@pytest.mark.ray
def test_ray_data_actors_write_what_the_single_process_path_writes(model, tmp_path, capsys):
    inputs = _inputs(tmp_path / "inputs")
    assert predict_main([str(model), *inputs, "--out", str(tmp_path / "plain")]) == 2
    assert "broken.png" in capsys.readouterr().err

    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    cmd = [str(BIN / "python"), "-m", "launch.predict", str(model), *inputs]
    cmd += ["--out", str(tmp_path / "ray"), "--ray", "--actors", "2", "--files-per-call", "1"]
    done = subprocess.run(
        cmd,
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "3 of 4 input(s) predicted" in done.stdout
    assert "broken.png" in done.stderr

    plain = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert plain == sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert len([n for n in plain if n.endswith(".json")]) == 3
    for name in plain:
        a, b = tmp_path / "plain" / name, tmp_path / "ray" / name
        if name.endswith(".json"):
            assert _comparable(a) == _comparable(b), name
        else:
            assert a.read_bytes() == b.read_bytes(), name
