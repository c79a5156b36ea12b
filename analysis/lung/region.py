"""The lungs' region of a chest CT: where lung findings may lie, tumours at the pleura and hilum included.

The lung segmentation (:func:`pacsnode.analysis.lung.segmentation.segment_lungs`)
keeps the aerated lung: a solid tumour that touches the chest wall or the hilum
is soft tissue, not air, and makes a bay in the lung's outline rather than a
hole in it, so neither the lung labels nor a filling of their holes contain it.
The region here is, per slice and per lung, that lung closed with a disk of
radius ``CLOSING_MM`` and its holes filled: it closes the bays of the pleura and
the hilum up to about twice that across (and the fissures and vessels inside),
while the chest wall, the body outside the lungs and the heart stay out (a
convex outline would take in the heart that the left lung wraps around, and
the mediastinum).

:func:`lung_region` computes it from a segmentation that was already made (the
``match.anatomy`` check returns one) or segments the volume itself; it keeps the
last few results by volume (without keeping the volumes alive), so the pipelines that ask for the same series share
one segmentation.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from pacsnode.analysis.types import LungResult, Volume

__all__ = ["CLOSING_MM", "lung_region", "lung_region_and_airways", "region_from_labels"]

#: Radius of the closing that turns a lung's outline into its region (mm).
CLOSING_MM = 30.0

_CACHE_SIZE = 2
_cache: OrderedDict[int, tuple[weakref.ref[Volume], np.ndarray, np.ndarray | None]] = OrderedDict()
_cache_lock = threading.Lock()


def region_from_labels(labels: np.ndarray, pixel_mm: float = 1.0, closing_mm: float = CLOSING_MM) -> np.ndarray:
    """Per slice, the union of each labelled lung closed in-plane and filled; bool of the shape of ``labels``.

    ``labels`` is a lung label map (0 background, one value per lung), as
    :class:`~pacsnode.analysis.types.LungResult` ``labels``; ``pixel_mm`` its in-plane pixel size.
    """
    from scipy import ndimage

    if labels.ndim != 3:
        raise ValueError(f"the labels must be 3D (slices, rows, columns), not of shape {labels.shape}")
    radius = max(1, int(round(closing_mm / pixel_mm)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    region = np.zeros(labels.shape, dtype=bool)
    values = [int(v) for v in np.unique(labels) if v != 0]
    for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        for value in values:
            lung = (labels[z] == value).astype(np.uint8)
            if not lung.any():
                continue
            padded = cv2.copyMakeBorder(lung, radius, radius, radius, radius, cv2.BORDER_CONSTANT, value=0)
            closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[radius:-radius, radius:-radius]
            region[z] |= ndimage.binary_fill_holes(closed.astype(bool) | lung.astype(bool))
    return region


def lung_region(volume: Volume, lungs: LungResult | None = None) -> np.ndarray:
    """The lungs' region of ``volume`` (bool, the volume's shape): see the module's description.

    ``lungs`` is the volume's lung segmentation when the caller already has it; otherwise the
    volume is segmented with the default settings. Raises
    :class:`~pacsnode.analysis.errors.InputError` when the volume shows no lungs.
    """
    return lung_region_and_airways(volume, lungs)[0]


def lung_region_and_airways(volume: Volume, lungs: LungResult | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`lung_region` and the trachea and main bronchi its segmentation traced (bool, the volume's shape;
    None when none were traced), from one look at the cache; both read-only."""
    key = id(volume)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is volume:
            _cache.move_to_end(key)
            return hit[1], hit[2]
    if lungs is None:
        from pacsnode.analysis.lung.segmentation import segment_lungs

        lungs = segment_lungs(volume)
    region = region_from_labels(lungs.labels, pixel_mm=float(min(volume.spacing[1:])))
    region.setflags(write=False)
    airways = lungs.airways
    if airways is not None:
        airways = airways.view()
        airways.setflags(write=False)
    with _cache_lock:
        _cache[key] = (weakref.ref(volume), region, airways)  # a reused id is told apart by the dead reference
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return region, airways
