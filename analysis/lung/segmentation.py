"""Classical lung segmentation and density measurements of a chest CT volume.

No trained weights: thresholds, connected components and morphology, vectorised
with numpy, OpenCV (per-slice 2D work) and scipy.ndimage (3D labelling).

1. Air is every voxel below ``air_threshold_hu``.
2. The body, per slice, is the largest 8-connected non-air region with its
   holes filled; air outside it (around the patient, under and inside the
   table) is dropped.
3. The trachea and main bronchi are traced from the trachea down to the hila
   (:mod:`pacsnode.analysis.lung.airways`) and taken out of that air: they are
   not lung, and they no longer join the two lungs.
4. The air inside the body is labelled in 3D (6-connected). Regions smaller
   than ``min_lung_ml`` (bowel gas, what is left of the airways, noise) are dropped.
5. Right and left: when the largest region lies on both sides of the body's
   mid-sagittal plane it holds both lungs (joined at a junction) and is cut at
   the plane x = const (patient coordinates) where it is thinnest, near its
   middle; otherwise the largest region is one lung and the largest region on
   the other side of the midline that reaches above the middle of the first
   (not gas under the diaphragm) is the other one. When there is none (a
   collapsed, airless or resected lung), that lung is reported missing: its
   volume 0, its density and LAA-950 not a number, and a note in
   ``LungResult.notes`` says so. DICOM patient coordinates are LPS: the
   patient's left is +x, so the right lung is the one at lower x, whatever
   the image orientation.
6. Each lung, slice by slice: a closing with an elliptical kernel of radius
   ``closing_mm`` (juxtapleural vessels, airway walls) and the filling of its
   holes up to ``max_hole_mm2`` (vessels, airways): they count as lung, in the
   volume and in the mean density. The traced airways are never filled in.
7. Volume (mL), mean density (HU) and LAA-950 (% of lung voxels below -950 HU),
   per lung and for both; the noise of the parenchyma (HU), and a note when it
   is so high (a sharp kernel) that LAA-950 is likely overestimated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np
from scipy import ndimage

from pacsnode.analysis.errors import InputError
from pacsnode.analysis.lung.airways import trace_airways
from pacsnode.analysis.types import LungResult, Volume

__all__ = ["LAA_THRESHOLD_HU", "NOISY_PARENCHYMA_HU", "segment_lungs"]

logger = logging.getLogger(__name__)

#: Low attenuation areas: lung voxels below this value (HU) count in LAA-950.
LAA_THRESHOLD_HU = -950

#: Above this parenchyma noise (HU, see ``LungResult.parenchyma_noise_hu``) a note says LAA-950 is
#: likely overestimated: noise pushes parenchyma below -950 HU. The soft-tissue and lung kernel
#: reconstructions of one real chest CT measure about 21 and 65 HU, and LAA-950 0.1 % and 13 %.
NOISY_PARENCHYMA_HU = 40.0
_NOISE_SLICES = 24  # slices sampled for the noise estimate
_NOISE_SIGMA_MM = 2.0  # the smooth image the noise is measured against
_NOISE_MARGIN_MM = 5.0  # from the lung's edge

_RIGHT, _LEFT = 1, 2
_AIRWAY = 3  # in the label volume during the refinement only: never filled in as lung
_BILATERAL_FRACTION = 0.2  # a region with this share of its voxels on each side of the midline holds both lungs
_SPLIT_WINDOW = 0.3  # search the cut in the middle of the region: skip this share of its width on each side
_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)


@dataclass(frozen=True, kw_only=True)
class _Region:
    """An air region of the labelled crop."""

    index: int  # label in the crop
    voxels: int
    box: tuple[slice, slice, slice]  # within the crop
    centroid_x: float  # patient x, mm
    z_range: tuple[float, float]  # lowest and highest patient z of its bounding box, mm


def segment_lungs(
    volume: Volume,
    *,
    air_threshold_hu: int = -400,
    min_lung_ml: float = 100.0,
    closing_mm: float = 3.0,
    max_hole_mm2: float = 1000.0,
    remove_airways: bool = True,
) -> LungResult:
    """Segment the right and left lungs and measure their volume and density.

    Parameters
    ----------
    volume
        The CT volume in HU.
    air_threshold_hu
        Voxels below this are air (lung parenchyma included).
    min_lung_ml
        Air regions inside the body smaller than this are not lung.
    closing_mm
        Radius of the elliptical kernel of the per-slice closing that smooths
        each lung's outline (vessels at the pleura, airway walls); 0 for none.
    max_hole_mm2
        Holes of a lung slice up to this area (vessels, airways) are filled;
        larger ones (the dome of the liver encircled by a lung base) are not.
    remove_airways
        Trace the trachea and main bronchi and leave them out of the lungs.

    Returns
    -------
    LungResult
        ``labels`` uint8 of the volume's shape, 1 right lung, 2 left lung;
        ``airways`` the traced trachea and main bronchi (None if none were
        traced); ``notes`` says which lung, if any, was not found.

    Raises
    ------
    InputError
        When no lung is found.
    ValueError
        For a volume that is not 3D or negative sizes.

    Examples
    --------
    >>> result = segment_lungs(load_series(paths))  # doctest: +SKIP
    >>> round(result.total_volume_ml), round(result.laa950_percent, 1)  # doctest: +SKIP
    (4812, 3.4)
    """
    hu = volume.hu
    if hu.ndim != 3:
        raise ValueError(f"the volume must be 3D (slices, rows, columns), not of shape {hu.shape}")
    if min_lung_ml < 0 or closing_mm < 0 or max_hole_mm2 < 0:
        raise ValueError("min_lung_ml, closing_mm and max_hole_mm2 must not be negative")
    started = time.perf_counter()
    geometry = _Geometry(volume)
    pixel_mm2 = volume.spacing[1] * volume.spacing[2]

    inside_air, body_centroid = _air_inside_body(hu, air_threshold_hu)
    crop = _bounding_box(inside_air)
    if crop is None:
        raise InputError(f"no lungs found: no air (below {air_threshold_hu} HU) inside the body")
    midline_x = geometry.x_of(*body_centroid)
    airways = None
    if remove_airways:
        airways = trace_airways(volume, inside_air, crop, x_of=geometry.x_of, midline_x=midline_x)
        if airways is not None:
            inside_air[crop][airways] = False
    offset = (crop[0].start, crop[1].start, crop[2].start)
    labelled, count = ndimage.label(inside_air[crop], structure=_SIX_CONNECTED)
    del inside_air
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    sizes[0] = 0
    min_voxels = min_lung_ml / volume.voxel_ml
    large = np.flatnonzero(sizes >= max(min_voxels, 1.0))
    kept = [int(i) for i in large[np.argsort(sizes[large], kind="stable")[::-1]]]
    if not kept:
        largest = float(sizes.max()) * volume.voxel_ml
        raise InputError(
            f"no lungs found: the largest air region inside the body is {largest:.0f} mL, "
            f"less than {min_lung_ml:g} mL (air threshold {air_threshold_hu} HU)"
        )
    boxes = ndimage.find_objects(labelled)
    regions = [_region(labelled, index, int(sizes[index]), boxes[index - 1], offset, geometry) for index in kept]

    first = regions[0]
    right_share = _share_below(labelled, first, offset, geometry, midline_x)
    lungs: dict[int, tuple[np.ndarray, tuple[slice, slice, slice]] | None]
    if min(right_share, 1.0 - right_share) >= _BILATERAL_FRACTION:
        split_x = _thinnest_plane(labelled, first, offset, geometry)
        right = _select(labelled, first, offset, geometry, below=split_x)
        left = _select(labelled, first, offset, geometry, at_or_above=split_x)
        logger.debug("one air region holds both lungs; cut at x = %.1f mm", split_x)
        sizes_found = {_RIGHT: np.count_nonzero(right[0]), _LEFT: np.count_nonzero(left[0])}
        smaller = min(sizes_found, key=lambda value: sizes_found[value])
        if sizes_found[smaller] < min_voxels:
            # A sliver across the cut, not a lung of its own: the whole region is the other lung.
            larger = _LEFT if smaller == _RIGHT else _RIGHT
            lungs = {smaller: None, larger: _select(labelled, first, offset, geometry)}
        else:
            lungs = {_RIGHT: right, _LEFT: left}
    else:
        first_is_right = right_share > 0.5
        # The other lung reaches above the middle of this one; gas under a diaphragm (the stomach's) does not.
        middle_z = sum(first.z_range) / 2.0
        opposite = [r for r in regions[1:] if (r.centroid_x < midline_x) != first_is_right and r.z_range[1] > middle_z]
        found = _select(labelled, first, offset, geometry)
        other_lung = _select(labelled, opposite[0], offset, geometry) if opposite else None
        if first_is_right:
            lungs = {_RIGHT: found, _LEFT: other_lung}
        else:
            lungs = {_RIGHT: other_lung, _LEFT: found}
    del labelled

    labels = np.zeros(hu.shape, dtype=np.uint8)
    notes = []
    for value, lung in lungs.items():
        if lung is None:
            notes.append(_missing_note(value, min_lung_ml, air_threshold_hu))
            continue
        mask, box = lung
        target = labels[_shift(box, offset)]
        target[mask] = value
    if airways is not None:
        labels[crop][airways] = _AIRWAY
    radius_px = (closing_mm / volume.spacing[1], closing_mm / volume.spacing[2])
    max_hole_px = max_hole_mm2 / pixel_mm2
    for value, lung in lungs.items():
        if lung is not None:
            _refine(labels, value, _shift(lung[1], offset), radius_px, max_hole_px)
    airway_ml = 0.0
    full_airways = None
    if airways is not None:
        labels[crop][airways] = 0
        full_airways = np.zeros(hu.shape, dtype=bool)
        full_airways[crop] = airways
        airway_ml = float(np.count_nonzero(airways)) * volume.voxel_ml

    noise_hu = _parenchyma_noise(hu, labels, volume.spacing)
    if noise_hu > NOISY_PARENCHYMA_HU:
        notes.append(
            f"LAA-950 is likely overestimated: the lung parenchyma is noisy ({noise_hu:.0f} HU, more than "
            f"{NOISY_PARENCHYMA_HU:g}; a sharp reconstruction kernel or a low dose?); LAA-950 needs a smooth kernel"
        )
    result = _measure(hu, labels, volume.voxel_ml, airways=full_airways, airway_ml=airway_ml, notes=tuple(notes))
    result = replace(result, parenchyma_noise_hu=noise_hu)
    for note in notes:
        logger.info(note)
    logger.debug(
        "segmented lungs in %.2f s: right %.0f mL, left %.0f mL, airways %.0f mL left out",
        time.perf_counter() - started,
        result.right_volume_ml,
        result.left_volume_ml,
        airway_ml,
    )
    return result


def _missing_note(value: int, min_lung_ml: float, air_threshold_hu: int) -> str:
    side = "right" if value == _RIGHT else "left"
    return (
        f"{side} lung not found: no air region of at least {min_lung_ml:g} mL (below {air_threshold_hu} HU) "
        f"on the patient's {side} (collapsed, airless or resected lung?); its volume is reported as 0 mL"
    )


# ----------------------------------------------------------------- geometry


class _Geometry:
    """Patient x and z (mm) of voxel indices: x = x0 + k * dx_slice + r * dx_row + c * dx_column, z alike."""

    def __init__(self, volume: Volume) -> None:
        row_direction = np.asarray(volume.row_direction, dtype=np.float64)
        column_direction = np.asarray(volume.column_direction, dtype=np.float64)
        normal = np.cross(row_direction, column_direction)
        normal /= np.linalg.norm(normal) or 1.0
        self.x0 = float(volume.origin[0])
        self.dx_slice = float(volume.spacing[0] * normal[0])
        self.dx_row = float(volume.spacing[1] * column_direction[0])  # moving down a column: next row
        self.dx_column = float(volume.spacing[2] * row_direction[0])  # moving along a row: next column
        self._z = (
            float(volume.origin[2]),
            float(volume.spacing[0] * normal[2]),
            float(volume.spacing[1] * column_direction[2]),
            float(volume.spacing[2] * row_direction[2]),
        )
        self.bin_mm = float(min(volume.spacing[1], volume.spacing[2]))

    def x_of(self, k: float, r: float, c: float) -> float:
        return self.x0 + k * self.dx_slice + r * self.dx_row + c * self.dx_column

    def z_range(self, box: tuple[slice, slice, slice]) -> tuple[float, float]:
        """Lowest and highest patient z (mm; LPS: +z is superior) of the corners of ``box`` (volume indices)."""
        z0, dz_slice, dz_row, dz_column = self._z
        corners = [
            z0 + k * dz_slice + r * dz_row + c * dz_column
            for k in (box[0].start, box[0].stop - 1)
            for r in (box[1].start, box[1].stop - 1)
            for c in (box[2].start, box[2].stop - 1)
        ]
        return min(corners), max(corners)

    def x_plane(self, k: int, rows: slice, columns: slice) -> np.ndarray:
        """Patient x of the voxels of slice ``k`` in ``rows`` x ``columns``."""
        r = np.arange(rows.start, rows.stop, dtype=np.float64) * self.dx_row
        c = np.arange(columns.start, columns.stop, dtype=np.float64) * self.dx_column
        result: np.ndarray = (self.x0 + k * self.dx_slice) + r[:, None] + c[None, :]
        return result


def _shift(box: tuple[slice, slice, slice], offset: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    return (
        slice(box[0].start + offset[0], box[0].stop + offset[0]),
        slice(box[1].start + offset[1], box[1].stop + offset[1]),
        slice(box[2].start + offset[2], box[2].stop + offset[2]),
    )


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    k0, k1 = int(slices[0]), int(slices[-1]) + 1
    sub = mask[k0:k1]
    rows = np.flatnonzero(sub.any(axis=(0, 2)))
    columns = np.flatnonzero(sub.any(axis=(0, 1)))
    return (
        slice(k0, k1),
        slice(int(rows[0]), int(rows[-1]) + 1),
        slice(int(columns[0]), int(columns[-1]) + 1),
    )


# ----------------------------------------------------------------- body


def _air_inside_body(hu: np.ndarray, air_threshold_hu: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Air enclosed by the body, per slice, and the body's centroid (slice, row, column indices)."""
    slices, rows, columns = hu.shape
    inside = np.zeros(hu.shape, dtype=bool)
    total = 0.0
    moments = np.zeros(3)
    row_index = np.arange(rows, dtype=np.float64)
    column_index = np.arange(columns, dtype=np.float64)
    min_body_px = 0.001 * rows * columns
    for k in range(slices):
        air = hu[k] < air_threshold_hu
        solid = np.logical_not(air).view(np.uint8)
        n, label, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8, ltype=cv2.CV_32S)
        if n <= 1:
            continue
        largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if stats[largest, cv2.CC_STAT_AREA] < min_body_px:
            continue
        outside_body = (label != largest).view(np.uint8)
        _, holes, hole_stats, _ = cv2.connectedComponentsWithStats(outside_body, connectivity=4, ltype=cv2.CV_32S)
        left = hole_stats[:, cv2.CC_STAT_LEFT]
        top = hole_stats[:, cv2.CC_STAT_TOP]
        touches_border = (
            (left == 0)
            | (top == 0)
            | (left + hole_stats[:, cv2.CC_STAT_WIDTH] == columns)
            | (top + hole_stats[:, cv2.CC_STAT_HEIGHT] == rows)
        )
        is_hole = ~touches_border
        is_hole[0] = False  # label 0: the body itself
        hole = is_hole[holes]
        np.logical_and(hole, air, out=inside[k])
        body = hole | (label == largest)
        area = float(np.count_nonzero(body))
        total += area
        moments[0] += k * area
        moments[1] += float(body.sum(axis=1) @ row_index)
        moments[2] += float(body.sum(axis=0) @ column_index)
    if total == 0:
        return inside, ((slices - 1) / 2.0, (rows - 1) / 2.0, (columns - 1) / 2.0)
    return inside, (moments[0] / total, moments[1] / total, moments[2] / total)


