"""CNN inference benchmark: the engine against a straightforward per-slice PyTorch loop, same model, same data.

Usage::

    .venv/bin/python bench/inference.py                 # 2 studies of 120 512x512 slices, 3 runs
    .venv/bin/python bench/inference.py --quick         # 1 study of 40 slices, 1 run
    .venv/bin/python -m bench.inference --studies 4 --slices 200 --runs 5 --device cuda
    .venv/bin/python bench/inference.py --loader-only   # the engine's feed alone, no network

What it runs
------------
The shipped ``lung-nodule`` model (2.5D MONAI UNet) over chest CT phantoms with
nodules written as real CT files (Explicit VR Little Endian, one file per
slice, 512x512, names shuffled), on each path in the same process, one after
the other, ``--runs`` times; medians are reported.

* **pacsnode**: ``ModelPipeline.run_many`` -- decode with the node's series
  loader (sorted along the normal, HU), the inference engine (batches of
  slices across all the studies, channels-last, bf16 autocast where the CPU or
  GPU has it, ``torch.inference_mode``, a loader thread preparing the next
  batch), findings (3D components, measurements) and the DICOM results (SEG,
  SR, SC) -- everything a job does but storing the results.
* **loop**: what a first implementation does: for every file, ``dcmread`` and
  ``pixel_array`` and the rescale to HU; sort by position; then per slice the
  three neighbouring slices, the same preprocessing steps, the network on a
  batch of one in fp32 under ``torch.no_grad``, the sigmoid; then the same
  findings and writers.

Figures: per path, seconds per run broken into decode, preprocess + model, and
findings + writing; slices/s and studies/min end to end; the model step alone
in slices/s (the engine's time inside its batch loop; the loop's time in its
network calls). Ratios pacsnode/loop. With CUDA, the model step on the GPU
and end-to-end as a share of it are the figures to quote (target: >= 2,000
slices/s model step on an H100, end-to-end >= 70 % of it); on a CPU, the
end-to-end ratio (target >= 2x). The benchmark asserts nothing.

``--loader-only``: the engine's feed without the network. The shipped model's
network is swapped for :class:`NoNetwork` (no work; its output, one zeroed
tensor per shape made once, is dense like a real network's); everything else
runs as in a job. The batch size is the one the engine picks for the real
network (measured once on a few slices before the timed runs). Figures, each
a median of ``--runs`` (of at least 11 for the host side, a few ms a run):

* **decode alone**: the node's series loader (``load_series``: headers,
  sorting, pixel data to int16 HU) in one thread. Decoding in two threads
  gains nothing here: pydicom holds the GIL for most of it (measured: about
  1,000 slices per CPU-second with 1, 2 or 4 threads).
* **loader with decode**: decoding in a thread (one series after the other)
  while the engine runs, device = ``--device`` (the CPU here): foreground box,
  upload, per-slice steps, batches with neighbour channels, the stand-in
  network, activation pasted into each volume's output, the output on the host.
* **feed from decoded volumes**: the same from volumes already decoded, with
  the CPU time of the process per slice. With device = CPU every device
  operation runs on this machine's cores, and the feed is bound by memory
  bandwidth: the line after it counts the bytes the feed reads and writes per
  slice (:func:`feed_bytes`, pass by pass; a 3-channel float32 512x512 input
  alone is 3 MiB) against the copy bandwidth measured here.
* **host side of a device run**: the same feed, from decoded volumes, on
  torch's ``meta`` device, at the batch the engine would run on CUDA (the
  largest that fits the memory budget, from the real network's activations as
  measured here). The studies are fed again and again in one engine call, so
  that a run is at least ``HOST_RUN_SLICES`` slices (tens of ms); the figure
  is a median of at least 11 runs, first as CPU time of the process per slice
  (less sensitive to other processes on the machine than wall time), then as
  wall slices/s. It executes everything the host does in a GPU run of the
  pipeline: the foreground box (every 8th slice and the outside of its box),
  each volume's upload as one decoded into pinned memory goes (whole, no host
  copy: the pipeline's series loader decodes into pinned memory on CUDA),
  every device operation dispatched by torch, the engine's Python per batch
  and per volume, the loader thread and its hand-over, a host buffer per
  output. Not in it: decoding (the line "decode alone"; on CUDA its int16
  array is pinned memory, written as any other), the CUDA runtime's own host
  cost (kernel launches, the async copies' calls, stream events: a few
  microseconds each, a few dozen calls per batch), page-locking (CUDA reuses
  pinned buffers), the copy of each output from the device (a DMA), and the
  staging copy a volume not decoded into pinned memory takes (a caller's own
  array: measured apart, printed on the next line, per slice). It includes
  some work a GPU run does not: a few meta operations (clamp, sigmoid into a
  float16 view, zero fills) go through Python reference implementations,
  slower than a C++ launch. This is the figure held against the target:
  >= 5,000 slices/s of 512x512, the rate a GPU model step must not wait on.
  The GPU itself is measured by ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pydicom
import torch

from pacsnode.analysis.cnn.engine import InferenceEngine, VolumeInput, WarmModel, resolve_device, warm_model
from pacsnode.analysis.cnn.findings import findings_from_probabilities
from pacsnode.analysis.cnn.package import load_package
from pacsnode.analysis.cnn.pipeline import ModelParams, ModelPipeline
from pacsnode.analysis.cnn.preprocess import build_preprocessor
from pacsnode.analysis.modeldev.synthetic import PhantomSpec, write_chest_ct
from pacsnode.analysis.pipelines import PipelineInput, SeriesInput
from pacsnode.analysis.types import Volume
from pacsnode.analysis.volume import load_series

LOADER_TARGET = 5000.0  # slices/s of 512x512 the feed must prepare, so that a GPU model step never waits on it
HOST_RUN_SLICES = 1000  # slices per run of the host-side figure, at least


def _write_corpus(root: Path, studies: int, slices: int) -> list[Any]:
    spec = PhantomSpec(
        slices=slices,
        size=512,
        slice_thickness_mm=max(1.0, 300.0 / slices / 1.5),
        nodules=8,
        vessel_spheres=False,
        blur_sigma_mm=0.5,
        noise_hu=15.0,
    )
    return [write_chest_ct(root / f"study{n}", spec, seed=100 + n) for n in range(studies)]


def _inputs(truths: list[Any]) -> list[PipelineInput]:
    return [
        PipelineInput(
            job_id=n,
            study_instance_uid=t.study_instance_uid,
            uid_root="2.25",
            series=(
                SeriesInput(
                    series_instance_uid=t.series_instance_uid,
                    modality="CT",
                    series_description="bench",
                    paths=tuple(t.paths),
                ),
            ),
        )
        for n, t in enumerate(truths)
    ]


def run_engine(truths: list[Any], params: ModelParams) -> dict[str, float]:
    pipeline = ModelPipeline()
    t0 = time.perf_counter()
    outputs = pipeline.run_many(_inputs(truths), params)
    total = time.perf_counter() - t0
    for out in outputs:
        if isinstance(out, Exception):
            raise out
    timings = outputs[0].summary["timings"]  # type: ignore[union-attr]
    write = sum(o.summary["timings"]["write_s"] for o in outputs)  # type: ignore[union-attr]
    return {
        "total_s": total,
        "decode_s": timings["decode_s"],
        "infer_s": timings["inference_s"],
        "model_s": timings["engine_model_s"],
        "write_s": write,
        "findings": float(sum(len(o.summary["findings"]) for o in outputs)),  # type: ignore[union-attr]
    }


def run_loop(truths: list[Any], params: ModelParams) -> dict[str, float]:
    """The straightforward implementation, written as one would without the engine."""
    from pacsnode.analysis.cnn.findings import label_spec
    from pacsnode.analysis.cnn.writers import write_segmentation_results

    package = load_package(params.model)
    manifest = package.manifest
    device = resolve_device(params.engine.device)
    net = package.build(device)
    preprocess = build_preprocessor(manifest.input.preprocessing)
    stats = {"total_s": 0.0, "decode_s": 0.0, "infer_s": 0.0, "model_s": 0.0, "write_s": 0.0, "findings": 0.0}
    t_all = time.perf_counter()
    for truth in truths:
        t0 = time.perf_counter()
        slices = []
        for path in truth.paths:
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            slices.append((float(ds.ImagePositionPatient[2]), hu, ds))
        slices.sort(key=lambda s: s[0])
        image = np.stack([s[1] for s in slices])
        stats["decode_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        spacing = (float(slices[0][2].PixelSpacing[0]), float(slices[0][2].PixelSpacing[1]))
        prob = np.zeros((1, *image.shape), dtype=np.float32)
        with torch.no_grad():
            for i in range(image.shape[0]):
                index = np.clip(np.arange(i - 1, i + 2), 0, image.shape[0] - 1)
                x = torch.from_numpy(image[index][None]).to(device)
                x, _ = preprocess(x, spacing)
                m0 = time.perf_counter()
                y = torch.sigmoid(net(x))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stats["model_s"] += time.perf_counter() - m0
                y = preprocess.restore(y, image.shape[1:], spacing)
                prob[:, i] = y[0].cpu().numpy()
        stats["infer_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        thickness = abs(slices[1][0] - slices[0][0])
        volume = Volume(
            hu=image.astype(np.int16),
            spacing=(thickness, *spacing),
            origin=tuple(slices[0][2].ImagePositionPatient),
            row_direction=tuple(float(v) for v in slices[0][2].ImageOrientationPatient[:3]),
            column_direction=tuple(float(v) for v in slices[0][2].ImageOrientationPatient[3:]),
            datasets=tuple(s[2] for s in slices),
        )
        findings = findings_from_probabilities(prob, volume, manifest.output.labels, manifest.output.activation)
        write_segmentation_results(
            volume,
            findings,
            [label_spec(label) for label in manifest.output.labels],
            pipeline_name="loop",
            pipeline_version="1",
            model_name=manifest.name,
            model_version=manifest.version,
        )
        stats["findings"] += len(findings)
        stats["write_s"] += time.perf_counter() - t0
    stats["total_s"] = time.perf_counter() - t_all
    return stats


class NoNetwork(torch.nn.Module):
    """Stands for the network in ``--loader-only``: no work, an output of the shape a segmentation gives."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self._outputs: dict[tuple[object, ...], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A network's output is fresh, dense memory: one zeroed tensor per shape, made once, stands for it.
        # (A view of the input, stride 3 in channels-last, made the activation that follows ~8x slower than
        # on a real network's output, and writing a fresh one per batch would time the network's write.)
        shape = (x.shape[0], self.channels, *x.shape[2:])
        key = (*shape, x.device, x.dtype)
        out = self._outputs.get(key)
        if out is None:
            out = self._outputs[key] = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return out


