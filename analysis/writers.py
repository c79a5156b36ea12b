"""Lung results as DICOM: a Segmentation, a Comprehensive 3D SR and key images.

All objects are built with highdicom and belong to the study of the source
series, each kind in a new series of its own. Every Series and SOP Instance
UID is derived from (source series UID, pipeline name, pipeline version,
object role, index) by :func:`result_uid`, so rerunning the same pipeline
version on the same series, even after more source instances arrived, gives
the same UIDs and a PACS replaces the earlier results instead of keeping
both.

Codes used (see :data:`CODES` for the private ones):

- SEG segments: category SCT 91723000 "Anatomical Structure", type
  SCT 39607008 "Lung", with a Segmented Property Type Modifier SCT 24028007
  "Right" or SCT 7771000 "Left" (DICOM CID 244 Laterality).
- SR measurements: SCT 118565006 "Volume" in UCUM ``ml``; DCM 112031
  "Attenuation Coefficient" with derivation SCT 373098007 "Mean" in UCUM
  ``[hnsf'U]``; ``99PACSNODE LAA950`` (no standard code exists) in UCUM ``%``.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import logging
import math
import platform
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from analysis.types import AnalysisError, LungResult, Volume

__all__ = [
    "CODES",
    "DEFAULT_DEVICE_SERIAL",
    "DEFAULT_SOFTWARE_VERSION",
    "LUNG_WINDOW",
    "NOT_FOR_DIAGNOSTIC_USE",
    "PRIVATE_SCHEME",
    "SEGMENT_LEFT_LUNG",
    "SEGMENT_RIGHT_LUNG",
    "result_uid",
    "write_lung_results",
]

logger = logging.getLogger(__name__)

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

#: Coding Scheme Designator of the codes pacsnode defines itself.
PRIVATE_SCHEME = "99PACSNODE"

#: Segment numbers in the SEG; equal to the label values of :class:`LungResult`.
SEGMENT_RIGHT_LUNG = 1
SEGMENT_LEFT_LUNG = 2

#: (width, level) in HU of the key images.
LUNG_WINDOW = (1500.0, -600.0)

_UID_MAX_LENGTH = 64
_UUID_ROOT = "2.25"
# Leaves at least 9 hash digits (about 30 bits) after the root; as pydicom.uid.generate_uid.
_UID_ROOT_MAX_LENGTH = 54
_UID_ROOT_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Namespace of the UUIDv5 behind "2.25" UIDs: uuid5(NAMESPACE_URL, "urn:pacsnode:result-uid").
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsnode:result-uid")

_LO_MAX_LENGTH = 64

# uid(role, index) -> the UID of one result object of one run.
_UidFactory = Callable[[str, str], str]

#: RGB contour colours of the key images; the SEG's recommended display colours match.
_RIGHT_RGB = (0, 220, 0)
_LEFT_RGB = (255, 140, 0)
_BANNER_WARNING_RGB = (255, 255, 0)
_BANNER_TEXT_RGB = (255, 255, 255)


@dataclass(frozen=True)
class _Codes:
    """The coded concepts of the lung results, standard ones where DICOM has one."""

    anatomical_structure: Code = codes.SCT.AnatomicalStructure
    lung: Code = codes.SCT.Lung
    right: Code = codes.cid244.Right
    left: Code = codes.cid244.Left
    both: Code = codes.cid244.Bilateral
    volume: Code = codes.SCT.Volume
    attenuation: Code = codes.DCM.AttenuationCoefficient
    mean: Code = codes.SCT.Mean
    laa950: Code = Code("LAA950", PRIVATE_SCHEME, "Percentage of lung volume below -950 HU (LAA-950)")
    intended_use: Code = Code("INTENDEDUSE", PRIVATE_SCHEME, "Intended use")
    not_for_diagnostic_use: Code = Code("NFDU", PRIVATE_SCHEME, "Not for diagnostic use")
    # LOINC 24627-2 is "CT Chest"; pydicom names it after its use as a report title (CID 7000).
    procedure: Code = Code("24627-2", "LN", "CT Chest")
    milliliter: Code = Code("ml", "UCUM", "milliliter")
    hounsfield_unit: Code = codes.UCUM.HounsfieldUnit
    percent: Code = codes.UCUM.Percent
    algorithm_family: Code = codes.cid7162.HistogramAnalysis


#: The codes written by :func:`write_lung_results`.
CODES = _Codes()


def _package_version() -> str:
    try:
        return importlib.metadata.version("pacsnode")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: Default Software Versions (0018,1020): the installed pacsnode version.
DEFAULT_SOFTWARE_VERSION = _package_version()
#: Default Device Serial Number (0018,1000): this host's name.
DEFAULT_DEVICE_SERIAL = (platform.node() or "unknown")[:_LO_MAX_LENGTH]


def result_uid(root: str, *parts: str) -> str:
    """Return a UID that depends only on ``root`` and ``parts``.

    Parameters
    ----------
    root
        UID root of the organisation. ``"2.25"`` gives ``2.25.<n>`` with ``n``
        the integer value of a name-based (version 5) UUID of the parts
        (PS3.5 B.2). Any other root gives ``root.<digits>`` with the digits
        taken from the SHA-256 of the parts, as many as fit in 64 characters.
    *parts
        Strings that identify the object, for example source series UID,
        pipeline name, pipeline version, role and index.

    Returns
    -------
    str
        A valid UID of at most 64 characters whose components have no leading
        zeros. The same root and parts always give the same UID; different
        parts give different UIDs with overwhelming probability.

    Raises
    ------
    ValueError
        If ``root`` is not a valid UID prefix or longer than 54 characters.

    Examples
    --------
    >>> result_uid("2.25", "1.2.3", "lung", "1.0", "SEG", "0") == result_uid(
    ...     "2.25", "1.2.3", "lung", "1.0", "SEG", "0")
    True
    """
    root = root.rstrip(".")
    if not _UID_ROOT_PATTERN.match(root):
        raise ValueError(f"invalid UID root {root!r}")
    if len(root) > _UID_ROOT_MAX_LENGTH:
        raise ValueError(f"UID root {root!r} is longer than {_UID_ROOT_MAX_LENGTH} characters")
    # Length-prefixed, so ("a", "bc") and ("ab", "c") differ.
    name = "".join(f"{len(part)}:{part};" for part in parts)
    if root == _UUID_ROOT:
        return f"{_UUID_ROOT}.{uuid.uuid5(_UID_NAMESPACE, name).int}"
    digits = str(int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest(), "big"))
    # int() never gives a leading zero, so the truncated component has none either.
    return f"{root}.{digits[: _UID_MAX_LENGTH - len(root) - 1]}"


def write_lung_results(
    volume: Volume,
    result: LungResult,
    *,
    pipeline_name: str,
    pipeline_version: str,
    uid_root: str = _UUID_ROOT,
    series_number_base: int = 9000,
    key_slices: int = 3,
    manufacturer: str = "pacsnode",
    device_serial: str = DEFAULT_DEVICE_SERIAL,
    software_version: str = DEFAULT_SOFTWARE_VERSION,
    algorithm_family: Code = CODES.algorithm_family,
) -> list[Dataset]:
    """Build the DICOM results of a lung analysis.

    Parameters
    ----------
    volume
        The analysed CT series; its headers supply patient, study and geometry.
    result
        Labels (1 right lung, 2 left lung) and measurements of ``volume``.
    pipeline_name
        Name of the analysis pipeline; also the Manufacturer's Model Name.
    pipeline_version
        Version of the pipeline.
    uid_root
        Root of every UID created, see :func:`result_uid`.
    series_number_base
        The SEG, SR and key image series get numbers base + 1, + 2 and + 3.
    key_slices
        Number of key images, spread evenly over the slices that contain lung.
    manufacturer
        Manufacturer (0008,0070) of the results.
    device_serial
        Device Serial Number (0018,1000) of the results.
    software_version
        Software Versions (0018,1020) of the results.
    algorithm_family
        Algorithm family of the segmentation (CID 7162).

    Returns
    -------
    list[pydicom.dataset.Dataset]
        The Segmentation, then the Comprehensive 3D SR, then ``key_slices``
        Secondary Capture images, ready for ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    AnalysisError
        If ``result`` does not match ``volume`` or contains no lung voxel, or
        if highdicom rejects the objects.
    """
    _check_inputs(volume, result, key_slices)
    source_series_uid = str(volume.datasets[0].SeriesInstanceUID)

    def uid(role: str, index: str) -> str:
        return result_uid(uid_root, source_series_uid, pipeline_name, pipeline_version, role, index)

    now = datetime.datetime.now()
    common = _Common(
        uid_root=uid_root,
        pipeline_name=pipeline_name,
        pipeline_version=pipeline_version,
        manufacturer=manufacturer,
        device_serial=device_serial[:_LO_MAX_LENGTH],
        software_version=software_version,
        algorithm_family=algorithm_family,
        now=now,
    )
    try:
        seg = _build_seg(volume, result, common, uid, series_number_base + 1)
        sr = _build_sr(volume, result, seg, common, uid, series_number_base + 2)
        scs = _build_key_images(volume, result, common, uid, series_number_base + 3, key_slices)
    except (ValueError, TypeError) as exc:
        raise AnalysisError(f"cannot build the lung results: {exc}") from exc
    logger.info(
        "built lung results",
        extra={
            "action": "write_lung_results",
            "source_series_uid": source_series_uid,
            "seg_sop_instance_uid": seg.SOPInstanceUID,
            "sr_sop_instance_uid": sr.SOPInstanceUID,
            "key_images": len(scs),
        },
    )
    return [seg, sr, *scs]


class _EquipmentArguments(TypedDict):
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    content_date: datetime.date
    content_time: datetime.time
    series_date: datetime.date
    series_time: datetime.time


@dataclass(frozen=True, kw_only=True)
class _Common:
    """What every result object states about its origin."""

    uid_root: str
    pipeline_name: str
    pipeline_version: str
    manufacturer: str
    device_serial: str
    software_version: str
    algorithm_family: Code
    now: datetime.datetime

    def series_description(self, kind: str) -> str:
        """``<pipeline> <version> <kind> - NOT FOR DIAGNOSTIC USE``, shortened to 64 characters."""
        suffix = f" {kind} - {NOT_FOR_DIAGNOSTIC_USE}"
        prefix = f"{self.pipeline_name} {self.pipeline_version}"
        return prefix[: _LO_MAX_LENGTH - len(suffix)] + suffix

    def equipment(self) -> _EquipmentArguments:
        """Keyword arguments of every highdicom SOP class constructor."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.pipeline_name[:_LO_MAX_LENGTH],
            "software_versions": self.software_version,
            "device_serial_number": self.device_serial,
            "content_date": self.now.date(),
            "content_time": self.now.time(),
            "series_date": self.now.date(),
            "series_time": self.now.time(),
        }