# ----------------------------------------------------------------- regions


def _region(
    labelled: np.ndarray,
    index: int,
    voxels: int,
    box: tuple[slice, slice, slice],
    offset: tuple[int, int, int],
    geometry: _Geometry,
) -> _Region:
    mask = labelled[box] == index
    per_slice = mask.sum(axis=(1, 2), dtype=np.float64)
    per_row = mask.sum(axis=(0, 2), dtype=np.float64)
    per_column = mask.sum(axis=(0, 1), dtype=np.float64)
    k = float(per_slice @ np.arange(box[0].start, box[0].stop)) / voxels + offset[0]
    r = float(per_row @ np.arange(box[1].start, box[1].stop)) / voxels + offset[1]
    c = float(per_column @ np.arange(box[2].start, box[2].stop)) / voxels + offset[2]
    return _Region(
        index=index, voxels=voxels, box=box, centroid_x=geometry.x_of(k, r, c),
        z_range=geometry.z_range(_shift(box, offset)),
    )  # fmt: skip


def _share_below(
    labelled: np.ndarray, region: _Region, offset: tuple[int, int, int], geometry: _Geometry, x: float
) -> float:
    """Share of the region's voxels at patient x below ``x`` (on the patient's right)."""
    below = 0
    box = region.box
    rows = slice(box[1].start + offset[1], box[1].stop + offset[1])
    columns = slice(box[2].start + offset[2], box[2].stop + offset[2])
    for k in range(box[0].start, box[0].stop):
        mask = labelled[k, box[1], box[2]] == region.index
        below += int(np.count_nonzero(mask & (geometry.x_plane(k + offset[0], rows, columns) < x)))
    return below / region.voxels


