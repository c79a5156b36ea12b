"""The inference engine: batching does not change outputs, budgets split work, deadlines hold, CUDA when present."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pacsnode.analysis.cnn.engine import (
    EngineOptions,
    InferenceEngine,
    VolumeInput,
    WarmModel,
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


def test_the_batch_that_fits_is_the_budget_over_the_activations_within_the_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the engine runs on CUDA, and what bench/inference.py --loader-only runs its host side at."""
    root = make_package(tmp_path / "m")
    key = (3, 64, 64)
    auto = _engine(root, batch_size="auto", memory_budget_mb=1)
    assert auto.batch_that_fits(key, 100_000) == 2**20 // 100_000  # 10
    assert auto.batch_that_fits(key, 10) == 256  # auto: at most 256, whatever the budget allows
    assert auto.batch_that_fits(key, 2**21) == 1  # nothing fits: one at a time, never zero
    assert _engine(root, batch_size=4, memory_budget_mb=1).batch_that_fits(key, 100_000) == 4
    monkeypatch.setitem(auto.warm.oom_batch, auto._oom_key(key), 3)  # an out-of-memory error cut this shape to 3
    assert auto.batch_that_fits(key, 100_000) == 3


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


# --- TorchScript under autocast, the loader thread included -------------------------------------------


def _tiny_unet_2d() -> torch.nn.Module:
    from monai.networks.nets import UNet

    from tests.support.models import TINY_UNET_2D

    torch.manual_seed(0)
    return UNet(**TINY_UNET_2D["params"]).eval()


def _precision_or_skip(precision: str) -> str:
    try:
        resolve_precision(precision, torch.device("cpu"))
    except ModelError as exc:
        pytest.skip(f"{precision} on this CPU: {exc}")
    return precision


@pytest.mark.parametrize("batch_size", ["auto", 1, 4])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "auto"])
@pytest.mark.parametrize("kind", ["traced", "scripted", "bundle"])
def test_torchscript_networks_run_at_every_precision_and_batch_size(
    tmp_path: Path, kind: str, precision: str, batch_size: object
) -> None:
    """Traced 2D networks with batch norm: the probe and the CPU timing in the loader thread run them too."""
    _precision_or_skip(precision)
    if kind == "bundle":
        root = make_bundle(tmp_path / "b", torchscript=True, dims="2d")
    else:
        root = make_package(tmp_path / "m", torchscript=True)
        if kind == "scripted":
            import json
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch deprecates TorchScript
                net = _tiny_unet_2d()
                torch.jit.script(net).save(str(root / "model.pt"))

            from tests.support.helpers import sha256_file

            manifest = json.loads((root / "manifest.json").read_text())
            manifest["weights"]["sha256"] = sha256_file(root / "model.pt")
            (root / "manifest.json").write_text(json.dumps(manifest))
    volume = _volume(30, depth=6, size=32)
    engine = _engine(root, precision=precision, batch_size=batch_size)
    out = engine.predict([volume])[0]
    assert out.shape[1:] == (6, 32, 32)
    assert np.isfinite(out.astype(np.float32)).all()


def test_a_torchscript_bundle_runs_in_the_model_pipeline_at_default_settings(tmp_path: Path) -> None:
    from pacsnode.analysis.cnn.pipeline import ModelParams, ModelPipeline
    from pacsnode.analysis.modeldev.synthetic import PhantomSpec, write_chest_ct
    from pacsnode.analysis.pipelines import PipelineInput, PipelineOutput, SeriesInput

    bundle = make_bundle(tmp_path / "b", torchscript=True, dims="2d")
    truth = write_chest_ct(tmp_path / "ct", PhantomSpec(slices=6, size=64), seed=0)
    series = SeriesInput(
        series_instance_uid=truth.series_instance_uid, modality="CT", series_description="", paths=tuple(truth.paths)
    )
    inputs = PipelineInput(job_id=1, study_instance_uid=truth.study_instance_uid, series=(series,), uid_root="2.25")
    params = ModelParams.model_validate({"model": str(bundle)})
    assert params.engine == EngineOptions()  # the defaults: auto device, precision and batch size
    output = ModelPipeline().run(inputs, params)
    assert isinstance(output, PipelineOutput) and output.datasets


# --- out-of-memory halving sticks, per memory budget ------------------------------------------------------


class _RunsOutOfMemory(torch.nn.Module):
    """The network, failing as CUDA does when a batch is larger than ``most``; records each batch size."""

    def __init__(self, net: torch.nn.Module, most: int, error: Callable[[], Exception]) -> None:
        super().__init__()
        self.net = net
        self.most = most
        self.error = error
        self.calls: list[tuple[int, bool]] = []  # batch size, whether it ran out of memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        failed = x.shape[0] > self.most
        self.calls.append((int(x.shape[0]), failed))
        if failed:
            raise self.error()
        out: torch.Tensor = self.net(x)
        return out


