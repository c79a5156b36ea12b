"""A synthetic chest CT phantom, in memory or written as real CT Image Storage files.

The phantom is built in patient coordinates (DICOM LPS, millimetres) so its
anatomy does not depend on the grid: a body ellipse of soft tissue with a
subcutaneous fat layer, a vertebral body, a hollow patient table below the
body (dense shell around a foam core, separated from the body by an air gap),
two lung ellipsoids of different sizes (the patient's right one larger), vessels
(tubes and spheres of soft tissue) and emphysema pockets (spheres of air)
inside the lungs, optional lung nodules (solid, part-solid and ground-glass
lobulated ellipsoids, some against the pleura), a trachea above the lungs and
bowel gas below them (small air pockets a lung segmentation must drop).
Gaussian noise and an optional in-plane blur are added last.

The truth (volumes, mean density, LAA-950) is computed from the exact voxel
masks of the lungs, vessels and nodules included, and the noise-free image
(after the blur, if any), so it is what a correct segmentation should find.
Nodules, when asked for, come with their own truth: a label volume
(``ChestPhantom.nodule_labels``) and one :class:`NoduleTruth` each.

Contents: :class:`PhantomSpec` (what phantom to build; :data:`BENCHMARK_PHANTOM`
is a realistic-size one), :class:`DicomSpec` (how to write it as files),
:class:`ChestPhantom` (in-memory phantom and truth), :class:`ChestTruth` (truth
of a written series), :class:`LungTruth` (the lung measurements),
:class:`NoduleTruth` (one nodule), :func:`make_chest_phantom`,
:func:`write_chest_ct` and :func:`make_benchmark_volume`.

Tests and benchmarks use :func:`write_chest_ct` (files on disk, for the loader)
and :func:`make_chest_phantom` (in memory; ``ChestPhantom.to_volume`` gives a
:class:`~pacsnode.analysis.types.Volume` without touching the disk); both take
a :class:`PhantomSpec` and a seed, and give the same phantom for the same pair.
"""

from __future__ import annotations

import copy
import datetime
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pacsnode.analysis.types import Volume

__all__ = [
    "BENCHMARK_PHANTOM",
    "ChestPhantom",
    "ChestTruth",
    "DicomSpec",
    "LungTruth",
    "NoduleTruth",
    "PhantomSpec",
    "make_benchmark_volume",
    "make_chest_phantom",
    "write_chest_ct",
]

logger = logging.getLogger(__name__)

# Hounsfield units of the phantom's materials.
AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
BONE_HU = 600
TABLE_SHELL_HU = 300
TABLE_CORE_HU = -950
LUNG_HU = -860  # mean parenchyma; a gravity gradient of +-40 HU runs anterior -> posterior
LUNG_GRADIENT_HU = 40
VESSEL_HU = 40
EMPHYSEMA_HU = -1000
# Nodules: the range each nodule's (noise-free, unblurred) value is drawn from, HU.
NODULE_KINDS = ("solid", "part-solid", "ground-glass")
SOLID_NODULE_HU = (0.0, 60.0)  # also the core of a part-solid nodule
PART_SOLID_HALO_HU = (-650.0, -450.0)
GROUND_GLASS_NODULE_HU = (-700.0, -450.0)

RESCALE_INTERCEPT = -1024
_HU_MIN = RESCALE_INTERCEPT
_HU_MAX = RESCALE_INTERCEPT + 4095  # 12-bit stored range, valid for BitsStored 12 and 16

DEFAULT_FIELD_OF_VIEW_MM = 400.0

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_LOSSLESS = (RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGLossless, HTJ2KLossless)


@dataclass(frozen=True, kw_only=True)
class _Ellipsoid:
    centre: tuple[float, float, float]  # patient x, y, z (mm)
    semi_axes: tuple[float, float, float]  # mm


@dataclass(frozen=True, kw_only=True)
class NoduleTruth:
    """The truth of one nodule of a phantom.

    ``number`` is its value in ``ChestPhantom.nodule_labels`` (1-based);
    ``kind`` one of ``"solid"``, ``"part-solid"``, ``"ground-glass"``;
    ``centre_mm`` the centroid of its voxel centres, patient x, y, z (mm);
    ``diameter_mm`` the diameter of the sphere of its voxel volume;
    ``volume_ml`` its voxel count times the voxel volume; ``mean_hu`` its mean
    on the noise-free image (after the blur, if any); ``side`` the lung it is
    in, ``"right"`` or ``"left"``; ``voxels`` its voxel count.
    """

    number: int
    kind: str
    centre_mm: tuple[float, float, float]
    diameter_mm: float
    volume_ml: float
    mean_hu: float
    side: str
    voxels: int


@dataclass(frozen=True, kw_only=True, eq=False)
class LungTruth:
    """The true lung measurements of a phantom: volumes in mL, densities in HU, LAA-950 in percent."""

    right_volume_ml: float
    left_volume_ml: float
    total_volume_ml: float
    laa950_percent: float
    mean_density_hu: float
    right_laa950_percent: float
    left_laa950_percent: float
    right_mean_density_hu: float
    left_mean_density_hu: float


@dataclass(frozen=True, kw_only=True)
class ChestTruth(LungTruth):
    """What a correct lung segmentation of a written phantom should report.

    ``paths[i]`` is the file of slice ``i``, slices in ascending patient z
    (the order :func:`pacsnode.analysis.volume.load_series` sorts them into); the file
    names themselves are shuffled unless ``DicomSpec.shuffle_files`` is False.
    Volumes in mL, densities in HU, LAA-950 in percent of lung voxels.
    ``nodules`` is the truth of the nodules, as ``ChestPhantom.nodules``.
    """

    paths: list[Path]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]
    transfer_syntax_uid: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    nodules: tuple[NoduleTruth, ...] = ()


