"""Smoke test of benchmarks/quality.py: the quick mode runs end to end and prints its table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import quality


def test_phantoms_are_consistent() -> None:
    """Boxes are the tight boxes of the lesion pixels; lesions lie inside the body."""
    images, masks, boxes = quality.make_phantoms(6, 48, seed=3)
    assert images.shape == (6, 1, 48, 48) and masks.shape == (6, 48, 48)
    assert set(np.unique(masks.numpy())) <= {0, 1, 2}
    assert sum(len(b["boxes"]) for b in boxes) > 0
    for mask, target in zip(masks, boxes, strict=True):
        covered = torch.zeros_like(mask, dtype=torch.bool)
        for x1, y1, x2, y2 in target["boxes"].long().tolist():
            assert (mask[y1:y2, x1:x2] == 2).any()
            covered[y1:y2, x1:x2] = True
        assert not ((mask == 2) & ~covered).any()  # every lesion pixel is inside a box
        assert target["labels"].eq(0).all()


def test_digits_split_is_stratified_and_normalised() -> None:
    x_train, y_train, x_test, y_test = quality.digits_split(size=16, seed=0)
    assert x_train.shape[1:] == (1, 16, 16) and len(x_train) + len(x_test) == 1797
    assert abs(float(x_train.mean())) < 1e-3
    assert torch.bincount(y_test, minlength=10).min() >= 40


@pytest.mark.timeout(300)
def test_quick_run_prints_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert quality.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for needle in ("accuracy", "dice_mean", "mAP@.5", "target", "wall s", "digits", "phantoms"):
        assert needle in out
    rows = [line for line in out.splitlines() if line.startswith(("digits (", "phantoms ("))]
    assert len(rows) >= 4
    for row in rows:
        value = float(row.split()[-4])
        assert 0.0 <= value <= 1.0 or np.isnan(value)


def test_quick_run_fails_on_a_broken_score(monkeypatch, capsys) -> None:
    """The smoke run's exit status means something: a NaN score (a diverged or empty
    evaluation) makes it 1."""
    nan = [quality.Row("digits (stub)", "accuracy", float("nan"), 0.97, 0.0)]
    monkeypatch.setattr(quality, "bench_digits", lambda quick, seed: nan)
    monkeypatch.setattr(quality, "bench_phantoms", lambda quick, seed: [])
    assert quality.main(["--quick"]) == 1
    assert "BROKEN: digits (stub) accuracy = nan" in capsys.readouterr().out
