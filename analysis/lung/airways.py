"""The trachea and main bronchi of a chest CT: traced from the trachea, cut at the hila.

The lungs' air region (:mod:`pacsnode.analysis.lung.segmentation`) holds the
airways joined to it: the trachea and the main bronchi, air that is not lung
parenchyma. :func:`trace_airways` finds them so that the segmentation leaves
them out of both lungs.

1. The trachea: on the slices superior to the centre of the air inside the
   body, 2D air regions that are round (an ellipse of axis ratio at most
   :data:`_MAX_ELONGATION`), of a trachea's cross-section
   (:data:`_TRACHEA_AREA_MM2`), near the body's mid-sagittal plane and not
   among lung parenchyma; the longest run of such regions that overlap from
   slice to slice (at least :data:`_MIN_TRACHEA_MM` long) is the trachea.
2. The lumen: air darker than the midpoint between the trachea's lumen and the
   lung parenchyma (both measured on this volume, after an in-plane Gaussian
   blur of :data:`_SMOOTH_MM`): thin airway walls and noise then no longer
   join the lumen to the parenchyma around it.
3. Local lung share: per slice, the share of lung parenchyma (air that is not
   lumen) among the non-lumen pixels of a square of :data:`_WINDOW_MM` around
   each pixel. The trachea and the main bronchi run through the mediastinum,
   among soft tissue (a low share); where a bronchus enters the lung at the
   hilum, parenchyma surrounds it (a share of a half or more).
4. Growth: the lumen with a share below :data:`_MAX_LUNG_SHARE` that is
   6-connected to the trachea: the trachea, the carina and the main bronchi,
   down to where they enter the lungs. A round 2D lumen region (a cross-section
   as in step 1) that the growth enters is taken whole: where a lung lies
   against the trachea, the lumen along that wall has a high share. Then, in
   each slice, the partial-volume rim of the lumen (air not yet below the
   lumen threshold) is added, up to :data:`_RIM_MM` from it: where the share
   is still low, and all around the round cross-sections.

A growth larger than :data:`_MAX_AIRWAY_ML` has leaked into a lung (emphysema
touching the mediastinum, a tracheal wall lost in noise): the airways are then
only the trachea found in step 1. No trachea found (a scan that starts below
the carina, a phantom without one): nothing is traced.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from pacsnode.analysis.types import Volume

__all__ = ["trace_airways"]

logger = logging.getLogger(__name__)

_SMOOTH_MM = 1.0  # sigma of the in-plane Gaussian before the lumen threshold
_TRACHEA_AREA_MM2 = (40.0, 1000.0)  # cross-section of a trachea's 2D air region (7 to 36 mm across)
_MAX_ELONGATION = 2.5  # major / minor axis of a trachea's cross-section (a sabre-sheath trachea is about 2)
_MIN_ROUNDNESS = 0.6  # area over that of the ellipse of the same second moments
_MAX_MIDLINE_MM = 40.0  # trachea centre from the body's mid-sagittal plane
_MIN_TRACHEA_MM = 15.0  # the run of trachea cross-sections spans at least this along the slice normal
_WINDOW_MM = 20.0  # side of the square of the local lung share
_MAX_LUNG_SHARE = 0.5  # airway lumen among less lung than this is trachea or main bronchus
_RIM_MM = 3.0  # partial-volume rim around the lumen, in plane
_MAX_AIRWAY_ML = 250.0  # trachea and main bronchi hold 30 to 80 mL: more is a leak into a lung
_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True, kw_only=True)
class _Section:
    """One candidate trachea cross-section: a 2D air region of slice ``k``."""

    k: int
    mask: np.ndarray  # bool, the slice's shape (rows x columns of the crop)
    area_px: int


def trace_airways(
    volume: Volume,
    inside_air: np.ndarray,
    crop: tuple[slice, slice, slice],
    *,
    x_of: Callable[[float, float, float], float],
    midline_x: float,
) -> np.ndarray | None:
    """The trachea and main bronchi of ``volume``, as a mask of ``crop``; None when no trachea is found.

    Parameters
    ----------
    volume
        The CT volume in HU.
    inside_air
        Bool, the volume's shape: the air enclosed by the body (lungs, airways, bowel gas).
    crop
        The bounding box of ``inside_air``; the returned mask has its shape.
    x_of
        Patient x (mm) of a voxel (slice, row, column) of the volume.
    midline_x
        Patient x (mm) of the body's mid-sagittal plane.

    Returns
    -------
    numpy.ndarray or None
        Bool mask of the crop: the airway voxels (all of them inside air), or None.
    """
    air = inside_air[crop]
    if air.shape[0] < 2:
        return None
    offset = (crop[0].start, crop[1].start, crop[2].start)
    row_mm, column_mm = float(volume.spacing[1]), float(volume.spacing[2])
    pixel_mm2 = row_mm * column_mm
    smooth = _smoothed(volume.hu[crop], (_SMOOTH_MM / row_mm, _SMOOTH_MM / column_mm))
    trachea = _find_trachea(volume, air, offset, pixel_mm2, x_of, midline_x)
    if not trachea:
        logger.debug("no trachea found: the airways are left in the lungs")
        return None
    seed = np.zeros(air.shape, dtype=bool)
    for section in trachea:
        seed[section.k] |= section.mask

    lumen_hu = _lumen_level(smooth, seed)
    parenchyma_hu = float(np.median(smooth[air & ~seed]))
    threshold = (lumen_hu + parenchyma_hu) / 2.0
    lumen = air & (smooth < threshold)
    del smooth
    window = (_odd(_WINDOW_MM / row_mm), _odd(_WINDOW_MM / column_mm))
    low_share = _low_lung_share(air, lumen, window)
    allowed = lumen & low_share
    labelled, _ = ndimage.label(allowed, structure=_SIX_CONNECTED)
    touched = np.unique(labelled[seed & allowed])
    touched = touched[touched > 0]
    airways = np.isin(labelled, touched) | seed
    del labelled, allowed
    min_px, max_px = (a / pixel_mm2 for a in _TRACHEA_AREA_MM2)
    round_sections = _round_sections(lumen, airways, min_px, max_px)
    rim_px = (_RIM_MM / row_mm, _RIM_MM / column_mm)
    airways = _add_rim(airways | round_sections, air & low_share, rim_px) | _add_rim(round_sections, air, rim_px) | seed

    voxel_ml = volume.voxel_ml
    traced_ml = float(np.count_nonzero(airways)) * voxel_ml
    if traced_ml > _MAX_AIRWAY_ML:
        logger.warning(
            "the airway growth leaked (%.0f mL, more than %.0f mL): only the trachea is left out of the lungs",
            traced_ml,
            _MAX_AIRWAY_ML,
        )
        airways = seed
    logger.debug(
        "airways: trachea over %d slices, lumen %.0f HU, parenchyma %.0f HU, threshold %.0f HU, %.1f mL",
        len(trachea),
        lumen_hu,
        parenchyma_hu,
        threshold,
        float(np.count_nonzero(airways)) * voxel_ml,
    )
    return airways


def _odd(pixels: float) -> int:
    return max(3, 2 * round(pixels / 2.0) + 1)


def _smoothed(hu: np.ndarray, sigma_px: tuple[float, float]) -> np.ndarray:
    out = np.empty(hu.shape, dtype=np.float32)
    for k in range(hu.shape[0]):
        cv2.GaussianBlur(
            hu[k].astype(np.float32), (0, 0), sigmaX=sigma_px[1], sigmaY=sigma_px[0], dst=out[k],
            borderType=cv2.BORDER_REPLICATE,
        )  # fmt: skip
    return out


def _lumen_level(smooth: np.ndarray, seed: np.ndarray) -> float:
    """Median (HU) of the trachea's lumen away from its wall: the seed eroded in plane, where anything is left."""
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    core = np.zeros(seed.shape, dtype=bool)
    for k in np.flatnonzero(seed.any(axis=(1, 2))):
        core[k] = cv2.erode(seed[k].view(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).view(bool)
    values = smooth[core] if core.any() else smooth[seed]
    return float(np.median(values))


def _low_lung_share(air: np.ndarray, lumen: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """Bool: the share of parenchyma among the non-lumen pixels of the window is below :data:`_MAX_LUNG_SHARE`."""
    out = np.zeros(air.shape, dtype=bool)
    size = (window[1], window[0])  # OpenCV: (width, height)
    for k in range(air.shape[0]):
        if not lumen[k].any():
            continue
        parenchyma = (air[k] & ~lumen[k]).astype(np.float32)
        other = (~lumen[k]).astype(np.float32)
        lung = cv2.boxFilter(parenchyma, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
        around = cv2.boxFilter(other, -1, size, normalize=False, borderType=cv2.BORDER_CONSTANT)
        out[k] = lung < _MAX_LUNG_SHARE * np.maximum(around, 1.0)
    return out


def _round_sections(lumen: np.ndarray, airways: np.ndarray, min_px: float, max_px: float) -> np.ndarray:
    """The whole of each round 2D lumen region (a trachea's or bronchus's cross-section) that the airways enter.

    Where the lung lies against the trachea, the lumen near that wall has a high lung share and
    the growth leaves it out; the cross-section it belongs to is the airway all the same.
    """
    out = np.zeros(lumen.shape, dtype=bool)
    for k in np.flatnonzero(airways.any(axis=(1, 2))):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(
            lumen[k].view(np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        for index in np.unique(labels[airways[k]]):
            if index == 0 or not min_px <= stats[index, cv2.CC_STAT_AREA] <= max_px:
                continue
            left, top = int(stats[index, cv2.CC_STAT_LEFT]), int(stats[index, cv2.CC_STAT_TOP])
            width, height = int(stats[index, cv2.CC_STAT_WIDTH]), int(stats[index, cv2.CC_STAT_HEIGHT])
            mask = labels[top : top + height, left : left + width] == index
            if _is_round(mask, int(stats[index, cv2.CC_STAT_AREA])):
                out[k, top : top + height, left : left + width] |= mask
    return out


def _add_rim(airways: np.ndarray, where: np.ndarray, radius_px: tuple[float, float]) -> np.ndarray:
    """``airways`` grown in plane, within ``where``, by up to ``radius_px`` (rows, columns) pixels."""
    steps = max(1, math.ceil(max(radius_px)))
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    out = airways.copy()
    for k in np.flatnonzero(airways.any(axis=(1, 2))):
        grown = out[k].view(np.uint8)
        allowed = where[k].view(np.uint8)
        for _ in range(steps):
            grown = cv2.dilate(grown, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) & allowed
        out[k] |= grown.view(bool)
    return out


# ----------------------------------------------------------------- trachea


def _find_trachea(
    volume: Volume,
    air: np.ndarray,
    offset: tuple[int, int, int],
    pixel_mm2: float,
    x_of: Callable[[float, float, float], float],
    midline_x: float,
) -> list[_Section]:
    """The longest run of trachea-like cross-sections that overlap from slice to slice, superior half only."""
    slices = air.shape[0]
    superior = _superior_slices(volume, air, offset)
    min_px, max_px = (a / pixel_mm2 for a in _TRACHEA_AREA_MM2)
    runs: list[list[_Section]] = []
    open_runs: list[list[_Section]] = []
    for k in superior:
        sections = _sections(air[k], k, offset, min_px, max_px, x_of, midline_x)
        extended: list[list[_Section]] = []
        for section in sections:
            parent = next((run for run in open_runs if np.any(run[-1].mask & section.mask)), None)
            run = [*parent, section] if parent is not None else [section]
            extended.append(run)
        for run in open_runs:
            if not any(len(e) > len(run) and e[len(run) - 1] is run[-1] for e in extended):
                runs.append(run)
        open_runs = extended
    runs.extend(open_runs)
    if not runs:
        return []
    best = max(runs, key=lambda run: (len(run), sum(s.area_px for s in run)))
    min_slices = max(2, math.ceil(_MIN_TRACHEA_MM / float(volume.spacing[0])))
    if len(best) < min(min_slices, slices):
        return []
    return best


def _superior_slices(volume: Volume, air: np.ndarray, offset: tuple[int, int, int]) -> list[int]:
    """Crop slice indices from the most superior down to the centre of the air, in that order."""
    row = np.asarray(volume.row_direction, dtype=np.float64)
    column = np.asarray(volume.column_direction, dtype=np.float64)
    normal_z = float(np.cross(row, column)[2])
    per_slice = air.sum(axis=(1, 2), dtype=np.float64)
    total = float(per_slice.sum())
    centre = float(per_slice @ np.arange(air.shape[0])) / total if total else (air.shape[0] - 1) / 2.0
    if normal_z >= 0:  # slice index grows towards the head (LPS +z is superior)
        return list(range(air.shape[0] - 1, math.floor(centre) - 1, -1))
    return list(range(0, math.ceil(centre) + 1))


def _sections(
    air: np.ndarray,
    k: int,
    offset: tuple[int, int, int],
    min_px: float,
    max_px: float,
    x_of: Callable[[float, float, float], float],
    midline_x: float,
) -> list[_Section]:
    """The trachea-like 2D air regions of one slice."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(
        air.view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    found = []
    for index in range(1, count):
        area = int(stats[index, cv2.CC_STAT_AREA])
        if not min_px <= area <= max_px:
            continue
        column, row = (float(v) for v in centroids[index])
        x = x_of(k + offset[0], row + offset[1], column + offset[2])
        if abs(x - midline_x) > _MAX_MIDLINE_MM:
            continue
        left, top = int(stats[index, cv2.CC_STAT_LEFT]), int(stats[index, cv2.CC_STAT_TOP])
        width, height = int(stats[index, cv2.CC_STAT_WIDTH]), int(stats[index, cv2.CC_STAT_HEIGHT])
        mask = labels[top : top + height, left : left + width] == index
        if not _is_round(mask, area):
            continue
        full = np.zeros(air.shape, dtype=bool)
        full[top : top + height, left : left + width] = mask
        found.append(_Section(k=k, mask=full, area_px=area))
    return found


def _is_round(mask: np.ndarray, area: int) -> bool:
    """An elliptic region: axis ratio at most :data:`_MAX_ELONGATION`, filling its moment ellipse."""
    rows, columns = np.nonzero(mask)
    if rows.size < 3:
        return False
    covariance = np.cov(np.stack([rows, columns]).astype(np.float64)) + np.eye(2) / 12.0  # pixel extent
    low, high = np.linalg.eigvalsh(covariance)
    if low <= 0 or high / low > _MAX_ELONGATION**2:
        return False
    ellipse_area = 4.0 * math.pi * math.sqrt(low * high)
    return area / ellipse_area >= _MIN_ROUNDNESS
