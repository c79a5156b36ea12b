"""Inference engine: runs a model package over volumes, fast on a GPU and correct on a CPU.

- **Device.** ``auto`` takes CUDA when present, else the CPU; a config may
  name ``cpu``, ``cuda`` or ``cuda:N``.
- **Warm models.** A network is built once per process and device and kept
  (:func:`warm_model`, the ``WARM_MODELS`` most recently used), so a worker pays
  the load only for its first job.
- **Batching.** A 2D model sees batches of slices, taken across all the
  volumes handed to one call (several queued studies fill one batch); a 3D
  model runs MONAI's sliding-window inference over patches.
- **Precision.** ``auto`` is bf16 autocast on a GPU that has it (fp16
  otherwise) and on a CPU with AVX-512 BF16 or AMX, fp32 elsewhere; ``fp32``
  on CUDA turns TF32 off while the network runs. Every thread that runs the
  network (the loader's probes too) enters ``torch.inference_mode``; TorchScript
  networks are frozen; 4D inputs are channels-last.
- **Overlap.** A loader thread stacks, converts and (on CUDA) pins the next
  batches while the device computes the current one.
- **Memory budget.** The batch size (sliding-window batch for 3D) is the
  largest whose activations, measured by one probe pass, fit the budget;
  a CUDA out-of-memory error halves it, and the halved size holds from then on
  for that input shape and budget. A 3D volume or output that does not fit
  the budget on the device stays in host memory (patches go to the device);
  out of memory at one patch per batch moves the stitching to the host.
- **Timeout.** A deadline (monotonic seconds) is checked between batches; past
  it the call raises :class:`InferenceTimeout` so the job fails cleanly before
  the worker's hard timeout.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pacsnode.analysis.cnn.feed import (
    FeedPlan,
    StagedVolume,
    Streams,
    copy_to_host,
    foreground_box,
    host_items,
    plan_feed,
    stage_volume,
)
from pacsnode.analysis.cnn.package import ModelPackage
from pacsnode.analysis.cnn.preprocess import Preprocessor, build_preprocessor
from pacsnode.analysis.errors import AnalysisError, InferenceTimeout, ModelError
from pacsnode.analysis.settings import EngineOptions

__all__ = [
    "EngineOptions",
    "InferenceEngine",
    "WarmModel",
    "resolve_device",
    "resolve_precision",
    "warm_model",
]

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU.

    CUDA devices come back with their index (``cuda`` is ``cuda:0``), so one device has one name.

    Raises
    ------
    ModelError
        If the machine has no CUDA device, or none of that index.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ModelError(f"device {name!r} asked for, but this machine has no CUDA device")
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        have = "1 CUDA device (cuda:0)" if count == 1 else f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"
        raise ModelError(f"device {name!r} asked for, but this machine has {have}")
    return torch.device("cuda", index)


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` on ``device``; None for full fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise ModelError("fp16 runs on CUDA only; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        # Without including_emulation=False, GPUs that only emulate bf16 (slowly) count as having it.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else None


@dataclass(kw_only=True)
class WarmModel:
    """A built network on its device, with what running it needs."""

    package: ModelPackage
    module: torch.nn.Module
    device: torch.device
    autocast: torch.dtype | None
    preprocessor: Preprocessor
    per_item_bytes: dict[tuple[object, ...], int] = field(default_factory=dict)  # measured, by shape and spacing
    cpu_batch: dict[tuple[object, ...], int] = field(default_factory=dict)  # fastest CPU batch, by shape
    # The batch size an out-of-memory error cut to, by input shape and memory budget (bytes): engines with
    # the same budget start from it; another budget measures for itself.
    oom_batch: dict[tuple[object, ...], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


WARM_MODELS = 4  # networks kept per process, the most recently used; each holds its weights in memory
_WARM: collections.OrderedDict[tuple[str, str, str, str], WarmModel] = collections.OrderedDict()
_WARM_LOCK = threading.Lock()


def warm_model(
    package: ModelPackage, options: EngineOptions, preprocessing: Sequence[object] | None = None
) -> WarmModel:
    """The package's network on the options' device, built on first use and kept for the process."""
    device = resolve_device(options.device)
    autocast = resolve_precision(options.precision, device)
    steps = list(package.manifest.input.preprocessing if preprocessing is None else preprocessing)
    key = (package.key, str(device), str(autocast), repr(steps))  # CUDA devices named with their index
    with _WARM_LOCK:
        warm = _WARM.get(key)
        if warm is not None:
            _WARM.move_to_end(key)
        else:
            t0 = time.perf_counter()
            module = _inference_module(package.build(device), package.manifest.input.dims == "2d")
            warm = WarmModel(
                package=package,
                module=module,
                device=device,
                autocast=autocast,
                preprocessor=build_preprocessor(steps),  # type: ignore[arg-type]
            )
            _WARM[key] = warm
            while len(_WARM) > WARM_MODELS:
                _, dropped = _WARM.popitem(last=False)
                logger.info(
                    "model %s dropped from the warm models (least recently used)", dropped.package.manifest.name
                )
            logger.info(
                "model %s %s loaded on %s (%s) in %.2f s",
                package.manifest.name,
                package.manifest.version,
                device,
                autocast or "fp32",
                time.perf_counter() - t0,
            )
        return warm


def _inference_module(module: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """The network as the engine runs it: eval mode, no gradients, TorchScript frozen.

    A TorchScript module (traced ones in particular, as MONAI Model Zoo bundles ship them) records for
    autograd when its parameters require gradients; frozen, its weights are constants and nothing is recorded.
    """
    module = module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    if channels_last:
        # Module.to takes memory_format (documented), which its typed overloads leave out
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if isinstance(module, torch.jit.ScriptModule):
        try:
            module = torch.jit.freeze(module)
        except Exception as exc:  # a module freezing refuses still runs, its parameters without gradients
            logger.debug("TorchScript module not frozen: %s", exc)
    return module


@contextlib.contextmanager
def _network_context(warm: WarmModel) -> Iterator[None]:
    """What every thread that runs the network enters, around preprocessing and the network.

    ``torch.inference_mode`` is per thread: the caller's does not reach the loader thread. On CUDA,
    ``fp32`` means full fp32 (no TF32 in matrix products and convolutions), and 2D batches, of a few
    fixed shapes, let cuDNN pick its fastest convolutions; torch's flags are restored afterwards.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if warm.device.type == "cuda":
            stack.enter_context(_cuda_flags(warm))
        yield


