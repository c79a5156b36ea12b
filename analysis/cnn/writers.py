"""Results of CNN models as DICOM: Segmentations, Comprehensive 3D SRs and key images.

Generic counterparts of :mod:`pacsnode.analysis.results.core` for any model: a segmentation
model reports connected :class:`Finding` objects of its output labels
(:class:`LabelSpec`), a classification model reports a :class:`ClassScore` per
output. Every object belongs to the study of the source series, each kind in
a new series of its own, with UIDs from :func:`pacsnode.analysis.results.core.result_uid`,
so rerunning the same pipeline version on the same series replaces the
earlier results in a PACS.

Codes used (see :data:`MODEL_CODES`):

- SEG segments: the label's segmented property category, type and modifier
  from the model's manifest; Anatomic Region Sequence from the finding site,
  with the laterality as its modifier.
- SR (TID 1500) measurements of a finding: SCT 118565006 "Volume" in UCUM
  ``ml``, SCT 103339001 "Long axis" (CID 7470 Linear Measurements, the
  RECIST longest diameter) in UCUM ``mm``, and ``99PACSNODE PROBABILITY``
  "Probability of finding" in UCUM ``1`` (no units, 0 to 1): DICOM has no code
  for a model's output probability. A classification adds ``99PACSNODE
  THRESHOLD`` "Decision threshold of probability", also in UCUM ``1``.
- Presence: a qualitative evaluation named after the label's type (or the
  classified concept) with value SCT 52101004 "Present" or SCT 272519000
  "Absent" (CID 240 Present-Absent).
- Free text: ``99PACSNODE LOCATION`` "Location description" (the location
  of a finding and its centroid in patient coordinates), ``99PACSNODE LESIONKIND``
  "Lesion kind" (``mass`` or ``nodule`` when the pipeline tells them apart), ``99PACSNODE SOURCE``
  "Finding source" for a finding that is not the model's (``image rule``; it has no probability),
  DCM 121106 "Comment" ("No nodule detected").
- A finding's second size, when given: ``99PACSNODE EXTENT3D`` "Largest 3D
  extent" in mm (the long axis above is the largest in-plane diameter).
- Procedure reported LN 25045-6 "CT unspecified body region" (CID 100),
  algorithm family DCM 123110 "Artificial Intelligence" (CID 7162), both
  replaceable through the equipment options.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pacsnode.analysis.errors import AnalysisError
from pacsnode.analysis.results.core import (
    BANNER_TEXT_RGB,
    BANNER_WARNING_RGB,
    CODES,
    DEFAULT_DEVICE_SERIAL,
    DEFAULT_SOFTWARE_VERSION,
    LO_MAX_LENGTH,
    NOT_FOR_DIAGNOSTIC_USE,
    PRIVATE_SCHEME,
    UUID_ROOT,
    ResultContext,
    UidFactory,
    key_image_pixels,
    measurement_report_sr,
    not_for_diagnostic_use,
    render_banner,
    result_uid,
    secondary_capture,
    segment_description,
    segmentation,
)
from pacsnode.analysis.types import Volume

__all__ = [
    "ClassScore",
    "DEFAULT_WINDOW",
    "EquipmentOptions",
    "Finding",
    "LabelSpec",
    "MODEL_CODES",
    "finding_line",
    "write_classification_results",
    "write_segmentation_results",
]

logger = logging.getLogger(__name__)

#: (width, level) in HU of the key images unless the caller gives another window.
DEFAULT_WINDOW = (1500.0, -600.0)

_POSITIVE_RGB = (255, 96, 96)

_Group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
_BannerLines = list[list[tuple[str, tuple[int, int, int]]]]


@dataclass(frozen=True)
class _ModelCodes:
    """The coded concepts of model results, standard ones where DICOM has one."""

    volume: Code = CODES.volume
    long_axis: Code = codes.SCT.LongAxis
    probability: Code = Code("PROBABILITY", PRIVATE_SCHEME, "Probability of finding")
    threshold: Code = Code("THRESHOLD", PRIVATE_SCHEME, "Decision threshold of probability")
    location: Code = Code("LOCATION", PRIVATE_SCHEME, "Location description")
    extent: Code = Code("EXTENT3D", PRIVATE_SCHEME, "Largest 3D extent")
    lesion_kind: Code = Code("LESIONKIND", PRIVATE_SCHEME, "Lesion kind")
    source: Code = Code("SOURCE", PRIVATE_SCHEME, "Finding source")
    comment: Code = codes.DCM.Comment
    present: Code = codes.cid240.Present
    absent: Code = codes.cid240.Absent
    milliliter: Code = CODES.milliliter
    millimeter: Code = codes.UCUM.Millimeter
    no_units: Code = codes.UCUM.NoUnits
    procedure: Code = codes.LN.CTUnspecifiedBodyRegion
    algorithm_family: Code = codes.cid7162.ArtificialIntelligence


#: The codes written by :func:`write_segmentation_results` and :func:`write_classification_results`.
MODEL_CODES = _ModelCodes()

_IMAGE_LATERALITY = {
    codes.cid244.Right: "R",
    codes.cid244.Left: "L",
    codes.cid244.Bilateral: "B",
}


@dataclass(frozen=True, kw_only=True)
class LabelSpec:
    """One output label of a segmentation model, as its manifest describes it.

    ``value`` is the label's value in the model's label map (at least 1),
    ``name`` its short name (``"nodule"``), ``category``, ``type`` and
    ``modifier`` its DICOM Segmented Property Category, Type and Type Modifier
    (for example SCT 49755003 "Morphologically Altered Structure" and
    SCT 27925004 "Nodule"), ``color`` the RGB of its contours and segments.
    """

    value: int
    name: str
    category: Code
    type: Code
    modifier: Code | None = None
    color: tuple[int, int, int] = (255, 0, 0)


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One connected finding of a segmentation model.

    ``number`` is 1-based and unique within the run; the finding's tracking
    identifier is ``"<label.name> <number>"``. ``mask`` is boolean with the
    shape of ``volume.hu``; ``probability`` (0..1) is the model's, for a finding of the model's
    map; a finding of another ``source`` (``"image rule"``: a mass found in the image itself) has
    none, since the map's value on it says nothing about it. ``centroid_index``
    is (slice, row, column), ``centroid_patient_mm`` patient (x, y, z).
    ``finding_site`` is an anatomic location (for example SCT 39607008 "Lung"),
    ``laterality`` one of DICOM CID 244 and needs a ``finding_site``.
    ``longest_diameter_mm`` is the long axis (for lesions, the largest in-plane diameter,
    RECIST), ``extent_mm`` (optional) the largest 3D extent; ``kind`` (optional) what the
    finding is called in the SR and on the key images, for example ``"mass"`` or ``"nodule"``;
    ``key_slice`` (optional) the slice its key image shows (for a lesion, the slice of its long
    axis), else the slice through its centroid.
    """

    label: LabelSpec
    number: int
    mask: np.ndarray
    probability: float | None
    volume_ml: float
    longest_diameter_mm: float
    centroid_index: tuple[float, float, float]
    centroid_patient_mm: tuple[float, float, float]
    location: str
    finding_site: Code | None = None
    laterality: Code | None = None
    extent_mm: float | None = None
    kind: str | None = None
    source: str = "model"
    key_slice: int | None = None

    @property
    def tracking_id(self) -> str:
        """``"<label name> <number>"``: segment label in the SEG and tracking identifier in the SR."""
        return f"{self.label.name} {self.number}"


