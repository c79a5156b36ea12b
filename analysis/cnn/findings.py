"""Model outputs -> findings: thresholds, connected components, measurements, class scores.

Pure numpy/scipy on host arrays; the engine (:mod:`pacsnode.analysis.cnn.engine`)
produces the probabilities, the writers (:mod:`pacsnode.analysis.cnn.writers`)
turn the findings into DICOM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pacsnode.analysis.cnn.package import LabelOutput

if TYPE_CHECKING:  # pragma: no cover
    from pacsnode.analysis.cnn.writers import ClassScore, Finding
    from pacsnode.analysis.types import Volume

__all__ = [
    "MASS_MM",
    "LesionFilter",
    "Shape",
    "axial_diameter_mm",
    "class_scores",
    "find_components",
    "findings_from_probabilities",
    "label_spec",
    "longest_diameter_mm",
    "shape_of",
]

logger = logging.getLogger(__name__)

#: A lung lesion whose long axis (largest axial diameter) is this or more is a mass, below it a nodule.
MASS_MM = 30.0


@dataclass(frozen=True, kw_only=True)
class LesionFilter:
    """Which connected findings are lesions: the shape tests of :func:`findings_from_probabilities`.

    The axes are the full lengths of the finding's principal axes (those of a solid
    ellipsoid with its second moments), long >= middle >= short. A vessel is a tube
    (``long / middle`` above ``max_elongation``), pleura and fissures are sheets
    (``middle / short`` above ``max_flatness``, or more than ``max_boundary_fraction``
    of the voxels within ``boundary_mm`` in-plane of the region's edge: a flat rim along
    the lung's outline). A lesion whose long axis is ``mass_mm`` or more is a ``"mass"``,
    a smaller one a ``"nodule"``.
    """

    max_elongation: float = 3.0
    max_flatness: float = 4.0
    boundary_mm: float = 5.0
    max_boundary_fraction: float = 0.5
    mass_mm: float = MASS_MM


@dataclass(frozen=True, kw_only=True)
class Shape:
    """Principal axes (mm, long >= middle >= short) of a finding and its share near the region's edge."""

    axes_mm: tuple[float, float, float]
    boundary_fraction: float

    @property
    def elongation(self) -> float:
        return self.axes_mm[0] / max(self.axes_mm[1], 1e-6)

    @property
    def flatness(self) -> float:
        return self.axes_mm[1] / max(self.axes_mm[2], 1e-6)

    def rejected_by(self, rules: LesionFilter) -> str | None:
        """Why the finding is not a lesion (``"tube"``, ``"sheet"``, ``"boundary"``), or None."""
        if self.elongation > rules.max_elongation:
            return "tube"
        if self.flatness > rules.max_flatness:
            return "sheet"
        if self.boundary_fraction > rules.max_boundary_fraction:
            return "boundary"
        return None


def shape_of(index: np.ndarray, spacing: tuple[float, float, float], near_edge: np.ndarray | None = None) -> Shape:
    """The :class:`Shape` of a finding of voxel indexes ``index`` (n, 3).

    Each voxel counts as a uniform box (its own variance, spacing**2 / 12, is added on each
    axis), so one slice of a thick-slice series still has a thickness. ``near_edge`` marks
    the voxels of the volume near the region's edge (None: boundary fraction 0).
    """
    sp = np.asarray(spacing, dtype=np.float64)
    points = index.astype(np.float64) * sp
    cov = np.cov(points.T) if points.shape[0] > 1 else np.zeros((3, 3))
    cov = cov + np.diag(sp**2 / 12.0)
    eig = np.sort(np.clip(np.linalg.eigvalsh(cov), 0.0, None))[::-1]
    axes = np.sqrt(20.0 * eig)  # a solid ellipsoid of full axis d has variance d**2 / 20 along it
    boundary = 0.0
    if near_edge is not None:
        boundary = float(near_edge[tuple(index.T)].mean())
    return Shape(axes_mm=(float(axes[0]), float(axes[1]), float(axes[2])), boundary_fraction=boundary)


def _near_edge(region: np.ndarray, spacing: tuple[float, float, float], within_mm: float) -> np.ndarray:
    """Voxels of ``region`` within ``within_mm`` in-plane of its outside, slice by slice."""
    from scipy import ndimage

    near = np.zeros(region.shape, dtype=bool)
    for z in np.flatnonzero(region.reshape(region.shape[0], -1).any(axis=1)):
        distance = ndimage.distance_transform_edt(np.pad(region[z], 1), sampling=spacing[1:])[1:-1, 1:-1]
        near[z] = region[z] & (distance <= within_mm)
    return near


def label_spec(label: LabelOutput) -> Any:
    """The writer's LabelSpec of a manifest label."""
    from pacsnode.analysis.cnn.writers import LabelSpec

    return LabelSpec(
        value=label.value,
        name=label.name,
        category=label.category.to_code(),
        type=label.type_code().to_code(),
        modifier=label.modifier.to_code() if label.modifier else None,
        color=label.color,
    )


def _channel(label: LabelOutput, activation: str) -> int:
    return label.value if activation == "softmax" else label.value - 1


def find_components(
    mask: np.ndarray, spacing: tuple[float, float, float], min_volume_mm3: float
) -> tuple[np.ndarray, int]:
    """3D connected components (26-connected) of ``mask`` of at least ``min_volume_mm3``; (labels, count)."""
    labels, count, _ = _components(mask, spacing, min_volume_mm3)
    return labels, count


def _components(
    mask: np.ndarray, spacing: tuple[float, float, float], min_volume_mm3: float
) -> tuple[np.ndarray, int, np.ndarray]:
    """As :func:`find_components`, plus the voxel count of each kept component (index = label).

    Labelled inside the bounding box of the mask only (findings are sparse), then placed in a full array.
    """
    from scipy import ndimage

    labels = np.zeros(mask.shape, dtype=np.int32)
    box = _bounding_box(mask)
    if box is None:
        return labels, 0, np.zeros(1, dtype=np.int64)
    inner, count = ndimage.label(mask[box], structure=np.ones((3, 3, 3), dtype=bool))
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(inner.ravel())
    keep = sizes * voxel_mm3 >= min_volume_mm3
    keep[0] = False
    remap = np.zeros(count + 1, dtype=np.int32)
    remap[keep] = np.arange(1, int(keep.sum()) + 1)
    labels[box] = remap[inner]
    return labels, int(keep.sum()), np.concatenate([[0], sizes[keep]])


def _above(channel: np.ndarray, threshold: float) -> np.ndarray:
    """``channel >= threshold`` for probabilities; float16 maps compare as integers (same order for x >= 0)."""
    if channel.dtype == np.float16 and threshold >= 0:
        bits = channel.view(np.uint16)
        if int(bits.max(initial=0)) < 0x7C00:  # no sign bit, no inf or NaN: bit order = value order
            return bits >= np.float16(threshold).view(np.uint16)
    return channel >= threshold


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def findings_from_probabilities(
    prob: np.ndarray,
    volume: Volume,
    labels: Sequence[LabelOutput],
    activation: str,
    *,
    max_findings: int = 100,
    region: np.ndarray | None = None,
    lesions: LesionFilter | None = None,
) -> list[Finding]:
    """Threshold each label's map, split it into connected findings, measure each; largest first.

    ``region`` (bool, the volume's shape; None: everywhere) is where findings may lie: the map
    outside it is dropped before the split. With ``lesions``, a finding shaped like a vessel or
    pleura is dropped (:class:`LesionFilter`) and each one kept is a ``"mass"`` or ``"nodule"``
    (its ``kind``). The long axis (``longest_diameter_mm``) is the largest in-plane diameter on
    the axial slice where it is largest (RECIST), ``extent_mm`` the largest 3D extent.
    At most ``max_findings`` per label (the largest kept), so a noisy map cannot exhaust memory.
    """
    from dataclasses import replace

    from scipy import ndimage

    from pacsnode.analysis.cnn.writers import Finding

    if region is not None and region.shape != volume.hu.shape:
        raise ValueError(f"the region's shape {region.shape} differs from the volume's {volume.hu.shape}")
    near_edge = None
    if region is not None and lesions is not None:
        near_edge = _near_edge(region, volume.spacing, lesions.boundary_mm)
    findings: list[tuple[float, Finding]] = []
    normal = np.cross(volume.row_direction, volume.column_direction)
    for label in labels:
        channel = prob[_channel(label, activation)]
        above = _above(channel, label.threshold)
        if region is not None:
            above &= region
        components, count, sizes = _components(above, volume.spacing, label.min_volume_mm3)
        if count == 0:
            continue
        spec = label_spec(label)
        boxes = ndimage.find_objects(components)
        kept = 0
        dropped: dict[str, int] = {}
        for k in (np.argsort(-sizes[1:], kind="stable") + 1).tolist():
            if kept == max_findings:
                logger.warning("more than %d %s findings; keeping the %d largest", max_findings, label.name, kept)
                break
            box = boxes[k - 1]
            if box is None:
                continue
            mask_box = components[box] == k
            idx = np.argwhere(mask_box) + np.array([s.start for s in box])
            kind = None
            if lesions is not None:
                why = shape_of(idx, volume.spacing, near_edge).rejected_by(lesions)
                if why is not None:
                    dropped[why] = dropped.get(why, 0) + 1
                    continue
            kept += 1
            axial = axial_diameter_mm(idx, volume.spacing)
            if lesions is not None:
                kind = "mass" if axial >= lesions.mass_mm else "nodule"
            centroid = idx.mean(axis=0)
            patient = _patient(volume, normal, centroid)
            mask = np.zeros(components.shape, dtype=bool)
            mask[box] = mask_box
            slice_index = int(round(centroid[0]))
            # The patient's right is -x (LPS), measured from the body's midline on that slice, not x = 0.
            side = "right" if patient[0] < _midline_x(volume, normal, slice_index) else "left"
            finding_site = label.finding_site.to_code() if label.finding_site else None
            laterality = None
            if label.lateralize:
                from pydicom.sr.codedict import codes

                laterality = codes.cid244.Right if side == "right" else codes.cid244.Left
            site = label.finding_site.meaning.lower() if label.finding_site else "body"
            instance = volume.datasets[slice_index].get("InstanceNumber") if volume.datasets else None
            location = (
                f"{side} {site}, image {instance if instance is not None else slice_index + 1}, "
                f"patient x {patient[0]:.0f} y {patient[1]:.0f} z {patient[2]:.0f} mm"
            )
            volume_ml = float(idx.shape[0] * volume.voxel_ml)
            findings.append(
                (
                    volume_ml,
                    Finding(
                        label=spec,
                        number=len(findings) + 1,
                        mask=mask,
                        probability=float(np.clip(channel[box][mask_box].astype(np.float32).max(), 0.0, 1.0)),
                        volume_ml=volume_ml,
                        longest_diameter_mm=axial,
                        extent_mm=longest_diameter_mm(idx, volume.spacing),
                        kind=kind,
                        centroid_index=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                        centroid_patient_mm=(float(patient[0]), float(patient[1]), float(patient[2])),
                        location=location,
                        finding_site=finding_site,
                        laterality=laterality,
                    ),
                )
            )
        if dropped:
            logger.info("%s: dropped %s", label.name, ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())))
    findings.sort(key=lambda pair: -pair[0])  # numbered largest first
    return [replace(f, number=n) for n, (_, f) in enumerate(findings, start=1)]


