"""Intensity preprocessing per modality: CT clipped (foreground percentiles or a window), MR
z-scored per image, unfit schemes refused before any work, statistics written by sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigmodel.config import ConfigError
from bigmodel.data.intensity import IntensitySpec, apply_intensity, intensity_spec
from sharding._stats import ChannelStats

CT_MANIFEST = {
    "image": {"modality": "CT", "channels": 1},
    "stats": {
        "mean": [-400.0],
        "std": [500.0],
        "p0_5": [-1024.0],
        "p99_5": [1200.0],
        "foreground": {"mean": [50.0], "std": [25.0], "p0_5": [-20.0], "p99_5": [150.0]},
    },
}


def test_ct_is_clipped_to_the_foreground_percentiles_then_z_scored():
    spec = intensity_spec("auto", CT_MANIFEST)
    assert spec.scheme == "ct" and spec.low == (-20.0,) and spec.high == (150.0,)
    hu = torch.tensor([[[-1000.0, -20.0, 50.0, 150.0, 3000.0]]])
    out = apply_intensity(hu, spec)
    # air and metal land on the clip bounds, not 40 standard deviations away
    torch.testing.assert_close(out, torch.tensor([[[-2.8, -2.8, 0.0, 4.0, 4.0]]]))
    # the old scheme (dataset z-score over every pixel, air included) squeezes soft tissue
    dataset = apply_intensity(hu, intensity_spec("dataset", CT_MANIFEST))
    assert float(dataset[0, 0, 3] - dataset[0, 0, 1]) < 0.4


def test_ct_window_named_and_from_dicom():
    named = intensity_spec("ct_window:brain", CT_MANIFEST)  # 40 / 80 HU
    out = apply_intensity(torch.tensor([[[-1000.0, 0.0, 40.0, 80.0, 500.0]]]), named)
    torch.testing.assert_close(out, torch.tensor([[[-1.0, -1.0, 0.0, 1.0, 1.0]]]))
    own = intensity_spec("ct_window", CT_MANIFEST)
    window = {"center": 40.0, "width": 400.0}  # as sharding/readers/dicom.py records it
    out = apply_intensity(torch.tensor([[[-160.0, 40.0, 240.0]]]), own, window)
    torch.testing.assert_close(out, torch.tensor([[[-1.0, 0.0, 1.0]]]))
    with pytest.raises(ValueError, match="has none"):
        apply_intensity(torch.zeros(1, 2, 2), own, None)
    custom = intensity_spec("ct_window:100,200", CT_MANIFEST)
    assert custom.low == (0.0,) and custom.high == (200.0,)


def test_mr_z_scores_each_image_alone():
    spec = intensity_spec("auto", {"image": {"modality": "MR"}, "stats": {}})
    assert spec.scheme == "mr"
    images = torch.stack([torch.rand(2, 8, 8) * 100, torch.rand(2, 8, 8) * 5000 + 7])
    out = apply_intensity(images, spec)
    mean, std = out.mean(dim=(-2, -1)), out.std(dim=(-2, -1), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(2, 2), atol=1e-4, rtol=0)
    assert intensity_spec("auto", {"image": {"modality": "T2+FLAIR"}}).scheme == "mr"


def test_unfit_schemes_fail_before_work():
    mr = {"image": {"modality": "MR"}, "stats": {"mean": [1.0], "std": [1.0]}}
    with pytest.raises(ConfigError, match=r"ct clips Hounsfield units but x.json holds MR"):
        intensity_spec("ct", mr, "x.json")
    with pytest.raises(ConfigError, match=r"mr z-scores each image alone but .* holds CT"):
        intensity_spec("mr", CT_MANIFEST)
    rescaled = {"image": {"modality": ""}, "stats": {"p0_5": [0.0], "p99_5": [255.0]}}
    with pytest.raises(ConfigError, match=r"0.5th percentile of 0 \(no air"):
        intensity_spec("ct_window:lung", rescaled)
    with pytest.raises(ConfigError, match=r"allowed: auto, ct"):
        intensity_spec("zscore", CT_MANIFEST)
    with pytest.raises(ConfigError, match=r"unknown window"):
        intensity_spec("ct_window:liverish", CT_MANIFEST)
    assert intensity_spec("none", mr).scheme == "none"


def test_spec_round_trips_through_json():
    spec = intensity_spec("ct", CT_MANIFEST)
    assert IntensitySpec.from_dict(spec.to_dict()) == spec


def test_sharding_records_foreground_statistics():
    stats = ChannelStats(1)
    image = np.full((1, 10, 10), -1000.0)  # air
    image[0, 2:6, 2:6] = 40.0  # labelled organ
    mask = np.zeros((10, 10), np.uint8)
    mask[2:6, 2:6] = 1
    stats.add_image("k", image, mask)
    summary = ChannelStats.from_state(stats.to_state()).summary()
    assert summary["foreground"]["mean"] == [40.0] and summary["foreground"]["std"] == [0.0]
    assert summary["mean"][0] < -800 and summary["image_size"] == {"min": [10, 10], "max": [10, 10]}


@pytest.mark.parametrize("scheme", ["ct", "ct_window:brain", "ct_window", "dataset", "mr", "none"])
def test_inspect_preview_matches_the_training_transform(scheme):
    from sharding.inspection import preview_intensity

    values = np.random.default_rng(0).normal(-200, 600, size=200)
    window = {"center": 40.0, "width": 400.0}
    spec = intensity_spec(scheme, CT_MANIFEST) if scheme != "mr" else IntensitySpec("mr")
    want = apply_intensity(torch.from_numpy(values).view(1, 1, -1), spec, window).view(-1)
    got = preview_intensity(values, scheme, CT_MANIFEST, window)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_inspect_writes_the_histogram_png(tmp_path):
    from test_slice_labels import _build, _source

    from sharding import cli

    _build(_source(tmp_path), tmp_path / "out")
    png = tmp_path / "hist.png"
    argv = ["inspect", str(tmp_path / "out"), "--histogram", str(png), "--intensity", "dataset"]
    assert cli.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