OOM_ERRORS: dict[str, Callable[[], Exception]] = {
    "OutOfMemoryError": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "cuDNN not supported": lambda: RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if"),
    "RuntimeError out of memory": lambda: RuntimeError("CUDA error: out of memory"),
}


def _failing_warm(root: Path, options: EngineOptions, most: int, error: Callable[[], Exception]) -> WarmModel:
    base = warm_model(load_package(root), options)
    measured = {f.name: {} for f in dataclasses.fields(base) if f.name in ("per_item_bytes", "cpu_batch", "oom_batch")}
    return dataclasses.replace(base, module=_RunsOutOfMemory(base.module, most, error), **measured)


@pytest.mark.parametrize("error", list(OOM_ERRORS))
def test_an_out_of_memory_halving_sticks_for_the_rest_of_the_call_and_the_next(tmp_path: Path, error: str) -> None:
    root = make_package(tmp_path / "m")
    volume = _volume(40, depth=40, size=32)
    options = FP32.model_copy(update={"batch_size": 8, "memory_budget_mb": 4096})
    expected = _engine(root).predict([volume])[0]
    warm = _failing_warm(root, options, most=2, error=OOM_ERRORS[error])
    module = warm.module
    assert isinstance(module, _RunsOutOfMemory)
    engine = InferenceEngine(warm, options)
    out = engine.predict([volume])[0]
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    batches = [(size, failed) for size, failed in module.calls if size > 1 or not failed][1:]  # after the probe
    limit = 8
    for size, failed in batches:
        assert size <= limit, module.calls  # never larger than half of a batch that ran out of memory
        if failed:
            limit = size // 2
    assert sum(failed for _, failed in module.calls) <= 2, module.calls  # at 8, then at 4; never again
    module.calls.clear()
    engine.predict([volume])  # the next call starts from the halved size
    assert module.calls and all(size <= 2 and not failed for size, failed in module.calls), module.calls

    # Another budget on the same warm model measures for itself: it does not inherit the halved size.
    module.most = 64
    module.calls.clear()
    other = options.model_copy(update={"memory_budget_mb": 5000})
    InferenceEngine(warm, other).predict([volume])
    assert max(size for size, _ in module.calls) == 8, module.calls


