"""The 2D feed: each volume on the device once, batches of neighbouring slices cut from it there.

The path from a decoded volume to the network's batch, shaped so that the device, not Python, sets the pace:

- **Upload once, as stored.** A volume goes to the device once, in its own dtype (int16 HU from the
  series loader), on a copy stream of its own, so the copy overlaps the network running on the compute
  stream. The pipeline has the series loader decode into pinned memory when the device is CUDA
  (:func:`host_volume`): such a volume goes up whole, one DMA and no host pass, and is cropped to the
  model's foreground box on the device (a view). Any other volume is copied, cropped, into a pinned
  staging buffer first.
- **The foreground box from part of the volume.** The box of the voxels above the threshold is found
  from every 8th slice and then the outside of that box in every slice (:func:`_extent`): the same box
  as thresholding every voxel, reading roughly the air around the body.
- **Per-slice steps once per slice, on the device.** A model's preprocessing splits
  (:meth:`~pacsnode.analysis.cnn.preprocess.Preprocessor.split_per_slice`) into the leading steps that
  treat each channel alone (window, resample, denoising, ...), run once on every slice of the volume
  in place (a window is four in-place operations, no temporaries), and the steps that need a whole
  item (normalisation over all channels, CLAHE, ...), run per batch. The prepared volume holds its
  first and last slice repeated ``channels // 2`` times, and the padding to ``divisible_by`` when no
  per-item step follows.
- **Neighbour channels by indexing.** Item ``n`` of a batch, slices ``s - h .. s + h`` as channels,
  is a strided view of the prepared volume (no copy); the one copy is into the network's
  channels-last input.
- **CPU-only steps ahead, off the critical path.** When a model lists bilateral denoising or CLAHE
  (OpenCV), the steps run in the loader thread on the CPU while the device works on earlier batches;
  only then does anything but the int16 volume cross to the device.
- **Results pasted on the device.** Each volume's output is one float16 tensor of the full image size
  on the device; a batch's probabilities are written into its slices and foreground box (the
  activation writes straight into it), and the finished volume goes to the host once, on CUDA on a
  copy-out stream.

On the CPU the same code runs with the device = the CPU: the "upload" is a view of the caller's array
and the streams are no-ops.

On torch's ``meta`` device (tensors with a shape and no data: every device operation is dispatched and
does nothing) the same code runs the host's part of a device run alone: the foreground box, the upload
of each volume as one decoded into pinned memory goes (whole, no host copy: a contiguous volume is taken
for one; pinning needs CUDA), every device operation dispatched, the Python of each batch, a host buffer
for each output (its copy from the device is left out: a meta tensor has nothing to copy, as a DMA copy
asks nothing of the CPU). ``bench/inference.py --loader-only`` measures
with it what the CPU must do per slice when the device kernels run elsewhere. The results are not values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pacsnode.analysis.cnn.preprocess import Preprocessor

__all__ = ["FeedPlan", "StagedVolume", "Streams", "copy_to_host", "host_volume", "plan_feed"]

# Elements per chunk when the per-slice steps run over a volume: two 512x512 slices (2 MiB of float32),
# so that the in-place passes of one chunk stay in a core's L2 cache and one chunk's temporaries stay
# small (a window over int16 slices: ~15 % faster than with 4 MiB chunks on the 2-core CI machine).
_CHUNK_ELEMENTS = 1 << 19
# On a GPU the caches do not matter and every operation costs the host a launch: 64 slices of 512x512 a
# chunk (64 MiB of float32 temporaries at most).
_DEVICE_CHUNK_ELEMENTS = 1 << 24

# Dtypes that go to the device as they are; anything else is converted to float32 on the host first.
_UPLOADABLE = {np.dtype(t) for t in ("int16", "int32", "uint8", "int8", "float32", "float64")}


@dataclass(frozen=True, kw_only=True)
class FeedPlan:
    """How a model's preprocessing runs in the feed."""

    per_slice: Preprocessor  # once per slice of the volume
    per_item: Preprocessor  # once per batch, on the items with their neighbour channels
    host: bool  # a CPU-only step: the steps run in the loader thread on the CPU
    half: int  # neighbours each side (channels // 2)
    multiple: int  # divisible_by


def plan_feed(preprocessor: Preprocessor, channels: int, multiple: int) -> FeedPlan:
    """Split ``preprocessor`` for the feed (see the module's docstring)."""
    per_slice, per_item = preprocessor.split_per_slice()
    return FeedPlan(
        per_slice=per_slice,
        per_item=per_item,
        host=preprocessor.needs_cpu,
        half=channels // 2,
        multiple=multiple,
    )


class Streams:
    """The copy-in, compute and copy-out CUDA streams of one engine call; no-ops on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._copy_in: Any = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]
        self._compute: Any = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]
        self._copy_out: Any = torch.cuda.Stream(device) if self.cuda else None  # type: ignore[no-untyped-call]

    def copy_in(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self._copy_in) if self.cuda else contextlib.nullcontext()

    def compute(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self._compute) if self.cuda else contextlib.nullcontext()

    def copy_out(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(self._copy_out) if self.cuda else contextlib.nullcontext()

    def event_after_copy_in(self) -> Any:
        """An event recorded on the copy-in stream (None on the CPU): what the compute stream waits for."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._copy_in)
        return event

    def wait(self, event: Any, tensor: torch.Tensor) -> None:
        """The compute stream waits for ``event`` (a volume's upload and per-slice steps) and then reads ``tensor``.

        ``tensor`` was made on the copy-in stream: its memory is not reused until the compute stream's work
        queued by the time it is freed is done.
        """
        if event is not None:
            self._compute.wait_event(event)
            tensor.record_stream(self._compute)

    def used_by_copy_out(self, tensor: torch.Tensor) -> None:
        """``tensor`` (made on the compute stream) is read by the copy-out stream."""
        if self.cuda:
            tensor.record_stream(self._copy_out)

    def copy_out_after_compute(self) -> None:
        """The copy-out stream waits for everything queued on the compute stream so far."""
        if self.cuda:
            self._copy_out.wait_stream(self._compute)

    def mark(self) -> Any:
        """An event recorded on the compute stream now (None on the CPU), to time the device's work."""
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        event.record(self._compute)
        return event

    def event_after_copy_out(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._copy_out)
        return event


@dataclass(kw_only=True, eq=False)
class StagedVolume:
    """One volume on the device: its slices preprocessed once, and its output being filled."""

    index: int  # in the engine call
    shape: tuple[int, int, int]  # (slices, rows, columns) of the volume as given
    box: tuple[slice, slice] | None  # the foreground box the network sees, None: all of it
    crop: tuple[int, int]  # rows, columns inside the box
    spacing: tuple[float, float]  # (row, column) in mm, as given
    item_spacing: tuple[float, ...]  # after the per-slice steps
    prepared: torch.Tensor  # (slices + 2 * half, rows', columns') float32: per-slice steps done, edges repeated
    pad: tuple[int, ...]  # the padding to divisible_by already in ``prepared`` (empty: none, or done per batch)
    ready: Any = None  # CUDA event: upload and per-slice steps done (None on the CPU)
    output: torch.Tensor | None = None  # (K, slices, rows, columns) float16, or (K, slices) scores
    remaining: int = 0  # slices whose output has not arrived
    done: Any = None  # CUDA event: output copied to the host
    host_output: torch.Tensor | None = field(default=None, repr=False)
    # The host array the upload read: held until the output is back, as an async copy from pinned memory
    # may still be reading it when the caller lets go of its own reference.
    source: np.ndarray | None = field(default=None, repr=False)

    @property
    def depth(self) -> int:
        return self.shape[0]

    def release(self) -> None:
        """Let go of the device memory once the output has reached the host."""
        self.prepared = torch.empty(0)
        self.output = self.host_output = None
        self.source = None

    def items(self, start: int, count: int, half: int) -> torch.Tensor:
        """Slices ``start .. start + count - 1`` with their neighbours as channels: a view, (count, 2h+1, H, W).

        Item ``n`` channel ``c`` is slice ``start + n + c - h``, edges repeated: row ``start + n + c`` of
        ``prepared``.
        """
        p = self.prepared
        rows, cols = p.shape[1], p.shape[2]
        plane = rows * cols
        return p.as_strided(
            (count, 2 * half + 1, rows, cols), (plane, plane, cols, 1), p.storage_offset() + start * plane
        )


def stage_volume(
    *,
    index: int,
    image: np.ndarray,
    box: tuple[slice, slice] | None,
    spacing: tuple[float, float],
    plan: FeedPlan,
    device: torch.device,
    streams: Streams,
) -> StagedVolume:
    """Upload one volume (cropped to ``box``) and run the per-slice steps on its slices; in the loader thread.

    With a CPU-only step in the plan the steps run here on the CPU, and the prepared volume goes to the
    device (per-item steps then also run on the CPU: see :func:`host_items`).
    """
    shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
    cut = box
    if image.dtype not in _UPLOADABLE:
        image, cut = (image if box is None else image[:, box[0], box[1]]).astype(np.float32), None
    work = torch.device("cpu") if plan.host else device
    with streams.copy_in():
        raw = _upload(image, cut, work)
        depth, rows, cols = raw.shape
        grid = plan.per_slice.spatial_shape_after((rows, cols), spacing)
        pad_here = not plan.per_item.steps and plan.multiple > 1
        pads = [(0, (-n) % plan.multiple if pad_here else 0) for n in grid]
        height, width = grid[0] + pads[0][1], grid[1] + pads[1][1]
        half = plan.half
        prepared = torch.empty((depth + 2 * half, height, width), dtype=torch.float32, device=work)
        chunk = max(1, (_CHUNK_ELEMENTS if work.type == "cpu" else _DEVICE_CHUNK_ELEMENTS) // max(1, rows * cols))
        direct = tuple(grid) == (rows, cols) and (height, width) == (rows, cols)
        item_spacing: tuple[float, ...] = spacing
        for start in range(0, depth, chunk):
            stop = min(depth, start + chunk)
            target = prepared[half + start : half + stop]
            if direct:
                target.copy_(raw[start:stop])  # int16 -> float32 on the device
                out, item_spacing = plan.per_slice(target[:, None], spacing, in_place=True)
                if out.data_ptr() != target.data_ptr():
                    target.copy_(out[:, 0])
            else:
                out, item_spacing = plan.per_slice(raw[start:stop, None].float(), spacing, in_place=True)
                if any(p for _, p in pads):
                    out = torch.nn.functional.pad(out, [0, pads[1][1], 0, pads[0][1]], mode="replicate")
                target.copy_(out[:, 0])
        if half:
            prepared[:half] = prepared[half]
            prepared[half + depth :] = prepared[half + depth - 1]
        if work != device:
            prepared = _upload_tensor(prepared, device) if not plan.per_item.steps else prepared
        ready = streams.event_after_copy_in()
    pad: tuple[int, ...] = (0, pads[1][1], 0, pads[0][1]) if any(p for _, p in pads) else ()
    return StagedVolume(
        index=index,
        shape=shape,
        box=box,
        crop=(rows, cols),
        spacing=spacing,
        item_spacing=item_spacing,
        prepared=prepared,
        pad=pad,
        ready=ready,
        remaining=depth,
        source=image if work.type == "cuda" else None,
    )


def host_items(staged: StagedVolume, start: int, count: int, plan: FeedPlan, pin: bool) -> torch.Tensor:
    """A batch with the per-item steps done on the CPU (a model with CPU-only steps); in the loader thread."""
    x = staged.items(start, count, plan.half).clone()  # the steps must not see the overlapping view
    out, _ = plan.per_item(x, staged.item_spacing)
    out = out.contiguous()
    return out.pin_memory() if pin else out


def _upload(image: np.ndarray, box: tuple[slice, slice] | None, device: torch.device) -> torch.Tensor:
    """The volume on ``device`` in its dtype, cropped to ``box``: a view on the CPU.

    A volume in pinned memory (decoded into :func:`host_volume`'s buffer) goes to CUDA whole, as it is:
    one DMA, no host pass; the crop is a view on the device. Any other volume goes through a pinned
    staging buffer, cropped: one host copy. On ``meta`` a contiguous volume goes as a pinned one would
    (the host side of the pipeline's path, see the module's docstring).
    """
    cuda = device.type == "cuda"
    if device.type == "cpu" or not (image.flags.c_contiguous and (not cuda or _is_pinned(image))):
        crop = torch.from_numpy(image if box is None else image[:, box[0], box[1]])
        if device.type == "cpu":
            return crop
        staging = torch.empty(crop.shape, dtype=crop.dtype, pin_memory=cuda)
        staging.copy_(crop)  # the one host copy, into pinned memory: torch copies in threads
        return staging.to(device, non_blocking=cuda)
    whole = torch.from_numpy(image).to(device, non_blocking=cuda)
    return whole if box is None else whole[:, box[0], box[1]]


def _is_pinned(image: np.ndarray) -> bool:
    return bool(torch.from_numpy(image).is_pinned())


def host_volume(shape: tuple[int, int, int], dtype: np.dtype[Any] | type, device: torch.device) -> np.ndarray:
    """An empty host array for a volume that will go to ``device``: pinned memory on CUDA, ordinary otherwise.

    The series loader decodes into it (:func:`~pacsnode.analysis.volume.load_series`'s ``allocate``), so
    that the upload reads it directly (:func:`stage_volume`). The memory stays page-locked for as long as
    the volume lives (the job's findings and writers read it too), then returns to torch's pinned-memory
    cache, which keeps it (its blocks rounded up to a power of two) for the next volumes rather than
    giving it back to the system: as much page-locked memory as the most volumes alive at once.
    """
    torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    return torch.empty(shape, dtype=torch_dtype, pin_memory=device.type == "cuda").numpy()


def _upload_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_to_host(output: torch.Tensor, streams: Streams) -> tuple[torch.Tensor, Any]:
    """A finished device ``output`` in host memory (pinned on CUDA), and the event of its copy (None: done).

    On CUDA the copy runs on the copy-out stream after everything queued on the compute stream. A ``meta``
    output has no data: the host buffer is made and left as it is (see the module's docstring).
    """
    if output.device.type == "cpu":
        return output, None
    streams.copy_out_after_compute()
    with streams.copy_out():
        host = torch.empty(output.shape, dtype=output.dtype, pin_memory=streams.cuda)
        if output.device.type != "meta":
            host.copy_(output, non_blocking=streams.cuda)
        streams.used_by_copy_out(output)
        return host, streams.event_after_copy_out()


def foreground_box(image: np.ndarray, threshold: float, margin: tuple[int, int], step: int) -> tuple[slice, slice]:
    """In-plane (rows, columns) box of the voxels above ``threshold`` in any slice, widened by ``margin`` pixels.

    Sizes grow in steps of ``step`` pixels (centred, inside the image), so that studies share shapes. The
    box is the same as thresholding every voxel (:func:`_extent`), from part of a pass over the volume.
    """
    height, width = image.shape[1:]
    found = _extent(image, threshold)
    if found is None:
        return slice(0, height), slice(0, width)

    def span(first: int, last: int, extra: int, size: int) -> slice:
        start, stop = max(0, first - extra), min(size, last + 1 + extra)
        want = min(size, -(-(stop - start) // step) * step)
        start = max(0, min(start - (want - (stop - start)) // 2, size - want))
        return slice(start, start + want)

    first_row, last_row, first_col, last_col = found
    return span(first_row, last_row, margin[0], height), span(first_col, last_col, margin[1], width)


# Every this many slices make the first guess of the foreground's extent (see _extent).
_SAMPLE_STEP = 8


def _extent(image: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """First and last row, first and last column holding a voxel above ``threshold`` in any slice; None: none.

    Exact, without reading every voxel: the rectangle of the voxels above ``threshold`` in every 8th slice
    has one in its first and last row and column, so the whole volume's rectangle is it widened by what
    lies outside it in any slice. Only that outside (for a body: the air around it) is read in every slice.
    """

    def above(part: np.ndarray) -> np.ndarray:
        # fmax ignores NaN, as thresholding each voxel would
        peak = np.fmax.reduce(part, axis=0) if part.dtype.kind == "f" else part.max(axis=0)
        return np.asarray(peak > threshold)

    def extent(mask: np.ndarray) -> tuple[int, int, int, int] | None:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        return None if rows.size == 0 else (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))

    guess = extent(above(image[::_SAMPLE_STEP])) if image.shape[0] > _SAMPLE_STEP else None
    if guess is None:
        return extent(above(image))
    top, bottom, left, right = guess
    mask = np.zeros(image.shape[1:], dtype=bool)
    mask[top, left] = mask[bottom, right] = True  # the rectangle's extent
    mask[:top] = above(image[:, :top])
    mask[bottom + 1 :] = above(image[:, bottom + 1 :])
    mask[top : bottom + 1, :left] = above(image[:, top : bottom + 1, :left])
    mask[top : bottom + 1, right + 1 :] = above(image[:, top : bottom + 1, right + 1 :])
    return extent(mask)