_CUDA_FLAGS_LOCK = threading.Lock()
_CUDA_FLAGS: dict[str, Any] = {"exact": 0, "benchmark": 0, "saved_exact": None, "saved_benchmark": None}


@contextlib.contextmanager
def _cuda_flags(warm: WarmModel) -> Iterator[None]:
    """torch's global CUDA flags for the network's run; counted, so that concurrent runs restore them once."""
    exact = warm.autocast is None
    benchmark = warm.package.manifest.input.dims == "2d"
    flags = _CUDA_FLAGS
    with _CUDA_FLAGS_LOCK:
        if exact:
            if flags["exact"] == 0:
                flags["saved_exact"] = (
                    torch.backends.cuda.matmul.allow_tf32,
                    torch.backends.cudnn.allow_tf32,
                    torch.get_float32_matmul_precision(),
                )
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                torch.set_float32_matmul_precision("highest")
            flags["exact"] += 1
        if benchmark:
            if flags["benchmark"] == 0:
                flags["saved_benchmark"] = torch.backends.cudnn.benchmark
                torch.backends.cudnn.benchmark = True
            flags["benchmark"] += 1
    try:
        yield
    finally:
        with _CUDA_FLAGS_LOCK:
            if exact:
                flags["exact"] -= 1
                if flags["exact"] == 0:
                    matmul, cudnn, precision = flags["saved_exact"]
                    torch.set_float32_matmul_precision(precision)
                    torch.backends.cuda.matmul.allow_tf32 = matmul
                    torch.backends.cudnn.allow_tf32 = cudnn
            if benchmark:
                flags["benchmark"] -= 1
                if flags["benchmark"] == 0:
                    torch.backends.cudnn.benchmark = flags["saved_benchmark"]


@contextlib.contextmanager
def _running(warm: WarmModel) -> Iterator[None]:
    """:func:`_network_context` and the model's autocast: around the network alone."""
    with _network_context(warm), _autocast(warm):
        yield


@dataclass(frozen=True, kw_only=True)
class VolumeInput:
    """One volume to run: intensities (slices, rows, columns) and spacing (slice, row, column) in mm."""

    image: np.ndarray
    spacing: tuple[float, float, float]


@dataclass(frozen=True, kw_only=True)
class _Batch:
    """A batch as the loader thread describes it: runs of slices of staged volumes, cut on the device."""

    parts: list[tuple[StagedVolume, int, int]]  # (volume, first slice, count), in order
    key: tuple[object, ...]  # the network's input shape (channels, rows, columns after preprocessing)
    x: torch.Tensor | None = None  # the items with their per-item steps done on the CPU (CPU-only steps)

    @property
    def size(self) -> int:
        return sum(count for _, _, count in self.parts)


