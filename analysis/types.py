"""Data passed between the analysis steps: a CT volume, lung measurements.

Frozen, keyword-only dataclasses; arrays are indexed (slice, row, column).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["Volume", "LungResult"]


@dataclass(frozen=True, kw_only=True)
class Volume:
    """One CT series as a volume in Hounsfield units.

    ``hu`` is int16, shape (slices, rows, columns), slices sorted by position
    along the slice normal (``row_direction x column_direction``), ascending.
    ``datasets[i]`` is the header of the source image of slice ``i`` (no pixel data).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]  # (between slices, between rows, between columns), mm
    origin: tuple[float, float, float]  # ImagePositionPatient of slice 0
    row_direction: tuple[float, float, float]  # ImageOrientationPatient[:3]: direction along a row (column index grows)
    column_direction: tuple[float, float, float]  # ImageOrientationPatient[3:]: direction down a column
    datasets: tuple[Dataset, ...] = field(repr=False)

    @property
    def voxel_ml(self) -> float:
        return float(self.spacing[0] * self.spacing[1] * self.spacing[2]) / 1000.0


@dataclass(frozen=True, kw_only=True)
class LungResult:
    """Lung segmentation and measurements.

    ``labels`` is uint8 with the shape of the volume: 0 background,
    1 right lung, 2 left lung (patient's right/left).

    A lung that was not found (collapsed, airless, resected) has volume 0 and
    NaN density and LAA-950, and ``notes`` says so. ``airways`` (bool, the
    volume's shape, or None when none were traced) is the trachea and main
    bronchi left out of the lungs, ``airway_volume_ml`` their volume.
    ``parenchyma_noise_hu`` is the robust standard deviation of the fine
    detail of the parenchyma (HU): high on sharp kernels, where noise inflates
    LAA-950; NaN when not measured.
    """

    labels: np.ndarray
    right_volume_ml: float
    left_volume_ml: float
    total_volume_ml: float
    mean_density_hu: float  # over both lungs
    laa950_percent: float  # % of lung voxels below -950 HU, both lungs
    right_mean_density_hu: float
    left_mean_density_hu: float
    right_laa950_percent: float
    left_laa950_percent: float
    airways: np.ndarray | None = field(default=None, repr=False)
    airway_volume_ml: float = 0.0
    notes: tuple[str, ...] = ()  # findings to report with the measurements, e.g. a lung not found
    parenchyma_noise_hu: float = float("nan")
