"""The 2D feed gives what the reference per-slice preprocessing gives: same probabilities, masks and findings."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pacsnode.analysis.cnn import feed
from pacsnode.analysis.cnn.engine import EngineOptions, InferenceEngine, VolumeInput, warm_model
from pacsnode.analysis.cnn.feed import Streams, copy_to_host, foreground_box, plan_feed
from pacsnode.analysis.cnn.package import load_package
from pacsnode.analysis.cnn.preprocess import acts_per_channel, build_preprocessor, parse_steps
from pacsnode.analysis.modeldev.synthetic import PhantomSpec, make_chest_phantom
from tests.support.helpers import real_chest_ct
from tests.support.models import make_package

FP32 = EngineOptions(device="cpu", precision="fp32", batch_size=4)
WINDOW = {"kind": "window", "center": -400, "width": 1500}

# Step lists that take every branch of the feed: in place on the volume, a changed grid, per-item steps on
# the device, CPU-only steps before (bilateral) and after (CLAHE) the split.
STEP_LISTS: dict[str, list[dict[str, Any]]] = {
    "window": [{"kind": "resample", "spacing": [0.8, 0.8]}, WINDOW],
    "resampled": [{"kind": "resample", "spacing": [1.1, 1.1]}, WINDOW],
    "zscore per item": [WINDOW, {"kind": "normalize", "method": "zscore"}],
    "bilateral": [WINDOW, {"kind": "denoise", "method": "bilateral", "sigma_color": 0.1}],
    "clahe": [WINDOW, {"kind": "enhance", "method": "clahe"}],
    "per channel": [
        {"kind": "denoise", "method": "median", "radius": 1},
        {"kind": "normalize", "method": "minmax", "channel_wise": True},
        {"kind": "enhance", "method": "unsharp", "sigma": 1.0},
        {"kind": "crop_pad", "size": [40, 44]},
    ],
}


def reference(
    root: Path, volume: VolumeInput, *, steps: Sequence[Any] | None = None, crop: tuple[slice, slice] | None = None
) -> np.ndarray:
    """What the engine computed before the feed: per slice, its neighbours stacked on the host, every step
    on the item, padding, the network, the padding cut, the steps undone, the activation."""
    package = load_package(root)
    spec = package.manifest.input
    net = package.build(torch.device("cpu")).eval()
    pre = build_preprocessor(spec.preprocessing if steps is None else steps)
    image = volume.image if crop is None else volume.image[:, crop[0], crop[1]]
    spacing = (float(volume.spacing[1]), float(volume.spacing[2]))
    depth, half = image.shape[0], spec.channels // 2
    out = np.zeros((package.manifest.output.channels_needed, *volume.image.shape), dtype=np.float16)
    with torch.inference_mode():
        for s in range(depth):
            index = np.clip(np.arange(s - half, s + half + 1), 0, depth - 1)
            x, _ = pre(torch.from_numpy(image[index].astype(np.float32))[None], spacing)
            pads: list[int] = []
            for n in reversed(x.shape[2:]):
                pads += [0, (-n) % spec.divisible_by]
            grid = x.shape[2:]
            x = torch.nn.functional.pad(x, pads, mode="replicate")
            y = net(x)[:, :, : grid[0], : grid[1]]
            y = torch.sigmoid(pre.restore(y.float(), image.shape[1:], spacing))
            if crop is None:
                out[:, s] = y[0].numpy()
            else:
                out[:, s, crop[0], crop[1]] = y[0].numpy()
    return out


def _volume(seed: int, depth: int = 7, rows: int = 45, cols: int = 50) -> VolumeInput:
    rng = np.random.default_rng(seed)
    image = rng.normal(-500.0, 350.0, (depth, rows, cols)).astype(np.int16)
    return VolumeInput(image=image, spacing=(2.0, 0.8, 0.8))


CUDA_FP32 = FP32.model_copy(update={"device": "cuda"})
DEVICES = [
    pytest.param(FP32, id="cpu"),
    pytest.param(
        CUDA_FP32,
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    ),
]


@pytest.mark.parametrize("options", DEVICES)
@pytest.mark.parametrize("name", list(STEP_LISTS))
def test_the_feed_matches_the_reference_preprocessing(tmp_path: Path, name: str, options: EngineOptions) -> None:
    """On the CPU, and on CUDA (streams, pinned upload) against the CPU reference."""
    steps = STEP_LISTS[name]
    root = make_package(tmp_path / "m", preprocessing=steps, divisible_by=8)
    engine = InferenceEngine(warm_model(load_package(root), options), options)
    a, b = _volume(1), _volume(2, depth=6)
    got = engine.predict([a, b])  # 13 slices in batches of 4: one batch spans both volumes
    assert engine.stats["batches"] == 4
    for volume, out in zip((a, b), got, strict=True):
        want = reference(root, volume, steps=steps)
        assert out.shape == want.shape and out.dtype == np.float16
        assert float(want.astype(np.float32).std()) > 1e-3  # not a constant map
        np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), atol=2e-3)


@pytest.mark.parametrize(
    ("name", "shape"),
    [("window", "in place"), ("window", "padded"), ("resampled", "padded"), ("per channel", "padded")],
    ids=["in place", "padded", "resampled", "per channel"],
)
def test_per_slice_steps_in_chunks_of_a_few_slices_match_the_reference(
    tmp_path: Path, name: str, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real volume is many chunks (2 MiB each on the CPU): chunk edges must not show in the output."""
    steps = STEP_LISTS[name]
    root = make_package(tmp_path / "m", preprocessing=steps, divisible_by=8)
    engine = InferenceEngine(warm_model(load_package(root), FP32), FP32)
    volume = _volume(6, rows=48, cols=56) if shape == "in place" else _volume(6)  # 48x56: no padding to 8
    monkeypatch.setattr(feed, "_CHUNK_ELEMENTS", 2 * volume.image.shape[1] * volume.image.shape[2])  # 2 slices
    got = engine.predict([volume])[0]
    want = reference(root, volume, steps=steps)
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)