def feed_model(params: ModelParams, sample: VolumeInput) -> tuple[WarmModel, int]:
    """The shipped model's warm copy with :class:`NoNetwork` in place of the network, and its batch size.

    The batch size is the one the engine picks for the real network on ``sample``'s slices (run once on
    a few of them); the copy starts from those measurements. The first of the few is the maximum over all
    of ``sample``'s slices, so that their foreground box (and so the network's input shape, which the
    measurements are kept by) is the whole volume's.
    """
    package = load_package(params.model)
    warm = warm_model(package, params.engine)
    engine = InferenceEngine(warm, params.engine)
    few = np.concatenate([sample.image.max(axis=0, keepdims=True), sample.image[:7]])
    engine.predict([VolumeInput(image=few, spacing=sample.spacing)])
    batch = int(engine.stats["batch_size"])
    feed = dataclasses.replace(
        warm,
        module=NoNetwork(package.manifest.output.channels_needed),
        per_item_bytes=dict(warm.per_item_bytes),
        cpu_batch=dict(warm.cpu_batch),
        oom_batch={},
        lock=threading.Lock(),
    )
    return feed, batch


def host_side_model(feed: WarmModel, params: ModelParams) -> tuple[WarmModel, ModelParams, int]:
    """:func:`feed_model`'s copy on torch's ``meta`` device, with the engine options that run it at a GPU's batch.

    The batch is the one the engine runs on CUDA: the largest whose activations, as measured for the real
    network (on the CPU, by :func:`feed_model`), fit the memory budget (:meth:`InferenceEngine.batch_that_fits`).
    """
    engine = InferenceEngine(feed, params.engine)
    key, per_item = max(feed.per_item_bytes.items(), key=lambda kv: kv[1])
    batch = engine.batch_that_fits(key, per_item)
    meta = dataclasses.replace(
        feed,
        device=torch.device("meta"),
        autocast=None,  # autocast has no meta device; the stand-in network has nothing to cast
        per_item_bytes=dict(feed.per_item_bytes),
        cpu_batch={},
        oom_batch={},
        lock=threading.Lock(),
    )
    return meta, params.model_copy(update={"engine": params.engine.model_copy(update={"batch_size": batch})}), batch


