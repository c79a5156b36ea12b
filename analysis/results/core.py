"""The shared core of every result writer: UIDs, provenance, codes, banners and highdicom constructors.

The lung writers (:mod:`pacsnode.analysis.lung.writers`) and the findings
writers (:mod:`pacsnode.analysis.cnn.writers`) build their SEG, SR and SC
objects from these public pieces.

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
- SR qualitative evaluation of a lung that was not found: ``99PACSNODE LUNGSTATUS``
  = ``99PACSNODE LUNGNOTFOUND``, beside its volume of 0 mL.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import logging
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

from pacsnode.analysis.types import Volume

__all__ = [
    "BANNER_TEXT_RGB",
    "BANNER_WARNING_RGB",
    "CODES",
    "DEFAULT_DEVICE_SERIAL",
    "DEFAULT_SOFTWARE_VERSION",
    "LO_MAX_LENGTH",
    "NOT_FOR_DIAGNOSTIC_USE",
    "PRIVATE_SCHEME",
    "ResultContext",
    "UUID_ROOT",
    "UidFactory",
    "key_image_pixels",
    "measurement_report_sr",
    "not_for_diagnostic_use",
    "private_scheme",
    "render_banner",
    "result_uid",
    "secondary_capture",
    "segment_description",
    "segmentation",
    "window_to_grey",
    "draw_contour",
    "drop_incomplete_study_references",
    "patient_orientation",
]

logger = logging.getLogger(__name__)

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

#: Coding Scheme Designator of the codes pacsnode defines itself.
PRIVATE_SCHEME = "99PACSNODE"


_UID_MAX_LENGTH = 64
UUID_ROOT = "2.25"
# Leaves at least 9 hash digits (about 30 bits) after the root; as pydicom.uid.generate_uid.
_UID_ROOT_MAX_LENGTH = 54
_UID_ROOT_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Namespace of the UUIDv5 behind "2.25" UIDs: uuid5(NAMESPACE_URL, "urn:pacsnode:result-uid").
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsnode:result-uid")

LO_MAX_LENGTH = 64

# uid(role, index) -> the UID of one result object of one run.
UidFactory = Callable[[str, str], str]

BANNER_WARNING_RGB = (255, 255, 0)
BANNER_TEXT_RGB = (255, 255, 255)


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
    lung_status: Code = Code("LUNGSTATUS", PRIVATE_SCHEME, "Lung status")
    lung_not_found: Code = Code("LUNGNOTFOUND", PRIVATE_SCHEME, "Not found (no aerated lung on this side)")


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
DEFAULT_DEVICE_SERIAL = (platform.node() or "unknown")[:LO_MAX_LENGTH]


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
    if root == UUID_ROOT:
        return f"{UUID_ROOT}.{uuid.uuid5(_UID_NAMESPACE, name).int}"
    digits = str(int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest(), "big"))
    # int() never gives a leading zero, so the truncated component has none either.
    return f"{root}.{digits[: _UID_MAX_LENGTH - len(root) - 1]}"


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
class ResultContext:
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
        return prefix[: LO_MAX_LENGTH - len(suffix)] + suffix

    def equipment(self) -> _EquipmentArguments:
        """Keyword arguments of every highdicom SOP class constructor."""
        return {
            "manufacturer": self.manufacturer,
            "manufacturer_model_name": self.pipeline_name[:LO_MAX_LENGTH],
            "software_versions": self.software_version,
            "device_serial_number": self.device_serial,
            "content_date": self.now.date(),
            "content_time": self.now.time(),
            "series_date": self.now.date(),
            "series_time": self.now.time(),
        }


# --- Segmentation -------------------------------------------------------------------------------


def segment_description(
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


def segmentation(
    volume: Volume,
    pixel_array: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    common: ResultContext,
    uid: UidFactory,
    series_number: int,
    *,
    content_description: str,
    content_label: str,
    kind: str,
) -> hd.seg.Segmentation:
    """A BINARY SEG of ``volume`` (empty frames left out), instance 1 of its own series."""
    seg = hd.seg.Segmentation(
        source_images=list(volume.datasets),
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=uid("SEG", "series"),
        series_number=series_number,
        sop_instance_uid=uid("SEG", "1"),
        instance_number=1,
        content_description=content_description[:LO_MAX_LENGTH],
        content_label=content_label,
        series_description=common.series_description(kind),
        omit_empty_frames=True,
        **common.equipment(),
    )
    drop_incomplete_study_references(seg)
    return seg


# --- Structured report --------------------------------------------------------------------------


def not_for_diagnostic_use() -> list[hd.sr.QualitativeEvaluation]:
    return [hd.sr.QualitativeEvaluation(name=CODES.intended_use, value=CODES.not_for_diagnostic_use)]


def measurement_report_sr(
    evidence: list[Dataset],
    groups: Sequence[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ],
    procedure: Code,
    common: ResultContext,
    uid: UidFactory,
    series_number: int,
    *,
    kind: str,
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 Measurement Report by this device, instance 1 of its own series, complete, not final."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(common.uid_root, "device", common.manufacturer, common.pipeline_name, common.device_serial),
            name=f"{common.pipeline_name} {common.pipeline_version}"[:LO_MAX_LENGTH],
            manufacturer_name=common.manufacturer,
            model_name=common.pipeline_name[:LO_MAX_LENGTH],
            serial_number=common.device_serial,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uid("SR", "series"),
        series_number=series_number,
        sop_instance_uid=uid("SR", "1"),
        instance_number=1,
        is_complete=True,
        is_final=False,
        series_description=common.series_description(kind),
        coding_schemes=[private_scheme()],
        **common.equipment(),
    )
    drop_incomplete_study_references(sr)
    return sr


def drop_incomplete_study_references(ds: Dataset) -> None:
    """Remove Referenced Study Sequence items that lack a Referenced SOP Class or Instance UID.

    highdicom copies the source's General Study module into a SEG or SR, this optional (Type 3)
    sequence included. Real archives hold items without the Referenced SOP Class UID (left out by
    de-identification or by the scanner), and both UIDs are Type 1 in an item: copied as they are,
    the result would be invalid. What is left of the sequence is kept; an empty one is removed.
    """
    items = ds.get("ReferencedStudySequence")
    if items is None:
        return
    complete = [item for item in items if item.get("ReferencedSOPClassUID") and item.get("ReferencedSOPInstanceUID")]
    if len(complete) == len(items):
        return
    if complete:
        ds.ReferencedStudySequence = complete
    else:
        del ds.ReferencedStudySequence


def private_scheme() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="pacsnode local codes",
        responsible_organization="pacsnode",
    )


# --- Key images ---------------------------------------------------------------------------------


def window_to_grey(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    low = level - width / 2.0
    scaled = (hu.astype(np.float32) - np.float32(low)) * np.float32(255.0 / width)
    grey: np.ndarray = np.clip(scaled, 0.0, 255.0).astype(np.uint8)
    return grey


def draw_contour(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], *, outside: bool = False) -> None:
    """Draw the contours of the 2D ``mask`` into ``rgb``, in place.

    By default the outer contours, centred on the mask's edge pixels; with ``outside``, every
    edge (holes too) as a band just outside the mask, so that the edge itself (a pleura, a
    lesion's margin) stays visible. Either way ``columns // 256`` pixels wide (at least 1).
    """
    mask = mask.astype(np.uint8)
    if not mask.any():
        return
    if outside:
        width = max(1, rgb.shape[1] // 256)
        kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
        grown = cv2.dilate(mask, kernel, iterations=width, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        rgb[(grown > 0) & (mask == 0)] = colour
        return
    thickness = max(1, rgb.shape[1] // 256)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, colour, thickness, lineType=cv2.LINE_8)


def render_banner(
    columns: int,
    lines: list[list[tuple[str, tuple[int, int, int]]]],
    *,
    scale_at_512: float = 0.5,
    stroke_at_512: int = 1,
) -> np.ndarray:
    """An RGB band ``columns`` wide with ``lines`` of coloured text pieces, scaled to fit.

    ``scale_at_512`` and ``stroke_at_512`` are the font scale and stroke width (pixels) for a
    512-column image; both grow with ``columns``, and the scale shrinks to fit the widest line.
    """
    font = cv2.FONT_HERSHEY_SIMPLEX
    margin = max(2, columns // 64)
    stroke = max(1, round(stroke_at_512 * columns / 512.0))
    scale = scale_at_512 * columns / 512.0
    widest = max(cv2.getTextSize("".join(text for text, _ in line), font, 1.0, stroke)[0][0] for line in lines)
    scale = min(scale, (columns - 2 * margin) / widest)
    (_, text_height), baseline = cv2.getTextSize("Ag", font, scale, stroke)
    line_height = text_height + baseline + margin
    band = np.zeros((margin + line_height * len(lines), columns, 3), dtype=np.uint8)
    for row, line in enumerate(lines):
        x = margin
        y = margin + row * line_height + text_height
        for text, colour in line:
            cv2.putText(band, text, (x, y), font, scale, colour, stroke, cv2.LINE_AA)
            x += cv2.getTextSize(text, font, scale, stroke)[0][0]
    return band


def patient_orientation(volume: Volume) -> tuple[str, str]:
    row = np.asarray(volume.row_direction, dtype=float)
    column = np.asarray(volume.column_direction, dtype=float)
    directions = np.stack([row, column, np.cross(row, column)], axis=1)
    orientation = hd.spatial.get_closest_patient_orientation(directions)
    return (orientation[0].value, orientation[1].value)


def key_image_pixels(
    hu: np.ndarray,
    window: tuple[float, float],
    contours: list[tuple[np.ndarray, tuple[int, int, int]]],
    banner: np.ndarray,
    *,
    outside: bool = False,
) -> np.ndarray:
    """The 2D ``hu`` in ``window`` (width, level) with (mask, colour) ``contours``, below ``banner``; RGB uint8.

    ``outside``: the contours are drawn just outside each mask (see :func:`draw_contour`).
    """
    grey = window_to_grey(hu, *window)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    for mask, colour in contours:
        draw_contour(rgb, mask, colour, outside=outside)
    return np.ascontiguousarray(np.concatenate([banner, rgb], axis=0))


def secondary_capture(
    volume: Volume,
    index: int,
    pixels: np.ndarray,
    common: ResultContext,
    uid: UidFactory,
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
        patient_orientation=patient_orientation(volume),
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