def test_per_slice_steps_act_on_each_channel_alone() -> None:
    """The split's premise: a step the feed runs once per slice gives each channel what it gives that slice."""
    rng = np.random.default_rng(3)
    items = torch.from_numpy(rng.normal(-400.0, 300.0, (2, 3, 24, 28)).astype(np.float32))
    for steps in STEP_LISTS.values():
        for step in parse_steps(steps):
            if not acts_per_channel(step):
                continue
            pre = build_preprocessor([step])
            together, _ = pre(items.clone(), (0.8, 0.8))
            alone, _ = pre(items.reshape(6, 1, 24, 28).clone(), (0.8, 0.8))
            torch.testing.assert_close(together, alone.reshape(together.shape), rtol=0, atol=1e-6, msg=str(step))


def test_the_window_in_place_is_monai_s_window() -> None:
    pre = build_preprocessor([WINDOW])
    x = torch.from_numpy(np.random.default_rng(4).normal(-400.0, 900.0, (3, 1, 16, 16)).astype(np.float32))
    expected, _ = pre(x, (1.0, 1.0))
    got, _ = pre(x.clone(), (1.0, 1.0), in_place=True)
    assert torch.equal(got, expected)


def test_the_plan_splits_where_an_item_step_starts() -> None:
    plan = plan_feed(build_preprocessor(STEP_LISTS["zscore per item"]), channels=3, multiple=8)
    assert [s.kind for s in plan.per_slice.steps] == ["window"]
    assert [s.kind for s in plan.per_item.steps] == ["normalize"]
    assert not plan.host and plan.half == 1
    assert plan_feed(build_preprocessor(STEP_LISTS["clahe"]), channels=1, multiple=1).host


def test_the_foreground_box_is_the_box_of_every_voxel_above_the_threshold() -> None:
    rng = np.random.default_rng(5)
    image = np.full((6, 90, 70), -1000, dtype=np.int16)
    image[2, 30:41, 12:20] = 40
    image[4, 55, 50] = 100
    floats = image.astype(np.float32)
    floats[0, 0, 0] = np.nan  # ignored, as thresholding each voxel ignores it
    for volume in (image, floats):
        rows, cols = foreground_box(volume, -500.0, (2, 3), 8)
        assert (rows.start, rows.stop) == (28 - 1, 58 + 1)  # rows 30..55 +- 2: 30 rows, widened to 32
        assert (cols.start, cols.stop) == (9 - 1, 54 + 2)  # columns 12..50 +- 3: 45 columns, widened to 48
    empty = rng.normal(-1000.0, 1.0, (3, 20, 20))
    assert foreground_box(empty, -500.0, (2, 2), 8) == (slice(0, 20), slice(0, 20))


