"""bigmodel-train's driver-side checks: one line on stderr and exit 2, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import launch.train

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def shards(demo_shards) -> Path:
    """The session's demo shards (conftest.py): tasks cls and mask."""
    return demo_shards


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    """Fail the test if bigmodel-train gets as far as starting (or joining) Ray."""

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started although the preflight should have refused")

    monkeypatch.setattr(launch.train, "connect", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return [f"train.output_dir={tmp_path / 'runs'}"]


def _refused(capsys, argv: list[str]) -> str:
    assert launch.train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bigmodel-train: ")
    return err[0]


def test_missing_shards_folder(capsys, no_ray, tmp_path):
    line = _refused(capsys, [DEMO, f"data.shards={tmp_path / 'nowhere'}", *no_ray])
    assert "data.shards=" in line and "no such folder" in line and "bigmodel-shard build" in line


def test_unknown_backbone_names_close_timm_models(capsys, no_ray, shards):
    line = _refused(
        capsys, [DEMO, f"data.shards={shards}", "model.backbone.name=resnet181", *no_ray]
    )
    assert "model.backbone.name='resnet181' is not a timm model" in line
    assert "resnet18" in line  # a close name to pick


def test_missing_pretrained_file(capsys, no_ray, shards, tmp_path):
    weights = tmp_path / "weights" / "resnet18.safetensors"
    line = _refused(
        capsys, [DEMO, f"data.shards={shards}", f"model.backbone.pretrained={weights}", *no_ray]
    )
    assert "backbone.pretrained=" in line and "no such file or folder" in line


def test_pretrained_weights_of_another_architecture(capsys, no_ray, shards, tmp_path):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("test_resnet").state_dict()  # the demo's backbone is resnet18
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    argv = [DEMO, f"data.shards={shards}", f"model.backbone.pretrained={tmp_path}", *no_ray]
    line = _refused(capsys, argv)
    assert "w.safetensors' does not fit timm model 'resnet18'" in line and "missing" in line


def test_head_target_absent_from_the_manifest(capsys, no_ray, shards):
    argv = [DEMO, f"data.shards={shards}", "model.heads.lesions={type: detection}", *no_ray]
    line = _refused(capsys, argv)
    assert "model.heads.lesions.target is 'boxes'" in line and "no such task" in line


def test_missing_validation_split_says_how_to_fix(capsys, no_ray, shards):
    line = _refused(capsys, [DEMO, f"data.shards={shards}", "data.val_split=valid", *no_ray])
    assert "no split 'valid'" in line and "train.eval_every=0" in line


def test_several_problems_one_line_each(capsys, no_ray, tmp_path):
    argv = [DEMO, f"data.shards={tmp_path / 'x'}", "model.backbone.name=nonet", *no_ray]
    assert launch.train.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert "nonet" in lines[0] and "data.shards=" in lines[1]


def test_cli_exit_status_and_stderr_are_one_line(tmp_path):
    """The installed console script, as a user runs it: exit 2, one line, no Ray process."""
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "bigmodel-train"),
            DEMO,
            f"data.shards={tmp_path / 'missing'}",
            f"train.output_dir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "runs").exists()
