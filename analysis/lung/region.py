"""The lungs' region of a chest CT: where lung findings may lie, tumours at the pleura and hilum included.

The lung segmentation (:func:`pacsnode.analysis.lung.segmentation.segment_lungs`)
keeps the aerated lung: a solid tumour that touches the chest wall or the hilum
is soft tissue, not air, and makes a bay in the lung's outline rather than a
hole in it, so neither the lung labels nor a filling of their holes contain it.
The region here is, per slice and per lung, the filled convex outline (convex
hull) of that lung: it closes the bays of the pleura and the hilum (and the
fissures and vessels inside), while the chest wall and the body outside the
lungs stay out.

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

__all__ = ["lung_region", "region_from_labels"]

_CACHE_SIZE = 2
_cache: OrderedDict[int, tuple[weakref.ref[Volume], np.ndarray]] = OrderedDict()
_cache_lock = threading.Lock()


def region_from_labels(labels: np.ndarray) -> np.ndarray:
    """Per slice, the union of each labelled lung's filled convex outline; bool of the shape of ``labels``.

    ``labels`` is a lung label map (0 background, one value per lung), as
    :class:`~pacsnode.analysis.types.LungResult` ``labels``.
    """
    if labels.ndim != 3:
        raise ValueError(f"the labels must be 3D (slices, rows, columns), not of shape {labels.shape}")
    region = np.zeros(labels.shape, dtype=np.uint8)
    values = [int(v) for v in np.unique(labels) if v != 0]
    for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1)):
        for value in values:
            lung = (labels[z] == value).astype(np.uint8)
            contours, _ = cv2.findContours(lung, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            if not contours:
                continue
            hull = cv2.convexHull(np.vstack(contours))
            cv2.fillPoly(region[z], [hull], 1)
            region[z] |= lung  # the hull's outline is drawn through the voxel centres: keep every lung voxel
    return region.astype(bool)


def lung_region(volume: Volume, lungs: LungResult | None = None) -> np.ndarray:
    """The lungs' region of ``volume`` (bool, the volume's shape): see the module's description.

    ``lungs`` is the volume's lung segmentation when the caller already has it; otherwise the
    volume is segmented with the default settings. Raises
    :class:`~pacsnode.analysis.errors.InputError` when the volume shows no lungs.
    """
    key = id(volume)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0]() is volume:
            _cache.move_to_end(key)
            return hit[1]
    if lungs is None:
        from pacsnode.analysis.lung.segmentation import segment_lungs

        lungs = segment_lungs(volume)
    region = region_from_labels(lungs.labels)
    region.setflags(write=False)
    with _cache_lock:
        _cache[key] = (weakref.ref(volume), region)  # a reused id is told apart by the dead reference
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return region