def _shipped_reference(volume: VolumeInput, engine: InferenceEngine) -> np.ndarray:
    from pacsnode.analysis.cnn.engine import _foreground_box

    spec = engine.warm.package.manifest.input
    return reference(engine.warm.package.root, volume, crop=_foreground_box(volume, spec.foreground))


def _shipped_engine() -> InferenceEngine:
    options = EngineOptions(device="cpu", precision="fp32", batch_size=8)
    return InferenceEngine(warm_model(load_package("lung-nodule"), options), options)


def test_the_shipped_model_gives_the_same_masks_and_findings_on_a_phantom() -> None:
    from scipy import ndimage

    phantom = make_chest_phantom(PhantomSpec(slices=6, size=96, nodules=3, noise_hu=10.0), seed=7)
    volume = VolumeInput(image=phantom.hu, spacing=phantom.spacing)
    engine = _shipped_engine()
    got = engine.predict([volume])[0].astype(np.float32)
    want = _shipped_reference(volume, engine).astype(np.float32)
    assert float(np.abs(got - want).max()) < 2e-3
    threshold = engine.warm.package.manifest.output.labels[0].threshold
    got_mask, want_mask = got[0] >= threshold, want[0] >= threshold
    assert want_mask.any()  # the model marks something here, so the comparison means something
    np.testing.assert_array_equal(got_mask, want_mask)
    got_labels, got_count = ndimage.label(got_mask)
    want_labels, want_count = ndimage.label(want_mask)
    assert got_count == want_count
    np.testing.assert_array_equal(got_labels, want_labels)


def test_the_shipped_model_on_real_slices_matches_the_reference() -> None:
    """Real chest CT: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461,
    CC BY 4.0), read where it lies."""
    from pacsnode.analysis.volume import load_series

    data = real_chest_ct()
    series = load_series(sorted((data / "A0001-5mm-B").glob("*.dcm")))
    middle = series.hu.shape[0] // 2
    volume = VolumeInput(image=series.hu[middle - 1 : middle + 2], spacing=series.spacing)
    engine = _shipped_engine()
    got = engine.predict([volume])[0].astype(np.float32)
    want = _shipped_reference(volume, engine).astype(np.float32)
    assert float(np.abs(got - want).max()) < 2e-3


class _FakeStream:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def wait_event(self, event: Any) -> None:
        self.log.append(f"{self.name} waits {event.stream}")

    def wait_stream(self, other: Any) -> None:
        self.log.append(f"{self.name} waits {other.name}")


class _FakeEvent:
    def __init__(self, log: list[str]) -> None:
        self.log, self.stream = log, ""

    def record(self, stream: Any) -> None:
        self.stream = stream.name