@dataclass(frozen=True, kw_only=True, eq=False)
class ChestPhantom(LungTruth):
    """An in-memory phantom: the noisy HU volume, the truth labels and measurements.

    ``hu`` is int16 (slices, rows, columns), slices ascending along the slice
    normal; ``labels`` is the truth, uint8, 1 right lung, 2 left lung, vessels
    and emphysema inside the lungs included (nodules too: a nodule voxel keeps
    its lung's label). Geometry as in :class:`~pacsnode.analysis.types.Volume`.

    ``nodule_labels`` is None unless nodules were asked for (``PhantomSpec.nodules > 0``);
    then it is uint16 of the shape of ``hu``, 0 background and ``k`` the
    voxels of nodule ``k`` (``nodules[k - 1]``): exactly the voxels painted
    with the nodule's value. ``nodules`` is the truth of each, by number.
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    slice_thickness_mm: float
    nodule_labels: np.ndarray | None = None
    nodules: tuple[NoduleTruth, ...] = ()

    def slice_position(self, index: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``index``."""
        normal = np.cross(self.row_direction, self.column_direction)
        position = np.asarray(self.origin) + index * self.spacing[0] * normal
        return (float(position[0]), float(position[1]), float(position[2]))

    def to_volume(self) -> Volume:
        """The phantom as a :class:`~pacsnode.analysis.types.Volume`, with minimal CT headers.

        Returns
        -------
        Volume
            Shares ``hu`` with the phantom (no copy).
        """
        datasets = []
        for index in range(self.hu.shape[0]):
            ds = Dataset()
            ds.Modality = "CT"
            ds.Rows, ds.Columns = self.hu.shape[1], self.hu.shape[2]
            ds.ImagePositionPatient = list(self.slice_position(index))
            ds.ImageOrientationPatient = [*self.row_direction, *self.column_direction]
            ds.PixelSpacing = [self.spacing[1], self.spacing[2]]
            ds.SliceThickness = self.slice_thickness_mm
            ds.InstanceNumber = index + 1
            datasets.append(ds)
        return Volume(
            hu=self.hu,
            spacing=self.spacing,
            origin=self.origin,
            row_direction=self.row_direction,
            column_direction=self.column_direction,
            datasets=tuple(datasets),
        )


@dataclass(frozen=True, kw_only=True)
class PhantomSpec:
    """What phantom to build: its grid, anatomy, nodules and image quality.

    The anatomy is fixed in patient millimetres, centred on z = -150 mm: the
    lungs span 184 mm in z (right 60 x 78 x 92 mm semi-axes, left 54 x 74 x 88),
    the trachea starts 60 mm above the centre, bowel gas lies 104 mm below it.
    The slab of ``slices * slice_thickness_mm`` is centred there; a slab
    shorter than about 240 mm cuts the lungs (the truth counts what is in it).

    Attributes
    ----------
    slices, size
        Number of axial slices, and rows = columns of each.
    pixel_spacing_mm
        In-plane spacing; None: a 400 mm field of view, ``400 / size``.
    slice_thickness_mm
        Slice thickness, also the spacing between slices.
    noise_hu
        Standard deviation of the Gaussian noise, HU.
    blur_sigma_mm
        Standard deviation of an in-plane Gaussian blur applied before the
        noise; 0 for none. The truth is computed after the blur.
    emphysema_pockets
        Spheres of air (-1000 HU, radius 6 to 14 mm) per lung.
    vessels
        Vessels per lung, tubes and spheres of soft tissue (radius 2 to 4 mm):
        of every four, two tubes, a sphere inside the lung and a sphere
        against the pleura (a notch in the outline); all tubes if
        ``vessel_spheres`` is False.
    vessel_spheres
        If False, every vessel is a tube: no spheres inside the lung and no
        juxtapleural spheres, so that nothing but the nodules is nodule-like
        (for nodule training data). True keeps the phantom as it always was.
    join_lungs
        Join the two lungs with a bridge of parenchyma across the midline
        (like an anterior junction) so that they form a single air component;
        the truth assigns the bridge to each side of the plane x = 0.
    collapsed_lung
        ``"right"`` or ``"left"``: that lung is airless (collapsed, or its
        hemithorax filled): its ellipsoid is soft tissue, without vessels or
        emphysema, and it is no lung in the truth (volume 0, densities NaN).
        The other lung is the same as without it. Not with ``join_lungs`` or
        ``nodules``.
    mirror_columns
        Store the columns in reverse order (ImageOrientationPatient
        ``-1\\0\\0\\0\\1\\0``): the same patient, the right lung now on the
        right of the image. ``nodule_labels`` is mirrored too.
    nodules
        Number of lung nodules, each put in the right or left lung at random
        (in proportion to their volumes). A nodule is a randomly oriented
        ellipsoid (semi-axes the radius times 0.8 to 1.2) with one or two
        smaller spheres bulging from it (a lobulated edge), entirely inside
        its lung and inside the slab, apart from every other nodule (by at
        least a voxel diagonal); about one in five lies against the pleura,
        flattened by it. Nodules are painted over the vessels and emphysema.
        A nodule that cannot be placed (a slab too thin, lungs too crowded)
        or that covers fewer than 3 voxels is left out, so there may be fewer;
        ``ChestPhantom.nodules`` lists those painted, numbered 1, 2, ...
    nodule_diameter_mm
        (min, max) of the nodules' diameters, drawn log-uniform, at most 40 mm; the
        equivalent-sphere diameter in the truth differs by the ellipsoid's
        axis factors, the lobes and the voxel grid.
    nodule_kinds
        The kinds to draw from, uniformly (repeat one to weight it):
        ``"solid"`` (a value drawn in 0..+60 HU), ``"ground-glass"``
        (-700..-450 HU), ``"part-solid"`` (a ground-glass halo, -650..-450 HU,
        around a solid core of half the diameter, 0..+60 HU).

    Raises
    ------
    ValueError
        For sizes or spacings that cannot hold the phantom, or bad nodule
        parameters.
    """

    slices: int = 80
    size: int = 128
    pixel_spacing_mm: float | None = None
    slice_thickness_mm: float = 3.0
    noise_hu: float = 15.0
    blur_sigma_mm: float = 0.0
    emphysema_pockets: int = 5
    vessels: int = 10
    vessel_spheres: bool = True
    join_lungs: bool = False
    collapsed_lung: str | None = None
    mirror_columns: bool = False
    nodules: int = 0
    nodule_diameter_mm: tuple[float, float] = (4.0, 24.0)
    nodule_kinds: tuple[str, ...] = NODULE_KINDS

    def __post_init__(self) -> None:
        if self.slices < 1 or self.size < 16:
            raise ValueError(
                f"the phantom needs at least 1 slice of 16x16 pixels, got {self.slices} of {self.size}x{self.size}"
            )
        if self.pixel_spacing <= 0 or self.slice_thickness_mm <= 0:
            raise ValueError("pixel_spacing_mm and slice_thickness_mm must be positive")
        _check_nodule_parameters(self.nodules, self.nodule_diameter_mm, self.nodule_kinds)
        if self.collapsed_lung not in (None, "right", "left"):
            raise ValueError(f"collapsed_lung must be None, 'right' or 'left', not {self.collapsed_lung!r}")
        if self.collapsed_lung is not None and (self.join_lungs or self.nodules):
            raise ValueError("a phantom with a collapsed lung has neither joined lungs nor nodules")

    @property
    def pixel_spacing(self) -> float:
        """The in-plane spacing, mm: ``pixel_spacing_mm``, or the default field of view over ``size``."""
        if self.pixel_spacing_mm is None:
            return DEFAULT_FIELD_OF_VIEW_MM / self.size
        return float(self.pixel_spacing_mm)


