"""Model outputs -> findings: thresholds, connected components, measurements, class scores.

Pure numpy/scipy on host arrays; the engine (:mod:`pacsnode.analysis.cnn.engine`)
produces the probabilities, the writers (:mod:`pacsnode.analysis.cnn.writers`)
turn the findings into DICOM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pacsnode.analysis.cnn.package import LabelOutput

if TYPE_CHECKING:  # pragma: no cover
    from pacsnode.analysis.cnn.writers import ClassScore, Finding
    from pacsnode.analysis.types import Volume

__all__ = [
    "MASS_MM",
    "SHAPE_ONLY",
    "LesionFilter",
    "Shape",
    "axial_diameter_mm",
    "class_scores",
    "density_of",
    "find_components",
    "find_masses",
    "find_solid_nodules",
    "findings_from_probabilities",
    "label_spec",
    "longest_diameter_mm",
    "outline_mass",
    "shape_of",
]

logger = logging.getLogger(__name__)

#: A lung lesion whose long axis (largest axial diameter) is this or more is a mass, below it a nodule.
MASS_MM = 30.0


@dataclass(frozen=True, kw_only=True)
class LesionFilter:
    """Which connected findings are lesions: the tests of :func:`findings_from_probabilities`.

    **Shape.** The axes are the full lengths of the finding's principal axes (those of a solid
    ellipsoid with its second moments), long >= middle >= short. A vessel is a tube
    (``long / middle`` above ``max_elongation``), pleura and fissures are sheets
    (``middle / short`` above ``max_flatness``, or more than ``max_boundary_fraction``
    of the voxels within ``boundary_mm`` in-plane of the region's edge while it fills less than
    ``compact_fill`` of its ellipsoid: a rim along the lung's outline, not a round nodule against
    the pleura). A lesion fills its own ellipsoid (``fill``, its volume over the
    ellipsoid's, at least ``min_fill``): a branching tree of vessels, a curved streak or a
    ring around a vessel does not.

    **Density, in the image itself.** At most ``max_solid_contact`` of an in-plane rim of
    ``contact_mm`` around the finding is soft tissue (``solid_hu`` or more): a finding wrapped
    around a vessel, a bronchial wall or the chest wall is their blurred edge, not a lesion
    (a lesion attached to them is found as a mass, below). Its mean density is at least
    ``min_contrast_hu`` above the median of the lung around it (``background_mm`` in-plane,
    below ``solid_hu``): the patient's own lung is the reference, whatever the kernel.

    **Size against the slices.** The in-plane long axis must reach ``min_axis_slices`` slice
    thicknesses: a smaller spot cannot be told from a vessel crossing the slice. On slices
    thicker than ``max_nodule_slice_mm`` the model's own findings are not reported at all
    (the shipped model was trained on 1-2.5 mm slices; on 5 mm real slices it marks the
    partial volume around every vessel); masses still are.

    **The model out of its depth.** A model that knows the lungs marks a few spots in them; the
    shipped one, trained on phantoms, marks hundreds on a real chest at any slice thickness (every
    vessel crossing and bronchial wall: 209-935 separate spots above its threshold in the lungs'
    region of the shared real series, at 5 mm and resampled to 1.25 mm, against 6-22 on held-out
    phantoms with 10 nodules each). No test of one finding tells its false findings from the phantom
    nodules (they have the same size, slices, probability and density), but their number does: with
    more than ``max_model_spots`` separate spots (components of at least the label's minimum volume)
    in the region, none of the model's findings in that series is reported; masses still are.

    **Masses.** With a region, the soft tissue inside it is opened in-plane with a disk of
    radius ``mass_core_mm`` (vessels, bronchial walls and the pleura are thinner than its
    diameter and vanish); a remaining 3D blob whose axial long axis is at least ``mass_core_fraction``
    of ``mass_mm`` (the opening trims a tumour's edge: a crescent against the chest wall loses most),
    whose outline (below) has an axial long axis of ``mass_mm`` or more, whose
    craniocaudal extent is at least two thirds of ``mass_mm``, with at least the volume of a
    ``mass_mm`` sphere and not a sheet, is a ``"mass"`` finding (the model's findings on it are
    merged into it). A smaller blob of that long axis and extent, down to the volume of a
    ``compact_mass_mm`` sphere, is a mass only when it is compact: it fills at least
    ``compact_mass_fill`` of its ellipsoid and is not longer than ``compact_mass_elongation`` times
    its middle axis. A tumour of 30-40 mm against the chest wall is such a blob (the lung holds only
    part of it), while the tangle of vessels and bronchi at a hilum that survives the opening is
    irregular (it fills 0.56-0.75 of its ellipsoid in the shared real series, against 0.88-0.95 for
    solid masses inserted at their pleura). The other lesions are ``"mass"`` or ``"nodule"`` by
    their long axis.

    **Solid nodules in the image.** Below the mass size the image holds no sure sign of a lesion
    against the hilar vessels, but a round solid nodule in the lung is clear enough: with the traced
    airways (trachea and main bronchi) given, the soft tissue in the region opened with a disk of
    radius ``nodule_core_mm`` (vessels under twice that across vanish) leaves blobs; one at least
    ``nodule_min_slices_mm`` craniocaudal, compact (``compact_mass_fill``, ``compact_mass_elongation``,
    a flatness of at most ``nodule_max_flatness``), with at most ``nodule_max_contact`` of its rim
    soft tissue (lung around most of it; a nodule against the pleura has the chest wall along a
    part), farther than ``hilum_mm`` from the airways (the hilar vessels and bronchi around them
    leave blobs just as round) and whose outline (below) is ``nodule_mm`` or more across is a
    ``"nodule"`` from the image rule (or a mass, when its outline reaches ``mass_mm``; a blob the mass
    test found first is not taken twice). Measured on
    the shared real series: no such blob but the tumour; the hilar blob nearest to passing is
    14-35 mm from the traced bronchi, with 0.40-0.44 of its rim soft tissue; the heart's and the
    aorta's corners that the region takes in, 0.63-0.67. ``nodule_mm`` None, or no airways traced
    (a scan that starts below the carina, a phantom): none.

    **A mass's outline.** The opened core leaves out a tumour's spiculated or ground-glass margin.
    On each of its slices the core grows into the lung around it, up to ``margin_mm`` from it,
    where the image averaged over ``margin_smooth_mm`` in-plane is at least ``margin_hu`` (a
    ground-glass or spiculated margin is; the aerated lung and a single vessel crossing it are
    not), inside the region; what the growth adds is opened with a disk of radius
    ``margin_open_mm`` (a vessel leaving the tumour is thinner than its diameter and stays out)
    and kept where it touches the core. ``margin_hu`` None: the core is the outline. Where the lungs'
    region cuts the tumour (its closed outline bridges the hilum with an arc, and a tumour against the
    mediastinum runs on beyond it), the outline would have a concave edge along that arc: with
    ``hull_outside_region``, the tissue outside the region within the convex hull of each slice's
    outline (at or above ``margin_hu``, averaged as above) is the tumour's too.

    **A mass's slices.** The opened core of a tumour at the hilum joins the hilar vessels and
    bronchi, which run on for centimetres above and below it. From the core's slice of largest
    in-plane diameter outward, a slice belongs to the mass while its section of the core overlaps
    the section kept on the slice before and its in-plane diameter is at least
    ``min_section_fraction`` of that largest one; the rest is not the mass (it is not grown,
    measured, drawn or counted). None: every slice of the core.
    ``None`` turns a test off.
    """

    max_elongation: float = 3.0
    max_flatness: float = 4.0
    boundary_mm: float = 5.0
    max_boundary_fraction: float = 0.5
    compact_fill: float = 0.8
    mass_mm: float = MASS_MM
    min_fill: float | None = 0.6
    solid_hu: float = -300.0
    contact_mm: float = 2.0
    max_solid_contact: float | None = 0.6
    background_mm: float = 10.0
    min_contrast_hu: float | None = 100.0
    min_axis_slices: float | None = 1.2
    max_nodule_slice_mm: float | None = 3.0
    max_model_spots: int | None = 50
    mass_core_mm: float | None = 5.0
    mass_core_fraction: float = 0.8
    compact_mass_mm: float | None = 20.0
    compact_mass_fill: float = 0.8
    compact_mass_elongation: float = 1.5
    margin_hu: float | None = -500.0
    margin_mm: float = 10.0
    margin_smooth_mm: float = 4.0
    margin_open_mm: float = 2.0
    hull_outside_region: bool = True
    nodule_mm: float | None = 15.0
    nodule_core_mm: float = 3.0
    nodule_min_slices_mm: float = 10.0
    nodule_max_contact: float = 0.45
    nodule_max_flatness: float = 2.0
    hilum_mm: float = 40.0
    min_section_fraction: float | None = 0.5


#: The tests about shape only (no density, no slice thickness, no mass search): for probability maps without an image.
SHAPE_ONLY = LesionFilter(
    min_fill=None,
    max_solid_contact=None,
    min_contrast_hu=None,
    min_axis_slices=None,
    max_nodule_slice_mm=None,
    max_model_spots=None,
    mass_core_mm=None,
    margin_hu=None,
    min_section_fraction=None,
)


@dataclass(frozen=True, kw_only=True)
class Shape:
    """Principal axes (mm, long >= middle >= short) of a finding, its share near the region's edge, how
    much of its ellipsoid it fills, and (when measured) its soft-tissue contact and contrast to the lung."""

    axes_mm: tuple[float, float, float]
    boundary_fraction: float
    fill: float = 1.0
    solid_contact: float | None = None
    contrast_hu: float | None = None

    @property
    def elongation(self) -> float:
        return self.axes_mm[0] / max(self.axes_mm[1], 1e-6)

    @property
    def flatness(self) -> float:
        return self.axes_mm[1] / max(self.axes_mm[2], 1e-6)

    def rejected_by(self, rules: LesionFilter) -> str | None:
        """Why the finding is not a lesion (``"tube"``, ``"sheet"``, ``"boundary"``, ``"irregular"``,
        ``"wraps tissue"``, ``"faint"``), or None."""
        if self.elongation > rules.max_elongation:
            return "tube"
        if self.flatness > rules.max_flatness:
            return "sheet"
        if self.boundary_fraction > rules.max_boundary_fraction and self.fill < rules.compact_fill:
            return "boundary"
        if rules.min_fill is not None and self.fill < rules.min_fill:
            return "irregular"
        if rules.max_solid_contact is not None and (self.solid_contact or 0.0) > rules.max_solid_contact:
            return "wraps tissue"
        if (
            rules.min_contrast_hu is not None
            and self.contrast_hu is not None
            and self.contrast_hu < rules.min_contrast_hu
        ):
            return "faint"
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
    ellipsoid_mm3 = np.pi / 6.0 * float(np.prod(axes))
    fill = index.shape[0] * float(np.prod(sp)) / ellipsoid_mm3 if ellipsoid_mm3 > 0 else 1.0
    return Shape(axes_mm=(float(axes[0]), float(axes[1]), float(axes[2])), boundary_fraction=boundary, fill=fill)


def _disk(radius_px: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))


def _dilate_slices(mask: np.ndarray, radius_px: int) -> np.ndarray:
    import cv2

    kernel = _disk(radius_px)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) for m in mask]).astype(bool)


def _grown_box(box: tuple[slice, ...], pad: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return (
        box[0],
        *(slice(max(b.start - pad, 0), min(b.stop + pad, n)) for b, n in zip(box[1:], shape[1:], strict=True)),
    )


def density_of(
    mask: np.ndarray,
    box: tuple[slice, ...],
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    rules: LesionFilter,
    region: np.ndarray | None = None,
) -> tuple[float, float | None]:
    """(soft-tissue share of the finding's in-plane rim, its mean HU minus the lung's around it).

    ``mask`` is the finding inside ``box`` of the volume; see :class:`LesionFilter` for the
    measures. The contrast is None when no lung lies around it.
    """
    pixel = float(min(spacing[1:]))
    near = max(1, int(round(rules.contact_mm / pixel)))
    far = max(near + 1, int(round(rules.background_mm / pixel)))
    outer = _grown_box(box, far, hu.shape)
    inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer, strict=True))
    own = np.zeros(tuple(s.stop - s.start for s in outer), dtype=bool)
    own[inner] = mask
    image = hu[outer]
    rim = _dilate_slices(own, near) & ~own
    contact = float((image[rim] >= rules.solid_hu).mean()) if rim.any() else 0.0
    around = _dilate_slices(own, far) & ~_dilate_slices(own, near) & (image < rules.solid_hu)
    if region is not None:
        around &= region[outer]
    if not around.any():
        return contact, None
    return contact, float(image[own].mean()) - float(np.median(image[around]))


def _opened_tissue(
    hu: np.ndarray, spacing: tuple[float, float, float], region: np.ndarray, solid_hu: float, radius_mm: float
) -> np.ndarray:
    """Labels (26-connected) of the soft tissue (``solid_hu`` or more) in ``region`` opened in-plane with a disk
    of ``radius_mm``: what is thinner than the disk across (vessels, walls, pleura) is gone."""
    import cv2
    from scipy import ndimage

    kernel = _disk(max(1, int(round(radius_mm / float(min(spacing[1:]))))))
    tissue = (hu >= solid_hu) & region
    core = np.zeros(hu.shape, dtype=bool)
    for z in np.flatnonzero(tissue.reshape(tissue.shape[0], -1).any(axis=1)):
        core[z] = cv2.morphologyEx(tissue[z].astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
    labels, _ = ndimage.label(core, structure=np.ones((3, 3, 3), dtype=bool))
    labelled: np.ndarray = labels
    return labelled


def find_masses(
    hu: np.ndarray, spacing: tuple[float, float, float], region: np.ndarray, rules: LesionFilter
) -> list[np.ndarray]:
    """Voxel indexes (n, 3) of the opened core of each mass in ``region``: see "Masses" in :class:`LesionFilter`
    (the outline's long axis is :func:`outline_mass`'s to measure)."""
    from scipy import ndimage

    if rules.mass_core_mm is None:
        return []
    labels = _opened_tissue(hu, spacing, region, rules.solid_hu, rules.mass_core_mm)
    sphere_mm3 = np.pi / 6.0 * rules.mass_mm**3
    compact_mm3 = sphere_mm3 if rules.compact_mass_mm is None else np.pi / 6.0 * rules.compact_mass_mm**3
    masses = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        if (box[0].stop - box[0].start) * spacing[0] < 2.0 / 3.0 * rules.mass_mm:
            continue
        idx = np.argwhere(labels[box] == k) + np.array([s.start for s in box])
        volume_mm3 = idx.shape[0] * float(np.prod(spacing))
        if volume_mm3 < min(sphere_mm3, compact_mm3):
            continue
        shape = shape_of(idx, spacing)
        if shape.flatness > rules.max_flatness:
            continue
        if volume_mm3 < sphere_mm3 and (
            shape.fill < rules.compact_mass_fill or shape.elongation > rules.compact_mass_elongation
        ):
            continue
        if axial_diameter_mm(idx, spacing) < rules.mass_core_fraction * rules.mass_mm:
            continue
        masses.append(idx)
    return masses


def find_solid_nodules(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    region: np.ndarray,
    rules: LesionFilter,
    airways: np.ndarray | None,
) -> list[np.ndarray]:
    """Voxel indexes (n, 3) of the opened core of each solid nodule in ``region``: see "Solid nodules in the
    image" in :class:`LesionFilter` (the outline's long axis is the caller's to check)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    if rules.nodule_mm is None or airways is None or not airways.any():
        return []
    labels = _opened_tissue(hu, spacing, region, rules.solid_hu, rules.nodule_core_mm)
    sp = np.asarray(spacing, dtype=np.float64)
    bronchi = cKDTree(np.argwhere(airways) * sp)
    floor = rules.mass_core_fraction * rules.nodule_mm
    nodules = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or (box[0].stop - box[0].start) * spacing[0] < rules.nodule_min_slices_mm:
            continue
        mask = labels[box] == k
        idx = np.argwhere(mask) + np.array([s.start for s in box])
        if axial_diameter_mm(idx, spacing) < floor:
            continue
        shape = shape_of(idx, spacing)
        if (
            shape.fill < rules.compact_mass_fill
            or shape.elongation > rules.compact_mass_elongation
            or shape.flatness > rules.nodule_max_flatness
        ):
            continue
        contact, _ = density_of(mask, box, hu, spacing, rules, region)
        if contact > rules.nodule_max_contact:
            continue
        nearest, _ = bronchi.query(idx * sp, k=1, distance_upper_bound=rules.hilum_mm)
        if np.isfinite(nearest).any():
            continue  # within hilum_mm of the trachea or a main bronchus
        nodules.append(idx)
    return nodules


def outline_mass(
    core: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float], region: np.ndarray, rules: LesionFilter
) -> np.ndarray:
    """Voxel indexes (n, 3) of a mass from those of its opened ``core`` (:func:`find_masses`): its margin added and
    the slices that are not the mass left out; see "A mass's outline" and "A mass's slices" in :class:`LesionFilter`."""
    import cv2
    from scipy import ndimage

    pixel = float(min(spacing[1:]))
    margin_px = max(1, int(round(rules.margin_mm / pixel)))
    smooth_px = max(1, int(round(rules.margin_smooth_mm / pixel))) | 1  # odd: centred on the voxel
    pad = margin_px + smooth_px
    lo, hi = core.min(axis=0), core.max(axis=0) + 1
    box = (
        slice(int(lo[0]), int(hi[0])),
        *(
            slice(max(int(a) - pad, 0), min(int(b) + pad, n))
            for a, b, n in zip(lo[1:], hi[1:], hu.shape[1:], strict=True)
        ),
    )
    origin = np.array([b.start for b in box])
    mask = np.zeros(tuple(b.stop - b.start for b in box), dtype=bool)
    mask[tuple((core - origin).T)] = True
    if rules.min_section_fraction is not None:  # before the margin: a hilar vessel's section would grow too
        mask = _mass_slices(mask, spacing, rules.min_section_fraction)
    if rules.margin_hu is not None:
        own = mask
        smooth = ndimage.uniform_filter(hu[box].astype(np.float32), size=(1, smooth_px, smooth_px))
        added = (smooth >= rules.margin_hu) & region[box] & _dilate_slices(own, margin_px)
        kernel = _disk(max(1, int(round(rules.margin_open_mm / pixel))))
        mask = np.zeros_like(own)
        for z in range(own.shape[0]):
            opened = cv2.morphologyEx((added[z] | own[z]).astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
            grown = opened | own[z]
            parts, _ = ndimage.label(grown)
            touching = np.unique(parts[own[z]])
            mask[z] = ndimage.binary_fill_holes(np.isin(parts, touching[touching > 0]))
        if rules.hull_outside_region:
            mask |= _hull_outside(mask, smooth >= rules.margin_hu, region[box])
    outline: np.ndarray = np.argwhere(mask) + origin
    return outline


def _hull_outside(mask: np.ndarray, tissue: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per slice, the ``tissue`` outside ``region`` within the convex hull of ``mask``'s section: where the
    lungs' region cuts a tumour that reaches into the mediastinum or the hilum (see "A mass's outline")."""
    import cv2
    from scipy import ndimage

    added = np.zeros_like(mask)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        pieces, count = ndimage.label(mask[z], structure=np.ones((3, 3), dtype=bool))
        hull = np.zeros(mask.shape[1:], dtype=np.uint8)
        for k in range(1, count + 1):  # one hull per piece: never across the gap between two
            points = np.argwhere(pieces == k)[:, ::-1].astype(np.int32)  # (x, y) for OpenCV
            cv2.fillPoly(hull, [cv2.convexHull(points)], 1)
        added[z] = hull.astype(bool) & tissue[z] & ~region[z]
    return added


def _mass_slices(mask: np.ndarray, spacing: tuple[float, float, float], fraction: float) -> np.ndarray:
    """``mask`` on the slices of the mass only: see "A mass's slices" in :class:`LesionFilter`."""
    from scipy import ndimage

    in_plane = np.asarray(spacing[1:], dtype=np.float64)

    def diameter(section: np.ndarray) -> float:
        return _longest_span(np.argwhere(section), in_plane) if section.any() else 0.0

    widths = [diameter(m) for m in mask]
    start = int(np.argmax(widths))
    floor = fraction * widths[start]
    kept = np.zeros_like(mask)
    kept[start] = mask[start]
    for step in (-1, 1):
        previous = mask[start]
        z = start + step
        while 0 <= z < mask.shape[0]:
            parts, _ = ndimage.label(mask[z], structure=np.ones((3, 3), dtype=bool))
            joined = np.unique(parts[previous])
            section = np.isin(parts, joined[joined > 0])
            if diameter(section) < floor:
                break
            kept[z] = previous = section
            z += step
    return kept


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
    airways: np.ndarray | None = None,
) -> list[Finding]:
    """Threshold each label's map, split it into connected findings, measure each; largest first.

    ``region`` (bool, the volume's shape; None: everywhere) is where findings may lie: the map
    outside it is dropped before the split. With ``lesions``, a finding that is not a lesion
    (a vessel, pleura, the blur around them: :class:`LesionFilter`) is dropped, the masses in
    the region are found in the image (given to the first label), so are solid nodules when
    ``airways`` (the traced trachea and main bronchi, bool of the volume's shape) are given, and
    each finding kept is a ``"mass"`` or ``"nodule"`` (its ``kind``). The long axis (``longest_diameter_mm``) is the
    largest in-plane diameter on the axial slice where it is largest (RECIST), ``extent_mm`` the
    largest 3D extent. At most ``max_findings`` per label (the largest kept), so a noisy map
    cannot exhaust memory.
    """
    from scipy import ndimage

    if region is not None and region.shape != volume.hu.shape:
        raise ValueError(f"the region's shape {region.shape} differs from the volume's {volume.hu.shape}")
    if airways is not None and airways.shape != volume.hu.shape:
        raise ValueError(f"the airways' shape {airways.shape} differs from the volume's {volume.hu.shape}")
    near_edge = None
    if region is not None and lesions is not None:
        near_edge = _near_edge(region, volume.spacing, lesions.boundary_mm)
    findings: list[tuple[float, Finding]] = []
    make = _FindingMaker(volume)
    masses: list[tuple[np.ndarray, str]] = []  # the image's own lesions: outline, kind
    mass_zone = np.zeros(volume.hu.shape, dtype=bool)
    if lesions is not None and region is not None and labels:
        floor = {"mass": lesions.mass_mm, "nodule": lesions.nodule_mm}
        found = [("mass", core) for core in find_masses(volume.hu, volume.spacing, region, lesions)]
        found += [("nodule", core) for core in find_solid_nodules(volume.hu, volume.spacing, region, lesions, airways)]
        for rule, core in found:
            if rule == "nodule" and mass_zone[tuple(core.T)].any():
                continue  # a mass already
            outline = outline_mass(core, volume.hu, volume.spacing, region, lesions)
            diameter = axial_diameter_mm(outline, volume.spacing)
            if diameter < (floor[rule] or 0.0) or (rule == "nodule" and mass_zone[tuple(outline.T)].any()):
                continue
            masses.append((outline, "mass" if diameter >= lesions.mass_mm else "nodule"))
            # The model's findings on the core's slices left out of the mass (hilar vessels) are still its blur.
            mass_zone[tuple(core.T)] = True
            mass_zone[tuple(outline.T)] = True
    if masses and lesions is not None:
        mass_zone = _dilate_slices(mass_zone, max(1, int(round(lesions.contact_mm / min(volume.spacing[1:])))))
    thick = (
        lesions is not None
        and lesions.max_nodule_slice_mm is not None
        and volume.spacing[0] > lesions.max_nodule_slice_mm
    )
    if thick:
        assert lesions is not None and lesions.max_nodule_slice_mm is not None
        logger.info(
            "slices of %.1f mm (over %.1f mm): the model's nodule findings are not reported, masses are",
            volume.spacing[0],
            lesions.max_nodule_slice_mm,
        )
    for n_label, label in enumerate(labels):
        channel = prob[_channel(label, activation)]
        spec = label_spec(label)
        if n_label == 0:
            for idx, found_kind in masses:
                findings.append(make(idx, channel, label, spec, found_kind, source="image rule"))
        if thick:
            continue
        above = _above(channel, label.threshold)
        if region is not None:
            above &= region
        components, count, sizes = _components(above, volume.spacing, label.min_volume_mm3)
        if count == 0:
            continue
        if lesions is not None and lesions.max_model_spots is not None and count > lesions.max_model_spots:
            logger.info(
                "%s: the model marks %d separate spots in the region (over %d): none of them is reported, masses are",
                label.name,
                count,
                lesions.max_model_spots,
            )
            continue
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
                why = _not_a_lesion(
                    idx, box, mask_box, volume, lesions, near_edge, region, mass_zone if masses else None
                )
                if why is not None:
                    dropped[why] = dropped.get(why, 0) + 1
                    continue
                kind = "mass" if axial_diameter_mm(idx, volume.spacing) >= lesions.mass_mm else "nodule"
            kept += 1
            findings.append(make(idx, channel, label, spec, kind))
        if dropped:
            logger.info("%s: dropped %s", label.name, ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())))
    findings.sort(key=lambda pair: -pair[0])  # numbered largest first
    return [replace(f, number=n) for n, (_, f) in enumerate(findings, start=1)]


def _not_a_lesion(
    idx: np.ndarray,
    box: tuple[slice, ...],
    mask_box: np.ndarray,
    volume: Volume,
    rules: LesionFilter,
    near_edge: np.ndarray | None,
    region: np.ndarray | None,
    mass_zone: np.ndarray | None,
) -> str | None:
    """Why a model finding is not reported (see :class:`LesionFilter`), or None."""
    if mass_zone is not None and mass_zone[tuple(idx.T)].any():
        return "part of a mass"
    if (
        rules.min_axis_slices is not None
        and axial_diameter_mm(idx, volume.spacing) < rules.min_axis_slices * (volume.spacing[0])
    ):
        return "smaller than the slices"
    shape = shape_of(idx, volume.spacing, near_edge)
    if rules.max_solid_contact is not None or rules.min_contrast_hu is not None:
        contact, contrast = density_of(mask_box, box, volume.hu, volume.spacing, rules, region)
        shape = replace(shape, solid_contact=contact, contrast_hu=contrast)
    return shape.rejected_by(rules)


class _FindingMaker:
    """Builds a :class:`Finding` (measures, location, side) from a finding's voxel indexes."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.normal = np.cross(volume.row_direction, volume.column_direction)

    def __call__(
        self,
        idx: np.ndarray,
        channel: np.ndarray,
        label: LabelOutput,
        spec: Any,
        kind: str | None,
        source: str = "model",
    ) -> tuple[float, Finding]:
        """(volume in mL, the finding); a finding of the model has the map's largest probability on it, one of
        another ``source`` (a mass found in the image) none: the map's value there does not score it."""
        from pacsnode.analysis.cnn.writers import Finding

        volume = self.volume
        mask = np.zeros(volume.hu.shape, dtype=bool)
        mask[tuple(idx.T)] = True
        probability = None
        if source == "model":
            box = _bounding_box(mask)
            assert box is not None
            probability = float(np.clip(channel[box][mask[box]].astype(np.float32).max(), 0.0, 1.0))
        axial, axial_slice = _axial_long_axis(idx, volume.spacing)
        centroid = idx.mean(axis=0)
        patient = _patient(volume, self.normal, centroid)
        slice_index = int(round(centroid[0]))
        # The patient's right is -x (LPS), measured from the body's midline on that slice, not x = 0.
        side = "right" if patient[0] < _midline_x(volume, self.normal, slice_index) else "left"
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
        return volume_ml, Finding(
            label=spec,
            number=1,
            mask=mask,
            probability=probability,
            volume_ml=volume_ml,
            longest_diameter_mm=axial,
            extent_mm=longest_diameter_mm(idx, volume.spacing),
            kind=kind,
            source=source,
            key_slice=axial_slice if kind is not None else None,
            centroid_index=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
            centroid_patient_mm=(float(patient[0]), float(patient[1]), float(patient[2])),
            location=location,
            finding_site=finding_site,
            laterality=laterality,
        )


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
    return _longest_span(np.asarray(index), np.asarray(spacing, dtype=np.float64))


def _longest_span(index: np.ndarray, spacing: np.ndarray) -> float:
    """The longest distance between two corners of the boxes of size ``spacing`` centred on ``index`` (n, d)."""
    dims = index.shape[1]
    grid = np.stack(np.meshgrid(*([(-0.5, 0.5)] * dims), indexing="ij"), axis=-1).reshape(-1, dims)
    points = np.unique(((index[:, None, :] + grid[None]) * spacing).reshape(-1, dims), axis=0)
    if points.shape[0] > 64:
        from scipy.spatial import ConvexHull, QhullError

        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # all on a line or a plane: the extremes along each axis bound the span well enough
            pass
    if points.shape[0] > 4096:  # degenerate hull: keep the pairwise matrix small
        points = points[np.unique(np.concatenate([points.argmin(axis=0), points.argmax(axis=0)]))]
    diff = points[:, None, :] - points[None, :, :]
    return float(np.sqrt((diff**2).sum(axis=-1)).max())


def axial_diameter_mm(index: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The largest in-plane diameter of a finding over its axial slices (RECIST long axis), mm.

    ``index`` is (n, 3) voxel indexes (slice, row, column); on each slice, the longest distance
    between two pixel corners of the finding there (through the 2D convex hull of the corners).
    """
    return _axial_long_axis(index, spacing)[0]


def _axial_long_axis(index: np.ndarray, spacing: tuple[float, float, float]) -> tuple[float, int]:
    """(:func:`axial_diameter_mm`, the slice where it lies)."""
    order = np.argsort(index[:, 0], kind="stable")
    rows = index[order]
    starts = np.flatnonzero(np.diff(rows[:, 0], prepend=rows[0, 0] - 1))
    in_plane = np.asarray(spacing[1:], dtype=np.float64)
    best, where = 0.0, int(rows[0, 0])
    for part in np.split(rows, starts[1:]):
        span = _longest_span(part[:, 1:], in_plane)
        if span > best:
            best, where = span, int(part[0, 0])
    return best, where


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
