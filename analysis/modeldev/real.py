"""Real chest CT for training and evaluation: lung backgrounds, inserted nodules, tumour boxes.

A folder of series folders (each a CT series of DICOM files; an ``annotations.json`` beside them may
hold per-slice tumour boxes, ``{series: {"tumour_boxes": [{"sop_instance_uid", "bbox_xyxy_px"}]}}``)
is read into :class:`RealSeries`: the volume resampled in-plane to the model's spacing, the lungs'
region (:func:`pacsnode.analysis.lung.region.region_from_labels` of
:func:`pacsnode.analysis.lung.segmentation.segment_lungs`), the aerated lung and the tumour mask
(box ∩ soft tissue above -300 HU ∩ the lungs' region).

:func:`insert_nodules` paints nodules drawn by the phantom generator (same shapes, kinds and
densities) into the aerated lung, with partial volume along the slice and the image's own noise
kept, and returns the image and the nodules' mask; centred on the pleura instead, they stand for a
tumour against the chest wall or the mediastinum.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["RealSeries", "insert_nodules", "load_real_series", "real_series_dirs"]

logger = logging.getLogger(__name__)

TUMOUR_MIN_HU = -300.0  # inside a tumour box, soft tissue above this is tumour
PLEURA_MM = 3.0  # a nodule inserted at the pleura is centred this close to the lungs' region's edge (in-plane)
_SUBSAMPLES = 5  # sub-slices per slice for the partial volume of an inserted nodule


@dataclass(frozen=True, kw_only=True, eq=False)
class RealSeries:
    name: str
    hu: np.ndarray  # float32 (slices, rows, columns), resampled to ``pixel_mm``
    pixel_mm: float
    slice_mm: float
    region: np.ndarray  # bool, the lungs' region (each lung closed and filled per slice)
    lung: np.ndarray  # bool, the aerated lung (segmentation labels > 0)
    tumour: np.ndarray  # bool, tumour voxels (box ∩ HU > -300 ∩ region)
    tumour_slices: frozenset[int]  # slices with a tumour box


def real_series_dirs(root: Path) -> list[Path]:
    """The series folders under ``root`` (folders holding ``*.dcm`` files), sorted by name."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and any(p.glob("*.dcm")))


def _resample(hu: np.ndarray, factor: float) -> np.ndarray:
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[:, None]
        size = [round(hu.shape[1] * factor), round(hu.shape[2] * factor)]
        out = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return np.ascontiguousarray(out[:, 0].numpy())


def _resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[1] / shape[0], mask.shape[1] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[2] / shape[1], mask.shape[2] - 1).astype(int)
    return np.ascontiguousarray(mask[:, rows][:, :, cols])


def load_real_series(folder: Path, pixel_mm: float) -> RealSeries:
    """Read one series folder, resample it in-plane to ``pixel_mm`` and segment its lungs."""
    from pacsnode.analysis.lung.region import region_from_labels
    from pacsnode.analysis.lung.segmentation import segment_lungs
    from pacsnode.analysis.volume import load_series

    folder = Path(folder)
    volume = load_series(sorted(folder.glob("*.dcm")))
    labels = segment_lungs(volume).labels
    region = region_from_labels(labels, pixel_mm=float(min(volume.spacing[1:])))
    boxes = np.zeros(volume.hu.shape, dtype=bool)
    annotations = folder.parent / "annotations.json"
    tumour_slices: set[int] = set()
    if annotations.is_file():
        entry = json.loads(annotations.read_text(encoding="utf-8")).get(folder.name, {})
        slice_of = {str(ds.SOPInstanceUID): k for k, ds in enumerate(volume.datasets)}
        for box in entry.get("tumour_boxes", []) if isinstance(entry, dict) else []:
            k = slice_of.get(str(box["sop_instance_uid"]))
            if k is None:
                continue
            x0, y0, x1, y1 = (int(v) for v in box["bbox_xyxy_px"])
            boxes[k, y0 : y1 + 1, x0 : x1 + 1] = True
            tumour_slices.add(k)
    tumour = boxes & (volume.hu > TUMOUR_MIN_HU) & region
    factor = float(volume.spacing[1]) / pixel_mm
    hu = _resample(volume.hu, factor)
    shape = (hu.shape[1], hu.shape[2])
    logger.info("real series %s: %d slices, tumour on %d", folder.name, hu.shape[0], len(tumour_slices))
    return RealSeries(
        name=folder.name,
        hu=hu,
        pixel_mm=pixel_mm,
        slice_mm=float(volume.spacing[0]),
        region=_resample_mask(region, shape),
        lung=_resample_mask(labels > 0, shape),
        tumour=_resample_mask(tumour, shape),
        tumour_slices=frozenset(tumour_slices),
    )


