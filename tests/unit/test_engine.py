"""The inference engine: batching does not change outputs, budgets split work, deadlines hold, CUDA when present."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pacsnode.analysis.cnn.engine import (
    EngineOptions,
    InferenceEngine,
    VolumeInput,
    resolve_device,
    resolve_precision,
    warm_model,
)
from pacsnode.analysis.cnn.package import load_package
from pacsnode.analysis.errors import InferenceTimeout, ModelError
from tests.support.models import make_bundle, make_package

FP32 = EngineOptions(device="cpu", precision="fp32", batch_size=1)


def _volume(seed: int, depth: int = 9, size: int = 48) -> VolumeInput:
    rng = np.random.default_rng(seed)
    image = rng.normal(-500.0, 350.0, (depth, size, size)).astype(np.int16)
    return VolumeInput(image=image, spacing=(2.0, 0.8, 0.8))


def _engine(root: Path, **options: object) -> InferenceEngine:
    opts = FP32.model_copy(update=options)
    return InferenceEngine(warm_model(load_package(root), opts), opts)


def test_batched_and_unbatched_give_the_same_probabilities(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    volume = _volume(0)
    one = _engine(root, batch_size=1).predict([volume])[0]
    many = _engine(root, batch_size=8).predict([volume])[0]
    assert one.shape == (1, 9, 48, 48)
    assert float(one.std()) > 1e-3  # not a constant map
    np.testing.assert_allclose(one.astype(np.float32), many.astype(np.float32), atol=2e-3)


def test_a_batch_spanning_two_studies_matches_each_study_alone(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    a, b = _volume(1, depth=5), _volume(2, depth=6)
    engine = _engine(root, batch_size=4)
    together = engine.predict([a, b])
    assert engine.stats["batches"] == 3  # 11 slices in batches of 4: slices of both studies shared one
    for volume, out in zip((a, b), together, strict=True):
        alone = _engine(root, batch_size=4).predict([volume])[0]
        np.testing.assert_allclose(out.astype(np.float32), alone.astype(np.float32), atol=2e-3)


def test_adjacent_slices_are_the_channels(tmp_path: Path) -> None:
    """Changing slice 0 changes the output of slices 0 and 1 (its neighbour), not of slice 3."""
    root = make_package(tmp_path / "m")
    volume = _volume(3, depth=5)
    changed = volume.image.copy()
    changed[0] = 300
    before = _engine(root).predict([volume])[0]
    after = _engine(root).predict([VolumeInput(image=changed, spacing=volume.spacing)])[0]
    assert not np.allclose(before[:, 0], after[:, 0])
    assert not np.allclose(before[:, 1], after[:, 1])
    np.testing.assert_array_equal(before[:, 3], after[:, 3])


def test_the_memory_budget_sets_the_batch_size(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    volume = _volume(4, depth=8)
    small = _engine(root, batch_size=64, memory_budget_mb=0.05)
    out_small = small.predict([volume])[0]
    assert small.stats["batches"] == 8  # one slice per batch fits 50 kB... or nothing does; never zero
    large = _engine(root, batch_size=64, memory_budget_mb=4096)
    out_large = large.predict([volume])[0]
    assert large.stats["batches"] == 1
    auto = _engine(root, batch_size="auto", memory_budget_mb=0.05)  # the CPU's timed choice obeys the budget too
    auto.predict([volume])
    assert auto.stats["batch_size"] == 1
    np.testing.assert_allclose(out_small.astype(np.float32), out_large.astype(np.float32), atol=2e-3)


def test_a_passed_deadline_stops_inference(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    with pytest.raises(InferenceTimeout, match="timeout"):
        _engine(root).predict([_volume(5)], deadline=time.monotonic() - 1)


def test_a_network_with_too_few_outputs_is_refused(tmp_path: Path) -> None:
    two_labels = {
        "kind": "segmentation",
        "activation": "sigmoid",
        "labels": [{"value": 1, "name": "a"}, {"value": 2, "name": "b"}],
    }
    root = make_package(tmp_path / "m", output=two_labels)
    with pytest.raises(ModelError, match="gives 1 output channels, the manifest needs 2"):
        _engine(root).predict([_volume(6)])


def test_odd_sizes_are_padded_for_the_network_and_cropped_back(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m", divisible_by=4)
    volume = VolumeInput(image=_volume(7).image[:, :45, :47].copy(), spacing=(2.0, 0.8, 0.8))
    out = _engine(root).predict([volume])[0]
    assert out.shape == (1, 9, 45, 47)


def test_preprocessing_resample_is_undone_on_the_output(tmp_path: Path) -> None:
    steps = [{"kind": "resample", "spacing": [1.6, 1.6]}, {"kind": "window", "center": -400, "width": 1500}]
    root = make_package(tmp_path / "m", preprocessing=steps)
    out = _engine(root).predict([_volume(8)])[0]
    assert out.shape == (1, 9, 48, 48)


def test_sliding_window_3d_whatever_the_budget(tmp_path: Path) -> None:
    root = make_bundle(tmp_path / "b")
    volume = VolumeInput(image=_volume(9, depth=20, size=40).image, spacing=(1.0, 1.0, 1.0))
    roomy = _engine(root).predict([volume])[0]
    tight = _engine(root, memory_budget_mb=0.2).predict([volume])[0]  # stitched on the host, patches one by one
    assert roomy.shape == (2, 20, 40, 40)
    np.testing.assert_allclose(roomy.sum(axis=0).astype(np.float32), 1.0, atol=2e-2)  # softmax
    np.testing.assert_allclose(roomy.astype(np.float32), tight.astype(np.float32), atol=2e-3)


def test_device_and_precision_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelError, match="fp16 runs on CUDA only"):
        resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ModelError, match="no CUDA device"):
            resolve_device("cuda")


def test_bf16_stays_close_to_fp32(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    volume = _volume(10)
    exact = _engine(root).predict([volume])[0].astype(np.float32)
    fast = _engine(root, precision="bf16").predict([volume])[0].astype(np.float32)
    assert float(np.abs(exact - fast).max()) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_path_matches_the_cpu(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    volume = _volume(11, depth=33, size=64)
    cpu = _engine(root).predict([volume])[0].astype(np.float32)
    for precision, tolerance in (("fp32", 2e-3), ("auto", 0.05)):
        engine = _engine(root, device="cuda", precision=precision, batch_size=16)
        assert engine.warm.device.type == "cuda"
        gpu = engine.predict([volume])[0].astype(np.float32)
        assert float(np.abs(cpu - gpu).max()) < tolerance, precision


def test_the_foreground_crop_runs_the_network_on_the_body_only(tmp_path: Path) -> None:
    import json

    plain = make_package(tmp_path / "plain")
    cropped = make_package(tmp_path / "cropped")
    manifest = json.loads((cropped / "manifest.json").read_text())
    manifest["input"]["foreground"] = {"threshold": -500, "margin_mm": 8.0}
    (cropped / "manifest.json").write_text(json.dumps(manifest))
    rng = np.random.default_rng(12)
    image = np.full((5, 128, 128), -1000, dtype=np.int16)
    image[:, 40:60, 44:64] = rng.normal(40, 200, (5, 20, 20)).astype(np.int16)  # the "body"
    volume = VolumeInput(image=image, spacing=(2.0, 0.8, 0.8))
    full = _engine(plain).predict([volume])[0].astype(np.float32)
    crop = _engine(cropped).predict([volume])[0].astype(np.float32)
    assert crop.shape == full.shape
    # The box: the body plus 8 mm (10 pixels) on each side, 40 pixels widened to 64 about its centre
    # (sizes go in steps of 32); outside it, nothing is predicted.
    outside = np.ones(image.shape, dtype=bool)
    outside[:, 18:82, 22:86] = False
    assert not crop[0][outside].any()
    assert crop[0][:, 18:82, 22:86].all()
    # Inside the body, where the network's view reaches no edge of the box, the outputs agree.
    np.testing.assert_allclose(crop[0][:, 42:58, 46:62], full[0][:, 42:58, 46:62], atol=2e-3)


def test_volumes_may_arrive_from_a_generator_and_each_is_handed_over_when_complete(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    engine = _engine(root, batch_size=4)
    volumes = [_volume(20, depth=3), _volume(21, depth=6), _volume(22, depth=2)]
    taken: list[int] = []
    done: list[tuple[int, int]] = []

    def arriving():  # type: ignore[no-untyped-def]
        for i, v in enumerate(volumes):
            taken.append(i)
            yield v

    out = engine.predict(arriving(), on_done=lambda i, p: done.append((i, p.shape[1])))
    assert taken == [0, 1, 2]
    assert done == [(0, 3), (1, 6), (2, 2)]
    for volume, prob in zip(volumes, out, strict=True):
        alone = _engine(root).predict([volume])[0]
        np.testing.assert_allclose(prob.astype(np.float32), alone.astype(np.float32), atol=2e-3)


def test_an_error_while_volumes_arrive_reaches_the_caller(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    done: list[int] = []

    def arriving():  # type: ignore[no-untyped-def]
        yield _volume(23, depth=2)
        raise RuntimeError("decoder broke")

    with pytest.raises(RuntimeError, match="decoder broke"):
        _engine(root, batch_size=1).predict(arriving(), on_done=lambda i, p: done.append(i))