def test_on_cuda_compute_waits_for_the_copy_in_and_copy_out_for_the_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    names = iter(("copy-in", "compute", "copy-out"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: _FakeStream(next(names), log))
    monkeypatch.setattr(torch.cuda, "Event", lambda: _FakeEvent(log))
    streams = Streams(torch.device("cuda", 0))
    recorded: list[Any] = []

    class Tensor:
        def record_stream(self, stream: Any) -> None:
            recorded.append(stream.name)

    streams.wait(streams.event_after_copy_in(), Tensor())  # type: ignore[arg-type]
    streams.copy_out_after_compute()
    streams.used_by_copy_out(Tensor())  # type: ignore[arg-type]
    assert log == ["compute waits copy-in", "copy-out waits compute"]
    assert recorded == ["compute", "copy-out"]  # memory made on one stream, read on another, is not reused early
    cpu = Streams(torch.device("cpu"))
    assert cpu.event_after_copy_in() is None and cpu.event_after_copy_out() is None


# Steps that read values (z-score and min-max normalisation: a host round trip each on a GPU) cannot run on meta.
VALUE_FREE = [name for name in STEP_LISTS if name not in ("zscore per item", "per channel")]


@pytest.mark.parametrize("name", VALUE_FREE)
def test_on_the_meta_device_the_feed_runs_its_host_side_and_hands_back_host_buffers(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host side of a device run (bench/inference.py --loader-only): every branch, the upload, host outputs."""
    root = make_package(tmp_path / "m", preprocessing=STEP_LISTS[name], divisible_by=8)
    warm = warm_model(load_package(root), FP32)
    a, b = _volume(1), _volume(2, depth=6)
    InferenceEngine(warm, FP32).predict([a])  # the activations measured on the CPU, as the bench does
    meta = dataclasses.replace(
        warm,
        module=copy.deepcopy(warm.module).to("meta"),
        device=torch.device("meta"),
        per_item_bytes=dict(warm.per_item_bytes),
        cpu_batch={},
        oom_batch={},
        lock=threading.Lock(),
    )
    staged: list[tuple[str, tuple[int, ...]]] = []
    upload = feed._upload

    def spy(image: np.ndarray, box: tuple[slice, slice] | None, device: torch.device) -> torch.Tensor:
        out = upload(image, box, device)
        staged.append((out.device.type, tuple(out.shape)))
        return out

    monkeypatch.setattr(feed, "_upload", spy)
    engine = InferenceEngine(meta, FP32)
    got = engine.predict([a, b])
    assert engine.stats["batches"] == 4  # 13 slices in batches of 4, as on the CPU
    assert [out.shape for out in got] == [(1, *a.image.shape), (1, *b.image.shape)]
    assert all(isinstance(out, np.ndarray) and out.dtype == np.float16 for out in got)
    # the volumes went to the device, or stayed on the host for a CPU-only step
    where = "cpu" if plan_feed(meta.preprocessor, 3, 8).host else "meta"
    assert staged == [(where, a.image.shape), (where, b.image.shape)]


def test_a_cpu_output_is_the_host_output_and_a_meta_one_gets_a_host_buffer() -> None:
    streams = Streams(torch.device("cpu"))
    cpu = torch.zeros((1, 3, 4, 5), dtype=torch.float16)
    host, done = copy_to_host(cpu, streams)
    assert host is cpu and done is None
    host, done = copy_to_host(torch.empty((1, 3, 4, 5), dtype=torch.float16, device="meta"), streams)
    assert host.device.type == "cpu" and host.shape == (1, 3, 4, 5) and host.dtype == torch.float16
    assert done is None


def _box_of_every_voxel(image: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    where = np.argwhere(np.nan_to_num(image, nan=-np.inf) > threshold)
    if where.size == 0:
        return None
    return int(where[:, 1].min()), int(where[:, 1].max()), int(where[:, 2].min()), int(where[:, 2].max())


@pytest.mark.parametrize("depth", [3, 8, 9, 40])
def test_the_extent_from_sampled_slices_and_the_outside_is_the_extent_of_every_voxel(depth: int) -> None:
    # Voxels above the threshold in slices the sample skips (not every 8th), beyond the sampled rectangle on
    # each side, and volumes too short to sample.
    rng = np.random.default_rng(depth)
    for trial in range(30):
        image = np.full((depth, 50, 60), -1000, dtype=np.int16)
        image[0, 20:30, 25:35] = 0  # in a sampled slice
        for _ in range(int(rng.integers(0, 4))):
            image[rng.integers(depth), rng.integers(50), rng.integers(60)] = 100
        floats = image.astype(np.float32)
        floats[rng.integers(depth), rng.integers(50), rng.integers(60)] = np.nan
        for volume in (image, floats):
            assert feed._extent(volume, -500.0) == _box_of_every_voxel(volume, -500.0), (depth, trial)
    empty = np.full((depth, 10, 12), -1000, dtype=np.int16)
    empty[depth - 1, 9, 0] = 1  # in a skipped slice only, when there are more than 8
    assert feed._extent(empty, -500.0) == (9, 9, 0, 0)
    assert feed._extent(np.full((depth, 10, 12), -1000, dtype=np.int16), -500.0) is None


def test_a_volume_goes_up_cropped_as_a_view_on_the_cpu_and_whole_then_cropped_on_another_device() -> None:
    image = np.arange(4 * 6 * 8, dtype=np.int16).reshape(4, 6, 8)
    box = (slice(1, 5), slice(2, 8))
    on_cpu = feed._upload(image, box, torch.device("cpu"))
    assert np.shares_memory(on_cpu.numpy(), image)
    assert np.array_equal(on_cpu.numpy(), image[:, 1:5, 2:8])
    assert feed._upload(image, box, torch.device("meta")).shape == (4, 4, 6)
    # Not contiguous (no buffer to read whole): the staging copy of the crop.
    strided = np.asfortranarray(image)
    assert feed._upload(strided, box, torch.device("meta")).shape == (4, 4, 6)
    assert feed._upload(strided, None, torch.device("meta")).shape == (4, 6, 8)


def test_a_host_volume_for_the_cpu_is_ordinary_memory_of_the_shape_asked() -> None:
    array = feed.host_volume((3, 4, 5), np.dtype(np.int16), torch.device("cpu"))
    assert array.shape == (3, 4, 5) and array.dtype == np.int16 and array.flags.writeable
    array[:] = 7  # the decoder writes into it
    assert int(array.sum()) == 7 * 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_host_volume_for_cuda_is_pinned_and_goes_up_whole() -> None:
    image = feed.host_volume((4, 6, 8), np.dtype(np.int16), torch.device("cuda"))
    image[:] = np.arange(image.size, dtype=np.int16).reshape(image.shape)
    assert feed._is_pinned(image)
    up = feed._upload(image, (slice(1, 5), slice(2, 8)), torch.device("cuda"))
    assert np.array_equal(up.cpu().numpy(), image[:, 1:5, 2:8])
    device = torch.device("cuda")
    staged = feed.stage_volume(
        index=0,
        image=image,
        box=(slice(1, 5), slice(2, 8)),
        spacing=(1.0, 1.0),
        plan=plan_feed(build_preprocessor([WINDOW]), channels=3, multiple=1),
        device=device,
        streams=Streams(device),
    )
    assert staged.source is image  # held while the async copy may read it
    staged.release()
    assert staged.source is None


def test_the_series_loader_decodes_into_the_array_it_is_given(tmp_path: Path) -> None:
    from pacsnode.analysis.modeldev.synthetic import write_chest_ct
    from pacsnode.analysis.volume import load_series

    paths = write_chest_ct(tmp_path / "chest", PhantomSpec(slices=12, size=32), seed=2).paths
    given: list[np.ndarray] = []

    def allocate(shape: tuple[int, int, int], dtype: np.dtype[Any]) -> np.ndarray:
        given.append(feed.host_volume(shape, dtype, torch.device("cpu")))
        return given[-1]

    volume = load_series(paths, allocate=allocate)
    assert volume.hu is given[0]
    assert np.array_equal(volume.hu, load_series(paths).hu)
    with pytest.raises(ValueError, match="allocate gave"):
        load_series(paths, allocate=lambda shape, dtype: np.empty(shape, dtype=np.int32))


def test_the_pipeline_decodes_into_pinned_memory_only_for_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pacsnode.analysis.cnn.pipeline import ModelParams, ModelPipeline
    from pacsnode.analysis.modeldev.synthetic import write_chest_ct
    from pacsnode.analysis.pipelines import PipelineInput, SeriesInput

    truth = write_chest_ct(tmp_path / "chest", PhantomSpec(slices=12, size=32), seed=4)
    inputs = PipelineInput(
        job_id=1,
        study_instance_uid=truth.study_instance_uid,
        uid_root="2.25",
        series=(
            SeriesInput(series_instance_uid="1.2", modality="CT", series_description="", paths=tuple(truth.paths)),
        ),
    )
    params = ModelParams(model="lung-nodule")
    asked: list[tuple[tuple[int, int, int], torch.device]] = []

    def host_volume(shape: tuple[int, int, int], dtype: np.dtype[Any], device: torch.device) -> np.ndarray:
        asked.append((shape, device))  # pinning needs CUDA: ordinary memory stands for it here
        return np.empty(shape, dtype=dtype)

    monkeypatch.setattr(feed, "host_volume", host_volume)
    on_cpu = ModelPipeline()._load(inputs, params, params.package(), torch.device("cpu"))
    assert asked == []
    on_cuda = ModelPipeline()._load(inputs, params, params.package(), torch.device("cuda"))
    assert asked == [((12, 32, 32), torch.device("cuda"))]
    assert np.array_equal(on_cuda.volume.hu, on_cpu.volume.hu)