def _check_inputs(volume: Volume, result: LungResult, key_slices: int) -> None:
    if not volume.datasets:
        raise AnalysisError("the volume has no source images")
    if result.labels.shape != volume.hu.shape:
        raise AnalysisError(f"label shape {result.labels.shape} differs from volume shape {volume.hu.shape}")
    if len(volume.datasets) != volume.hu.shape[0]:
        raise AnalysisError(f"{len(volume.datasets)} source headers for {volume.hu.shape[0]} slices")
    if key_slices < 0:
        raise ValueError(f"key_slices must not be negative, not {key_slices}")
    if not result.labels.any():
        raise AnalysisError("the segmentation contains no lung")


# --- Segmentation -------------------------------------------------------------------------------


def _segment_description(
    number: int,
    label: str,
    *,
    category: Code,
    property_type: Code,
    modifier: Code | None,
    rgb: tuple[int, int, int],
    algorithm: tuple[str, str, Code],
    tracking_uid: str,
) -> hd.seg.SegmentDescription:
    """An automatic segment; ``algorithm`` is (name, version, family), ``label`` also its tracking id."""
    name, version, family = algorithm
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(name=name, family=family, version=version),
        tracking_uid=tracking_uid,
        tracking_id=label,
        display_color=hd.color.CIELabColor.from_rgb(*rgb),
    )
    if modifier is not None:
        # Segmented Property Type Modifier Code Sequence (0062,0011): highdicom has no argument for it.
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(modifier)
        ]
    return description