def _patient(volume: Volume, normal: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Patient coordinates (mm) of a (slice, row, column) index: rows run along the column direction."""
    patient: np.ndarray = (  # an element of index is typed Any
        np.asarray(volume.origin)
        + index[0] * volume.spacing[0] * normal
        + index[1] * volume.spacing[1] * np.asarray(volume.column_direction)
        + index[2] * volume.spacing[2] * np.asarray(volume.row_direction)
    )
    return patient


def _midline_x(volume: Volume, normal: np.ndarray, slice_index: int, body_hu: float = -500.0) -> float:
    """Patient x of the centre of the body (voxels above ``body_hu``) on one slice; 0 when there is none."""
    rows, cols = np.nonzero(volume.hu[slice_index] > body_hu)
    if rows.size == 0:
        return 0.0
    centre = np.array([slice_index, float(rows.mean()), float(cols.mean())])
    return float(_patient(volume, normal, centre)[0])


def longest_diameter_mm(index: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The longest distance between two voxel corners of a finding (its 3D extent), mm.

    ``index`` is (n, 3) voxel indexes (slice, row, column). The candidates are
    the corners of the voxels, reduced to their convex hull before the
    pairwise distances.
    """
    corners = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    points = ((index[:, None, :] + corners[None]) * np.asarray(spacing)).reshape(-1, 3)
    points = np.unique(points, axis=0)
    if points.shape[0] > 64:
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:
            pass
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(axis=-1)).max())