def run_feed(
    truths: list[Any], feed: WarmModel, params: ModelParams, volumes: list[VolumeInput] | None
) -> tuple[float, float]:
    """Seconds (wall, CPU of the process) for the engine to take every study through its feed.

    Decoded in a thread when ``volumes`` is None.
    """
    engine = InferenceEngine(feed, params.engine)
    t0, c0 = time.perf_counter(), time.process_time()
    if volumes is not None:
        engine.predict(volumes)
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacsnode-decode") as decoder:
            futures = [decoder.submit(load_series, t.paths) for t in truths]

            def decoded() -> Iterator[VolumeInput]:
                for future in futures:
                    volume = future.result()
                    yield VolumeInput(image=volume.hu, spacing=volume.spacing)

            engine.predict(decoded())
    if feed.device.type == "cuda":
        torch.cuda.synchronize(feed.device)
    return time.perf_counter() - t0, time.process_time() - c0


def measure_feed(params: ModelParams, volumes: list[VolumeInput], runs: int) -> tuple[float, int]:
    """Slices/s of the engine's feed from decoded ``volumes`` (median of ``runs``), and the batch size it used."""
    feed, batch = feed_model(params, volumes[0])
    run_feed([], feed, params, volumes[:1])  # warm-up
    times = [run_feed([], feed, params, volumes)[0] for _ in range(runs)]
    return sum(v.image.shape[0] for v in volumes) / statistics.median(times), batch