def _segmentation(
    volume: Volume,
    pixel_array: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    common: _Common,
    uid: _UidFactory,
    series_number: int,
    *,
    content_description: str,
    content_label: str,
    kind: str,
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``volume`` (empty frames left out), instance 1 of its own series."""
    return hd.seg.Segmentation(
        source_images=list(volume.datasets),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid("SEG", "series"),
        series_number=series_number,
        sop_instance_uid=uid("SEG", "1"),
        instance_number=1,
        content_description=content_description[:_LO_MAX_LENGTH],
        content_label=content_label,
        series_description=common.series_description(kind),
        omit_empty_frames=True,
        **common.equipment(),
    )


def _build_seg(
    volume: Volume,
    result: LungResult,
    common: _Common,
    uid: _UidFactory,
    series_number: int,
) -> hd.seg.Segmentation:
    algorithm = (common.pipeline_name, common.pipeline_version, common.algorithm_family)
    descriptions = [
        _segment_description(
            number, label, category=CODES.anatomical_structure, property_type=CODES.lung, modifier=side,
            rgb=rgb, algorithm=algorithm, tracking_uid=uid("tracking", str(number)),
        )
        for number, label, side, rgb in (
            (SEGMENT_RIGHT_LUNG, "Right lung", CODES.right, _RIGHT_RGB),
            (SEGMENT_LEFT_LUNG, "Left lung", CODES.left, _LEFT_RGB),
        )
    ]  # fmt: skip
    labels = result.labels
    if labels.dtype != np.uint8:
        labels = labels.astype(np.uint8)
    return _segmentation(
        volume, labels, descriptions, common, uid, series_number,
        content_description=f"Lungs by {common.pipeline_name} {common.pipeline_version}",
        content_label="LUNGS",
        kind="lung SEG",
    )  # fmt: skip


# --- Structured report --------------------------------------------------------------------------


def _measurements(volume_ml: float, mean_hu: float, laa950_percent: float) -> list[hd.sr.Measurement]:
    values = [
        (CODES.volume, volume_ml, CODES.milliliter, None),
        (CODES.attenuation, mean_hu, CODES.hounsfield_unit, CODES.mean),
        (CODES.laa950, laa950_percent, CODES.percent, None),
    ]
    measurements = []
    for name, value, unit, derivation in values:
        if not math.isfinite(value):
            logger.warning(
                "measurement left out: not a finite number",
                extra={"action": "write_lung_results", "measurement": name.meaning, "value": value},
            )
            continue
        measurements.append(hd.sr.Measurement(name=name, value=float(value), unit=unit, derivation=derivation))
    return measurements


def _nfdu() -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(name=CODES.intended_use, value=CODES.not_for_diagnostic_use)]


def _build_sr(
    volume: Volume,
    result: LungResult,
    seg: hd.seg.Segmentation,
    common: _Common,
    uid: _UidFactory,
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    source_series_uid = str(volume.datasets[0].SeriesInstanceUID)
    algorithm = hd.sr.AlgorithmIdentification(
        name=common.pipeline_name,
        version=common.pipeline_version,
        family=common.algorithm_family,
        manufacturer=common.manufacturer,
    )
    lungs = [
        (SEGMENT_RIGHT_LUNG, "Right lung", CODES.right, result.right_volume_ml, result.right_mean_density_hu,
         result.right_laa950_percent),
        (SEGMENT_LEFT_LUNG, "Left lung", CODES.left, result.left_volume_ml, result.left_mean_density_hu,
         result.left_laa950_percent),
    ]  # fmt: skip
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for number, label, side, volume_ml, mean_hu, laa in lungs:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                # The same tracking UID as the segment in the SEG.
                tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("tracking", str(number)), identifier=label),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid),
                ),
                finding_type=CODES.lung,
                finding_sites=[hd.sr.FindingSite(anatomic_location=CODES.lung, laterality=side)],
                algorithm_id=algorithm,
                measurements=_measurements(volume_ml, mean_hu, laa),
                qualitative_evaluations=_nfdu(),
            )
        )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("tracking", "both"), identifier="Both lungs"),
            finding_type=CODES.lung,
            finding_sites=[hd.sr.FindingSite(anatomic_location=CODES.lung, laterality=CODES.both)],
            algorithm_id=algorithm,
            measurements=_measurements(result.total_volume_ml, result.mean_density_hu, result.laa950_percent),
            qualitative_evaluations=_nfdu(),
        )
    )
    return _measurement_report_sr(
        [*volume.datasets, seg], groups, CODES.procedure, common, uid, series_number, kind="lung SR"
    )


def _measurement_report_sr(
    evidence: list[Dataset],
    groups: Sequence[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ],
    procedure: Code,
    common: _Common,
    uid: _UidFactory,
    series_number: int,
    *,
    kind: str,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report by this device, instance 1 of its own series, complete, not final."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(common.uid_root, "device", common.manufacturer, common.pipeline_name, common.device_serial),
            name=f"{common.pipeline_name} {common.pipeline_version}"[:_LO_MAX_LENGTH],
            manufacturer_name=common.manufacturer,
            model_name=common.pipeline_name[:_LO_MAX_LENGTH],
            serial_number=common.device_serial,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uid("SR", "series"),
        series_number=series_number,
        sop_instance_uid=uid("SR", "1"),
        instance_number=1,
        is_complete=True,
        is_final=False,
        series_description=common.series_description(kind),
        coding_schemes=[_private_scheme()],
        **common.equipment(),
    )


def _private_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="pacsnode local codes",
        responsible_organization="pacsnode",
    )


# --- Key images ---------------------------------------------------------------------------------


def _key_slice_indices(labels: np.ndarray, count: int) -> list[int]:
    """Slices at (i + 1) / (count + 1) of the slices that contain lung, in volume order."""
    with_lung = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    picks = [with_lung[min(len(with_lung) - 1, round((i + 1) * len(with_lung) / (count + 1)))] for i in range(count)]
    return [int(k) for k in picks]


def _window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    low = level - width / 2.0
    scaled = (hu.astype(np.float32) - np.float32(low)) * np.float32(255.0 / width)
    grey: np.ndarray = np.clip(scaled, 0.0, 255.0).astype(np.uint8)
    return grey


def _draw_contour(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Draw the outer contours of the 2D ``mask`` into ``rgb``, in place."""
    thickness = max(1, rgb.shape[1] // 256)
    mask = mask.astype(np.uint8)
    if not mask.any():
        return
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, colour, thickness, lineType=cv2.LINE_8)


def _banner(
    columns: int, lines: list[list[tuple[str, tuple[int, int, int]]]]
) -> np.ndarray:
    """An RGB band ``columns`` wide with ``lines`` of coloured text pieces, scaled to fit."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    margin = max(2, columns // 64)
    scale = 0.5 * columns / 512.0
    widest = max(cv2.getTextSize("".join(text for text, _ in line), font, 1.0, 1)[0][0] for line in lines)
    scale = min(scale, (columns - 2 * margin) / widest)
    (_, text_height), baseline = cv2.getTextSize("Ag", font, scale, 1)
    line_height = text_height + baseline + margin
    band = np.zeros((margin + line_height * len(lines), columns, 3), dtype=np.uint8)
    for row, line in enumerate(lines):
        x = margin
        y = margin + row * line_height + text_height
        for text, colour in line:
            cv2.putText(band, text, (x, y), font, scale, colour, 1, cv2.LINE_AA)
            x += cv2.getTextSize(text, font, scale, 1)[0][0]
    return band


def _banner_lines(result: LungResult, common: _Common) -> list[list[tuple[str, tuple[int, int, int]]]]:
    return [
        [(f"{common.pipeline_name} {common.pipeline_version} - {NOT_FOR_DIAGNOSTIC_USE}", _BANNER_WARNING_RGB)],
        [
            (f"R {result.right_volume_ml:.0f} mL", _RIGHT_RGB),
            ("  ", _BANNER_TEXT_RGB),
            (f"L {result.left_volume_ml:.0f} mL", _LEFT_RGB),
            (f"  Total {result.total_volume_ml:.0f} mL  LAA-950 {result.laa950_percent:.1f}%", _BANNER_TEXT_RGB),
        ],
    ]


def _patient_orientation(volume: Volume) -> tuple[str, str]:
    row = np.asarray(volume.row_direction, dtype=float)
    column = np.asarray(volume.column_direction, dtype=float)
    directions = np.stack([row, column, np.cross(row, column)], axis=1)
    orientation = hd.spatial.get_closest_patient_orientation(directions)
    return (orientation[0].value, orientation[1].value)


def _key_image_pixels(
    hu: np.ndarray,
    window: tuple[float, float],
    contours: list[tuple[np.ndarray, tuple[int, int, int]]],
    banner: np.ndarray,
) -> np.ndarray:
    """The 2D ``hu`` in ``window`` (width, level) with (mask, colour) ``contours``, below ``banner``; RGB uint8."""
    grey = _window(hu, *window)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    for mask, colour in contours:
        _draw_contour(rgb, mask, colour)
    return np.ascontiguousarray(np.concatenate([banner, rgb], axis=0))


def _render_key_image(volume: Volume, result: LungResult, index: int, banner: np.ndarray) -> np.ndarray:
    """Slice ``index`` in the lung window with lung contours, below ``banner``; RGB uint8."""
    labels = result.labels[index]
    contours = [(labels == SEGMENT_RIGHT_LUNG, _RIGHT_RGB), (labels == SEGMENT_LEFT_LUNG, _LEFT_RGB)]
    return _key_image_pixels(volume.hu[index], LUNG_WINDOW, contours, banner)


def _secondary_capture(
    volume: Volume,
    index: int,
    pixels: np.ndarray,
    common: _Common,
    uid: _UidFactory,
    series_number: int,
    number: int,
    *,
    kind: str,
    derivation: str,
) -> hd.sc.SCImage:
    """RGB ``pixels`` made from slice ``index`` as SC instance ``number``, burned-in annotation flagged."""
    source = volume.datasets[index]
    pixel_spacing = (float(volume.spacing[1]), float(volume.spacing[2]))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uid("SC", "series"),
        series_number=series_number,
        sop_instance_uid=uid("SC", str(number)),
        instance_number=number,
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]  # highdicom annotates tuple[int, int]
        patient_orientation=_patient_orientation(volume),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=common.series_description(kind),
        **common.equipment(),
    )
    # Not set by highdicom's SCImage: what the pixels show and where they come from.
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # made by software, not captured from a video interface
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    sc.DerivationDescription = derivation
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return sc


def _build_key_images(
    volume: Volume,
    result: LungResult,
    common: _Common,
    uid: _UidFactory,
    series_number: int,
    count: int,
) -> list[hd.sc.SCImage]:
    banner = _banner(volume.hu.shape[2], _banner_lines(result, common))
    width, level = LUNG_WINDOW
    images = []
    for number, index in enumerate(_key_slice_indices(result.labels, count), start=1):
        sc = _secondary_capture(
            volume, index, _render_key_image(volume, result, index, banner), common, uid, series_number, number,
            kind="lung key images",
            derivation=f"Lung window W {width:.0f} L {level:.0f}, lung contours and banner burned in",
        )  # fmt: skip
        sc.ImageLaterality = "B"  # both lungs; also satisfies the Laterality (0020,0060) 2C rule
        images.append(sc)
    return images