def axial_diameter_mm(index: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The largest in-plane diameter of a finding over its axial slices (RECIST long axis), mm.

    ``index`` is (n, 3) voxel indexes (slice, row, column); on each slice, the longest distance
    between two pixel corners of the finding there.
    """
    order = np.argsort(index[:, 0], kind="stable")
    rows = index[order]
    starts = np.flatnonzero(np.diff(rows[:, 0], prepend=rows[0, 0] - 1))
    best = 0.0
    for part in np.split(rows, starts[1:]):
        flat = np.concatenate([np.zeros((part.shape[0], 1), dtype=part.dtype), part[:, 1:]], axis=1)
        best = max(best, longest_diameter_mm(flat, (0.0, spacing[1], spacing[2])))
    return best


def class_scores(prob: np.ndarray, manifest: Any) -> tuple[list[ClassScore], int | None]:
    """Per class, the probability (the largest over slices for a 2D model) and the slice that gave it."""
    from pacsnode.analysis.cnn.writers import ClassScore

    scores = []
    key_slice = None
    best = -1.0
    for spec in manifest.output.classes:
        values = np.asarray(prob[spec.index], dtype=np.float32).reshape(-1)
        where = int(values.argmax())
        p = float(np.clip(values[where], 0.0, 1.0))
        if values.size > 1 and p > best:
            best, key_slice = p, where
        scores.append(ClassScore(name=spec.name, code=spec.code.to_code(), probability=p, threshold=spec.threshold))
    return scores, key_slice