def _thinnest_plane(labelled: np.ndarray, region: _Region, offset: tuple[int, int, int], geometry: _Geometry) -> float:
    """The plane x = const, near the middle of the region, that cuts it through the fewest voxels."""
    box = region.box
    rows = slice(box[1].start + offset[1], box[1].stop + offset[1])
    columns = slice(box[2].start + offset[2], box[2].stop + offset[2])
    corners = [
        geometry.x_of(k, r, c)
        for k in (box[0].start + offset[0], box[0].stop - 1 + offset[0])
        for r in (rows.start, rows.stop - 1)
        for c in (columns.start, columns.stop - 1)
    ]
    x_min = min(corners)
    bins = int(np.ceil((max(corners) - x_min) / geometry.bin_mm)) + 1
    profile = np.zeros(bins, dtype=np.int64)
    for k in range(box[0].start, box[0].stop):
        mask = labelled[k, box[1], box[2]] == region.index
        if not mask.any():
            continue
        x = geometry.x_plane(k + offset[0], rows, columns)[mask]
        profile += np.bincount(((x - x_min) / geometry.bin_mm).astype(np.intp), minlength=bins)[:bins]
    occupied = np.flatnonzero(profile)
    first, last = int(occupied[0]), int(occupied[-1])
    skip = int(_SPLIT_WINDOW * (last - first))
    lo, hi = first + skip, max(last - skip, first + skip + 1)
    window = profile[lo:hi]
    candidates = np.flatnonzero(window == window.min()) + lo
    centre = (first + last) / 2.0
    best = int(candidates[np.argmin(np.abs(candidates - centre))])
    return x_min + (best + 0.5) * geometry.bin_mm


