"""Intensity preprocessing per modality: CT clipped (foreground percentiles or a window), MR
z-scored per volume (the same numbers on every slice of a scan), unfit schemes refused before any
work, statistics written by sharding."""

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


def _two_slices_of_one_scan() -> np.ndarray:
    """A ``[1, 2, 32, 32]`` MR volume: slice 0 holds a little tissue in a lot of background
    (the top of a head), slice 1 mostly tissue; grey (300) and white (600) matter on both."""
    volume = np.zeros((1, 2, 32, 32), np.float32)
    volume[0, 0, 12:20, 12:16], volume[0, 0, 12:20, 16:20] = 300.0, 600.0
    volume[0, 1, 2:30, 2:16], volume[0, 1, 2:30, 16:30] = 300.0, 600.0
    return volume


def _mr_manifest(crop: float) -> dict:
    return {"image": {"modality": "T1"}, "stats": {"nonzero_crop": crop}}


@pytest.mark.parametrize("region", ["nonzero", "all"])
def test_mr_gives_the_same_tissue_the_same_value_on_every_slice_of_a_scan(region):
    from sharding.format import volume_intensity

    volume = _two_slices_of_one_scan()
    spec = intensity_spec(f"mr:{region}", _mr_manifest(0.5))
    stats = volume_intensity(volume)  # what bigmodel-shard build writes into meta.json
    slices = [apply_intensity(torch.from_numpy(volume[:, z]), spec, volume=stats) for z in (0, 1)]
    grey = [float(s[0, 14, 13]) for s in slices]
    white = [float(s[0, 14, 17]) for s in slices]
    assert grey[0] == pytest.approx(grey[1]) and white[0] == pytest.approx(white[1])
    assert white[0] - grey[0] > 0.5  # the contrast between tissues is kept
    # the per-slice z-score (data.intensity=image, what ``mr`` did before) does not hold it:
    # slice 0's mostly-background pixels push its tissue to very different values
    per_slice = [
        apply_intensity(torch.from_numpy(volume[:, z]), IntensitySpec("image")) for z in (0, 1)
    ]
    assert abs(float(per_slice[0][0, 14, 13]) - float(per_slice[1][0, 14, 13])) > 1.0
    if region == "nonzero":  # nnU-Net: statistics within the non-zero mask, background set to 0
        assert float(slices[0][0, 0, 0]) == 0.0
        inside = torch.cat([s[0][s[0] != 0] for s in slices])
        assert float(inside.mean()) == pytest.approx(0.0, abs=1e-5)


def test_mr_region_follows_nnunets_crop_rule_and_a_scan_has_its_own_scale():
    assert intensity_spec("auto", _mr_manifest(0.4)) == IntensitySpec("mr", region="nonzero")
    assert intensity_spec("auto", _mr_manifest(0.9)) == IntensitySpec("mr", region="all")
    assert intensity_spec("mr:all", _mr_manifest(0.4)).region == "all"
    assert (
        intensity_spec(
            "auto", {"image": {"modality": "T2+FLAIR"}, "stats": {"nonzero_crop": 1.0}}
        ).scheme
        == "mr"
    )
    from sharding.format import volume_intensity

    volume = _two_slices_of_one_scan()
    spec = intensity_spec("auto", _mr_manifest(0.4))
    # the same anatomy at another scanner gain gets the same values
    a = apply_intensity(torch.from_numpy(volume[:, 1]), spec, volume=volume_intensity(volume))
    b = apply_intensity(
        torch.from_numpy(3 * volume[:, 1]), spec, volume=volume_intensity(3 * volume)
    )
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="rebuild the shards"):
        apply_intensity(torch.from_numpy(volume[:, 1]), spec)
    # shards built before per-volume statistics: refused up front, naming the fix
    with pytest.raises(ConfigError, match=r"stats.nonzero_crop.*rebuild the shards"):
        intensity_spec("auto", {"image": {"modality": "MR"}, "stats": {}})


def test_volume_statistics_reach_every_2_5d_channel_of_their_source_channel():
    spec = IntensitySpec("mr", region="all")
    stats = {"mean": [10.0, 100.0], "std": [2.0, 20.0]}
    image = torch.tensor([10.0, 12.0, 14.0, 100.0, 120.0, 140.0]).view(6, 1, 1)  # 2 ch x 3 slices
    out = apply_intensity(image, spec, volume=stats).view(-1)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0, 2.0]))


def test_old_mr_records_keep_their_per_image_z_score():
    """A model folder saved before per-volume statistics has ``mr`` without a region."""
    old = IntensitySpec.from_dict(
        {"scheme": "mr", "low": None, "high": None, "mean": None, "std": None, "window": ""}
    )
    images = torch.rand(2, 8, 8) * 100
    out = apply_intensity(images, old)
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(2), atol=1e-5, rtol=0)


def test_unfit_schemes_fail_before_work():
    mr = {"image": {"modality": "MR"}, "stats": {"mean": [1.0], "std": [1.0]}}
    with pytest.raises(ConfigError, match=r"ct clips Hounsfield units but x.json holds MR"):
        intensity_spec("ct", mr, "x.json")
    with pytest.raises(ConfigError, match=r"mr z-scores each scan alone but .* holds CT"):
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


@pytest.mark.parametrize(
    "scheme",
    ["ct", "ct_window:brain", "ct_window", "dataset", "image", "mr:nonzero", "mr:all", "none"],
)
def test_inspect_preview_matches_the_training_transform(scheme):
    from sharding.format import volume_intensity
    from sharding.inspection import preview_intensity

    values = np.random.default_rng(0).normal(-200, 600, size=200)
    values[::7] = 0.0
    window = {"center": 40.0, "width": 400.0}
    volume = volume_intensity(2 * values[None, None])
    if scheme.startswith("mr") or scheme == "image":
        spec = intensity_spec(scheme, _mr_manifest(0.5))
    else:
        spec = intensity_spec(scheme, CT_MANIFEST)
    image = torch.from_numpy(values).view(1, 1, -1)
    want = apply_intensity(image, spec, window, volume).view(-1)
    got = preview_intensity(values, scheme, CT_MANIFEST, window, volume)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_inspect_writes_the_histogram_png(tmp_path):
    from test_slice_labels import _build, _source

    from sharding import cli

    _build(_source(tmp_path), tmp_path / "out")
    png = tmp_path / "hist.png"
    argv = ["inspect", str(tmp_path / "out"), "--histogram", str(png), "--intensity", "dataset"]
    assert cli.main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