def _check_nodule_parameters(nodules: int, diameter_mm: tuple[float, float], kinds: tuple[str, ...]) -> None:
    if nodules < 0:
        raise ValueError(f"nodules must be 0 or more, not {nodules}")
    if nodules == 0:
        return
    low, high = (float(d) for d in diameter_mm)
    if not 0.0 < low <= high:
        raise ValueError(f"nodule_diameter_mm must be (min, max) with 0 < min <= max, not {diameter_mm}")
    if high > 40.0:
        raise ValueError(f"nodules larger than 40 mm do not fit the lungs, got {diameter_mm}")
    unknown = sorted(set(kinds) - set(NODULE_KINDS))
    if not kinds or unknown:
        raise ValueError(f"nodule_kinds must be some of {NODULE_KINDS}, got {kinds}")


#: A realistic-size phantom: 300x512x512, 0.78 mm pixels, 1 mm slices, blurred, more vessels and pockets.
BENCHMARK_PHANTOM = PhantomSpec(
    slices=300, size=512, slice_thickness_mm=1.0, blur_sigma_mm=0.5, vessels=25, emphysema_pockets=6
)


@dataclass(frozen=True, kw_only=True)
class DicomSpec:
    """How :func:`write_chest_ct` writes a phantom: identity, encoding and order of the files.

    Attributes
    ----------
    study_instance_uid, series_instance_uid
        UIDs to use; new ones when None.
    series_number
        SeriesNumber.
    patient_id, patient_name
        Patient module values.
    transfer_syntax_uid
        Explicit or Implicit VR Little Endian, or a lossless compressed syntax
        that has an encoder installed (RLE Lossless, JPEG-LS Lossless,
        JPEG 2000 Lossless).
    bits_stored
        12 or 16.
    shuffle_files
        Name the files (and write them) in a random order, not slice order.
    """

    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    series_number: int = 1
    patient_id: str = "PHANTOM-0001"
    patient_name: str = "Phantom^Chest"
    transfer_syntax_uid: str = ExplicitVRLittleEndian
    bits_stored: int = 12
    shuffle_files: bool = True