def _select(
    labelled: np.ndarray,
    region: _Region,
    offset: tuple[int, int, int],
    geometry: _Geometry,
    *,
    below: float | None = None,
    at_or_above: float | None = None,
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """The region's mask in its box, optionally only on one side of a plane x = const."""
    box = region.box
    mask = labelled[box] == region.index
    if below is None and at_or_above is None:
        return mask, box
    rows = slice(box[1].start + offset[1], box[1].stop + offset[1])
    columns = slice(box[2].start + offset[2], box[2].stop + offset[2])
    for i, k in enumerate(range(box[0].start, box[0].stop)):
        x = geometry.x_plane(k + offset[0], rows, columns)
        keep = x < below if below is not None else x >= at_or_above
        mask[i] &= keep
    return mask, box


# ----------------------------------------------------------------- refinement


def _refine(
    labels: np.ndarray,
    value: int,
    box: tuple[slice, slice, slice],
    radius_px: tuple[float, float],
    max_hole_px: float,
) -> None:
    """Close and fill the holes of lung ``value``, slice by slice, adding only unlabelled voxels."""
    _, rows, columns = labels.shape
    pad_r, pad_c = round(radius_px[0]), round(radius_px[1])
    kernel = None
    if pad_r > 0 or pad_c > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad_c + 1, 2 * pad_r + 1))
    r0, r1 = max(box[1].start - pad_r - 1, 0), min(box[1].stop + pad_r + 1, rows)
    c0, c1 = max(box[2].start - pad_c - 1, 0), min(box[2].stop + pad_c + 1, columns)
    for k in range(box[0].start, box[0].stop):
        target = labels[k, r0:r1, c0:c1]
        lung = (target == value).view(np.uint8)
        if not lung.any():
            continue
        if kernel is not None:
            lung = cv2.morphologyEx(lung, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        background = (lung == 0).view(np.uint8)
        _, holes, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4, ltype=cv2.CV_32S)
        height, width = lung.shape
        left, top = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
        fill = (
            (left > 0)
            & (top > 0)
            & (left + stats[:, cv2.CC_STAT_WIDTH] < width)
            & (top + stats[:, cv2.CC_STAT_HEIGHT] < height)
            & (stats[:, cv2.CC_STAT_AREA] <= max_hole_px)
        )
        fill[0] = False
        add = (lung.view(bool) | fill[holes]) & (target == 0)
        target[add] = value


