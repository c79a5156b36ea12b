"""Preprocessing of image batches for CNN models: composable steps configured per model.

A model's configuration lists its steps (YAML or JSON), validated by the step
models below (a discriminated union on ``kind``; ``denoise`` and ``enhance``
also on ``method``)::

    - {kind: window, center: -600, width: 1500}
    - {kind: resample, spacing: [1.0, 1.0]}
    - {kind: crop_pad, size: [384, 384]}
    - {kind: enhance, method: clahe, clip_limit: 2.0}

:func:`build_preprocessor` makes them a :class:`Preprocessor`, which runs them
on a float32 batch of N 2D slices ``(N, C, H, W)`` or N 3D volumes
``(N, C, D, H, W)``, on the batch's device, every item independently of the
others, and maps a model's output back to the original grid
(:meth:`Preprocessor.restore`).

Conventions: spacings are in mm, (row, column) for 2D items and (slice, row,
column) for 3D items, the order of the tensor's spatial axes. A per-axis value
(size, spacing, sigma, radius) given with 2 entries on a 3D item applies in
the plane of each slice and leaves the slice axis alone; 3 entries on a 2D
item are an :class:`~pacsnode.analysis.errors.InputError`.

The step models are plain pydantic models; nothing is built at import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

# MONAI's package namespaces do not declare their re-exports, so a strict type checker wants the
# defining modules.
from monai.config.type_definitions import NdarrayOrTensor
from monai.data.meta_tensor import MetaTensor
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering
from monai.transforms.croppad.array import BorderPad, ResizeWithPadOrCrop, SpatialCrop
from monai.transforms.intensity.array import (
    HistogramNormalize,
    MedianSmooth,
    NormalizeIntensity,
    ScaleIntensity,
    ScaleIntensityRange,
)
from monai.transforms.spatial.array import Resize
from monai.transforms.utils_pytorch_numpy_unification import percentile

from pacsnode.analysis.cnn.steps import (  # noqa: F401 - re-exported
    BilateralDenoiseStep,
    ClaheStep,
    ContrastStretchStep,
    CropPadStep,
    DenoiseStep,
    EnhanceStep,
    GaussianDenoiseStep,
    HistEqStep,
    Interpolation,
    MedianDenoiseStep,
    NormalizeStep,
    ResampleStep,
    ResizeStep,
    Step,
    UnsharpStep,
    WindowStep,
    parse_steps,
)
from pacsnode.analysis.errors import InputError

__all__ = [
    "BilateralDenoiseStep",
    "ClaheStep",
    "ContrastStretchStep",
    "CropPadStep",
    "DenoiseStep",
    "EnhanceStep",
    "GaussianDenoiseStep",
    "HistEqStep",
    "MedianDenoiseStep",
    "NormalizeStep",
    "Preprocessor",
    "ResampleStep",
    "ResizeStep",
    "Step",
    "UnsharpStep",
    "WindowStep",
    "acts_per_channel",
    "build_preprocessor",
    "parse_steps",
    "runs_on_cpu",
]

# ---------------------------------------------------------------------------------------------------------------------
# Helpers on tensors


def _plain(t: NdarrayOrTensor) -> torch.Tensor:
    """A MONAI transform's output as a plain tensor (no metadata tracking).

    The transforms are typed array-or-tensor in and out; given a tensor, they return one.
    """
    if isinstance(t, MetaTensor):
        return t.as_tensor()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a tensor from the transform, got {type(t).__name__}")
    return t


def _per_item(fn: Callable[[torch.Tensor], NdarrayOrTensor], x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to every channel-first item ``x[i]`` of the batch alone."""
    return torch.stack([_plain(fn(item)) for item in x])


def _per_channel(fn: Callable[[torch.Tensor], NdarrayOrTensor], x: torch.Tensor, planes: bool = False) -> torch.Tensor:
    """Apply a per-channel transform ``fn`` once, every channel of every item (or every 2D plane) as a channel.

    Only for transforms that treat channels independently (interpolation,
    filtering, padding): the result of an item then cannot depend on the others.
    """
    lead = x.shape[:-2] if planes else x.shape[:2]
    out = _plain(fn(x.reshape(-1, *x.shape[len(lead) :])))
    return out.reshape(*lead, *out.shape[1:])


def _per_axis(value: float | tuple[float, ...], ndim: int, what: str) -> bool:
    """Whether a per-axis ``value`` applies in-plane only; :class:`InputError` when it has too many axes."""
    if isinstance(value, tuple):
        if len(value) > ndim:
            raise InputError(f"{what} has {len(value)} values but the images are {ndim}D")
        return len(value) < ndim
    return False


def _interp(mode: str, ndim: int) -> str:
    """The torch interpolation mode for a configured one."""
    if mode == "bilinear":
        return "trilinear" if ndim == 3 else "bilinear"
    if mode == "nearest":
        return "nearest-exact"  # pixel centres map symmetrically, unlike torch's "nearest"
    return mode


def _smooth(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Gaussian smoothing of ``x`` (B, *spatial), ``sigma`` per spatial axis (0: none), borders replicated.

    MONAI's ``gaussian_1d`` kernels and ``separable_filtering``; not its
    ``GaussianSmooth``, which pads with zeros and so pulls the border of an
    image towards 0 (-1000 HU air would brighten).
    """
    kernels = [gaussian_1d(torch.tensor(s), approx="erf", normalize=True) if s > 0 else torch.ones(1) for s in sigma]
    return separable_filtering(x.unsqueeze(1), kernels, mode="replicate").squeeze(1)


def _resize(x: torch.Tensor, shape: tuple[int, ...], mode: str, anti_aliasing: bool = False) -> torch.Tensor:
    if tuple(x.shape[2:]) == shape:
        return x
    if anti_aliasing:
        # skimage's (and MONAI Resize's) choice of sigma, with replicated borders
        sigma = [max(0.0, (n / m - 1) / 2) for n, m in zip(x.shape[2:], shape, strict=False)]
        if any(s > 0 for s in sigma):
            x = _per_channel(lambda flat: _smooth(flat, sigma), x)
    return _per_channel(Resize(spatial_size=shape, mode=_interp(mode, len(shape))), x)


def _crop_pad_plan(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[int, int]]:
    """Per axis ``(start, pad)``: where ``ResizeWithPadOrCrop`` starts a centered crop, and its leading pad."""
    plan = []
    for size, target in zip(before, after, strict=False):
        start = size // 2 - target // 2 if size > target else 0
        pad = (target - size) // 2 if target > size else 0
        plan.append((start, pad))
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Geometry: the grid after each step


def _geometry(
    step: Step, shape: tuple[int, ...], spacing: tuple[float, ...]
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The spatial shape and spacing after ``step``."""
    ndim = len(shape)
    if isinstance(step, ResampleStep):
        _per_axis(step.spacing, ndim, "resample spacing")
        target = (*spacing[: ndim - len(step.spacing)], *step.spacing)
        new = tuple(max(1, math.floor(n * s / t + 0.5)) for n, s, t in zip(shape, spacing, target, strict=False))
    elif isinstance(step, ResizeStep):
        _per_axis(step.size, ndim, "resize size")
        new = (*shape[: ndim - len(step.size)], *step.size)
    elif isinstance(step, CropPadStep):
        _per_axis(step.size, ndim, "crop_pad size")
        return (*shape[: ndim - len(step.size)], *step.size), spacing
    else:
        return shape, spacing
    return new, tuple(s * n / m for s, n, m in zip(spacing, shape, new, strict=False))


# ---------------------------------------------------------------------------------------------------------------------
# The steps on a batch


def _window(step: WindowStep, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    half = step.width / 2.0
    if in_place:
        # ScaleIntensityRange's operations in its order, without its temporary tensors
        low, high = step.center - half, step.center + half
        x.sub_(low).div_(high - low)
        if (step.out_min, step.out_max) != (0.0, 1.0):  # x * 1 + 0 is x
            x.mul_(step.out_max - step.out_min).add_(step.out_min)
        return x.clamp_(step.out_min, step.out_max)
    scale = ScaleIntensityRange(  # element-wise: one call for the whole batch
        a_min=step.center - half, a_max=step.center + half, b_min=step.out_min, b_max=step.out_max, clip=True
    )
    return _plain(scale(x))


def _normalize(step: NormalizeStep, x: torch.Tensor) -> torch.Tensor:
    if step.method == "minmax":
        scale = ScaleIntensity(minv=0.0, maxv=1.0, channel_wise=step.channel_wise)
        return _per_item(scale, x)
    normalize = NormalizeIntensity(channel_wise=step.channel_wise)
    # channel_wise NormalizeIntensity writes into its input: give it a copy
    return _per_item(lambda item: normalize(item.clone() if step.channel_wise else item), x)


def _gaussian(x: torch.Tensor, sigma: float | tuple[float, ...], what: str) -> torch.Tensor:
    planes = _per_axis(sigma, x.ndim - 2, what)
    sigmas = sigma if isinstance(sigma, tuple) else (sigma,) * (2 if planes else x.ndim - 2)
    return _per_channel(lambda flat: _smooth(flat, sigmas), x, planes=planes)


def _median(step: MedianDenoiseStep, x: torch.Tensor) -> torch.Tensor:
    planes = _per_axis(step.radius, x.ndim - 2, "median radius")
    median = MedianSmooth(radius=step.radius)
    # item by item: the filter unfolds its input into (2r+1)^d copies
    return torch.stack([_per_channel(median, item[None], planes=planes)[0] for item in x])


def _bilateral(step: BilateralDenoiseStep, x: torch.Tensor) -> torch.Tensor:
    planes = x.detach().reshape(-1, *x.shape[-2:]).cpu().numpy()
    out = np.stack(
        [
            cv2.bilateralFilter(np.ascontiguousarray(plane), step.diameter, step.sigma_color, step.sigma_space)
            for plane in planes
        ]
    )
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype).reshape(x.shape)


def _histeq(step: HistEqStep, x: torch.Tensor) -> torch.Tensor:
    def one(item: torch.Tensor) -> torch.Tensor:
        low, high = float(item.min()), float(item.max())
        if not high > low:
            return item
        # min and max are annotated int, but the transform takes any number
        return _plain(HistogramNormalize(num_bins=step.bins, min=low, max=high)(item))  # type: ignore[arg-type]

    return _per_item(one, x)


def _clahe(step: ClaheStep, x: torch.Tensor) -> torch.Tensor:
    top = float(2**step.bits - 1)
    dtype = np.uint8 if step.bits == 8 else np.uint16
    clahe = cv2.createCLAHE(clipLimit=step.clip_limit, tileGridSize=(step.tile_grid[1], step.tile_grid[0]))

    def one(item: torch.Tensor) -> torch.Tensor:
        low, high = float(item.min()), float(item.max())
        if not high > low:
            return item
        scaled = _plain(ScaleIntensity(minv=0.0, maxv=top)(item))
        planes = torch.round(scaled).reshape(-1, *item.shape[-2:]).cpu().numpy().astype(dtype)
        out = torch.from_numpy(np.stack([clahe.apply(p) for p in planes]).astype(np.float32))
        out = out.to(item.device).reshape(item.shape)
        return _plain(ScaleIntensityRange(a_min=0.0, a_max=top, b_min=low, b_max=high)(out))

    return _per_item(one, x)


def _contrast_stretch(step: ContrastStretchStep, x: torch.Tensor) -> torch.Tensor:
    def one(item: torch.Tensor) -> torch.Tensor:
        low = float(percentile(item, step.lower_percentile))
        high = float(percentile(item, step.upper_percentile))
        if not high > low:
            # no spread between the percentiles: the limit of a narrowing window
            return torch.where(item > low, step.out_max, step.out_min).to(item.dtype)
        # what ScaleIntensityRangePercentiles does, without its warning on a zero range
        scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=step.out_min, b_max=step.out_max, clip=True)
        return _plain(scale(item))

    return _per_item(one, x)


def _unsharp(step: UnsharpStep, x: torch.Tensor) -> torch.Tensor:
    blurred = _gaussian(x, step.sigma, "unsharp sigma")
    return x + step.amount * (x - blurred)


def _crop_pad(x: torch.Tensor, shape: tuple[int, ...], value: float) -> torch.Tensor:
    if tuple(x.shape[2:]) == shape:
        return x
    return _per_channel(ResizeWithPadOrCrop(spatial_size=shape, value=value), x)


def _uncrop_pad(x: torch.Tensor, before: tuple[int, ...], value: float) -> torch.Tensor:
    """Undo :func:`_crop_pad` from ``before`` to ``x``'s shape: crop the padding away, pad back what was cropped."""
    after = tuple(x.shape[2:])
    if after == before:
        return x
    plan = _crop_pad_plan(before, after)
    starts = [pad for _, pad in plan]
    ends = [pad + min(n, m) for (_, pad), n, m in zip(plan, before, after, strict=False)]
    x = _per_channel(SpatialCrop(roi_start=starts, roi_end=ends), x)
    border: list[int] = []
    for (start, _), n, m in zip(plan, before, after, strict=False):
        kept = min(n, m)
        border += [start, n - kept - start]
    return _per_channel(BorderPad(spatial_border=border, value=value), x)


def _apply(step: Step, x: torch.Tensor, shape: tuple[int, ...], in_place: bool = False) -> torch.Tensor:
    """``step`` on the batch ``x``; ``shape`` is the spatial shape it must produce; ``in_place``: ``x`` may be reused."""
    if isinstance(step, WindowStep):
        return _window(step, x, in_place)
    if isinstance(step, NormalizeStep):
        return _normalize(step, x)
    if isinstance(step, (ResampleStep, ResizeStep)):
        return _resize(x, shape, step.mode, step.anti_aliasing)
    if isinstance(step, CropPadStep):
        return _crop_pad(x, shape, step.pad_value)
    if isinstance(step, GaussianDenoiseStep):
        return _gaussian(x, step.sigma, "gaussian sigma")
    if isinstance(step, MedianDenoiseStep):
        return _median(step, x)
    if isinstance(step, BilateralDenoiseStep):
        return _bilateral(step, x)
    if isinstance(step, HistEqStep):
        return _histeq(step, x)
    if isinstance(step, ClaheStep):
        return _clahe(step, x)
    if isinstance(step, ContrastStretchStep):
        return _contrast_stretch(step, x)
    if isinstance(step, UnsharpStep):
        return _unsharp(step, x)
    raise TypeError(f"not a preprocessing step: {step!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The preprocessor


def _spatial(shape: Sequence[int]) -> tuple[int, ...]:
    """The spatial part of a spatial shape (2 or 3 values) or of a batch shape (4 or 5 values)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) in (4, 5):
        shape = shape[2:]
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise InputError(f"shape {shape}: expected (H, W), (D, H, W), (N, C, H, W) or (N, C, D, H, W)")
    return shape


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    names = "(row, col)" if ndim == 2 else "(slice, row, col)"
    if len(values) != ndim:
        raise InputError(f"spacing {values}: {ndim}D images need {ndim} values {names}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(f"spacing {values}: every value must be a positive number of mm")
    return values


class Preprocessor:
    """A sequence of preprocessing steps run on image batches.

    Parameters
    ----------
    steps
        The validated steps, in order.
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        self._steps: tuple[Step, ...] = tuple(steps)

    @property
    def steps(self) -> tuple[Step, ...]:
        return self._steps

    def __repr__(self) -> str:
        return f"Preprocessor({', '.join(_label(step) for step in self._steps)})"

    def _grids(
        self, shape: tuple[int, ...], spacing: tuple[float, ...]
    ) -> Iterator[tuple[Step, tuple[int, ...], tuple[int, ...], tuple[float, ...]]]:
        """Every step with the spatial shape before and after it and the spacing after it."""
        for step in self._steps:
            after, spacing = _geometry(step, shape, spacing)
            yield step, shape, after, spacing
            shape = after

    def __call__(
        self, x: torch.Tensor, spacing: Sequence[float], *, in_place: bool = False
    ) -> tuple[torch.Tensor, tuple[float, ...]]:
        """Run the steps on a batch.

        Parameters
        ----------
        x
            float32, (N, C, H, W): N 2D slices, or (N, C, D, H, W): N 3D volumes,
            on any device; the steps run there (OpenCV ones on the CPU, their
            result moved back).
        spacing
            The items' pixel spacing in mm: (row, col), or (slice, row, col).
        in_place
            ``x`` is the caller's to overwrite: element-wise steps write into it
            (same values, no temporary tensors), so the result may be ``x`` itself.

        Returns
        -------
        tuple[torch.Tensor, tuple[float, ...]]
            The preprocessed batch (float32, same device) and its spacing.

        Raises
        ------
        InputError
            ``x`` is not a float32 4D or 5D tensor, ``spacing`` does not fit
            it, or a step's sizes do not fit its dimensionality.
        """
        if not isinstance(x, torch.Tensor) or x.ndim not in (4, 5):
            raise InputError(
                f"expected a (N, C, H, W) or (N, C, D, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}"
            )
        if x.dtype != torch.float32:
            raise InputError(f"expected a float32 tensor, got {x.dtype}")
        if min(x.shape[1:]) < 1:
            raise InputError(f"empty channel or spatial axis in the batch shape {tuple(x.shape)}")
        shape = tuple(x.shape[2:])
        new_spacing = _check_spacing(spacing, len(shape))
        grids = list(self._grids(shape, new_spacing))
        if grids:
            shape, new_spacing = grids[-1][2], grids[-1][3]
        if x.shape[0] == 0:
            return x.new_empty((0, x.shape[1], *shape)), new_spacing
        with torch.no_grad():
            for step, _, after, _ in grids:
                x = _apply(step, x, after, in_place)
        return x.to(torch.float32), new_spacing

    def split_per_slice(self) -> tuple[Preprocessor, Preprocessor]:
        """The longest leading run of steps that treat each channel (each 2D slice) alone, and the rest.

        Run on a volume's slices one at a time, the first part gives what it gives on any item those
        slices are channels of; so a 2D model's neighbour-slice items can be cut from one preprocessed
        volume (:mod:`pacsnode.analysis.cnn.feed`), each slice processed once.
        """
        count = 0
        for step in self._steps:
            if not acts_per_channel(step):
                break
            count += 1
        return Preprocessor(self._steps[:count]), Preprocessor(self._steps[count:])

    @property
    def needs_cpu(self) -> bool:
        """Whether a step runs through OpenCV on the CPU (bilateral denoising, CLAHE)."""
        return any(runs_on_cpu(step) for step in self._steps)

    def spatial_shape_after(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, ...]:
        """The spatial shape the steps make of ``shape``: (H, W), (D, H, W), or a batch's full shape.

        Raises
        ------
        InputError
            As for :meth:`__call__`.
        """
        spatial = _spatial(shape)
        grids = list(self._grids(spatial, _check_spacing(spacing, len(spatial))))
        return grids[-1][2] if grids else spatial

    def restore(
        self,
        pred: torch.Tensor,
        original_shape: Sequence[int],
        spacing: Sequence[float],
        *,
        mode: Interpolation | None = None,
        pad_value: float = 0.0,
    ) -> torch.Tensor:
        """Map a model output on the preprocessed grid back to the original grid.

        The spatial steps are undone in reverse order: resample and resize by
        interpolating back, crop_pad by cropping its padding away and padding
        back what it cropped (with ``pad_value``). Intensity steps need no inverse.

        Parameters
        ----------
        pred
            (N, K, *spatial) on the preprocessed grid (:meth:`spatial_shape_after`).
        original_shape
            The spatial shape of the input, or its full batch shape.
        spacing
            The input's spacing, as given to :meth:`__call__`.
        mode
            Interpolation back; default bilinear (trilinear in 3D) for floating
            outputs, nearest for integer or boolean ones (labels stay labels).
        pad_value
            The value of what crop_pad cropped away (outside the model's view).

        Returns
        -------
        torch.Tensor
            (N, K, *original spatial shape), ``pred``'s dtype and device.

        Raises
        ------
        InputError
            ``pred``'s spatial shape is not the preprocessed one.
        """
        spatial = _spatial(original_shape)
        grids = list(self._grids(spatial, _check_spacing(spacing, len(spatial))))
        expected = grids[-1][2] if grids else spatial
        if pred.ndim != len(spatial) + 2 or tuple(pred.shape[2:]) != expected:
            raise InputError(
                f"prediction shape {tuple(pred.shape)}: expected (N, K, {', '.join(map(str, expected))})"
                f" for inputs of spatial shape {spatial}"
            )
        dtype = pred.dtype
        floating = dtype.is_floating_point
        mode_ = mode or ("bilinear" if floating else "nearest")
        out = pred if dtype == torch.float32 else pred.to(torch.float32)
        with torch.no_grad():
            for step, before, after, _ in reversed(grids):
                if before == after:
                    continue
                if isinstance(step, (ResampleStep, ResizeStep)):
                    out = _resize(out, before, mode_)
                elif isinstance(step, CropPadStep):
                    out = _uncrop_pad(out, before, pad_value)
        if not floating:
            out = torch.round(out)
        return out.to(dtype)

    def describe(self) -> list[dict[str, Any]]:
        """The steps as JSON-able mappings (what the configuration would say, defaults filled in)."""
        return [step.model_dump(mode="json") for step in self._steps]


def acts_per_channel(step: Step) -> bool:
    """Whether ``step`` gives each channel of an item a result that depends on that channel alone."""
    if isinstance(step, NormalizeStep):
        return step.channel_wise
    return isinstance(
        step,
        (
            WindowStep,
            ResampleStep,
            ResizeStep,
            CropPadStep,
            GaussianDenoiseStep,
            MedianDenoiseStep,
            BilateralDenoiseStep,
            UnsharpStep,
        ),
    )


def runs_on_cpu(step: Step) -> bool:
    """Whether ``step`` runs through OpenCV on the CPU, whatever the batch's device."""
    return isinstance(step, (BilateralDenoiseStep, ClaheStep))


def _label(step: Step) -> str:
    method = getattr(step, "method", None)
    return f"{step.kind}:{method}" if method else step.kind


def build_preprocessor(steps: Sequence[Step | Mapping[str, Any]]) -> Preprocessor:
    """Make a :class:`Preprocessor` of validated steps, or of mappings as loaded from a configuration file.

    Raises
    ------
    pydantic.ValidationError
        A mapping is not a valid step.
    """
    return Preprocessor(parse_steps(steps))