@dataclass(frozen=True, kw_only=True)
class ClassScore:
    """One output of a classification model.

    ``code`` is what is classified (for example SCT 27925004 "Nodule",
    present or absent); the class counts as present when ``probability`` is
    at least ``threshold``; both lie in 0..1.
    """

    name: str
    code: Code
    probability: float
    threshold: float

    @property
    def positive(self) -> bool:
        """Whether ``probability`` reaches ``threshold``."""
        return self.probability >= self.threshold


class EquipmentOptions(TypedDict, total=False):
    """Optional keyword arguments of the writers: who made the results, and what was done.

    ``manufacturer`` (default ``"pacsnode"``), ``device_serial`` (default this
    host's name), ``software_version`` (default the pacsnode version),
    ``algorithm_family`` (CID 7162, default DCM 123110 "Artificial
    Intelligence") and ``procedure_reported`` (CID 100, default LN 25045-6
    "CT unspecified body region").
    """

    manufacturer: str
    device_serial: str
    software_version: str
    algorithm_family: Code
    procedure_reported: Code


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What one call of a writer shares between its objects."""

    common: ResultContext
    uid: UidFactory
    model_name: str
    model_version: str
    procedure: Code
    window: tuple[float, float]

    @property
    def algorithm(self) -> tuple[str, str, Code]:
        return (self.model_name, self.model_version, self.common.algorithm_family)

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        return hd.sr.AlgorithmIdentification(
            name=self.model_name,
            version=self.model_version,
            family=self.common.algorithm_family,
            manufacturer=self.common.manufacturer,
        )

    def banner_header(self) -> _BannerLines:
        return [
            [(f"{self.common.pipeline_name} {self.common.pipeline_version} - {NOT_FOR_DIAGNOSTIC_USE}",
              BANNER_WARNING_RGB)],
            [(f"Model {self.model_name} {self.model_version}", BANNER_TEXT_RGB)],
        ]  # fmt: skip

    def derivation(self, burned_in: str) -> str:
        width, level = self.window
        return f"Window W {width:.0f} L {level:.0f}, {burned_in} burned in by {self.model_name} {self.model_version}"


def write_segmentation_results(
    volume: Volume,
    findings: Sequence[Finding],
    labels: Sequence[LabelSpec],
    *,
    pipeline_name: str,
    pipeline_version: str,
    model_name: str,
    model_version: str,
    uid_root: str = UUID_ROOT,
    series_number_base: int = 9100,
    max_key_images: int = 5,
    window: tuple[float, float] = DEFAULT_WINDOW,
    **equipment: Unpack[EquipmentOptions],
) -> list[Dataset]:
    """Build the DICOM results of a segmentation model.

    Parameters
    ----------
    volume
        The CT series the model segmented, with the headers that give patient, study and geometry.
    findings
        The connected findings, in any order; none when the model found nothing.
    labels
        Every output label of the model; a label without findings is reported absent.
    pipeline_name
        Name of the analysis pipeline; also the Manufacturer's Model Name.
    pipeline_version
        Version of the pipeline.
    model_name, model_version
        The model, named in the algorithm identification of segments and measurements.
    uid_root
        Root of every UID created, see :func:`pacsnode.analysis.results.core.result_uid`.
    series_number_base
        The SEG, SR and key image series get numbers base + 1, + 2 and + 3.
    max_key_images
        Key images of at most this many findings, the largest (by volume) first.
    window
        (width, level) in HU of the key images.
    **equipment
        See :class:`EquipmentOptions`.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        The Segmentation (one segment per finding, left out when there is no
        finding), the Comprehensive 3D SR (TID 1500: a volumetric group per
        finding, a group per label without findings saying it is absent),
        then the Secondary Capture key images: one per finding up to
        ``max_key_images``, or with no finding one of the middle slice.

    Raises
    ------
    AnalysisError
        If the findings do not match ``volume`` or ``labels`` (mask shape,
        empty mask, probability outside 0..1, duplicate numbers, unknown label,
        laterality without finding site), or if highdicom rejects the objects.
    ValueError
        If ``max_key_images`` is negative or ``window`` has no positive width.
    TypeError
        For an unknown equipment option.
    """
    _check_volume(volume)
    _check_labels(labels)
    for finding in findings:
        _check_finding(volume, finding, labels)
    numbers = [finding.number for finding in findings]
    if len(set(numbers)) != len(numbers):
        raise AnalysisError(f"finding numbers must be unique, got {sorted(numbers)}")
    if max_key_images < 0:
        raise ValueError(f"max_key_images must not be negative, not {max_key_images}")
    ordered = sorted(findings, key=lambda finding: finding.number)
    run = _run(volume, "", pipeline_name, pipeline_version, uid_root, model_name, model_version, window, equipment)
    try:
        seg = _findings_seg(volume, ordered, run, series_number_base + 1) if ordered else None
        sr = _findings_sr(volume, ordered, labels, seg, run, series_number_base + 2)
        scs = _findings_key_images(volume, ordered, labels, run, series_number_base + 3, max_key_images)
    except (ValueError, TypeError) as exc:
        raise AnalysisError(f"cannot build the segmentation results of {model_name}: {exc}") from exc
    outputs: list[Dataset] = [*([seg] if seg is not None else []), sr, *scs]
    _log("write_segmentation_results", volume, outputs, findings=len(ordered))
    return outputs


def write_classification_results(
    volume: Volume,
    scores: Sequence[ClassScore],
    *,
    pipeline_name: str,
    pipeline_version: str,
    model_name: str,
    model_version: str,
    uid_root: str = UUID_ROOT,
    series_number_base: int = 9100,
    key_slice: int | None = None,
    window: tuple[float, float] = DEFAULT_WINDOW,
    **equipment: Unpack[EquipmentOptions],
) -> list[Dataset]:
    """Build the DICOM results of a classification model.

    Parameters
    ----------
    volume
        The CT series the model classified, as for :func:`write_segmentation_results`.
    scores
        One per output of the model, names unique.
    pipeline_name, pipeline_version, model_name, model_version, uid_root, window
        As for :func:`write_segmentation_results`.
    series_number_base
        The SR and key image series get numbers base + 2 and + 3.
    key_slice
        Slice index of the key image; default the middle slice.
    **equipment
        See :class:`EquipmentOptions`.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        The Comprehensive 3D SR (TID 1500, a group per score with the
        probability, the threshold and the class present or absent), then one
        Secondary Capture with a banner listing every score. Their UIDs use
        the roles ``classification SR`` and ``classification SC``, so a
        pipeline that also segments gets other UIDs for those.

    Raises
    ------
    AnalysisError
        If there is no score, a probability or threshold lies outside 0..1,
        names repeat, ``key_slice`` is outside the volume, or highdicom
        rejects the objects.
    ValueError
        If ``window`` has no positive width.
    TypeError
        For an unknown equipment option.
    """
    _check_volume(volume)
    if not scores:
        raise AnalysisError("a classification needs at least one score")
    for score in scores:
        _check_probability(score.probability, f"score {score.name!r}")
        _check_probability(score.threshold, f"the threshold of score {score.name!r}")
    names = [score.name for score in scores]
    if len(set(names)) != len(names):
        raise AnalysisError(f"score names must be unique, got {names}")
    slices = volume.hu.shape[0]
    index = slices // 2 if key_slice is None else key_slice
    if not 0 <= index < slices:
        raise AnalysisError(f"key_slice {key_slice} is outside the volume's {slices} slices")
    run = _run(
        volume, "classification ", pipeline_name, pipeline_version, uid_root, model_name, model_version, window,
        equipment,
    )  # fmt: skip
    try:
        sr = measurement_report_sr(
            list(volume.datasets), [_score_group(score, run) for score in scores], run.procedure, run.common, run.uid,
            series_number_base + 2, kind="SR",
        )  # fmt: skip
        lines = [[_score_line(score)] for score in scores]
        sc = _key_image(volume, index, [], lines, run, series_number_base + 3, 1, burned_in="score banner")
    except (ValueError, TypeError) as exc:
        raise AnalysisError(f"cannot build the classification results of {model_name}: {exc}") from exc
    outputs: list[Dataset] = [sr, sc]
    _log("write_classification_results", volume, outputs, scores=len(scores))
    return outputs


# --- Checks -------------------------------------------------------------------------------------


def _check_volume(volume: Volume) -> None:
    if not volume.datasets:
        raise AnalysisError("the volume has no source images")
    if len(volume.datasets) != volume.hu.shape[0]:
        raise AnalysisError(f"{len(volume.datasets)} source headers for {volume.hu.shape[0]} slices")


def _check_labels(labels: Sequence[LabelSpec]) -> None:
    if not labels:
        raise AnalysisError("the model has no labels")
    values = [label.value for label in labels]
    names = [label.name for label in labels]
    if len(set(values)) != len(values) or len(set(names)) != len(names):
        raise AnalysisError(f"label values and names must be unique, got {list(zip(values, names, strict=True))}")
    for label in labels:
        if label.value < 1:
            raise AnalysisError(f"label {label.name!r} has value {label.value}; label values start at 1")
        if not label.name:
            raise AnalysisError(f"label {label.value} has no name")


def _check_probability(value: float, what: str) -> None:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise AnalysisError(f"{what}: probability {value} is outside 0..1")


def _check_finding(volume: Volume, finding: Finding, labels: Sequence[LabelSpec]) -> None:
    name = f"finding {finding.tracking_id!r}"
    if finding.label not in labels:
        raise AnalysisError(f"{name}: its label {finding.label.name!r} is not one of the model's labels")
    if finding.number < 1:
        raise AnalysisError(f"{name}: finding numbers start at 1")
    if finding.mask.shape != volume.hu.shape:
        raise AnalysisError(f"{name}: mask shape {finding.mask.shape} differs from volume shape {volume.hu.shape}")
    if not finding.mask.any():
        raise AnalysisError(f"{name}: the mask is empty")
    if finding.source == "model" and finding.probability is None:
        raise AnalysisError(f"{name}: a finding of the model needs its probability")
    if finding.probability is not None:
        _check_probability(finding.probability, name)
    sizes = [("volume", finding.volume_ml), ("longest diameter", finding.longest_diameter_mm)]
    if finding.extent_mm is not None:
        sizes.append(("3D extent", finding.extent_mm))
    for what, value in sizes:
        if not (math.isfinite(value) and value >= 0.0):
            raise AnalysisError(f"{name}: the {what} {value} is not a finite number >= 0")
    if not all(math.isfinite(v) for v in (*finding.centroid_index, *finding.centroid_patient_mm)):
        raise AnalysisError(f"{name}: the centroid is not finite")
    if finding.laterality is not None and finding.finding_site is None:
        raise AnalysisError(f"{name}: a laterality needs a finding site")


def _run(
    volume: Volume,
    role_prefix: str,
    pipeline_name: str,
    pipeline_version: str,
    uid_root: str,
    model_name: str,
    model_version: str,
    window: tuple[float, float],
    equipment: EquipmentOptions,
) -> _Run:
    unknown = set(equipment) - EquipmentOptions.__optional_keys__
    if unknown:
        raise TypeError(f"unknown equipment options: {', '.join(sorted(unknown))}")
    if not window[0] > 0:
        raise ValueError(f"the window width must be positive, not {window[0]}")
    source_series_uid = str(volume.datasets[0].SeriesInstanceUID)

    def uid(role: str, index: str) -> str:
        return result_uid(uid_root, source_series_uid, pipeline_name, pipeline_version, role_prefix + role, index)

    common = ResultContext(
        uid_root=uid_root,
        pipeline_name=pipeline_name,
        pipeline_version=pipeline_version,
        manufacturer=equipment.get("manufacturer", "pacsnode"),
        device_serial=equipment.get("device_serial", DEFAULT_DEVICE_SERIAL)[:LO_MAX_LENGTH],
        software_version=equipment.get("software_version", DEFAULT_SOFTWARE_VERSION),
        algorithm_family=equipment.get("algorithm_family", MODEL_CODES.algorithm_family),
        now=datetime.datetime.now(),
    )
    return _Run(
        common=common,
        uid=uid,
        model_name=model_name,
        model_version=model_version,
        procedure=equipment.get("procedure_reported", MODEL_CODES.procedure),
        window=(float(window[0]), float(window[1])),
    )


def _log(action: str, volume: Volume, outputs: list[Dataset], **counts: int) -> None:
    logger.info(
        "built model results",
        extra={
            "action": action,
            "source_series_uid": str(volume.datasets[0].SeriesInstanceUID),
            "sop_instance_uids": [str(ds.SOPInstanceUID) for ds in outputs],
            **counts,
        },
    )


# --- Segmentation -------------------------------------------------------------------------------


def _findings_seg(volume: Volume, findings: list[Finding], run: _Run, series_number: int) -> hd.seg.Segmentation:
    """Segment ``i + 1`` is ``findings[i]``."""
    descriptions = []
    for number, finding in enumerate(findings, start=1):
        label = finding.label
        description = segment_description(
            number, finding.tracking_id, category=label.category, property_type=label.type,
            modifier=label.modifier, rgb=label.color, algorithm=run.algorithm,
            tracking_uid=run.uid("tracking", str(finding.number)),
        )  # fmt: skip
        if finding.finding_site is not None:
            region = hd.sr.CodedConcept.from_code(finding.finding_site)
            if finding.laterality is not None:
                region.AnatomicRegionModifierSequence = [hd.sr.CodedConcept.from_code(finding.laterality)]
            description.AnatomicRegionSequence = [region]
        descriptions.append(description)
    return segmentation(
        volume, _segment_pixels([finding.mask for finding in findings]), descriptions, run.common, run.uid,
        series_number,
        content_description=f"Findings of {run.model_name} {run.model_version}",
        content_label="FINDINGS",
        kind="SEG",
    )  # fmt: skip


def _segment_pixels(masks: list[np.ndarray]) -> np.ndarray:
    """A label map of segment numbers where the masks do not overlap, else (slices, rows, columns, segments)."""
    counts = np.zeros(masks[0].shape, dtype=np.uint16)
    for mask in masks:
        counts += mask.astype(bool)
    if counts.max() > 1:
        return np.stack([mask.astype(bool) for mask in masks], axis=-1)
    label_map = np.zeros(masks[0].shape, dtype=np.uint8 if len(masks) < 256 else np.uint16)
    for number, mask in enumerate(masks, start=1):
        label_map[mask.astype(bool)] = number
    return label_map


# --- Structured report --------------------------------------------------------------------------


def _findings_sr(
    volume: Volume,
    findings: list[Finding],
    labels: Sequence[LabelSpec],
    seg: hd.seg.Segmentation | None,
    run: _Run,
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    groups: list[_Group] = []
    if seg is not None:  # segment number n + 1 is findings[n]
        groups.extend(_finding_group(volume, finding, seg, n, run) for n, finding in enumerate(findings, start=1))
    found = {finding.label.value for finding in findings}
    groups.extend(_absent_group(label, run) for label in labels if label.value not in found)
    evidence = [*volume.datasets, *([seg] if seg is not None else [])]
    return measurement_report_sr(evidence, groups, run.procedure, run.common, run.uid, series_number, kind="SR")


def _finding_group(
    volume: Volume, finding: Finding, seg: hd.seg.Segmentation, segment_number: int, run: _Run
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    with_finding = np.flatnonzero(finding.mask.reshape(finding.mask.shape[0], -1).any(axis=1))
    sites = None
    if finding.finding_site is not None:
        sites = [hd.sr.FindingSite(anatomic_location=finding.finding_site, laterality=finding.laterality)]
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        # The same tracking UID as the segment in the SEG.
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=run.uid("tracking", str(finding.number)), identifier=finding.tracking_id
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment_number,
            source_images=[
                hd.sr.SourceImageForSegmentation.from_source_image(volume.datasets[k]) for k in with_finding
            ],
        ),  # fmt: skip
        finding_type=finding.label.type,
        finding_category=finding.label.category,
        finding_sites=sites,
        algorithm_id=run.sr_algorithm(),
        measurements=[
            hd.sr.Measurement(name=MODEL_CODES.volume, value=finding.volume_ml, unit=MODEL_CODES.milliliter),
            hd.sr.Measurement(
                name=MODEL_CODES.long_axis, value=finding.longest_diameter_mm, unit=MODEL_CODES.millimeter
            ),
            *(
                [hd.sr.Measurement(name=MODEL_CODES.extent, value=finding.extent_mm, unit=MODEL_CODES.millimeter)]
                if finding.extent_mm is not None
                else []
            ),
            *(
                [hd.sr.Measurement(name=MODEL_CODES.probability, value=finding.probability, unit=MODEL_CODES.no_units)]
                if finding.probability is not None
                else []
            ),
        ],
        qualitative_evaluations=[_presence(finding.label.type, True), *not_for_diagnostic_use()],
    )
    if finding.kind:
        _add_text(group, MODEL_CODES.lesion_kind, finding.kind)
    if finding.source != "model":
        _add_text(group, MODEL_CODES.source, finding.source)
    x, y, z = finding.centroid_patient_mm
    centroid = f"centroid x {x:.1f}, y {y:.1f}, z {z:.1f} mm"
    _add_text(group, MODEL_CODES.location, f"{finding.location}; {centroid}" if finding.location else centroid)
    return group


def _absent_group(label: LabelSpec, run: _Run) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = _evaluation_group(run, f"label {label.value}", label.name, label.type, False, category=label.category)
    _add_text(group, MODEL_CODES.comment, f"No {label.name} detected")
    return group


def _score_group(score: ClassScore, run: _Run) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = [
        hd.sr.Measurement(name=MODEL_CODES.probability, value=score.probability, unit=MODEL_CODES.no_units),
        hd.sr.Measurement(name=MODEL_CODES.threshold, value=score.threshold, unit=MODEL_CODES.no_units),
    ]
    return _evaluation_group(run, f"class {score.name}", score.name, score.code, score.positive,
                             measurements=measurements)  # fmt: skip


def _evaluation_group(
    run: _Run,
    tracking_index: str,
    identifier: str,
    concept: Code,
    present: bool,
    *,
    category: Code | None = None,
    measurements: list[hd.sr.Measurement] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group on the whole series: finding ``concept`` present or absent, not for diagnostic use."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=run.uid("tracking", tracking_index), identifier=identifier),
        finding_type=concept,
        finding_category=category,
        algorithm_id=run.sr_algorithm(),
        measurements=measurements,
        qualitative_evaluations=[_presence(concept, present), *not_for_diagnostic_use()],
    )


def _presence(concept: Code, present: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=concept, value=MODEL_CODES.present if present else MODEL_CODES.absent)


def _add_text(group: _Group, name: Code, text: str) -> None:
    """Append a CONTAINS TEXT qualitative evaluation (TID 1501/1411); highdicom takes only CODE ones."""
    group[0].ContentSequence.append(
        hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    )


# --- Key images ---------------------------------------------------------------------------------


def _finding_slice(finding: Finding) -> int:
    """The finding's key slice if it is on the mask, else the slice through the centroid or the slice of the mask nearest
    to it."""
    if finding.key_slice is not None and finding.mask[finding.key_slice].any():
        return finding.key_slice
    with_finding = np.flatnonzero(finding.mask.reshape(finding.mask.shape[0], -1).any(axis=1))
    centre = finding.centroid_index[0]
    return int(with_finding[np.argmin(np.abs(with_finding - centre))])


def _findings_key_images(
    volume: Volume,
    findings: list[Finding],
    labels: Sequence[LabelSpec],
    run: _Run,
    series_number: int,
    count: int,
) -> list[hd.sc.SCImage]:
    if not findings:
        lines = [[(f"No {label.name} detected", label.color)] for label in labels]
        return [_key_image(volume, volume.hu.shape[0] // 2, [], lines, run, series_number, 1, burned_in="banner")]
    largest = sorted(findings, key=lambda finding: (-finding.volume_ml, finding.number))[:count]
    images = []
    for number, finding in enumerate(largest, start=1):
        index = _finding_slice(finding)
        text = finding_line(finding)
        sc = _key_image(
            volume, index, [(finding.mask[index], finding.label.color)], [[(text, finding.label.color)]], run,
            series_number, number, burned_in=f"contour of {finding.tracking_id} and banner",
        )  # fmt: skip
        if finding.laterality in _IMAGE_LATERALITY:
            sc.ImageLaterality = _IMAGE_LATERALITY[finding.laterality]
        images.append(sc)
    return images


def finding_line(finding: Finding) -> str:
    """The key image's banner line of a finding: ``mass 1 (image rule): long axis 59.8 mm, 3D 65.0 mm, 47.92 mL``.

    A lesion is named by its kind, the long axis is the RECIST one, the 3D extent second; the model's
    probability (``, p=0.93``) only for the model's findings, another one says where it comes from.
    """
    name = f"{finding.kind} {finding.number}" if finding.kind else finding.tracking_id
    if finding.source != "model":
        name = f"{name} ({finding.source})"
    extent = f", 3D {finding.extent_mm:.1f} mm" if finding.extent_mm is not None else ""
    probability = f", p={finding.probability:.2f}" if finding.probability is not None else ""
    return f"{name}: long axis {finding.longest_diameter_mm:.1f} mm{extent}, {finding.volume_ml:.2f} mL{probability}"


def _score_line(score: ClassScore) -> tuple[str, tuple[int, int, int]]:
    """``<name>: p=0.93 (threshold 0.50) POSITIVE``, positive ones in red."""
    verdict = "POSITIVE" if score.positive else "NEGATIVE"
    text = f"{score.name}: p={score.probability:.2f} (threshold {score.threshold:.2f}) {verdict}"
    return (text, _POSITIVE_RGB if score.positive else BANNER_TEXT_RGB)


def _key_image(
    volume: Volume,
    index: int,
    contours: list[tuple[np.ndarray, tuple[int, int, int]]],
    lines: _BannerLines,
    run: _Run,
    series_number: int,
    number: int,
    *,
    burned_in: str,
) -> hd.sc.SCImage:
    """SC ``number``: slice ``index`` in the run's window with ``contours``, below a banner of ``lines``."""
    banner = render_banner(volume.hu.shape[2], [*run.banner_header(), *lines])
    pixels = key_image_pixels(volume.hu[index], run.window, contours, banner)
    return secondary_capture(
        volume, index, pixels, run.common, run.uid, series_number, number,
        kind="SC", derivation=run.derivation(burned_in),
    )  # fmt: skip