def measure_host_side(params: ModelParams, volumes: list[VolumeInput], runs: int) -> tuple[float, int]:
    """Slices/s of the feed's host side (:func:`host_side_model`) from decoded ``volumes``, median of ``runs``.

    And the batch size it ran at.
    """
    feed, _ = feed_model(params, volumes[0])
    meta, meta_params, batch = host_side_model(feed, params)
    run_feed([], meta, meta_params, volumes[:1])  # warm-up
    slices = sum(v.image.shape[0] for v in volumes)
    repeat = max(1, -(-HOST_RUN_SLICES // slices))  # runs of tens of ms, as in --loader-only
    times = [run_feed([], meta, meta_params, volumes * repeat)[0] for _ in range(runs)]
    return slices * repeat / statistics.median(times), batch


def count_device_ops(feed: WarmModel, params: ModelParams, volumes: list[VolumeInput]) -> int | None:
    """Top-level torch operations one run of the feed dispatches, in every thread; None where torch cannot count them.

    On CUDA each is a kernel launch, an async copy or a view: the host calls a ``meta`` run does not time.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
        with profile(activities=[ProfilerActivity.CPU], experimental_config=config) as prof:
            InferenceEngine(feed, params.engine).predict(volumes)
        return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))
    except (AttributeError, TypeError, RuntimeError):  # the option is experimental (torch >= 2.6)
        return None


def staging_copy_s(volumes: list[VolumeInput], params: ModelParams) -> float:
    """Seconds per slice to copy each volume's crop into a reused host buffer (median of 5): a staged upload's host pass.

    On CUDA a volume the caller did not decode into pinned memory takes this copy (into a cached pinned
    buffer) before its upload; one decoded into :func:`~pacsnode.analysis.cnn.feed.host_volume` does not.
    """
    from pacsnode.analysis.cnn.engine import _foreground_box

    foreground = load_package(params.model).manifest.input.foreground
    crops = [torch.from_numpy(v.image[:, b[0], b[1]]) for v in volumes for b in [_foreground_box(v, foreground)]]
    buffers = [torch.empty(c.shape, dtype=c.dtype) for c in crops]
    for buffer, crop in zip(buffers, crops, strict=True):
        buffer.copy_(crop)  # touched once, as the pinned-memory cache's buffers are
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for buffer, crop in zip(buffers, crops, strict=True):
            buffer.copy_(crop)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / sum(c.shape[0] for c in crops)


def memory_bandwidth() -> float:
    """Bytes/s this machine copies, read and write counted (torch's copy of 256 MiB of float32, best of 5)."""
    src = torch.ones(64 << 20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def feed_bytes(rows: int, cols: int, crop: tuple[int, int], channels: int) -> int:
    """Bytes of memory the feed reads and writes per slice with the device = the CPU, the shipped model's steps.

    Counted pass by pass (see the module's docstring), for a slice of ``rows`` x ``cols`` cropped to ``crop``:
    the foreground box (int16 read), the int16 slice into float32 (2 + 4), the window's three in-place
    passes (3 x 8), the neighbour channels into the channels-last input (``channels`` x (4 + 4)), the
    activation of the output into float16 (4 + 2) and the output's zeros outside the box (2). The network's
    own reads and writes are not counted.
    """
    inside = crop[0] * crop[1]
    return 2 * rows * cols + (6 + 24 + 8 * channels + 6) * inside + 2 * (rows * cols - inside)


def loader_only(args: argparse.Namespace, params: ModelParams) -> dict[str, float]:
    """The ``--loader-only`` figures: the feed with decoding, from decoded volumes, and its host side."""
    slices = args.studies * args.slices
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-loader-") as tmp:
        t0 = time.perf_counter()
        truths = _write_corpus(Path(tmp), args.studies, args.slices)
        print(
            f"corpus: {args.studies} studies x {args.slices} slices of 512x512 written in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        decoded = [load_series(t.paths) for t in truths]
        decode_s = time.perf_counter() - t0
        volumes = [VolumeInput(image=v.hu, spacing=v.spacing) for v in decoded]
        feed, batch = feed_model(params, volumes[0])
        run_feed(truths, feed, params, volumes[:1])  # warm-up
        with_decode = [run_feed(truths, feed, params, None) for _ in range(args.runs)]
        from_volumes = [run_feed(truths, feed, params, volumes) for _ in range(args.runs)]
        meta, meta_params, gpu_batch = host_side_model(feed, params)
        run_feed(truths, meta, meta_params, volumes[:1])  # warm-up
        # The studies again and again in one engine call, so that a run is about 1,000 slices (tens of ms).
        repeat = max(1, -(-HOST_RUN_SLICES // slices))
        host = [run_feed(truths, meta, meta_params, volumes * repeat) for _ in range(max(11, args.runs))]
        ops = count_device_ops(meta, meta_params, volumes)
        staging = staging_copy_s(volumes, params)
    key = max(feed.per_item_bytes, key=lambda k: feed.per_item_bytes[k])  # (channels, rows, columns) of the input
    crop = (int(key[1]), int(key[2]))  # type: ignore[call-overload]  # the shipped model: the foreground box
    touched = feed_bytes(512, 512, crop, int(key[0]))  # type: ignore[call-overload]
    bandwidth = memory_bandwidth()
    figures = {
        "batch_size": float(batch),
        "decode_slices_per_s": slices / decode_s,
        "feed_slices_per_s": slices / statistics.median(w for w, _ in from_volumes),
        "feed_cpu_s_per_slice": statistics.median(c for _, c in from_volumes) / slices,
        "loader_slices_per_s": slices / statistics.median(w for w, _ in with_decode),
        "host_batch_size": float(gpu_batch),
        "host_slices_per_s": slices * repeat / statistics.median(w for w, _ in host),
        "host_best_slices_per_s": slices * repeat / min(w for w, _ in host),
        "host_cpu_s_per_slice": statistics.median(c for _, c in host) / (slices * repeat),
        "host_run_slices": float(slices * repeat),
        "staging_copy_s_per_slice": staging,
        "feed_bytes_per_slice": float(touched),
        "memory_bandwidth_bytes_per_s": bandwidth,
        "target_slices_per_s": LOADER_TARGET,
    }
    if ops is not None:
        figures["host_device_ops_per_slice"] = ops / slices
    # Met by the host work measured; the CUDA runtime's share of it is not in the figure (next line).
    verdict = "met, CUDA calls aside" if figures["host_slices_per_s"] >= LOADER_TARGET else "NOT met"
    print(
        f"decode alone {figures['decode_slices_per_s']:.0f} slices/s (one thread; the node's series loader, "
        "headers included)"
    )
    print(
        f"loader with decode, device {feed.device} (decode -> volume -> preprocessing -> batches -> output): "
        f"{figures['loader_slices_per_s']:.0f} slices/s at batch {batch}"
    )
    print(
        f"feed from decoded volumes, device {feed.device}: {figures['feed_slices_per_s']:.0f} slices/s at batch "
        f"{batch} (the engine's pick for the network here), "
        f"{figures['feed_cpu_s_per_slice'] * 1e6:.0f} us CPU per slice"
    )
    print(
        f"  its memory traffic: {touched / 2**20:.1f} MiB per slice (crop {crop[0]}x{crop[1]}); this machine "
        f"copies {bandwidth / 1e9:.1f} GB/s: at most {bandwidth / touched:.0f} slices/s from bandwidth alone"
    )
    cpu_us = figures["host_cpu_s_per_slice"] * 1e6
    print(
        f"host side of a device run (device meta: every device op dispatched, no kernel runs), at batch {gpu_batch} "
        f"(the engine's CUDA pick), median of {len(host)} runs of {slices * repeat} slices: {cpu_us:.0f} us CPU per "
        f"slice ({1e6 / cpu_us:.0f} slices per CPU-second); wall {figures['host_slices_per_s']:.0f} slices/s "
        f"(best {figures['host_best_slices_per_s']:.0f}); target >= {LOADER_TARGET:.0f}: {verdict}"
    )
    print(
        f"  volumes decoded into pinned memory (the pipeline on CUDA) go up without a host pass; any other volume "
        f"adds a staging copy of its crop: {staging * 1e6:.0f} us per slice (into a reused buffer), not in the figure"
    )
    untimed = "not counted" if ops is None else f"{ops / slices:.2f} per slice"
    print(
        f"  not in it: the CUDA runtime's host time for the device operations dispatched ({untimed}; on CUDA "
        "one launch or async copy each, views none); no GPU here to measure it"
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", default="auto", help="engine batch size: auto or a number")
    parser.add_argument("--quick", action="store_true", help="1 study of 40 slices, 1 run")
    parser.add_argument("--loader-only", action="store_true", help="the engine's feed alone, without the network")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.slices, args.runs = 1, 40, 1
    device = resolve_device(args.device)
    params = ModelParams(
        model="lung-nodule",
        engine={
            "device": args.device,
            "batch_size": args.batch_size if args.batch_size == "auto" else int(args.batch_size),
        },
    )
    if args.loader_only:
        print(f"device {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}; loader only (no network)")
        figures = loader_only(args, params)
        if args.json:
            args.json.write_text(json.dumps({"loader": figures, "device": str(device)}, indent=2))
        return 0
    options = params.engine
    warm = warm_model(load_package(params.model), options)
    cpu = os.cpu_count()
    print(
        f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"{cpu} CPU cores, torch {torch.__version__}, engine precision {warm.autocast or 'fp32'}"
    )
    slices = args.studies * args.slices
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-inference-") as tmp:
        t0 = time.perf_counter()
        truths = _write_corpus(Path(tmp), args.studies, args.slices)
        print(
            f"corpus: {args.studies} studies x {args.slices} slices of 512x512 written in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        run_engine(truths[:1], params)  # warm-up: model loaded, memory probe done, caches warm
        results: dict[str, list[dict[str, float]]] = {"pacsnode": [], "loop": []}
        for run in range(args.runs):
            for name, fn in (("pacsnode", run_engine), ("loop", run_loop)):
                stats = fn(truths, params)
                results[name].append(stats)
                print(
                    f"run {run + 1} {name:8s}: {stats['total_s']:.2f} s (decode {stats['decode_s']:.2f}, "
                    f"preprocess+model {stats['infer_s']:.2f} [model {stats['model_s']:.2f}], "
                    f"findings+write {stats['write_s']:.2f}; {int(stats['findings'])} findings)",
                    flush=True,
                )
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    rows = []
    for name in ("pacsnode", "loop"):
        m = med[name]
        rows.append(
            (name, m["total_s"], slices / m["total_s"], args.studies * 60 / m["total_s"], slices / m["model_s"])
        )
    print()
    print(f"{'path':10s} {'median s':>9s} {'slices/s':>9s} {'studies/min':>12s} {'model step slices/s':>20s}")
    for name, total, sps, spm, model in rows:
        print(f"{name:10s} {total:9.2f} {sps:9.1f} {spm:12.2f} {model:20.1f}")
    ratio_e2e = med["loop"]["total_s"] / med["pacsnode"]["total_s"]
    ratio_model = med["loop"]["model_s"] / med["pacsnode"]["model_s"]
    e2e_share = (slices / med["pacsnode"]["total_s"]) / (slices / med["pacsnode"]["model_s"])
    print(
        f"\npacsnode / loop: end to end {ratio_e2e:.2f}x, model step {ratio_model:.2f}x; "
        f"pacsnode end to end = {e2e_share:.0%} of its model step"
    )
    if device.type == "cuda":
        print(
            f"GPU model step: {slices / med['pacsnode']['model_s']:.0f} slices/s (target >= 2000 on an H100); "
            f"end to end {e2e_share:.0%} of it (target >= 70%)"
        )
    else:
        print("CPU: target end to end >= 2x the loop")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"median": med, "runs": results, "device": str(device), "studies": args.studies, "slices": args.slices},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