def insert_nodules(
    series: RealSeries,
    rng: np.random.Generator,
    count: int,
    *,
    slices: tuple[int, int] | None = None,
    diameter_mm: tuple[float, float] = (4.0, 24.0),
    kinds: tuple[str, ...] | None = None,
    at_pleura: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, np.ndarray]]]:
    """Paint ``count`` phantom nodules into the aerated lung of ``series`` (slices ``[lo, hi)`` only).

    ``kinds``: the nodule kinds drawn from (default all of the phantoms'). ``at_pleura``: each
    nodule is centred on the aerated lung within ``PLEURA_MM`` in-plane of the lungs' region's
    edge (the pleura, the mediastinum), so the part of it outside the lung is left out, as for a
    tumour against the chest wall; otherwise on lung at least two voxels from its edge.
    Returns the image (float32 HU), the mask of the inserted nodules (uint16, nodule k = k) and,
    per nodule, (its equivalent diameter in mm of what was painted, its centre voxel).
    """
    from pacsnode.analysis.modeldev.synthetic import NODULE_KINDS, _draw_nodule, _Ellipsoid, _nodule_mask

    image = series.hu.copy()
    labels = np.zeros(image.shape, dtype=np.uint16)
    depth, rows, cols = image.shape
    lo, hi = slices if slices is not None else (0, depth)
    # The image's own texture (noise, kernel) is kept on top of a nodule's value.
    detail = image - ndimage.gaussian_filter(image, sigma=(0, 2.0, 2.0))
    if at_pleura:
        in_plane = np.zeros((3, 3, 3), dtype=bool)
        in_plane[1] = ndimage.generate_binary_structure(2, 1)
        steps = max(1, int(round(PLEURA_MM / series.pixel_mm)))
        eroded = series.lung & ~ndimage.binary_erosion(series.region, structure=in_plane, iterations=steps)
    else:
        eroded = ndimage.binary_erosion(series.lung, iterations=2)
    eroded[:lo] = False
    eroded[hi:] = False
    eroded &= ~ndimage.binary_dilation(series.tumour, iterations=8)
    candidates = np.argwhere(eroded[:, ::4, ::4]) * np.array([1, 4, 4])
    dummy = _Ellipsoid(centre=(0.0, 0.0, 0.0), semi_axes=(1.0, 1.0, 1.0))
    truths: list[tuple[float, np.ndarray]] = []
    dz, ps = series.slice_mm, series.pixel_mm
    for _ in range(count):
        shape = _draw_nodule(rng, (dummy, dummy), diameter_mm, kinds or NODULE_KINDS)
        if len(candidates) == 0:
            break
        centre = candidates[int(rng.integers(0, len(candidates)))]
        reach = (int(np.ceil(shape.bound / dz)) + 1, int(np.ceil(shape.bound / ps)) + 1)
        k0, k1 = max(int(centre[0]) - reach[0], 0), min(int(centre[0]) + reach[0] + 1, depth)
        r0, r1 = max(int(centre[1]) - reach[1], 0), min(int(centre[1]) + reach[1] + 1, rows)
        c0, c1 = max(int(centre[2]) - reach[1], 0), min(int(centre[2]) + reach[1] + 1, cols)
        box = (slice(k0, k1), slice(r0, r1), slice(c0, c1))
        if (labels[box] > 0).any():
            continue
        xs = (np.arange(c0, c1) - centre[2]) * ps
        ys = (np.arange(r0, r1) - centre[1]) * ps
        sub = (np.arange(_SUBSAMPLES) + 0.5) / _SUBSAMPLES - 0.5
        zs = ((np.arange(k0, k1)[:, None] - centre[0]) + sub[None, :]).ravel() * dz
        inside, core = _nodule_mask(shape, np.zeros(3), xs, ys, zs)
        value = np.where(core, shape.core_hu, shape.value_hu) if shape.kind == "part-solid" else shape.value_hu
        fine = inside * value
        fraction = inside.reshape(k1 - k0, _SUBSAMPLES, r1 - r0, c1 - c0).mean(axis=1)
        mean_value = fine.reshape(k1 - k0, _SUBSAMPLES, r1 - r0, c1 - c0).sum(axis=1) / np.maximum(
            fraction * _SUBSAMPLES, 1
        )
        fraction = fraction * series.lung[box]  # painted into the aerated lung only
        if np.count_nonzero(fraction >= 0.5) < 3:
            continue
        background = image[box]
        image[box] = np.where(
            fraction > 0,
            (1 - fraction) * background + fraction * (mean_value + detail[box]),
            background,
        ).astype(np.float32)
        number = len(truths) + 1
        labels[box][fraction >= 0.5] = number
        voxels = int(np.count_nonzero(fraction >= 0.5))
        diameter = float((6.0 * voxels * ps * ps * dz / np.pi) ** (1.0 / 3.0))
        truths.append((diameter, centre))
    return image, labels, truths
