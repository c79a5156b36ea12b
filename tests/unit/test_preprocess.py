"""Tests of pacsnode.analysis.cnn.preprocess: step configuration, every step on 2D and 3D batches, restore.

Items of a batch are made deliberately different (scale, offset) so that a
step computing statistics across the batch would give another result than
the same step on each item alone.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from pacsnode.analysis.cnn.preprocess import (
    BilateralDenoiseStep,
    ClaheStep,
    ContrastStretchStep,
    CropPadStep,
    GaussianDenoiseStep,
    HistEqStep,
    MedianDenoiseStep,
    NormalizeStep,
    Preprocessor,
    ResampleStep,
    ResizeStep,
    UnsharpStep,
    WindowStep,
    build_preprocessor,
    parse_steps,
)
from pacsnode.analysis.errors import InputError

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

# One configuration per step kind and method, as it would appear in a model's YAML.
STEPS_2D: dict[str, dict[str, Any]] = {
    "window": {"kind": "window", "center": 0.5, "width": 3.0},
    "minmax": {"kind": "normalize", "method": "minmax"},
    "zscore": {"kind": "normalize", "method": "zscore"},
    "zscore_channels": {"kind": "normalize", "method": "zscore", "channel_wise": True},
    "resample": {"kind": "resample", "spacing": [1.5, 0.75]},
    "resize": {"kind": "resize", "size": [40, 72]},
    "resize_area": {"kind": "resize", "size": [32, 32], "mode": "area"},
    "crop_pad": {"kind": "crop_pad", "size": [50, 80], "pad_value": -1.0},
    "gaussian": {"kind": "denoise", "method": "gaussian", "sigma": 1.5},
    "median": {"kind": "denoise", "method": "median", "radius": 1},
    "bilateral": {"kind": "denoise", "method": "bilateral", "diameter": 5, "sigma_color": 0.5, "sigma_space": 2.0},
    "histeq": {"kind": "enhance", "method": "histeq"},
    "clahe": {"kind": "enhance", "method": "clahe", "clip_limit": 2.0, "tile_grid": [4, 4]},
    "clahe16": {"kind": "enhance", "method": "clahe", "bits": 16},
    "contrast_stretch": {
        "kind": "enhance",
        "method": "contrast_stretch",
        "lower_percentile": 2,
        "upper_percentile": 98,
    },
    "unsharp": {"kind": "enhance", "method": "unsharp", "sigma": 1.0, "amount": 0.8},
}
STEPS_3D: dict[str, dict[str, Any]] = {
    "window": STEPS_2D["window"],
    "minmax": STEPS_2D["minmax"],
    "zscore": STEPS_2D["zscore"],
    "resample_in_plane": {"kind": "resample", "spacing": [2.0, 2.0]},
    "resample": {"kind": "resample", "spacing": [1.0, 2.0, 2.0]},
    "resize": {"kind": "resize", "size": [6, 20, 24]},
    "resize_in_plane": {"kind": "resize", "size": [20, 24]},
    "crop_pad": {"kind": "crop_pad", "size": [12, 24, 40]},
    "gaussian": {"kind": "denoise", "method": "gaussian", "sigma": 1.0},
    "gaussian_in_plane": {"kind": "denoise", "method": "gaussian", "sigma": [1.0, 1.5]},
    "median": {"kind": "denoise", "method": "median", "radius": [1, 1]},
    "bilateral": STEPS_2D["bilateral"],
    "histeq": STEPS_2D["histeq"],
    "clahe": STEPS_2D["clahe"],
    "contrast_stretch": STEPS_2D["contrast_stretch"],
    "unsharp": {"kind": "enhance", "method": "unsharp", "sigma": [0.5, 1.0, 1.0]},
}


def _batch(seed: int, n: int, c: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Smooth structure plus noise; item i scaled by 2**i and shifted by i, so items differ in statistics."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in spatial], indexing="ij")
    structure = np.sin(3 * grids[-1]) * np.cos(2 * grids[-2]) + (sum(g**2 for g in grids) < 0.4)
    items = []
    for i in range(n):
        item = structure[None] + 0.2 * rng.standard_normal((c, *spatial))
        items.append(item * (2.0**i) + i + np.arange(c).reshape(c, *[1] * len(spatial)))
    return torch.as_tensor(np.stack(items), dtype=torch.float32)


def _disc(shape: tuple[int, ...], radius_fraction: float) -> torch.Tensor:
    """A centered disc (ellipsoid in 3D) whose semi-axes are ``radius_fraction`` of the axes."""
    grids = np.meshgrid(*[(np.arange(s) - (s - 1) / 2) / (radius_fraction * s) for s in shape], indexing="ij")
    return torch.as_tensor(sum(g**2 for g in grids) <= 1.0)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


# ---------------------------------------------------------------------------------------------------------------------
# Configuration


def test_steps_parse_from_yaml_list_and_describe_round_trips() -> None:
    text = """
    - {kind: window, center: -600, width: 1500}
    - {kind: normalize, method: zscore}
    - {kind: resample, spacing: [0.8, 0.8], mode: area}
    - {kind: resize, size: [256, 256]}
    - {kind: crop_pad, size: [224, 224]}
    - {kind: denoise, method: gaussian, sigma: [1.0, 0.5]}
    - {kind: denoise, method: median, radius: 2}
    - {kind: denoise, method: bilateral, sigma_color: 0.1}
    - {kind: enhance, method: histeq}
    - {kind: enhance, method: clahe, clip_limit: 3, tile_grid: [4, 6]}
    - {kind: enhance, method: contrast_stretch, lower_percentile: 0.5, upper_percentile: 99.5}
    - {kind: enhance, method: unsharp, sigma: 2, amount: 0.5}
    """
    steps = parse_steps(yaml.safe_load(text))
    assert [type(step) for step in steps] == [
        WindowStep,
        NormalizeStep,
        ResampleStep,
        ResizeStep,
        CropPadStep,
        GaussianDenoiseStep,
        MedianDenoiseStep,
        BilateralDenoiseStep,
        HistEqStep,
        ClaheStep,
        ContrastStretchStep,
        UnsharpStep,
    ]
    window = steps[0]
    assert isinstance(window, WindowStep) and (window.out_min, window.out_max) == (0.0, 1.0)
    assert steps[5] == GaussianDenoiseStep(method="gaussian", sigma=(1.0, 0.5))
    assert steps[9] == ClaheStep(method="clahe", clip_limit=3.0, tile_grid=(4, 6))

    pre = build_preprocessor(yaml.safe_load(text))
    described = pre.describe()
    assert json.loads(json.dumps(described)) == described
    assert described[2] == {"kind": "resample", "spacing": [0.8, 0.8], "mode": "area", "anti_aliasing": False}
    assert parse_steps(described) == steps == pre.steps
    # models and mappings can be mixed; models pass unchanged
    assert build_preprocessor([steps[0], {"kind": "normalize", "method": "minmax"}]).steps[0] is steps[0]


def test_step_models_are_frozen() -> None:
    step = WindowStep(center=40, width=400)
    with pytest.raises(ValidationError):
        step.width = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"kind": "window", "center": 40, "width": 0}, "width"),
        ({"kind": "window", "center": 40, "width": -5}, "width"),
        ({"kind": "window", "center": float("nan"), "width": 5}, "center"),
        ({"kind": "window", "center": 40, "width": 400, "out_min": 1, "out_max": 0}, "out_max"),
        ({"kind": "window", "center": 40, "widht": 400}, "widht"),
        ({"kind": "normalize", "method": "l2"}, "method"),
        ({"kind": "resample", "spacing": [1.0, 0.0]}, "spacing"),
        ({"kind": "resample", "spacing": [1.0]}, "spacing"),
        ({"kind": "resample", "spacing": [1.0, 1.0], "mode": "cubic"}, "mode"),
        ({"kind": "resize", "size": [0, 64]}, "size"),
        ({"kind": "resize", "size": [1, 2, 3, 4]}, "size"),
        ({"kind": "crop_pad", "size": [64, -1]}, "size"),
        ({"kind": "denoise", "method": "gaussian", "sigma": 0}, "sigma"),
        ({"kind": "denoise", "method": "gaussian", "sigma": [1.0, -1.0]}, "sigma"),
        ({"kind": "denoise", "method": "median", "radius": 0}, "radius"),
        ({"kind": "denoise", "method": "median", "sigma": 1.0}, "sigma"),
        ({"kind": "denoise", "method": "bilateral"}, "sigma_color"),
        ({"kind": "denoise", "method": "bilateral", "sigma_color": 0.1, "diameter": 0}, "diameter"),
        ({"kind": "denoise", "method": "wavelet"}, "method"),
        ({"kind": "enhance", "method": "clahe", "clip_limit": 0}, "clip_limit"),
        ({"kind": "enhance", "method": "clahe", "tile_grid": [0, 8]}, "tile_grid"),
        ({"kind": "enhance", "method": "clahe", "bits": 12}, "bits"),
        (
            {"kind": "enhance", "method": "contrast_stretch", "lower_percentile": 99, "upper_percentile": 1},
            "lower_percentile",
        ),
        ({"kind": "enhance", "method": "contrast_stretch", "upper_percentile": 101}, "upper_percentile"),
        ({"kind": "enhance", "method": "unsharp", "amount": 0}, "amount"),
        ({"kind": "enhance", "method": "histeq", "bins": 1}, "bins"),
        ({"kind": "blur", "sigma": 1}, "kind"),
        ({"center": 40, "width": 400}, "kind"),
    ],
)
def test_bad_configs_raise_validation_errors_naming_the_field(config: dict[str, Any], named: str) -> None:
    with pytest.raises(ValidationError) as caught:
        build_preprocessor([{"kind": "normalize", "method": "minmax"}, config])
    errors = caught.value.errors()
    assert all(error["loc"][0] == 1 for error in errors)  # the index of the bad step
    assert any(named in " ".join(map(str, error["loc"])) + " " + error["msg"] for error in errors), errors


# ---------------------------------------------------------------------------------------------------------------------
# Every step: batch == items one by one, shape, dtype, device


def _check_batch_equals_items(config: dict[str, Any], x: torch.Tensor, spacing: tuple[float, ...]) -> None:
    pre = build_preprocessor([config])
    before = x.clone()
    with torch.inference_mode():
        out, out_spacing = pre(x, spacing)
    assert torch.equal(x, before), "the input was modified"
    assert out.dtype == torch.float32 and out.device == x.device and type(out) is torch.Tensor
    assert out.shape[:2] == x.shape[:2]
    assert tuple(out.shape[2:]) == pre.spatial_shape_after(tuple(x.shape[2:]), spacing)
    assert torch.isfinite(out).all()
    for i in range(x.shape[0]):
        alone, alone_spacing = pre(x[i : i + 1], spacing)
        assert alone_spacing == out_spacing
        torch.testing.assert_close(alone, out[i : i + 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(STEPS_2D))
def test_2d_step_batch_equals_items(name: str) -> None:
    _check_batch_equals_items(STEPS_2D[name], _batch(1, 3, 2, (64, 64)), (0.9, 0.7))


@pytest.mark.parametrize("name", sorted(STEPS_3D))
def test_3d_step_batch_equals_items(name: str) -> None:
    _check_batch_equals_items(STEPS_3D[name], _batch(2, 2, 1, (8, 32, 32)), (2.5, 0.9, 0.7))


@pytest.mark.parametrize("device", DEVICES)
def test_full_chain_keeps_device_and_dtype(device: str) -> None:
    x = _batch(3, 2, 1, (64, 64)).to(device)
    pre = build_preprocessor(list(STEPS_2D.values()))
    out, spacing = pre(x, (1.0, 1.0))
    assert out.device == x.device and out.dtype == torch.float32
    assert tuple(out.shape) == (2, 1, 50, 80)
    pred = torch.rand((2, 3, 50, 80), device=device)
    assert pre.restore(pred, x.shape, (1.0, 1.0)).device == x.device


def test_empty_batch_gives_the_output_shape() -> None:
    pre = build_preprocessor([STEPS_2D["resize"], STEPS_2D["zscore"]])
    out, spacing = pre(torch.zeros((0, 1, 64, 64)), (1.0, 1.0))
    assert tuple(out.shape) == (0, 1, 40, 72)
    assert spacing == pytest.approx((1.6, 64 / 72))


# ---------------------------------------------------------------------------------------------------------------------
# Intensity steps


def test_window_maps_its_edges_to_the_output_range_and_clips() -> None:
    center, width = 40.0, 400.0
    values = torch.tensor([center - width / 2, center, center + width / 2, -1000.0, 3000.0, center + width / 4])
    x = values.reshape(1, 1, 1, 6).expand(2, 1, 3, 6).contiguous()
    out, spacing = build_preprocessor([WindowStep(center=center, width=width)])(x, (1.0, 1.0))
    assert spacing == (1.0, 1.0)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 0.0, 1.0, 0.75]))
    out, _ = build_preprocessor([WindowStep(center=center, width=width, out_min=-1, out_max=1)])(x, (1.0, 1.0))
    torch.testing.assert_close(out[1, 0, 2], torch.tensor([-1.0, 0.0, 1.0, -1.0, 1.0, 0.5]))


@pytest.mark.parametrize("spatial", [(64, 64), (6, 24, 24)])
def test_zscore_and_minmax_use_each_items_own_statistics(spatial: tuple[int, ...]) -> None:
    x = _batch(4, 3, 2, spatial)
    spacing = (1.0,) * len(spatial)
    z, _ = build_preprocessor([NormalizeStep(method="zscore")])(x, spacing)
    for item in z:
        assert abs(float(item.mean())) < 1e-5
        assert float(item.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    # the channels of an item share its statistics unless channel_wise
    assert float(z[0, 1].mean()) > 0.5 > float(z[0, 0].mean())
    zc, _ = build_preprocessor([NormalizeStep(method="zscore", channel_wise=True)])(x, spacing)
    for channel in zc.flatten(0, 1):
        assert abs(float(channel.mean())) < 1e-5
        assert float(channel.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    m, _ = build_preprocessor([NormalizeStep(method="minmax")])(x, spacing)
    for item in m:
        assert (float(item.min()), float(item.max())) == pytest.approx((0.0, 1.0), abs=1e-6)


def test_constant_items_do_not_fail_or_warn() -> None:
    x = torch.full((2, 1, 32, 32), 7.0)
    x[1] = -3.0
    for config in ("zscore", "minmax", "histeq", "clahe", "contrast_stretch"):
        out, _ = build_preprocessor([STEPS_2D[config]])(x, (1.0, 1.0))
        assert torch.isfinite(out).all() and out.shape == x.shape, config


def test_contrast_stretch_maps_the_percentiles_per_item() -> None:
    x = _batch(5, 2, 1, (64, 64))
    out, _ = build_preprocessor([STEPS_2D["contrast_stretch"]])(x, (1.0, 1.0))
    for item_in, item in zip(x, out, strict=False):
        assert float(item.min()) == 0.0 and float(item.max()) == 1.0
        # 2 % at or below the 2nd percentile -> 0, 2 % at or above the 98th -> 1
        assert float((item == 0).float().mean()) == pytest.approx(0.02, abs=0.005)
        assert float((item == 1).float().mean()) == pytest.approx(0.02, abs=0.005)
        inside = (item > 0) & (item < 1)
        corr = np.corrcoef(item_in[inside].numpy(), item[inside].numpy())[0, 1]
        assert corr > 0.999  # linear in between


def test_histeq_flattens_the_histogram_within_the_item_range() -> None:
    rng = np.random.default_rng(6)
    x = torch.as_tensor(rng.exponential(1.0, (2, 1, 64, 64)), dtype=torch.float32)
    x[1] = x[1] * 100 - 50
    out, _ = build_preprocessor([STEPS_2D["histeq"]])(x, (1.0, 1.0))
    for item_in, item in zip(x, out, strict=False):
        low, high = float(item_in.min()), float(item_in.max())
        assert float(item.min()) == pytest.approx(low, abs=1e-3 * (high - low))
        assert float(item.max()) == pytest.approx(high, abs=1e-3 * (high - low))
        # skewed input (~86 % below the middle of the range) becomes about uniform
        middle = (low + high) / 2
        assert float((item_in < middle).float().mean()) > 0.8
        assert float((item < middle).float().mean()) == pytest.approx(0.5, abs=0.05)
        # monotonic: the order of the pixels is kept
        order = torch.argsort(item_in.flatten())
        assert bool((torch.diff(item.flatten()[order]) >= -1e-4 * (high - low)).all())


def test_clahe_enhances_local_contrast_within_the_item_range() -> None:
    x = _batch(7, 2, 1, (64, 64))
    outputs = {}
    for clip in (1.5, 4.0):
        step = ClaheStep(method="clahe", clip_limit=clip, tile_grid=(2, 2))
        out, _ = build_preprocessor([step])(x, (1.0, 1.0))
        assert out.shape == x.shape and out.dtype == torch.float32
        for item_in, item in zip(x, out, strict=False):
            assert float(item.min()) >= float(item_in.min()) - 1e-4
            assert float(item.max()) <= float(item_in.max()) + 1e-4
        outputs[clip] = out
    # a higher clip limit allows more contrast
    assert float(outputs[4.0].std()) > float(outputs[1.5].std()) > 0
    assert not torch.allclose(outputs[1.5], x, atol=1e-2)
    sixteen, _ = build_preprocessor([STEPS_2D["clahe16"]])(x, (1.0, 1.0))
    assert sixteen.shape == x.shape and not torch.allclose(sixteen, x, atol=1e-2)


def test_unsharp_overshoots_at_edges_and_leaves_flat_regions() -> None:
    x = torch.zeros((1, 1, 32, 32))
    x[..., 16:] = 1.0
    out, _ = build_preprocessor([STEPS_2D["unsharp"]])(x, (1.0, 1.0))
    assert float(out.max()) > 1.1 and float(out.min()) < -0.1
    torch.testing.assert_close(out[..., :8], x[..., :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 24:], x[..., 24:], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Denoising


def test_gaussian_and_median_remove_noise() -> None:
    rng = np.random.default_rng(8)
    x = torch.as_tensor(rng.normal(0.0, 1.0, (2, 1, 64, 64)), dtype=torch.float32)
    gauss, _ = build_preprocessor([STEPS_2D["gaussian"]])(x, (1.0, 1.0))
    assert float(gauss.std()) < 0.4 * float(x.std())
    spikes = torch.zeros((1, 1, 32, 32))
    spikes[0, 0, 10, 10] = spikes[0, 0, 20, 5] = 100.0
    median, _ = build_preprocessor([STEPS_2D["median"]])(spikes, (1.0, 1.0))
    assert float(median.abs().max()) == 0.0


def test_in_plane_smoothing_of_volumes_leaves_the_slice_axis_alone() -> None:
    # every slice constant, slices different: in-plane filters change nothing, 3D ones mix slices
    x = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1, 1).expand(2, 1, 6, 16, 16).contiguous()
    for config in (STEPS_3D["gaussian_in_plane"], STEPS_3D["median"]):
        out, _ = build_preprocessor([config])(x, (3.0, 1.0, 1.0))
        torch.testing.assert_close(out, x)
    out, _ = build_preprocessor([STEPS_3D["gaussian"]])(x, (3.0, 1.0, 1.0))
    assert not torch.allclose(out, x, atol=1e-2)


def test_bilateral_smooths_flat_regions_and_keeps_edges() -> None:
    rng = np.random.default_rng(9)
    clean = torch.zeros((2, 1, 64, 64))
    clean[..., 32:] = 4.0
    x = clean + torch.as_tensor(rng.normal(0.0, 0.3, clean.shape), dtype=torch.float32)
    out, _ = build_preprocessor([STEPS_2D["bilateral"]])(x, (1.0, 1.0))
    assert out.shape == x.shape and out.dtype == torch.float32 and out.device == x.device
    assert float((out - clean)[..., 4:28].std()) < 0.6 * float((x - clean)[..., 4:28].std())
    # the edge stays sharp: columns next to it keep their levels
    assert float(out[..., 30].mean()) < 0.3 and float(out[..., 33].mean()) > 3.7


# ---------------------------------------------------------------------------------------------------------------------
# Spatial steps and restore


def test_resample_halves_the_size_when_the_target_spacing_doubles() -> None:
    x = _batch(10, 2, 1, (64, 48))
    out, spacing = build_preprocessor([ResampleStep(spacing=(1.6, 1.4))])(x, (0.8, 0.7))
    assert tuple(out.shape) == (2, 1, 32, 24) and spacing == pytest.approx((1.6, 1.4))
    # output size is rounded; the returned spacing is the exact one of the output grid
    pre = build_preprocessor([ResampleStep(spacing=(2.0, 2.0))])
    assert pre.spatial_shape_after((63, 64), (1.0, 1.0)) == (32, 32)
    assert pre(torch.zeros((1, 1, 63, 64)), (1.0, 1.0))[1] == pytest.approx((63 / 32, 2.0))
    # 3D: two values resample in-plane only, three also the slices
    v = _batch(11, 1, 1, (8, 32, 32))
    out, spacing = build_preprocessor([ResampleStep(spacing=(2.0, 2.0))])(v, (2.5, 1.0, 1.0))
    assert tuple(out.shape) == (1, 1, 8, 16, 16) and spacing == pytest.approx((2.5, 2.0, 2.0))
    out, spacing = build_preprocessor([ResampleStep(spacing=(5.0, 2.0, 2.0))])(v, (2.5, 1.0, 1.0))
    assert tuple(out.shape) == (1, 1, 4, 16, 16) and spacing == pytest.approx((5.0, 2.0, 2.0))


def test_resample_keeps_the_physical_size_of_an_object() -> None:
    disc = _disc((64, 64), 0.3).float()[None, None]
    out, spacing = build_preprocessor([ResampleStep(spacing=(1.0, 0.5))])(disc, (0.5, 0.5))
    assert tuple(out.shape) == (1, 1, 32, 64)
    area_mm2 = float(disc.sum()) * 0.25
    assert float(out.sum()) * spacing[0] * spacing[1] == pytest.approx(area_mm2, rel=0.02)


def test_anti_aliasing_smooths_before_shrinking_and_keeps_the_borders() -> None:
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()[None, None] * 2000 - 1000
    plain, _ = build_preprocessor([ResizeStep(size=(21, 21), mode="nearest")])(checker, (1.0, 1.0))
    smooth, _ = build_preprocessor([ResizeStep(size=(21, 21), mode="nearest", anti_aliasing=True)])(checker, (1.0, 1.0))
    assert float(plain.std()) > 900 and float(smooth.std()) < 100 and float(smooth.mean()) == pytest.approx(0, abs=50)
    air = torch.full((1, 1, 64, 64), -1000.0)
    out, _ = build_preprocessor([ResampleStep(spacing=(3.0, 3.0), anti_aliasing=True)])(air, (1.0, 1.0))
    torch.testing.assert_close(out, torch.full((1, 1, 21, 21), -1000.0))


def test_resize_sets_the_size_and_scales_the_spacing() -> None:
    pre = build_preprocessor([ResizeStep(size=(32, 96))])
    out, spacing = pre(_batch(12, 1, 3, (64, 48)), (1.0, 1.0))
    assert tuple(out.shape) == (1, 3, 32, 96) and spacing == pytest.approx((2.0, 0.5))
    v = _batch(13, 1, 1, (8, 32, 32))
    out, spacing = build_preprocessor([STEPS_3D["resize_in_plane"]])(v, (2.5, 1.0, 1.0))
    assert tuple(out.shape) == (1, 1, 8, 20, 24) and spacing == pytest.approx((2.5, 1.6, 32 / 24))


@pytest.mark.parametrize("size", [(50, 80), (51, 71), (64, 64), (9, 120), (40, 45), (62, 33)])
def test_crop_pad_is_centered_and_restore_puts_every_pixel_back(size: tuple[int, int]) -> None:
    rows, cols = 63, 64
    # pixel values encode their position: a misplaced pixel cannot go unnoticed
    x = (torch.arange(rows)[:, None] * 1000 + torch.arange(cols)[None, :]).float().expand(2, 1, rows, cols)
    pre = build_preprocessor([CropPadStep(size=size, pad_value=-1.0)])
    out, spacing = pre(x, (1.0, 1.0))
    assert tuple(out.shape) == (2, 1, *size) and spacing == (1.0, 1.0)
    kept = out[out != -1]
    assert kept.numel() == 2 * min(rows, size[0]) * min(cols, size[1])
    # centered: the kept rows and columns are in the middle of the input (within one pixel)
    kept_rows, kept_cols = torch.unique(kept // 1000), torch.unique(kept % 1000)
    assert abs((int(kept_rows[0]) + int(kept_rows[-1])) / 2 - (rows - 1) / 2) <= 0.5
    assert abs((int(kept_cols[0]) + int(kept_cols[-1])) / 2 - (cols - 1) / 2) <= 0.5
    back = pre.restore(out, (rows, cols), (1.0, 1.0), pad_value=-1.0)
    assert tuple(back.shape) == (2, 1, rows, cols)
    restored = back != -1
    assert int(restored.sum()) == kept.numel()
    assert torch.equal(back[restored], x[restored])


def _restore_chain(ndim: int) -> Preprocessor:
    if ndim == 2:
        return build_preprocessor(
            [
                WindowStep(center=0.5, width=1.0),
                ResampleStep(spacing=(1.3, 1.1)),
                ResizeStep(size=(40, 48)),
                CropPadStep(size=(36, 56)),
                GaussianDenoiseStep(method="gaussian", sigma=0.5),
            ]
        )
    return build_preprocessor(
        [
            ResampleStep(spacing=(3.0, 1.3, 1.1)),
            ResizeStep(size=(20, 24)),
            CropPadStep(size=(14, 22, 28)),
        ]
    )


@pytest.mark.parametrize(("shape", "spacing"), [((64, 64), (0.8, 0.8)), ((24, 32, 32), (2.0, 0.8, 0.8))])
def test_restore_maps_a_mask_back_to_the_original_grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    pre = _restore_chain(len(shape))
    mask = _disc(shape, 0.3)
    x = mask.float()[None, None].expand(2, 1, *shape).contiguous()
    out, _ = pre(x, spacing)
    assert tuple(out.shape[2:]) == pre.spatial_shape_after(shape, spacing) != shape
    # a float output (probabilities), as a model would give, with two channels
    pred = torch.cat([out, 1 - out], dim=1)
    back = pre.restore(pred, shape, spacing)
    assert tuple(back.shape) == (2, 2, *shape) and back.dtype == torch.float32
    for item in back:
        assert _iou(item[0] > 0.5, mask) > 0.9
    # the second channel was interpolated with the same geometry (only where crop_pad kept the image)
    kept = pre.restore(torch.ones_like(out), shape, spacing) > 1 - 1e-6
    assert bool((back[:, 1][kept[:, 0]] - (1 - back[:, 0][kept[:, 0]])).abs().max() < 1e-5)
    # integer labels stay integer labels (nearest neighbour)
    labels = (out > 0.5).long() * 2
    back_labels = pre.restore(labels, (2, 1, *shape), spacing)
    assert back_labels.dtype == torch.long and set(back_labels.unique().tolist()) <= {0, 2}
    # coarser than the float path (labels quantized on the coarse grid), but not shifted
    assert _iou(back_labels[0, 0] == 2, mask) > 0.85
    centre = torch.nonzero(back_labels[0, 0] == 2).float().mean(0)
    torch.testing.assert_close(centre, torch.nonzero(mask).float().mean(0), atol=0.5, rtol=0)


def test_restore_refuses_a_prediction_of_the_wrong_shape() -> None:
    pre = _restore_chain(2)
    with pytest.raises(InputError, match="expected"):
        pre.restore(torch.zeros((1, 1, 64, 64)), (64, 64), (0.8, 0.8))
    with pytest.raises(InputError, match="expected"):
        pre.restore(torch.zeros((1, 36, 56)), (64, 64), (0.8, 0.8))


def test_without_spatial_steps_restore_is_the_identity() -> None:
    pre = build_preprocessor([STEPS_2D["zscore"], STEPS_2D["gaussian"]])
    pred = torch.rand((1, 2, 64, 64))
    assert torch.equal(pre.restore(pred, (64, 64), (1.0, 1.0)), pred)
    assert build_preprocessor([]).spatial_shape_after((1, 1, 5, 64, 64), (1.0, 1.0, 1.0)) == (5, 64, 64)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs that do not fit


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "resize", "size": [8, 32, 32]}, "resize size has 3 values but the images are 2D"),
        ({"kind": "crop_pad", "size": [8, 32, 32]}, "crop_pad size has 3 values"),
        ({"kind": "resample", "spacing": [1, 1, 1]}, "resample spacing has 3 values"),
        ({"kind": "denoise", "method": "gaussian", "sigma": [1, 1, 1]}, "gaussian sigma has 3 values"),
        ({"kind": "denoise", "method": "median", "radius": [1, 1, 1]}, "median radius has 3 values"),
        ({"kind": "enhance", "method": "unsharp", "sigma": [1, 1, 1]}, "unsharp sigma has 3 values"),
    ],
)
def test_3d_settings_on_2d_input_raise_input_error(config: dict[str, Any], message: str) -> None:
    pre = build_preprocessor([config])
    with pytest.raises(InputError, match=message):
        pre(torch.zeros((1, 1, 32, 32)), (1.0, 1.0))
    if config["kind"] in ("resize", "crop_pad", "resample"):
        with pytest.raises(InputError, match=message):
            pre.spatial_shape_after((32, 32), (1.0, 1.0))


def test_bad_inputs_raise_input_error() -> None:
    pre = build_preprocessor([STEPS_2D["zscore"]])
    with pytest.raises(InputError, match=r"2D images need 2 values \(row, col\)"):
        pre(torch.zeros((1, 1, 32, 32)), (1.0, 1.0, 1.0))
    with pytest.raises(InputError, match=r"3D images need 3 values \(slice, row, col\)"):
        pre(torch.zeros((1, 1, 4, 32, 32)), (1.0, 1.0))
    with pytest.raises(InputError, match="positive"):
        pre(torch.zeros((1, 1, 32, 32)), (1.0, 0.0))
    with pytest.raises(InputError, match="float32"):
        pre(torch.zeros((1, 1, 32, 32), dtype=torch.float64), (1.0, 1.0))
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        pre(torch.zeros((32, 32)), (1.0, 1.0))
    with pytest.raises(InputError, match="shape"):
        pre.spatial_shape_after((32,), (1.0,))
