"""Lung results as DICOM: a Segmentation, a Comprehensive 3D SR and key images.

Built on the shared result core (:mod:`pacsnode.analysis.results.core`): the
same UIDs, provenance, banners and highdicom constructors as every other
pipeline's results. See that module for the codes used.

A lung that was not found (volume 0, see :class:`~pacsnode.analysis.types.LungResult`)
keeps its segment and its SR measurement group: the volume 0 mL and the lung
status "Not found"; the key images' banner says "not found" in place of its volume.

Key images: the centre slices of ``key_slices`` zones of equal lung volume
(apex to base), in the lung window, with each lung's outline drawn just outside
it (the pleura stays visible), below a banner: the pipeline and NOT FOR
DIAGNOSTIC USE, the volumes, LAA-950 and mean density (with a warning when
the parenchyma is so noisy that LAA-950 is overestimated, see
:data:`~pacsnode.analysis.lung.segmentation.NOISY_PARENCHYMA_HU`), and the
source image (instance number, z, reconstruction kernel).
"""

from __future__ import annotations

import datetime
import logging
import math

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from pacsnode.analysis.errors import AnalysisError
from pacsnode.analysis.lung.segmentation import NOISY_PARENCHYMA_HU
from pacsnode.analysis.results.core import (
    BANNER_TEXT_RGB,
    BANNER_WARNING_RGB,
    CODES,
    DEFAULT_DEVICE_SERIAL,
    DEFAULT_SOFTWARE_VERSION,
    LO_MAX_LENGTH,
    NOT_FOR_DIAGNOSTIC_USE,
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
from pacsnode.analysis.types import LungResult, Volume

__all__ = ["LUNG_WINDOW", "SEGMENT_LEFT_LUNG", "SEGMENT_RIGHT_LUNG", "write_lung_results"]

logger = logging.getLogger(__name__)


#: Segment numbers in the SEG; equal to the label values of :class:`LungResult`.
SEGMENT_RIGHT_LUNG = 1


SEGMENT_LEFT_LUNG = 2


#: (width, level) in HU of the key images.
LUNG_WINDOW = (1500.0, -600.0)


#: RGB contour colours of the key images; the SEG's recommended display colours match.
_RIGHT_RGB = (0, 220, 0)


_LEFT_RGB = (255, 140, 0)


def write_lung_results(
    volume: Volume,
    result: LungResult,
    *,
    pipeline_name: str,
    pipeline_version: str,
    uid_root: str = UUID_ROOT,
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
        Number of key images: the centre slices of as many zones of equal lung
        volume (fewer when the lungs span fewer slices).
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
    common = ResultContext(
        uid_root=uid_root,
        pipeline_name=pipeline_name,
        pipeline_version=pipeline_version,
        manufacturer=manufacturer,
        device_serial=device_serial[:LO_MAX_LENGTH],
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


def _build_seg(
    volume: Volume,
    result: LungResult,
    common: ResultContext,
    uid: UidFactory,
    series_number: int,
) -> hd.seg.Segmentation:
    algorithm = (common.pipeline_name, common.pipeline_version, common.algorithm_family)
    descriptions = [
        segment_description(
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
    return segmentation(
        volume, labels, descriptions, common, uid, series_number,
        content_description=f"Lungs by {common.pipeline_name} {common.pipeline_version}",
        content_label="LUNGS",
        kind="lung SEG",
    )  # fmt: skip


def _measurements(volume_ml: float, mean_hu: float, laa950_percent: float) -> list[hd.sr.Measurement]:
    values = [
        (CODES.volume, volume_ml, CODES.milliliter, None),
        (CODES.attenuation, mean_hu, CODES.hounsfield_unit, CODES.mean),
        (CODES.laa950, laa950_percent, CODES.percent, None),
    ]
    measurements = []
    for name, value, unit, derivation in values:
        if not math.isfinite(value):
            if volume_ml > 0:  # a lung not found has no density: nothing to warn about
                logger.warning(
                    "measurement left out: not a finite number",
                    extra={"action": "write_lung_results", "measurement": name.meaning, "value": value},
                )
            continue
        measurements.append(hd.sr.Measurement(name=name, value=float(value), unit=unit, derivation=derivation))
    return measurements


def _evaluations(volume_ml: float) -> list[hd.sr.QualitativeEvaluation]:
    """Intended use, and for a lung of volume 0 the finding that it was not found."""
    evaluations = not_for_diagnostic_use()
    if volume_ml <= 0:
        evaluations.append(hd.sr.QualitativeEvaluation(name=CODES.lung_status, value=CODES.lung_not_found))
    return evaluations


def _build_sr(
    volume: Volume,
    result: LungResult,
    seg: hd.seg.Segmentation,
    common: ResultContext,
    uid: UidFactory,
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
                qualitative_evaluations=_evaluations(volume_ml),
            )
        )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("tracking", "both"), identifier="Both lungs"),
            finding_type=CODES.lung,
            finding_sites=[hd.sr.FindingSite(anatomic_location=CODES.lung, laterality=CODES.both)],
            algorithm_id=algorithm,
            measurements=_measurements(result.total_volume_ml, result.mean_density_hu, result.laa950_percent),
            qualitative_evaluations=not_for_diagnostic_use(),
        )
    )
    return measurement_report_sr(
        [*volume.datasets, seg], groups, CODES.procedure, common, uid, series_number, kind="lung SR"
    )


def _key_slice_indices(labels: np.ndarray, count: int) -> list[int]:
    """The centre slices of ``count`` zones of equal lung volume, in volume order, each once."""
    if count == 0:
        return []
    area = np.count_nonzero(labels.reshape(labels.shape[0], -1), axis=1)
    cumulative = np.cumsum(area, dtype=np.float64) / float(area.sum())
    picks = {int(np.searchsorted(cumulative, (i + 0.5) / count)) for i in range(count)}
    return sorted(picks)


#: Font scale and stroke of the banner on a 512-column image: bold enough to read in a 2x2 layout.
_BANNER_SCALE, _BANNER_STROKE = 0.55, 2
_INFO_RGB = (200, 200, 200)


def _side(name: str, volume_ml: float, rgb: tuple[int, int, int]) -> tuple[str, tuple[int, int, int]]:
    if volume_ml <= 0:
        return (f"{name} not found", BANNER_WARNING_RGB)
    return (f"{name} {volume_ml:.0f} mL", rgb)


def _source_line(volume: Volume, index: int) -> str:
    """Where the key image comes from: instance number, z (mm) and kernel of source slice ``index``."""
    ds = volume.datasets[index]
    parts = []
    number = ds.get("InstanceNumber")
    parts.append(f"CT image {number}" if number not in (None, "") else f"Slice {index + 1}/{len(volume.datasets)}")
    position = ds.get("ImagePositionPatient")
    if position is not None and len(position) == 3:
        parts.append(f"z {float(position[2]):.1f} mm")
    kernel = ds.get("ConvolutionKernel")
    if kernel:
        text = "/".join(str(k) for k in kernel) if not isinstance(kernel, str) else kernel
        parts.append(f"Kernel {text[:16]}")
    return "  ".join(parts)


def _banner_lines(
    volume: Volume, result: LungResult, common: ResultContext, index: int
) -> list[list[tuple[str, tuple[int, int, int]]]]:
    density = f"  Mean {result.mean_density_hu:.0f} HU" if math.isfinite(result.mean_density_hu) else ""
    lines = [
        [(f"{common.pipeline_name} {common.pipeline_version} - {NOT_FOR_DIAGNOSTIC_USE}", BANNER_WARNING_RGB)],
        [
            _side("R", result.right_volume_ml, _RIGHT_RGB),
            ("  ", BANNER_TEXT_RGB),
            _side("L", result.left_volume_ml, _LEFT_RGB),
            (f"  Total {result.total_volume_ml:.0f} mL", BANNER_TEXT_RGB),
        ],
        [(f"LAA-950 {result.laa950_percent:.1f}%{density}", BANNER_TEXT_RGB)],
    ]
    noise = result.parenchyma_noise_hu
    if math.isfinite(noise) and noise > NOISY_PARENCHYMA_HU:
        lines.append([(f"Noisy lung ({noise:.0f} HU): LAA-950 too high", BANNER_WARNING_RGB)])
    lines.append([(_source_line(volume, index), _INFO_RGB)])
    return lines


def _render_key_image(volume: Volume, result: LungResult, common: ResultContext, index: int) -> np.ndarray:
    """Slice ``index`` in the lung window with each lung outlined just outside it, below its banner; RGB uint8."""
    banner = render_banner(
        volume.hu.shape[2],
        _banner_lines(volume, result, common, index),
        scale_at_512=_BANNER_SCALE,
        stroke_at_512=_BANNER_STROKE,
    )
    labels = result.labels[index]
    contours = [(labels == SEGMENT_RIGHT_LUNG, _RIGHT_RGB), (labels == SEGMENT_LEFT_LUNG, _LEFT_RGB)]
    return key_image_pixels(volume.hu[index], LUNG_WINDOW, contours, banner, outside=True)


def _build_key_images(
    volume: Volume,
    result: LungResult,
    common: ResultContext,
    uid: UidFactory,
    series_number: int,
    count: int,
) -> list[hd.sc.SCImage]:
    width, level = LUNG_WINDOW
    images = []
    for number, index in enumerate(_key_slice_indices(result.labels, count), start=1):
        sc = secondary_capture(
            volume, index, _render_key_image(volume, result, common, index), common, uid, series_number, number,
            kind="lung key images",
            derivation=f"Lung window W {width:.0f} L {level:.0f}, lung outlines and banner burned in",
        )  # fmt: skip
        sc.ImageLaterality = "B"  # both lungs; also satisfies the Laterality (0020,0060) 2C rule
        images.append(sc)
    return images