def make_chest_phantom(spec: PhantomSpec = PhantomSpec(), *, seed: int = 0) -> ChestPhantom:
    """Build the chest phantom in memory, vectorised (a 300x512x512 volume takes about 2 s).

    Parameters
    ----------
    spec
        The phantom, see :class:`PhantomSpec`.
    seed
        Seed of the :class:`numpy.random.Generator` that places the vessels and
        emphysema pockets and draws the noise; the nodules are drawn from a
        generator of their own (``default_rng([seed, 7])``), so asking for
        nodules changes nothing else of the phantom.

    Returns
    -------
    ChestPhantom
    """
    slices, size = spec.slices, spec.size
    rng = np.random.default_rng(seed)
    ps = spec.pixel_spacing
    dz = float(spec.slice_thickness_mm)

    # Patient coordinates of the voxel centres: x along columns, y along rows, z along slices.
    xs = (np.arange(size) - (size - 1) / 2.0) * ps
    ys = (np.arange(size) - (size - 1) / 2.0) * ps
    z_centre = -150.0  # anatomy in mm about this z: lungs from -82 to +102 mm, slabs shorter than that cut them
    zs = z_centre + (np.arange(slices) - (slices - 1) / 2.0) * dz

    hu = np.empty((slices, size, size), dtype=np.float32)
    hu[:] = _body_and_table(xs, ys)
    labels = np.zeros((slices, size, size), dtype=np.uint8)

    lungs = (
        _Ellipsoid(centre=(-78.0, -5.0, z_centre + 10.0), semi_axes=(60.0, 78.0, 92.0)),
        _Ellipsoid(centre=(74.0, -5.0, z_centre + 14.0), semi_axes=(54.0, 74.0, 88.0)),
    )
    for label, lung in enumerate(lungs, start=1):
        _paint_lung(hu, labels, label, lung, xs, ys, zs)
    if spec.join_lungs:
        _paint_bridge(hu, labels, lungs, xs, ys, zs)

    # Emphysema first, vessels after, so that a vessel crossing a pocket stays a vessel.
    for label, lung in enumerate(lungs, start=1):
        for _ in range(spec.emphysema_pockets):
            centre = _point_inside(rng, lung, 0.6)
            radius = float(rng.uniform(6.0, 14.0))
            _paint_capsule(hu, labels, label, centre, centre, radius, EMPHYSEMA_HU, xs, ys, zs)
        for n in range(spec.vessels):
            radius = float(rng.uniform(2.0, 4.0))
            if spec.vessel_spheres and n % 4 == 3:  # a juxtapleural nodule-like sphere: a notch in the lung's outline
                start = end = _point_on_surface(rng, lung, 1.0 - radius / min(lung.semi_axes[:2]))
            else:
                start = _point_inside(rng, lung, 0.55)
                end = start if spec.vessel_spheres and n % 4 == 2 else _point_inside(rng, lung, 0.55)
            _paint_capsule(hu, labels, label, start, end, radius, VESSEL_HU, xs, ys, zs)

    if spec.collapsed_lung is not None:  # after drawing its vessels and pockets: the other lung stays the same
        airless = labels == (1 if spec.collapsed_lung == "right" else 2)
        hu[airless] = SOFT_TISSUE_HU
        labels[airless] = 0

    # Air that is not lung: the trachea above the lungs, bowel gas below them.
    trachea_start = (0.0, -30.0, z_centre + 60.0)
    trachea_end = (0.0, -30.0, max(float(zs[-1]), z_centre + 60.0) + dz)
    _paint_capsule(hu, labels, 0, trachea_start, trachea_end, 8.0, AIR_HU, xs, ys, zs)
    for gx, gy in ((35.0, -45.0), (-45.0, 10.0)):
        _paint_capsule(hu, labels, 0, (gx, gy, z_centre - 104.0), None, 12.0, AIR_HU, xs, ys, zs)

    # Nodules last: they override vessels and emphysema (nothing else reaches into the lungs).
    nodule_labels = None
    painted: list[_PaintedNodule] = []
    if spec.nodules > 0:
        nodule_labels = np.zeros((slices, size, size), dtype=np.uint16)
        painted = _paint_nodules(
            hu,
            labels,
            nodule_labels,
            np.random.default_rng([seed, 7]),
            lungs,
            spec.nodules,
            spec.nodule_diameter_mm,
            spec.nodule_kinds,
            xs,
            ys,
            zs,
            spacing=(ps, ps, dz),
        )

    if spec.blur_sigma_mm > 0:
        sigma_px = spec.blur_sigma_mm / ps
        for k in range(slices):
            cv2.GaussianBlur(hu[k], (0, 0), sigmaX=sigma_px, dst=hu[k], borderType=cv2.BORDER_REPLICATE)

    truth = _measure(hu, labels, voxel_ml=ps * ps * dz / 1000.0)
    nodule_truth = _measure_nodules(hu, painted, voxel_ml=ps * ps * dz / 1000.0)

    out = np.empty((slices, size, size), dtype=np.int16)
    chunk = max(1, (1 << 22) // (size * size))
    for k0 in range(0, slices, chunk):
        block = hu[k0 : k0 + chunk]
        if spec.noise_hu > 0:
            block += rng.normal(0.0, spec.noise_hu, size=block.shape).astype(np.float32)
        np.clip(np.rint(block), _HU_MIN, _HU_MAX, out=block)
        out[k0 : k0 + chunk] = block
    del hu

    row_direction = (1.0, 0.0, 0.0)
    origin_x = float(xs[0])
    if spec.mirror_columns:
        out = np.ascontiguousarray(out[:, :, ::-1])
        labels = np.ascontiguousarray(labels[:, :, ::-1])
        if nodule_labels is not None:
            nodule_labels = np.ascontiguousarray(nodule_labels[:, :, ::-1])
        row_direction = (-1.0, 0.0, 0.0)
        origin_x = float(xs[-1])
    return ChestPhantom(
        hu=out,
        labels=labels,
        spacing=(dz, ps, ps),
        origin=(origin_x, float(ys[0]), float(zs[0])),
        row_direction=row_direction,
        column_direction=(0.0, 1.0, 0.0),
        slice_thickness_mm=dz,
        nodule_labels=nodule_labels,
        nodules=nodule_truth,
        **asdict(truth),
    )


def make_benchmark_volume(spec: PhantomSpec = BENCHMARK_PHANTOM, *, seed: int = 0) -> tuple[Volume, ChestPhantom]:
    """A phantom as a Volume, by default the realistic-size :data:`BENCHMARK_PHANTOM`.

    Vary the benchmark with :func:`dataclasses.replace`, e.g.
    ``replace(BENCHMARK_PHANTOM, slices=120, nodules=8)``.

    Returns
    -------
    tuple
        The :class:`~pacsnode.analysis.types.Volume` and the :class:`ChestPhantom` with the truth.
    """
    phantom = make_chest_phantom(spec, seed=seed)
    return phantom.to_volume(), phantom


def write_chest_ct(
    out_dir: Path, spec: PhantomSpec = PhantomSpec(), *, seed: int = 0, dicom: DicomSpec = DicomSpec()
) -> ChestTruth:
    """Write the chest phantom as one CT Image Storage file per slice.

    The files carry every Type 1 and Type 2 attribute of the CT Image IOD
    (dciodvfy reports no errors), stored values unsigned with
    RescaleIntercept -1024 and RescaleSlope 1.

    Parameters
    ----------
    out_dir
        Folder to write into (created if needed).
    spec, seed
        The phantom, as for :func:`make_chest_phantom`; ``ChestTruth.nodules``
        has the nodules' truth (their label volume is not written: use
        :func:`make_chest_phantom` with the same spec and seed).
    dicom
        UIDs, patient, transfer syntax, bits stored and file order, see :class:`DicomSpec`.

    Returns
    -------
    ChestTruth

    Raises
    ------
    ValueError
        For a transfer syntax that cannot be written or a bad ``bits_stored``.
    """
    tsuid = UID(dicom.transfer_syntax_uid)
    if tsuid not in _UNCOMPRESSED:
        if tsuid not in _LOSSLESS:
            raise ValueError(f"cannot write the phantom as {tsuid.name}: only uncompressed or lossless syntaxes")
        try:
            encoder = get_encoder(tsuid)
        except NotImplementedError as exc:
            raise ValueError(f"no encoder exists for {tsuid.name}") from exc
        if not encoder.is_available:
            raise ValueError(f"no encoder available for {tsuid.name}: {encoder.missing_dependencies}")
    if dicom.bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, not {dicom.bits_stored}")

    phantom = make_chest_phantom(spec, seed=seed)
    slices, size = spec.slices, spec.size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = dicom.study_instance_uid or generate_uid()
    series_uid = dicom.series_instance_uid or generate_uid()
    frame_uid = generate_uid()
    now = datetime.datetime.now()
    common = _common_header(
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=frame_uid,
        patient_id=dicom.patient_id,
        patient_name=dicom.patient_name,
        series_number=dicom.series_number,
        phantom=phantom,
        bits_stored=dicom.bits_stored,
        when=now,
    )

    shuffle = dicom.shuffle_files
    order = np.random.default_rng(seed + 1).permutation(slices) if shuffle else np.arange(slices)
    names = [f"IM{int(n):05d}.dcm" for n in order]  # names[k]: the file of slice k
    paths = [out_dir / name for name in names]
    sop_uids = [str(generate_uid()) for _ in range(slices)]
    for k in np.argsort(order) if shuffle else range(slices):
        ds = _slice_dataset(common, phantom, int(k), sop_uids[k], tsuid, now)
        stored = (phantom.hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype(np.uint16)
        if tsuid in _UNCOMPRESSED:
            ds.PixelData = stored.tobytes()
        else:
            ds.compress(tsuid, stored, generate_instance_uid=False)
            ds.LossyImageCompression = "00"
        ds.save_as(paths[k], enforce_file_format=True)
    logger.debug("wrote a %dx%dx%d chest phantom to %s as %s", slices, size, size, out_dir, tsuid.name)
    return ChestTruth(
        paths=paths,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        sop_instance_uids=sop_uids,
        transfer_syntax_uid=str(tsuid),
        shape=(slices, size, size),
        spacing=phantom.spacing,
        nodules=phantom.nodules,
        **{f.name: getattr(phantom, f.name) for f in fields(LungTruth)},
    )


# ----------------------------------------------------------------- geometry


def _body_and_table(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """One axial slice of everything that does not change along z: body, fat, spine, table."""
    x = xs[None, :]
    y = ys[:, None]
    body_y = -10.0

    def ellipse(cx: float, cy: float, a: float, b: float) -> np.ndarray:
        result: np.ndarray = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
        return result

    slice_ = np.full((ys.size, xs.size), AIR_HU, dtype=np.float32)
    slice_[ellipse(0.0, body_y, 170.0, 120.0)] = FAT_HU
    slice_[ellipse(0.0, body_y, 158.0, 108.0)] = SOFT_TISSUE_HU
    slice_[ellipse(0.0, 60.0, 18.0, 16.0)] = BONE_HU
    # Hollow table: 4 mm shell around a foam core, 15 mm below the body.
    table_top = body_y + 120.0 + 15.0
    shell = (np.abs(x) <= 185.0) & (y >= table_top) & (y <= table_top + 30.0)
    core = (np.abs(x) <= 181.0) & (y >= table_top + 4.0) & (y <= table_top + 26.0)
    slice_[shell] = TABLE_SHELL_HU
    slice_[core] = TABLE_CORE_HU
    return slice_


def _index_range(coords: np.ndarray, low: float, high: float) -> slice:
    """Indices of the ascending ``coords`` within [low, high]."""
    start = int(np.searchsorted(coords, low, side="left"))
    stop = int(np.searchsorted(coords, high, side="right"))
    return slice(start, stop)


def _paint_lung(
    hu: np.ndarray,
    labels: np.ndarray,
    label: int,
    lung: _Ellipsoid,
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
) -> None:
    (cx, cy, cz), (a, b, c) = lung.centre, lung.semi_axes
    sk, sr, sc = _index_range(zs, cz - c, cz + c), _index_range(ys, cy - b, cy + b), _index_range(xs, cx - a, cx + a)
    inside = _inside_lung(lung, xs[sc], ys[sr], zs[sk])
    # Dependent (posterior, +y) lung is denser.
    gradient = (LUNG_HU + LUNG_GRADIENT_HU * (ys[sr] - cy) / b).astype(np.float32)
    values = np.broadcast_to(gradient[None, :, None], inside.shape)
    hu[sk, sr, sc][inside] = values[inside]
    labels[sk, sr, sc][inside] = label


def _inside_lung(lung: _Ellipsoid, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
    """Which voxel centres of the grid ``zs`` x ``ys`` x ``xs`` are inside the lung (the test that paints it)."""
    (cx, cy, cz), (a, b, c) = lung.centre, lung.semi_axes
    u = (((xs - cx) / a) ** 2).astype(np.float32)
    v = (((ys - cy) / b) ** 2).astype(np.float32)
    w = (((zs - cz) / c) ** 2).astype(np.float32)
    result: np.ndarray = (w[:, None, None] + v[None, :, None] + u[None, None, :]) <= 1.0
    return result


def _paint_bridge(
    hu: np.ndarray,
    labels: np.ndarray,
    lungs: tuple[_Ellipsoid, _Ellipsoid],
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
) -> None:
    """A 12 mm x 12 mm parenchyma bar across the anterior mediastinum, over the middle third of the lungs."""
    right, left = lungs
    cz = (right.centre[2] + left.centre[2]) / 2.0
    half_z = min(right.semi_axes[2], left.semi_axes[2]) / 3.0
    x0, x1 = right.centre[0], left.centre[0]
    y0 = right.centre[1] - 0.55 * right.semi_axes[1]
    sk, sr, sc = (
        _index_range(zs, cz - half_z, cz + half_z),
        _index_range(ys, y0 - 6.0, y0 + 6.0),
        _index_range(xs, x0, x1),
    )
    block_labels = labels[sk, sr, sc]
    empty = block_labels == 0
    side = np.where(xs[sc] < 0.0, 1, 2).astype(np.uint8)
    block_labels[empty] = np.broadcast_to(side[None, None, :], empty.shape)[empty]
    hu[sk, sr, sc][empty] = LUNG_HU


def _point_inside(rng: np.random.Generator, lung: _Ellipsoid, scale: float) -> tuple[float, float, float]:
    """A uniform random point inside the lung ellipsoid shrunk by ``scale``."""
    while True:
        p = rng.uniform(-1.0, 1.0, size=3)
        if float(p @ p) <= 1.0:
            break
    point = np.asarray(lung.centre) + scale * p * np.asarray(lung.semi_axes)
    return (float(point[0]), float(point[1]), float(point[2]))


def _point_on_surface(rng: np.random.Generator, lung: _Ellipsoid, scale: float) -> tuple[float, float, float]:
    """A random point on the lung's surface shrunk by ``scale``, away from the apex and base."""
    while True:
        p = rng.normal(size=3)
        p /= np.linalg.norm(p)
        if abs(p[2]) < 0.6:
            break
    point = np.asarray(lung.centre) + scale * p * np.asarray(lung.semi_axes)
    return (float(point[0]), float(point[1]), float(point[2]))


def _paint_capsule(
    hu: np.ndarray,
    labels: np.ndarray,
    label: int,
    start: tuple[float, float, float],
    end: tuple[float, float, float] | None,
    radius: float,
    value: float,
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
) -> None:
    """Paint the voxels within ``radius`` of the segment start-end (a sphere if end is None or start)."""
    a = np.asarray(start, dtype=np.float64)
    b = a if end is None else np.asarray(end, dtype=np.float64)
    low, high = np.minimum(a, b) - radius, np.maximum(a, b) + radius
    sk, sr, sc = _index_range(zs, low[2], high[2]), _index_range(ys, low[1], high[1]), _index_range(xs, low[0], high[0])
    px = (xs[sc] - a[0])[None, None, :]
    py = (ys[sr] - a[1])[None, :, None]
    pz = (zs[sk] - a[2])[:, None, None]
    d = b - a
    length2 = float(d @ d)
    if length2 > 0:
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / length2, 0.0, 1.0)
        dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
    else:
        dist2 = px**2 + py**2 + pz**2
    inside = dist2 <= radius * radius
    if label:
        inside &= labels[sk, sr, sc] == label  # stay inside this lung
    hu[sk, sr, sc][inside] = value


# ----------------------------------------------------------------- nodules


@dataclass(frozen=True, kw_only=True, eq=False)
class _NoduleShape:
    """A nodule about its own centre: an ellipsoid in its own frame, lobes, values."""

    kind: str
    side: int  # lung label, 1 right, 2 left
    rotation: np.ndarray  # 3x3, columns: the ellipsoid's axes in patient coordinates
    semi_axes: np.ndarray  # mm
    lobes: tuple[tuple[np.ndarray, float], ...]  # (centre in the nodule's frame, radius), mm
    bound: float  # radius of a sphere about the centre holding the whole nodule, mm
    value_hu: float  # solid or ground-glass value, or the part-solid halo
    core_hu: float  # value of the solid core of a part-solid nodule
    juxtapleural: bool


@dataclass(frozen=True, kw_only=True, eq=False)
class _PaintedNodule:
    kind: str
    side: int
    box: tuple[slice, slice, slice]
    mask: np.ndarray  # over box
    centre_mm: tuple[float, float, float]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (from a random unit quaternion)."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _draw_nodule(
    rng: np.random.Generator,
    lungs: tuple[_Ellipsoid, _Ellipsoid],
    diameter_mm: tuple[float, float],
    kinds: tuple[str, ...],
) -> _NoduleShape:
    """Side, kind, size, shape and values of one nodule (a fixed number of draws)."""
    volumes = [float(np.prod(lung.semi_axes)) for lung in lungs]
    side = 1 if rng.random() < volumes[0] / sum(volumes) else 2
    kind = kinds[int(rng.integers(len(kinds)))]
    radius = float(np.exp(rng.uniform(np.log(diameter_mm[0]), np.log(diameter_mm[1])))) / 2.0
    semi_axes = radius * rng.uniform(0.8, 1.2, size=3)
    rotation = _random_rotation(rng)
    bound = float(semi_axes.max())
    lobes = []
    for _ in range(int(rng.integers(1, 3))):  # one or two lobes bulging from the ellipsoid
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        lobe_radius = radius * float(rng.uniform(0.35, 0.55))
        bulge = lobe_radius * float(rng.uniform(0.2, 0.5))
        to_surface = 1.0 / float(np.sqrt(np.sum((direction / semi_axes) ** 2)))
        distance = to_surface - lobe_radius + bulge
        lobes.append((distance * direction, lobe_radius))
        bound = max(bound, distance + lobe_radius)
    if kind == "solid":
        value, core = float(rng.uniform(*SOLID_NODULE_HU)), float(rng.uniform(*SOLID_NODULE_HU))
    elif kind == "part-solid":
        value, core = float(rng.uniform(*PART_SOLID_HALO_HU)), float(rng.uniform(*SOLID_NODULE_HU))
    else:
        value, core = float(rng.uniform(*GROUND_GLASS_NODULE_HU)), float(rng.uniform(*SOLID_NODULE_HU))
    return _NoduleShape(
        kind=kind,
        side=side,
        rotation=rotation,
        semi_axes=semi_axes,
        lobes=tuple(lobes),
        bound=bound,
        value_hu=value,
        core_hu=core,
        juxtapleural=bool(rng.random() < 0.2),
    )


def _place_nodule(
    rng: np.random.Generator,
    shape: _NoduleShape,
    lung: _Ellipsoid,
    placed: list[tuple[np.ndarray, float]],
    gap: float,
    limits: np.ndarray,
    tries: int = 200,
) -> np.ndarray | None:
    """A centre for the nodule inside its lung, the slab and apart from ``placed``; None if none is found.

    ``limits`` is (low, high) x (x, y, z) of the grid, half a voxel beyond the
    outer voxel centres. A juxtapleural nodule is pushed against the pleura
    (10 % of its extent beyond it, clipped by the lung when painted).
    """
    centre0, axes = np.asarray(lung.centre), np.asarray(lung.semi_axes)
    # Covariance of the nodule's ellipsoid: its extent along a unit n is sqrt(n' M n).
    extent = shape.rotation @ np.diag(shape.semi_axes**2) @ shape.rotation.T
    scale = 1.0 - (shape.bound + 1.0) / float(axes.min())
    for _ in range(tries):
        if shape.juxtapleural:
            surface = np.asarray(_point_on_surface(rng, lung, 1.0))
            normal = (surface - centre0) / axes**2
            normal /= np.linalg.norm(normal)
            centre: np.ndarray = surface - 0.9 * float(np.sqrt(normal @ extent @ normal)) * normal
        else:
            centre = np.asarray(_point_inside(rng, lung, scale))
        if np.any(centre - shape.bound < limits[0]) or np.any(centre + shape.bound > limits[1]):
            continue
        if all(float(np.linalg.norm(centre - other)) >= shape.bound + bound + gap for other, bound in placed):
            return centre
    return None


def _nodule_mask(
    shape: _NoduleShape, centre: np.ndarray, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(inside the nodule, inside its solid core) for the voxel centres of the grid ``zs`` x ``ys`` x ``xs``."""
    px = (xs - centre[0])[None, None, :]
    py = (ys - centre[1])[None, :, None]
    pz = (zs - centre[2])[:, None, None]
    r = shape.rotation
    local = [r[0, i] * px + r[1, i] * py + r[2, i] * pz for i in range(3)]  # coordinates in the nodule's frame
    ellipsoid = sum((local[i] / shape.semi_axes[i]) ** 2 for i in range(3))
    inside = ellipsoid <= 1.0
    for (lx, ly, lz), radius in shape.lobes:
        inside |= (local[0] - lx) ** 2 + (local[1] - ly) ** 2 + (local[2] - lz) ** 2 <= radius * radius
    core = ellipsoid <= 0.25  # half the diameter
    return inside, core


def _paint_nodules(
    hu: np.ndarray,
    labels: np.ndarray,
    nodule_labels: np.ndarray,
    rng: np.random.Generator,
    lungs: tuple[_Ellipsoid, _Ellipsoid],
    count: int,
    diameter_mm: tuple[float, float],
    kinds: tuple[str, ...],
    xs: np.ndarray,
    ys: np.ndarray,
    zs: np.ndarray,
    *,
    spacing: tuple[float, float, float],
) -> list[_PaintedNodule]:
    """Draw, place and paint ``count`` nodules; nodule ``k`` of the result has the value ``k + 1`` in ``nodule_labels``.

    ``spacing`` is the voxel size along x, y, z (mm).
    """
    steps = np.asarray(spacing, dtype=np.float64)
    limits = np.array([[xs[0], ys[0], zs[0]], [xs[-1], ys[-1], zs[-1]]]) + np.outer([-0.5, 0.5], steps)
    gap = float(np.linalg.norm(steps))  # no two nodules touch, not even at a voxel corner
    placed: list[tuple[np.ndarray, float]] = []
    painted: list[_PaintedNodule] = []
    for _ in range(count):
        shape = _draw_nodule(rng, lungs, diameter_mm, kinds)
        lung = lungs[shape.side - 1]
        centre = _place_nodule(rng, shape, lung, placed, gap, limits)
        if centre is None:
            side = _SIDES[shape.side]
            logger.warning("no room for a nodule %.1f mm across in the %s lung: left out", 2 * shape.bound, side)
            continue
        low, high = centre - shape.bound, centre + shape.bound
        box = (_index_range(zs, low[2], high[2]), _index_range(ys, low[1], high[1]), _index_range(xs, low[0], high[0]))
        sk, sr, sc = box
        inside, core = _nodule_mask(shape, centre, xs[sc], ys[sr], zs[sk])
        inside &= _inside_lung(lung, xs[sc], ys[sr], zs[sk]) & (labels[box] == shape.side)
        voxels = int(np.count_nonzero(inside))
        if voxels < 3:
            logger.debug("a nodule of %d voxels left out", voxels)
            continue
        placed.append((centre, shape.bound))
        if shape.kind == "part-solid":
            values = np.where(core, np.float32(shape.core_hu), np.float32(shape.value_hu))
            hu[box][inside] = values[inside]
        else:
            hu[box][inside] = shape.value_hu
        nodule_labels[box][inside] = len(painted) + 1
        kk, rr, cc = np.nonzero(inside)
        centroid = (float(xs[sc][cc].mean()), float(ys[sr][rr].mean()), float(zs[sk][kk].mean()))
        painted.append(_PaintedNodule(kind=shape.kind, side=shape.side, box=box, mask=inside, centre_mm=centroid))
    return painted


def _measure_nodules(hu: np.ndarray, painted: list[_PaintedNodule], *, voxel_ml: float) -> tuple[NoduleTruth, ...]:
    """The truth of the painted nodules on the noise-free image."""
    result = []
    for number, nodule in enumerate(painted, start=1):
        voxels = int(np.count_nonzero(nodule.mask))
        volume_ml = voxels * voxel_ml
        result.append(
            NoduleTruth(
                number=number,
                kind=nodule.kind,
                centre_mm=nodule.centre_mm,
                diameter_mm=float((6.0 * volume_ml * 1000.0 / np.pi) ** (1.0 / 3.0)),
                volume_ml=volume_ml,
                mean_hu=float(hu[nodule.box][nodule.mask].astype(np.float64).mean()),
                side=_SIDES[nodule.side],
                voxels=voxels,
            )
        )
    return tuple(result)


_SIDES = {1: "right", 2: "left"}


def _measure(hu: np.ndarray, labels: np.ndarray, *, voxel_ml: float) -> LungTruth:
    """Volumes, mean density and LAA-950 of the truth labels on the noise-free image."""
    counts, sums, lows = [], [], []
    for label in (1, 2):
        values = hu[labels == label].astype(np.float64)
        counts.append(int(values.size))
        sums.append(float(values.sum()))
        lows.append(int(np.count_nonzero(values < -950)))

    def ratio(numerator: float, denominator: int) -> float:
        return numerator / denominator if denominator else float("nan")

    total = counts[0] + counts[1]
    return LungTruth(
        right_volume_ml=counts[0] * voxel_ml,
        left_volume_ml=counts[1] * voxel_ml,
        total_volume_ml=total * voxel_ml,
        laa950_percent=ratio(100.0 * (lows[0] + lows[1]), total),
        mean_density_hu=ratio(sums[0] + sums[1], total),
        right_laa950_percent=ratio(100.0 * lows[0], counts[0]),
        left_laa950_percent=ratio(100.0 * lows[1], counts[1]),
        right_mean_density_hu=ratio(sums[0], counts[0]),
        left_mean_density_hu=ratio(sums[1], counts[1]),
    )


# ----------------------------------------------------------------- DICOM


def _common_header(
    *,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    patient_id: str,
    patient_name: str,
    series_number: int,
    phantom: ChestPhantom,
    bits_stored: int,
    when: datetime.datetime,
) -> Dataset:
    """The attributes shared by every slice of the series."""
    date = when.strftime("%Y%m%d")
    time = when.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic chest CT phantom"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = "Chest phantom"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "pacsnode"
    ds.ManufacturerModelName = "pacsnode.analysis.modeldev.synthetic"
    ds.SoftwareVersions = "1"
    # General Acquisition / General Image
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.BurnedInAnnotation = "NO"
    # Image Plane
    ds.ImageOrientationPatient = [*phantom.row_direction, *phantom.column_direction]
    ds.PixelSpacing = [_ds_number(phantom.spacing[1]), _ds_number(phantom.spacing[2])]
    ds.SliceThickness = _ds_number(phantom.slice_thickness_mm)
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = phantom.hu.shape[1]
    ds.Columns = phantom.hu.shape[2]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    # CT Image
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.KVP = 120
    ds.ConvolutionKernel = "STANDARD"
    # VOI LUT: a lung window
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    return ds


def _ds_number(value: float) -> str:
    """A decimal string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text[:16]


def _slice_dataset(
    common: Dataset,
    phantom: ChestPhantom,
    index: int,
    sop_uid: str,
    tsuid: UID,
    when: datetime.datetime,
) -> Dataset:
    ds = copy.deepcopy(common)
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    position = phantom.slice_position(index)
    ds.ImagePositionPatient = [_ds_number(v) for v in position]
    ds.SliceLocation = _ds_number(position[2])
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = tsuid if tsuid in _UNCOMPRESSED else UID(ExplicitVRLittleEndian)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds
