"""Preprocessing step models: what a model's config may list, validated by pydantic.

Plain pydantic models with no heavy imports, so that loading the config (and
validating a model package's manifest) does not import torch or MONAI;
:mod:`pacsnode.analysis.cnn.preprocess` runs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from pacsnode.storage.model_base import StrictModel

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
    "ResampleStep",
    "ResizeStep",
    "Step",
    "UnsharpStep",
    "WindowStep",
    "parse_steps",
]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
Percentile = Annotated[float, Field(ge=0, le=100)]
# (rows, cols) or (slices, rows, cols)
Size = Annotated[tuple[PositiveInt, ...], Field(min_length=2, max_length=3)]
Spacing = Annotated[tuple[PositiveFloat, ...], Field(min_length=2, max_length=3)]
# one value for every spatial axis, or one per axis (2 on a 3D item: in-plane only)
Sigma = PositiveFloat | Annotated[tuple[PositiveFloat, ...], Field(min_length=2, max_length=3)]
Radius = PositiveInt | Annotated[tuple[PositiveInt, ...], Field(min_length=2, max_length=3)]
Interpolation = Literal["bilinear", "nearest", "area"]


def _check_range(model: BaseModel, low: str, high: str) -> None:
    if not getattr(model, high) > getattr(model, low):
        raise ValueError(f"{high} ({getattr(model, high)}) must be greater than {low} ({getattr(model, low)})")


# ---------------------------------------------------------------------------------------------------------------------
# Step models


class WindowStep(StrictModel):
    """Intensity window: ``center - width/2 .. center + width/2`` -> ``out_min .. out_max``, clipped."""

    kind: Literal["window"] = "window"
    center: FiniteFloat
    width: PositiveFloat
    out_min: FiniteFloat = 0.0
    out_max: FiniteFloat = 1.0

    @model_validator(mode="after")
    def _range(self) -> WindowStep:
        _check_range(self, "out_min", "out_max")
        return self


class NormalizeStep(StrictModel):
    """Per-item normalization: ``minmax`` to 0 .. 1, or ``zscore`` to mean 0, standard deviation 1.

    The statistics come from each item of the batch (a slice or a volume), all
    its channels together, or each channel alone with ``channel_wise``.
    """

    kind: Literal["normalize"] = "normalize"
    method: Literal["minmax", "zscore"]
    channel_wise: bool = False


class ResampleStep(StrictModel):
    """Resample to a pixel spacing in mm: (row, col), or (slice, row, col) for 3D items.

    The output size along an axis is ``round(size * spacing / target)`` (at least
    1); the spacing it returns is the exact one of that grid,
    ``spacing * size / new_size``. ``anti_aliasing``: Gaussian smoothing with
    sigma ``(factor - 1) / 2`` along the axes it shrinks, before interpolating.
    """

    kind: Literal["resample"] = "resample"
    spacing: Spacing
    mode: Interpolation = "bilinear"
    anti_aliasing: bool = False


class ResizeStep(StrictModel):
    """Resize to ``size``: (rows, cols), or (slices, rows, cols) for 3D items; ``anti_aliasing`` as for resample."""

    kind: Literal["resize"] = "resize"
    size: Size
    mode: Interpolation = "bilinear"
    anti_aliasing: bool = False


class CropPadStep(StrictModel):
    """Centered crop and/or constant pad to ``size`` (the convention of MONAI's ``ResizeWithPadOrCrop``)."""

    kind: Literal["crop_pad"] = "crop_pad"
    size: Size
    pad_value: FiniteFloat = 0.0


class GaussianDenoiseStep(StrictModel):
    """Gaussian smoothing; ``sigma`` in pixels."""

    kind: Literal["denoise"] = "denoise"
    method: Literal["gaussian"]
    sigma: Sigma = 1.0


class MedianDenoiseStep(StrictModel):
    """Median filter over a ``(2 * radius + 1)`` window per axis."""

    kind: Literal["denoise"] = "denoise"
    method: Literal["median"]
    radius: Radius = 1


class BilateralDenoiseStep(StrictModel):
    """Edge-preserving bilateral filter, per 2D slice (OpenCV, on the CPU).

    ``sigma_color`` is in the intensity unit of the step's input (HU, or 0 .. 1
    after a window); ``sigma_space`` and ``diameter`` in pixels.
    """

    kind: Literal["denoise"] = "denoise"
    method: Literal["bilateral"]
    diameter: PositiveInt = 5
    sigma_color: PositiveFloat
    sigma_space: PositiveFloat = 2.0


class HistEqStep(StrictModel):
    """Histogram equalization of each item, mapped to the item's own intensity range."""

    kind: Literal["enhance"] = "enhance"
    method: Literal["histeq"]
    bins: Annotated[int, Field(ge=2, le=65536)] = 256


class ClaheStep(StrictModel):
    """Contrast-limited adaptive histogram equalization per 2D slice, mapped back to the item's intensity range.

    Each item is rescaled over its range to ``bits``-bit integers for OpenCV.
    ``tile_grid`` is (rows, cols) of tiles. OpenCV scales ``clip_limit`` by
    ``pixels per tile / 2**bits`` and never lets it go below one count per
    bin: with ``bits=16`` a tile needs more than 65536 / clip_limit pixels
    before the limit does anything, so 16 bits is plain adaptive equalization
    in practice.
    """

    kind: Literal["enhance"] = "enhance"
    method: Literal["clahe"]
    clip_limit: PositiveFloat = 2.0
    tile_grid: tuple[PositiveInt, PositiveInt] = (8, 8)
    bits: Literal[8, 16] = 8


class ContrastStretchStep(StrictModel):
    """Map the item's ``lower_percentile .. upper_percentile`` intensities to ``out_min .. out_max``, clipped."""

    kind: Literal["enhance"] = "enhance"
    method: Literal["contrast_stretch"]
    lower_percentile: Percentile = 1.0
    upper_percentile: Percentile = 99.0
    out_min: FiniteFloat = 0.0
    out_max: FiniteFloat = 1.0

    @model_validator(mode="after")
    def _ranges(self) -> ContrastStretchStep:
        _check_range(self, "lower_percentile", "upper_percentile")
        _check_range(self, "out_min", "out_max")
        return self


class UnsharpStep(StrictModel):
    """Unsharp masking: ``x + amount * (x - gaussian(x, sigma))``; ``sigma`` in pixels."""

    kind: Literal["enhance"] = "enhance"
    method: Literal["unsharp"]
    sigma: Sigma = 1.0
    amount: PositiveFloat = 1.0


DenoiseStep = Annotated[GaussianDenoiseStep | MedianDenoiseStep | BilateralDenoiseStep, Field(discriminator="method")]
EnhanceStep = Annotated[HistEqStep | ClaheStep | ContrastStretchStep | UnsharpStep, Field(discriminator="method")]
Step = Annotated[
    WindowStep | NormalizeStep | ResampleStep | ResizeStep | CropPadStep | DenoiseStep | EnhanceStep,
    Field(discriminator="kind"),
]


@cache
def _steps_adapter() -> TypeAdapter[list[Step]]:
    return TypeAdapter(list[Step], config=ConfigDict(title="preprocessing steps"))


def parse_steps(data: Sequence[Step | Mapping[str, Any]]) -> tuple[Step, ...]:
    """Validate a list of step mappings (as loaded from YAML or JSON); step models pass as they are.

    Raises
    ------
    pydantic.ValidationError
        A step is invalid; the error's location names the step's index, kind
        (and method) and field.
    """
    return tuple(_steps_adapter().validate_python(list(data)))