def test_an_error_that_is_not_out_of_memory_is_not_retried(tmp_path: Path) -> None:
    root = make_package(tmp_path / "m")
    options = FP32.model_copy(update={"batch_size": 8})
    warm = _failing_warm(root, options, most=2, error=lambda: RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        InferenceEngine(warm, options).predict([_volume(41, depth=16, size=32)])


# --- CUDA device and precision choices (CUDA faked: this machine may have none) ------------------------------


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, *, count: int = 2, bf16: str = "native") -> None:
    """torch.cuda as on a machine with ``count`` devices; bf16 "native", "emulated" (what older GPUs report
    unless ``including_emulation=False``) or "none"."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return bf16 == "native" or (bf16 == "emulated" and including_emulation)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


@pytest.mark.parametrize(("bf16", "expected"), [("native", torch.bfloat16), ("emulated", torch.float16)])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(
    monkeypatch: pytest.MonkeyPatch, bf16: str, expected: torch.dtype
) -> None:
    _fake_cuda(monkeypatch, bf16=bf16)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp32", torch.device("cuda")) is None


def test_a_cuda_device_index_is_checked_and_cuda_means_cuda_0(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, count=2)
    assert resolve_device("cuda") == resolve_device("cuda:0") == resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ModelError, match=r"cuda:2.*2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_a_model_is_kept_once_per_device_however_the_device_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacsnode.analysis.cnn.package import ModelPackage

    _fake_cuda(monkeypatch)
    built: list[str] = []
    real_build = ModelPackage.build

    def build(self: ModelPackage, device: torch.device | str = "cpu") -> torch.nn.Module:
        built.append(str(device))
        return real_build(self, "cpu")  # the network stays on the CPU: there is no GPU here

    monkeypatch.setattr(ModelPackage, "build", build)
    package = load_package(make_package(tmp_path / "m"))
    names = ("cuda", "cuda:0", "auto")
    warms = [warm_model(package, EngineOptions(device=name, precision="fp32")) for name in names]
    assert all(w is warms[0] for w in warms)
    assert built == ["cuda:0"]


def test_fp32_on_cuda_is_exact_and_2d_convolutions_are_benchmarked(tmp_path: Path) -> None:
    from pacsnode.analysis.cnn.engine import _network_context

    base = warm_model(load_package(make_package(tmp_path / "m")), FP32)
    before = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions
    try:
        cuda_fp32 = dataclasses.replace(base, device=torch.device("cuda", 0), autocast=None)
        with _network_context(cuda_fp32):
            assert torch.is_inference_mode_enabled()
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert torch.backends.cudnn.benchmark  # 2D batches of one shape
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cudnn.allow_tf32  # restored
        cuda_bf16 = dataclasses.replace(base, device=torch.device("cuda", 0), autocast=torch.bfloat16)
        with _network_context(cuda_bf16):
            assert torch.backends.cudnn.allow_tf32  # autocast decides; TF32 left as configured
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = before


# --- 3D: out of memory, volumes larger than the budget, timings ----------------------------------------------


def _volume_3d() -> VolumeInput:
    return VolumeInput(image=_volume(9, depth=20, size=40).image, spacing=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("error", list(OOM_ERRORS))
def test_3d_out_of_memory_halves_the_patches_per_batch_and_it_sticks(tmp_path: Path, error: str) -> None:
    root = make_bundle(tmp_path / "b")
    options = FP32.model_copy(update={"batch_size": 8})
    expected = _engine(root, batch_size=8).predict([_volume_3d()])[0]
    warm = _failing_warm(root, options, most=2, error=OOM_ERRORS[error])
    module = warm.module
    assert isinstance(module, _RunsOutOfMemory)
    engine = InferenceEngine(warm, options)
    out = engine.predict([_volume_3d()])[0]
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), atol=2e-3)
    assert engine.stats["sw_batch"] == 2
    module.calls.clear()
    engine.predict([_volume_3d()])  # the next volume starts at the halved size
    assert module.calls and all(size <= 2 and not failed for size, failed in module.calls), module.calls


def test_3d_out_of_memory_at_one_patch_stitches_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At one patch per batch, an output stitched on the device that runs out of memory moves to the host."""
    import monai.inferers.utils as inferers

    root = make_bundle(tmp_path / "b")
    options = FP32.model_copy(update={"batch_size": 1})
    expected = _engine(root).predict([_volume_3d()])[0]
    engine = InferenceEngine(warm_model(load_package(root), options), options)
    on_device = torch.device("meta")  # stands for the GPU: stitching "there" runs out of memory
    plan = engine._window_plan
    monkeypatch.setattr(engine, "_window_plan", lambda xp: (*plan(xp)[:2], on_device))
    real = inferers.sliding_window_inference
    stitched: list[str] = []

    def sliding_window_inference(*args: object, device: torch.device, **kwargs: object) -> object:
        stitched.append(str(device))
        if device == on_device:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(*args, device=device, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(inferers, "sliding_window_inference", sliding_window_inference)
    out = engine.predict([_volume_3d()])[0]
    assert stitched == ["meta", "cpu"]
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), atol=2e-3)


def test_3d_a_volume_larger_than_the_budget_stays_on_the_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU (faked) gets patches only; the volume and the output stay in host memory; timings synchronise."""
    import monai.inferers.utils as inferers

    _fake_cuda(monkeypatch)
    synchronized: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    root = make_bundle(tmp_path / "b")
    options = FP32.model_copy(update={"memory_budget_mb": 0.2, "batch_size": 4})
    base = warm_model(load_package(root), FP32)
    gpu = torch.device("cuda", 0)
    roi_key = (1, 16, 16, 16)
    warm = dataclasses.replace(base, device=gpu, per_item_bytes={roi_key: 10_000}, cpu_batch={})
    seen: dict[str, object] = {}

    def sliding_window_inference(inputs: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.update(inputs=str(inputs.device), sw_device=str(kwargs["sw_device"]), device=str(kwargs["device"]))
        return torch.zeros((1, 2, *inputs.shape[2:]))

    monkeypatch.setattr(inferers, "sliding_window_inference", sliding_window_inference)
    out = InferenceEngine(warm, options).predict([_volume_3d()])[0]
    assert out.shape == (2, 20, 40, 40)
    assert seen == {"inputs": "cpu", "sw_device": "cuda:0", "device": "cpu"}
    assert synchronized, "a CUDA timing must wait for the device"


# --- process caches are bounded ------------------------------------------------------------------------------


def test_the_warm_models_kept_are_the_most_recently_used(tmp_path: Path) -> None:
    from pacsnode.analysis.cnn import engine as engine_module

    packages = [load_package(make_package(tmp_path / f"m{i}", seed=i)) for i in range(engine_module.WARM_MODELS + 1)]
    first = warm_model(packages[0], FP32)
    second = warm_model(packages[1], FP32)
    for package in packages[2:-1]:
        warm_model(package, FP32)
    assert warm_model(packages[0], FP32) is first  # used again: now the most recent
    warm_model(packages[-1], FP32)  # one more than the cache holds: the least recently used goes
    assert len(engine_module._WARM) <= engine_module.WARM_MODELS
    assert warm_model(packages[0], FP32) is first
    assert warm_model(packages[1], FP32) is not second  # built again