class InferenceEngine:
    """Runs one warm model over volumes; outputs are probabilities (after the activation)."""

    def __init__(self, warm: WarmModel, options: EngineOptions) -> None:
        self.warm = warm
        self.options = options
        self.stats: dict[str, float] = {}

    # --- public -------------------------------------------------------------------------------

    def predict(
        self,
        volumes: Iterable[VolumeInput],
        *,
        deadline: float | None = None,
        on_done: Callable[[int, np.ndarray], None] | None = None,
    ) -> list[np.ndarray]:
        """Probabilities per volume: float16 arrays (K, slices, rows, columns) for K output channels.

        A 2D classification model gives (K, slices): each slice's scores.

        ``volumes`` may be a generator: a 2D model's loader thread takes the next volume (waiting for
        its decoding, say) while the device computes on the ones before. ``on_done(index,
        probabilities)`` is called as soon as a volume is complete, so its results can be written
        while the next volumes run.

        Raises
        ------
        InferenceTimeout
            Past ``deadline`` (``time.monotonic()`` value).
        ModelError
            If the network's output does not match the manifest.
        """
        spec = self.warm.package.manifest.input
        with self.warm.lock, torch.inference_mode():
            if spec.dims == "2d":
                return self._predict_2d(volumes, deadline, on_done)
            result = []
            for index, volume in enumerate(volumes):
                inner, box = _cropped(volume, spec.foreground)
                result.append(_paste(self._predict_3d(inner, deadline), volume, box))
                if on_done is not None:
                    on_done(index, result[-1])
            return result

    # --- 2D: batches of slices across volumes ------------------------------------------------------

    def _predict_2d(
        self,
        volumes: Iterable[VolumeInput],
        deadline: float | None,
        on_done: Callable[[int, np.ndarray], None] | None,
    ) -> list[np.ndarray]:
        warm = self.warm
        stats = {"items": 0, "batches": 0, "model_s": 0.0, "wait_s": 0.0, "batch_size": 0}
        model_lock = threading.Lock()  # the loader's probes and the batches never run the network at once
        streams = Streams(warm.device)
        staged: list[StagedVolume] = []  # in arrival order: filled by the loader thread
        finishing: list[StagedVolume] = []  # complete, output being copied to the host
        results: dict[int, np.ndarray] = {}
        marks: list[tuple[Any, Any]] = []  # CUDA events around each batch on the compute stream

        def batch_size(key: tuple[object, ...], sample: VolumeInput, spacing: tuple[float, float]) -> int:
            with model_lock:
                size = self._batch_size_2d(key, sample, spacing)
            stats["batch_size"] = max(stats["batch_size"], size)
            return size

        def hand_over(wait: bool) -> None:
            """Volumes whose output reached the host, handed on in the order they completed."""
            while finishing and (wait or _event_done(finishing[0].done)):
                volume = finishing.pop(0)
                if volume.done is not None:
                    volume.done.synchronize()
                assert volume.host_output is not None
                results[volume.index] = volume.host_output.numpy()
                volume.release()
                if on_done is not None:
                    on_done(volume.index, results[volume.index])

        spec = warm.package.manifest.input
        plan = plan_feed(warm.preprocessor, spec.channels, spec.divisible_by)
        stream = _Prefetch(
            self._slice_batches(volumes, staged, batch_size, streams, plan), depth=self.options.prefetch_batches
        )
        try:
            for batch in stream:
                if deadline is not None and time.monotonic() > deadline:
                    raise InferenceTimeout("inference did not finish within the job's timeout")
                t0 = time.perf_counter()
                with model_lock, streams.compute():
                    for volume, _, _ in batch.parts:
                        streams.wait(volume.ready, volume.prepared)
                    began = streams.mark()
                    logits = self._run_2d(self._network_input(batch, plan), batch)
                    finishing += self._paste_batch(logits, batch, streams)
                    if began is not None:  # CUDA: the device's time, read once the work is done
                        marks.append((began, streams.mark()))
                    else:
                        stats["model_s"] += time.perf_counter() - t0
                stats["items"] += batch.size
                stats["batches"] += 1
                hand_over(wait=False)
            hand_over(wait=True)
            if marks:
                marks[-1][1].synchronize()
                stats["model_s"] += sum(start.elapsed_time(end) for start, end in marks) / 1000.0
        finally:
            stats["wait_s"] += stream.waited
            stream.close()
        self.stats = stats
        return [results[volume.index] for volume in staged]

    def _slice_batches(
        self,
        volumes: Iterable[VolumeInput],
        staged: list[StagedVolume],
        batch_size: Callable[[tuple[object, ...], VolumeInput, tuple[float, float]], int],
        streams: Streams,
        plan: FeedPlan,
    ) -> Iterator[_Batch]:
        """Batches of slices of the staged volumes (see :mod:`pacsnode.analysis.cnn.feed`); in the loader thread.

        Takes each volume as it comes, crops it to the foreground, uploads it and runs its per-slice
        steps once; consecutive volumes of one network input shape share batches.
        """
        warm = self.warm
        spec = warm.package.manifest.input
        parts: list[tuple[StagedVolume, int, int]] = []
        filled = 0
        current: tuple[object, ...] | None = None
        signature: tuple[object, ...] | None = None  # network input shape, crop and spacing of the batch
        size = 1

        def flush() -> _Batch:
            nonlocal filled
            assert current is not None
            x = None
            if plan.host and plan.per_item.steps:
                pieces = [host_items(v, start, count, plan, pin=False) for v, start, count in parts]
                x = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                if warm.device.type == "cuda":
                    x = x.pin_memory()
            batch = _Batch(parts=list(parts), key=current, x=x)
            parts.clear()
            filled = 0
            return batch

        for vi, volume in enumerate(volumes):
            _check_volume(volume)
            box = _foreground_box(volume, spec.foreground) if spec.foreground else None
            inner = (
                volume if box is None else VolumeInput(image=volume.image[:, box[0], box[1]], spacing=volume.spacing)
            )
            item_spacing = (float(volume.spacing[1]), float(volume.spacing[2]))
            crop = (int(inner.image.shape[1]), int(inner.image.shape[2]))
            grid = warm.preprocessor.spatial_shape_after(crop, item_spacing)
            # Memory and speed depend on what the network sees: the preprocessed, padded slice.
            key = (spec.channels, *(-(-int(n) // spec.divisible_by) * spec.divisible_by for n in grid))
            if (key, crop, item_spacing) != signature:
                if parts:
                    yield flush()
                signature, current = (key, crop, item_spacing), key
                size = batch_size(key, inner, item_spacing)
            one = stage_volume(
                index=vi,
                image=volume.image,
                box=box,
                spacing=item_spacing,
                plan=plan,
                device=warm.device,
                streams=streams,
            )
            staged.append(one)
            start = 0
            while start < one.depth:
                limit = min(size, self._oom_limit(current))
                count = min(one.depth - start, limit - filled)
                parts.append((one, start, count))
                filled += count
                start += count
                if filled >= limit:
                    yield flush()
        if parts:
            yield flush()

    def _network_input(self, batch: _Batch, plan: FeedPlan) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The batch as the network takes it, on the device: per-item steps, padding, channels-last."""
        warm = self.warm
        plan_steps = plan.per_item
        first = batch.parts[0][0]
        half = plan.half
        if batch.x is not None:
            x = batch.x.to(warm.device, non_blocking=True)
        elif not plan_steps.steps:
            # The one copy of the feed: the neighbour views into the network's channels-last input.
            rows, cols = first.prepared.shape[1:]
            x = torch.empty(
                (batch.size, 2 * half + 1, rows, cols),
                dtype=torch.float32,
                device=warm.device,
                memory_format=torch.channels_last,  # allocated so: no pass over memory to make it channels-last
            )
            at = 0
            for volume, start, count in batch.parts:
                x[at : at + count].copy_(volume.items(start, count, half))
                at += count
            return x, first.pad
        else:
            views = [volume.items(start, count, half) for volume, start, count in batch.parts]
            x = views[0].clone() if len(views) == 1 else torch.cat(views)  # the steps must not see overlaps
            x, _ = plan_steps(x, first.item_spacing, in_place=True)
        x, pad = _pad_to_multiple(x, warm.package.manifest.input.divisible_by)
        return x.contiguous(memory_format=torch.channels_last), pad

    def _paste_batch(self, logits: torch.Tensor, batch: _Batch, streams: Streams) -> list[StagedVolume]:
        """Write a batch's probabilities (the activation of ``logits``) into its volumes' outputs on the device.

        Returns the volumes it completed.

        A completed volume's output starts its copy to the host (on CUDA, on the copy-out stream).
        """
        completed = []
        activation = self.warm.package.manifest.output.activation
        at = 0
        for volume, start, count in batch.parts:
            part = logits[at : at + count].transpose(0, 1)  # (K, count, ...)
            at += count
            if volume.output is None:
                volume.output = _output_volume(part, volume)
            target = volume.output[:, start : start + count]
            if part.ndim == 4 and volume.box is not None:
                target = target[:, :, volume.box[0], volume.box[1]]
            if activation == "sigmoid":
                torch.sigmoid(part, out=target)  # computed in float32, stored as float16
            else:
                target.copy_(_activate(part.transpose(0, 1), activation).transpose(0, 1))
            volume.remaining -= count
            if volume.remaining == 0:
                completed.append(volume)
        for volume in completed:
            assert volume.output is not None
            volume.host_output, volume.done = copy_to_host(volume.output, streams)
        return completed

    def _run_2d(self, prepared: tuple[torch.Tensor, tuple[int, ...]], batch: _Batch) -> torch.Tensor:
        """The network on one device batch, its output mapped back; halves itself on CUDA out-of-memory.

        The halved size sticks: batches already made larger are split before they run, and the loader
        makes no larger ones from then on (for this shape and memory budget).
        """
        xp, pad = prepared
        first = batch.parts[0][0]
        limit = self._oom_limit(batch.key)
        if xp.shape[0] > limit:
            return torch.cat([self._run_2d((xp[i : i + limit], pad), batch) for i in range(0, xp.shape[0], limit)])
        try:
            return self._network_2d(xp, pad, first.spacing, first.crop)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if xp.shape[0] == 1 or not _is_out_of_memory(exc):
                raise
        # Out of the handler, so the failed batch's tensors (and its traceback's) are gone before the retry.
        _empty_cache(self.warm.device)
        half = xp.shape[0] // 2
        logger.warning(
            "CUDA out of memory at a batch of %d: splitting it, and smaller batches from now on", xp.shape[0]
        )
        self.warm.oom_batch[self._oom_key(batch.key)] = min(half, self._oom_limit(batch.key))
        return self._run_2d(prepared, batch)

    def _network_2d(
        self, xp: torch.Tensor, pad: tuple[int, ...], spacing: tuple[float, float], shape: tuple[int, int]
    ) -> torch.Tensor:
        """The network on a prepared device batch; its output (float32) on the items' own grid, before the activation."""
        warm = self.warm
        with _network_context(warm):  # also in the loader thread, which times batch sizes with it
            with _autocast(warm):
                logits = warm.module(xp)
            logits = _check_output(logits, warm, xp)
            if logits.ndim == 4:
                logits = _unpad(logits, pad)
                logits = warm.preprocessor.restore(logits.float(), shape, spacing)
            return logits.float()

    def _forward_2d(self, x: torch.Tensor, spacing: tuple[float, float], shape: tuple[int, int]) -> torch.Tensor:
        """The reference path on a host batch of raw items (N, C, H, W): every step on the batch, then the network.

        The engine's probes and the CPU batch timing use it; the feed must give what it gives.
        """
        warm = self.warm
        with _network_context(warm):
            xp, pad = _prepare_2d(warm, x.to(warm.device, non_blocking=True), spacing)
            logits = self._network_2d(xp, pad, spacing, shape)
            return _activate(logits, warm.package.manifest.output.activation)

    def _budget(self) -> float:
        return self.options.memory_budget_mb * 1024 * 1024

    def _oom_key(self, key: tuple[object, ...]) -> tuple[object, ...]:
        return (*key, int(self._budget()))

    def _oom_limit(self, key: tuple[object, ...] | None) -> int:
        """The largest batch not yet known to run out of memory for this input shape and budget."""
        if key is None:
            return 1 << 30
        return self.warm.oom_batch.get(self._oom_key(key), 1 << 30)

    def _batch_size_2d(self, key: tuple[object, ...], sample: VolumeInput, spacing: tuple[float, float]) -> int:
        """The batch size for items of one shape and spacing, measured once per warm model.

        On CUDA: the largest batch whose activations (measured in one probe pass) fit the memory budget,
        at most ``options.batch_size``. On the CPU, where a large batch falls out of the caches, the
        fastest of the sizes that fit, timed on slices of the study itself.
        """
        warm = self.warm
        channels = int(key[0])  # type: ignore[call-overload]
        rows, cols = sample.image.shape[1:]
        per_item = warm.per_item_bytes.get(key)
        if per_item is None:
            probe = torch.zeros((1, channels, rows, cols), dtype=torch.float32, device=warm.device)
            per_item = warm.per_item_bytes[key] = _activation_bytes(warm, probe, spacing)
        fits = self.batch_that_fits(key, per_item)
        if warm.device.type == "cuda" or self.options.batch_size != "auto":
            size = fits
        else:
            size = warm.cpu_batch.get(key) or 0
            if not size:
                size = warm.cpu_batch[key] = self._fastest_cpu_batch(sample, channels, spacing, fits)
        logger.debug(
            "batch size %d (%.1f MB per slice, budget %.0f MB)", size, per_item / 2**20, self._budget() / 2**20
        )
        return size

    def batch_that_fits(self, key: tuple[object, ...], per_item: int) -> int:
        """The largest batch of items of shape ``key`` whose activations (``per_item`` bytes each) fit the budget.

        What the engine runs on CUDA (at most ``options.batch_size``, 256 for ``auto``); on the CPU an
        ``auto`` batch size is the fastest of the sizes up to it.
        """
        limit = _AUTO_BATCH_MOST if self.options.batch_size == "auto" else self.options.batch_size
        return int(max(1, min(limit, self._oom_limit(key), self._budget() // max(per_item, 1))))

    def _fastest_cpu_batch(self, sample: VolumeInput, channels: int, spacing: tuple[float, float], fits: int) -> int:
        candidates = [b for b in (1, 2, 4, 8, 16) if b <= fits] or [1]
        depth = sample.image.shape[0]
        best, best_rate = candidates[0], 0.0
        for size in candidates:
            index = np.clip(np.arange(size * channels) % max(depth, 1), 0, depth - 1)
            x = torch.from_numpy(
                sample.image[index].astype(np.float32).reshape(size, channels, *sample.image.shape[1:])
            )
            self._forward_2d(x, spacing, sample.image.shape[1:])  # warm-up of this shape
            t0 = time.perf_counter()
            self._forward_2d(x, spacing, sample.image.shape[1:])
            rate = size / (time.perf_counter() - t0)
            if rate > best_rate * 1.05:  # a larger batch must be clearly faster
                best, best_rate = size, rate
        logger.info(
            "CPU batch size %d for %dx%d slices (%.0f slices/s in the probe)",
            best,
            sample.image.shape[1],
            sample.image.shape[2],
            best_rate,
        )
        return best

    # --- 3D: sliding window ------------------------------------------------------------------------

    def _predict_3d(self, volume: VolumeInput, deadline: float | None) -> np.ndarray:
        from monai.inferers.utils import sliding_window_inference  # monai.inferers does not declare re-exports

        warm = self.warm
        spec = warm.package.manifest.input
        if deadline is not None and time.monotonic() > deadline:
            raise InferenceTimeout("inference did not finish within the job's timeout")
        image = torch.from_numpy(np.ascontiguousarray(volume.image, dtype=np.float32))
        host = torch.device("cpu")
        # The volume goes to the device only when it, its preprocessed copy and the output fit the budget with
        # room for patches; otherwise it stays in host memory and the sliding window moves patches over.
        volume_bytes = spec.channels * image.numel() * 4
        place = warm.device if volume_bytes * 4 < self._budget() else host
        x = image[None, None].to(place)
        if spec.channels > 1:
            x = x.expand(-1, spec.channels, -1, -1, -1)
        xp, _ = warm.preprocessor(x, volume.spacing)
        grid = tuple(xp.shape[2:])
        xp, pad = _pad_to_multiple(xp, spec.divisible_by)
        out_channels = warm.package.manifest.output.channels_needed
        roi, sw_batch, stitch = self._window_plan(xp)
        if place != warm.device:
            stitch = host
        oom_key = self._oom_key((spec.channels, *roi))
        sw_batch = min(sw_batch, warm.oom_batch.get(oom_key, sw_batch))

        def predictor(patch: torch.Tensor) -> torch.Tensor:
            with _running(warm):
                out: torch.Tensor = warm.module(patch)  # Module.__call__ is typed Any
                return out.float()

        t0 = time.perf_counter()
        while True:
            error: BaseException | None = None
            try:
                logits = sliding_window_inference(
                    xp,
                    roi_size=roi,
                    sw_batch_size=sw_batch,
                    predictor=predictor,
                    overlap=spec.overlap,
                    mode="gaussian",
                    sw_device=warm.device,
                    device=stitch,
                )
                break
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_out_of_memory(exc) or (sw_batch == 1 and stitch == host):
                    raise
                error = exc
            # Out of the handler, so the failed attempt's tensors are gone before the retry.
            del error
            _empty_cache(warm.device)
            if sw_batch > 1:
                logger.warning("CUDA out of memory at %d patches per batch: halving it", sw_batch)
                sw_batch //= 2
                warm.oom_batch[oom_key] = sw_batch
            else:
                logger.warning("CUDA out of memory stitching on %s: stitching in host memory", stitch)
                stitch = host
        assert isinstance(logits, torch.Tensor)
        if logits.shape[1] < out_channels:
            raise ModelError(
                f"model {warm.package.manifest.name}: network gives {logits.shape[1]} output channels, "
                f"the manifest needs {out_channels}"
            )
        logits = _unpad(logits, pad)
        assert tuple(logits.shape[2:]) == grid
        logits = warm.preprocessor.restore(logits.float(), tuple(volume.image.shape), volume.spacing)
        probs = _activate(logits, warm.package.manifest.output.activation)
        _synchronize(warm.device)
        self.stats = {"items": 1, "batches": 1, "model_s": time.perf_counter() - t0, "sw_batch": sw_batch}
        return probs[0].to("cpu", torch.float16).numpy()

    def _window_plan(self, xp: torch.Tensor) -> tuple[tuple[int, ...], int, torch.device]:
        """Patch size, patches per batch and the device the output is stitched on, for the preprocessed ``xp``.

        The patches per batch are as many as the memory budget holds (measured once per patch size), less
        the output when it is stitched on the device.
        """
        warm = self.warm
        spec = warm.package.manifest.input
        out_bytes = warm.package.manifest.output.channels_needed * xp[0, 0].numel() * 4
        budget = self._budget()
        # Stitch on the host when the whole output would take more than half the budget on the device.
        stitch = warm.device if out_bytes * 2 < budget else torch.device("cpu")
        roi = tuple(spec.roi_size) if spec.roi_size else tuple(xp.shape[2:])
        roi_key = (spec.channels, *roi)
        per_patch = warm.per_item_bytes.get(roi_key)
        if per_patch is None:
            probe = torch.zeros((1, spec.channels, *roi), device=warm.device)
            per_patch = warm.per_item_bytes[roi_key] = _activation_bytes(warm, probe, None)
        limit = 64 if self.options.batch_size == "auto" else self.options.batch_size
        sw_batch = int(max(1, min(limit, (budget - (out_bytes if stitch == warm.device else 0)) // per_patch)))
        return roi, sw_batch, stitch


# --- helpers -----------------------------------------------------------------------------------------


def _check_volume(volume: VolumeInput) -> None:
    if volume.image.ndim != 3 or 0 in volume.image.shape:
        raise AnalysisError(f"a volume has shape {volume.image.shape}, expected (slices, rows, columns)")


def _cropped(volume: VolumeInput, foreground: Any) -> tuple[VolumeInput, tuple[slice, slice] | None]:
    """The checked volume cut to its foreground box when the model asks for one, and the box."""
    _check_volume(volume)
    if not foreground:
        return volume, None
    box = _foreground_box(volume, foreground)
    return VolumeInput(image=volume.image[:, box[0], box[1]], spacing=volume.spacing), box


def _paste(prob: np.ndarray, volume: VolumeInput, box: tuple[slice, slice] | None) -> np.ndarray:
    """A cropped volume's output placed in a full-size array (zeros outside the box); scores pass."""
    if box is None or prob.ndim < 4:
        return prob
    out = np.zeros((prob.shape[0], *volume.image.shape), dtype=prob.dtype)
    out[:, :, box[0], box[1]] = prob
    return out


def _foreground_box(volume: VolumeInput, crop: Any) -> tuple[slice, slice]:
    """In-plane (rows, columns) box of the voxels above the threshold in any slice, widened by the margin.

    Sizes in steps of 32 pixels, so that studies share shapes (batches, measured batch sizes).
    """
    margin = (int(np.ceil(crop.margin_mm / volume.spacing[1])), int(np.ceil(crop.margin_mm / volume.spacing[2])))
    return foreground_box(volume.image, crop.threshold, margin, _CROP_STEP)


_CROP_STEP = 32
_AUTO_BATCH_MOST = 256  # items per batch with batch_size "auto", whatever the memory budget allows


def _is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA out-of-memory error, or cuDNN's forms of one (a RuntimeError, through TorchScript too)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "CUDNN_STATUS_NOT_SUPPORTED" in text or "CUDNN_STATUS_ALLOC_FAILED" in text
    )


def _output_volume(part: torch.Tensor, volume: StagedVolume) -> torch.Tensor:
    """A volume's float16 output on the device: (K, slices, rows, columns), or (K, slices) for scores.

    Zero outside the foreground box; what the box holds is written by the batches.
    """
    if part.ndim != 4:
        return torch.empty((part.shape[0], volume.depth), dtype=torch.float16, device=part.device)
    output = torch.empty((part.shape[0], *volume.shape), dtype=torch.float16, device=part.device)
    if volume.box is not None:
        rows, cols = volume.box
        output[:, :, : rows.start] = 0
        output[:, :, rows.stop :] = 0
        output[:, :, rows, : cols.start] = 0
        output[:, :, rows, cols.stop :] = 0
    return output


def _event_done(event: Any) -> bool:
    """Whether a CUDA event has completed (None: nothing to wait for)."""
    return event is None or bool(event.query())


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a timing taken next includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(warm: WarmModel) -> contextlib.AbstractContextManager[object]:
    """Mixed precision when the warm model has an autocast dtype, else nothing."""
    if warm.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=warm.device.type, dtype=warm.autocast)


def _activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    return logits


def _check_output(logits: object, warm: WarmModel, x: torch.Tensor) -> torch.Tensor:
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if isinstance(logits, dict):
        logits = next(iter(logits.values()))
    if not isinstance(logits, torch.Tensor):
        raise ModelError(
            f"model {warm.package.manifest.name}: the network returned {type(logits).__name__}, not a tensor"
        )
    spec = warm.package.manifest.output
    if spec.kind == "segmentation" and (logits.ndim != x.ndim or logits.shape[2:] != x.shape[2:]):
        raise ModelError(
            f"model {warm.package.manifest.name}: a segmentation network must give one map per input pixel; "
            f"input {tuple(x.shape)} gave {tuple(logits.shape)}"
        )
    if logits.shape[1] < spec.channels_needed:
        raise ModelError(
            f"model {warm.package.manifest.name}: network gives {logits.shape[1]} output channels, "
            f"the manifest needs {spec.channels_needed}"
        )
    return logits


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if multiple <= 1:
        return x, ()
    pads: list[int] = []
    for size in reversed(x.shape[2:]):
        extra = (-size) % multiple
        pads += [0, extra]
    if not any(pads):
        return x, ()
    return torch.nn.functional.pad(x, pads, mode="replicate"), tuple(pads)


def _unpad(x: torch.Tensor, pads: tuple[int, ...]) -> torch.Tensor:
    if not pads:
        return x
    index = [slice(None), slice(None)]
    spatial = x.ndim - 2
    for d in range(spatial):
        extra = pads[2 * (spatial - 1 - d) + 1]
        index.append(slice(0, x.shape[2 + d] - extra))
    return x[tuple(index)]


def _prepare_2d(warm: WarmModel, x: torch.Tensor, spacing: tuple[float, float]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A device batch as the network takes it: preprocessed, padded to ``divisible_by``, channels-last."""
    xp, _ = warm.preprocessor(x, spacing)
    xp, pad = _pad_to_multiple(xp, warm.package.manifest.input.divisible_by)
    return xp.contiguous(memory_format=torch.channels_last), pad


def _activation_bytes(warm: WarmModel, probe: torch.Tensor, spacing: tuple[float, float] | None) -> int:
    """Bytes one item needs on the device: input, every module's output, the output, measured in one pass."""
    total = 0

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = []
    if not isinstance(warm.module, torch.jit.ScriptModule):
        handles = [m.register_forward_hook(hook) for m in warm.module.modules() if not list(m.children())]
    try:
        with _network_context(warm):  # the 2D probe runs in the loader thread
            x = probe
            if spacing is not None:
                x, _ = _prepare_2d(warm, x, spacing)
            with _autocast(warm):
                out = warm.module(x)
            out = _check_output(out, warm, x)
        measured = total
    finally:
        for h in handles:
            h.remove()
    if measured == 0:  # TorchScript: no hooks; a rule of thumb of 64 feature maps of the input size
        measured = 64 * x[0, 0].numel() * 4
    # Live tensors are a fraction of all module outputs, but CUDA allocator slack and the float copies
    # of input and output come on top: count everything once, plus the output twice.
    return int(measured + x.numel() * 4 + 2 * out.numel() * 4)


class _Prefetch:
    """Runs an iterator in a thread, ``depth`` items ahead of the consumer."""

    _END = object()

    def __init__(self, source: Iterator[_Batch], depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.waited = 0.0
        self._thread = threading.Thread(target=self._fill, args=(source,), name="pacsnode-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, source: Iterator[_Batch]) -> None:
        try:
            for item in source:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer
            self._queue.put(exc)
            return
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[_Batch]:
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self.waited += time.perf_counter() - t0
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, _Batch)
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)