# ----------------------------------------------------------------- measurements


def _parenchyma_noise(hu: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Robust standard deviation (HU) of the fine detail of the lung parenchyma; NaN with too little lung.

    On up to :data:`_NOISE_SLICES` slices with lung: the image minus its Gaussian blur
    (:data:`_NOISE_SIGMA_MM`), over the lung at least :data:`_NOISE_MARGIN_MM` from its edge and
    below -700 HU (no vessels); 1.4826 times the median absolute value.
    """
    with_lung = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if with_lung.size == 0:
        return float("nan")
    picks = with_lung[np.linspace(0, with_lung.size - 1, min(_NOISE_SLICES, with_lung.size)).round().astype(int)]
    sigma = (_NOISE_SIGMA_MM / spacing[1], _NOISE_SIGMA_MM / spacing[2])
    margin = (max(1, round(_NOISE_MARGIN_MM / spacing[1])), max(1, round(_NOISE_MARGIN_MM / spacing[2])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin[1] + 1, 2 * margin[0] + 1))
    details = []
    for k in np.unique(picks):
        inner = cv2.erode((labels[k] > 0).view(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        where = inner.view(bool) & (hu[k] < -700)
        if not where.any():
            continue
        image = hu[k].astype(np.float32)
        smooth = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma[1], sigmaY=sigma[0], borderType=cv2.BORDER_REPLICATE)
        details.append((image - smooth)[where])
    if not details:
        return float("nan")
    values = np.concatenate(details)
    if values.size < 1000:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values)))


def _measure(
    hu: np.ndarray,
    labels: np.ndarray,
    voxel_ml: float,
    *,
    airways: np.ndarray | None,
    airway_ml: float,
    notes: tuple[str, ...],
) -> LungResult:
    """Volumes and densities of the labelled lungs; a lung without voxels has volume 0 and NaN densities."""
    box = _bounding_box(labels > 0)
    assert box is not None
    hu_box, labels_box = hu[box], labels[box]
    counts, sums, lows = [], [], []
    for value in (_RIGHT, _LEFT):
        values = hu_box[labels_box == value]
        counts.append(int(values.size))
        sums.append(float(values.sum(dtype=np.int64)))
        lows.append(int(np.count_nonzero(values < LAA_THRESHOLD_HU)))
    total = counts[0] + counts[1]

    def ratio(numerator: float, denominator: int) -> float:
        return numerator / denominator if denominator else float("nan")

    return LungResult(
        labels=labels,
        right_volume_ml=counts[0] * voxel_ml,
        left_volume_ml=counts[1] * voxel_ml,
        total_volume_ml=total * voxel_ml,
        mean_density_hu=(sums[0] + sums[1]) / total,
        laa950_percent=100.0 * (lows[0] + lows[1]) / total,
        right_mean_density_hu=ratio(sums[0], counts[0]),
        left_mean_density_hu=ratio(sums[1], counts[1]),
        right_laa950_percent=ratio(100.0 * lows[0], counts[0]),
        left_laa950_percent=ratio(100.0 * lows[1], counts[1]),
        airways=airways,
        airway_volume_ml=airway_ml,
        notes=notes,
    )
