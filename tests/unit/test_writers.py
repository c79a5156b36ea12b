"""Tests of pacsnode.analysis.results.core: SEG, SR and key images built from a small synthetic CT."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pacsnode.analysis.errors import AnalysisError
from pacsnode.analysis.lung.writers import LUNG_WINDOW
from pacsnode.analysis.results.core import CODES, NOT_FOR_DIAGNOSTIC_USE, result_uid
from pacsnode.analysis.types import LungResult, Volume
from tests.support.lung_outputs import (
    PIPELINE_NAME,
    ROWS,
    SC_SOP_CLASS,
    SEG_SOP_CLASS,
    SLICES,
    SR_SOP_CLASS,
    UID_PATTERN,
    make_ct_headers,
    make_result,
    make_volume,
    save_by_kind,
    write,
)


@pytest.fixture(scope="module")
def volume() -> Volume:
    return make_volume()


@pytest.fixture(scope="module")
def result(volume: Volume) -> LungResult:
    return make_result(volume)


@pytest.fixture(scope="module")
def outputs(volume: Volume, result: LungResult) -> list[Dataset]:
    return write(volume, result)


@pytest.fixture(scope="module")
def written(outputs: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The outputs saved as files, grouped by kind."""
    return save_by_kind(outputs, tmp_path_factory.mktemp("results"))


def uids_of(outputs: list[Dataset]) -> list[tuple[str, str]]:
    return [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in outputs]


# --- result_uid ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "root", ["2.25", "1.2.826.0.1.3680043.10.999", "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18.19.20.21"]
)
def test_result_uid_is_valid_deterministic_and_under_root(root: str) -> None:
    parts = ("1.2.840.99.1", "lung-threshold", "1.2.0", "SEG", "1")
    uid = result_uid(root, *parts)
    assert uid == result_uid(root, *parts)
    assert len(uid) <= 64
    assert UID_PATTERN.match(uid), uid
    assert uid.startswith(root + ".")
    assert len(uid.split(".")) == len(root.split(".")) + 1
    assert result_uid(root, *parts[:-1], "2") != uid
    if root != "2.25":
        assert len(uid) == 64  # uses all the room the root leaves


def test_result_uid_2_25_is_uuid_form() -> None:
    uid = result_uid("2.25", "a", "b")
    value = int(uid.split(".")[2])
    assert 0 < value < 2**128
    assert str(value) == uid.split(".")[2]  # no leading zero


def test_result_uid_parts_are_not_just_concatenated() -> None:
    assert result_uid("2.25", "ab", "c") != result_uid("2.25", "a", "bc")
    assert result_uid("1.2.3", "ab", "c") != result_uid("1.2.3", "a", "bc")


@pytest.mark.parametrize("root", ["", "1.02.3", "1..2", "abc", "1.2." + "1" * 60])
def test_result_uid_rejects_bad_roots(root: str) -> None:
    with pytest.raises(ValueError):
        result_uid(root, "x")


# --- write_lung_results -------------------------------------------------------------------------


def test_three_kinds_each_in_own_new_series(outputs: list[Dataset], volume: Volume) -> None:
    assert [ds.SOPClassUID for ds in outputs] == [SEG_SOP_CLASS, SR_SOP_CLASS] + [SC_SOP_CLASS] * 3
    assert isinstance(outputs[0], hd.seg.Segmentation)
    assert isinstance(outputs[1], hd.sr.Comprehensive3DSR)
    assert all(isinstance(ds, hd.sc.SCImage) for ds in outputs[2:])
    series = {ds.SOPClassUID: ds.SeriesInstanceUID for ds in outputs}
    assert len(set(series.values())) == 3
    assert volume.datasets[0].SeriesInstanceUID not in series.values()
    assert len({ds.SOPInstanceUID for ds in outputs}) == len(outputs)
    assert [ds.SeriesNumber for ds in outputs] == [9001, 9002, 9003, 9003, 9003]
    assert [ds.InstanceNumber for ds in outputs[2:]] == [1, 2, 3]
    for ds in outputs:
        assert NOT_FOR_DIAGNOSTIC_USE in ds.SeriesDescription
        assert len(ds.SeriesDescription) <= 64
        assert ds.Manufacturer == "pacsnode"
        assert ds.ManufacturerModelName == PIPELINE_NAME


def test_patient_and_study_copied(outputs: list[Dataset], volume: Volume) -> None:
    source = volume.datasets[0]
    for ds in outputs:
        for keyword in (
            "StudyInstanceUID",
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
        ):
            assert str(ds[keyword].value) == str(source[keyword].value), (ds.Modality, keyword)


def test_rerun_gives_same_uids_even_with_more_source_slices(volume: Volume, result: LungResult) -> None:
    first = write(volume, result)
    again = write(volume, result)
    assert uids_of(first) == uids_of(again)
    # More instances arrived: one more slice, same series.
    extra = make_ct_headers(1, series_uid=volume.datasets[0].SeriesInstanceUID)[0]
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        setattr(extra, keyword, volume.datasets[0][keyword].value)
    extra.ImagePositionPatient = [-22.4, -22.4, -100.0 + 2.5 * SLICES]
    grown = replace(
        volume,
        hu=np.concatenate([volume.hu, volume.hu[-1:]]),
        datasets=(*volume.datasets, extra),
    )
    grown_result = replace(result, labels=np.concatenate([result.labels, result.labels[-1:]]))
    assert uids_of(write(grown, grown_result)) == uids_of(first)


def test_other_series_or_version_gives_other_uids(volume: Volume, result: LungResult) -> None:
    first = {uid for pair in uids_of(write(volume, result)) for uid in pair}
    other_volume = make_volume()
    other_series = {uid for pair in uids_of(write(other_volume, result)) for uid in pair}
    other_version = {uid for pair in uids_of(write(volume, result, version="2")) for uid in pair}
    assert not first & other_series
    assert not first & other_version


def test_uid_root_is_used(volume: Volume, result: LungResult) -> None:
    root = "1.2.826.0.1.3680043.10.999"
    for ds in write(volume, result, uid_root=root, key_slices=1):
        assert ds.SeriesInstanceUID.startswith(root + ".")
        assert ds.SOPInstanceUID.startswith(root + ".")


def test_empty_labels_are_an_analysis_error(volume: Volume, result: LungResult) -> None:
    empty = replace(result, labels=np.zeros_like(result.labels))
    with pytest.raises(AnalysisError, match="no lung"):
        write(volume, empty)


def test_missing_lung_keeps_valid_objects(volume: Volume, result: LungResult, tmp_path: Path) -> None:
    """A single lung (say after pneumonectomy): the empty segment stays described, NaNs are left out."""
    labels = np.where(result.labels == 2, 0, result.labels).astype(np.uint8)
    one_lung = replace(
        result, labels=labels, left_volume_ml=0.0, left_mean_density_hu=float("nan"), left_laa950_percent=float("nan")
    )
    seg, sr, *_ = write(volume, one_lung, key_slices=1)
    assert len(seg.SegmentSequence) == 2
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    back = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.datasets],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels, labels)
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    report = hd.sr.srread(tmp_path / "sr.dcm").content
    assert isinstance(report, hd.sr.MeasurementReport)
    numbers = {}
    for group in report.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment is not None and group.referenced_segment.referenced_segment_numbers
        numbers[group.referenced_segment.referenced_segment_numbers[0]] = _numbers(group)
    assert numbers[2] == {CODES.volume.value: 0.0}
    assert len(numbers[1]) == 3


def test_seg_round_trip(written: dict[str, list[Path]], volume: Volume, result: LungResult) -> None:
    seg = hd.seg.segread(written["SEG"][0])
    assert seg.SegmentationType == "BINARY"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.datasets],
        combine_segments=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(labels, result.labels)
    for item, side in zip(seg.SegmentSequence, (CODES.right, CODES.left), strict=True):
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == (CODES.lung.value, "SCT")
        modifier = prop.SegmentedPropertyTypeModifierCodeSequence[0]
        assert modifier.CodeValue == side.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == CODES.anatomical_structure.value
        assert item.SegmentAlgorithmName == PIPELINE_NAME
    assert seg.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == volume.datasets[0].FrameOfReferenceUID


def _numbers(
    group: hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
) -> dict[str, float]:
    return {measurement.name.value: measurement.value for measurement in group.get_measurements()}


def test_sr_holds_the_measurements(written: dict[str, list[Path]], outputs: list[Dataset], result: LungResult) -> None:
    sr = hd.sr.srread(written["SR"][0])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    seg = outputs[0]
    expected = {
        1: (result.right_volume_ml, result.right_mean_density_hu, result.right_laa950_percent),
        2: (result.left_volume_ml, result.left_mean_density_hu, result.left_laa950_percent),
    }
    for group in groups:
        segment = group.referenced_segment
        assert segment is not None
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment.referenced_segment_numbers is not None
        number = segment.referenced_segment_numbers[0]
        values = _numbers(group)
        assert values == pytest.approx(
            {CODES.volume.value: expected[number][0], CODES.attenuation.value: expected[number][1],
             CODES.laa950.value: expected[number][2]}
        )  # fmt: skip
        assert group.get_measurements(name=CODES.volume)[0].unit == CODES.milliliter
        assert group.get_measurements(name=CODES.laa950)[0].unit == CODES.percent
        assert group.get_measurements(name=CODES.attenuation)[0].unit == CODES.hounsfield_unit
    totals = report.get_image_measurement_groups()
    assert len(totals) == 1
    assert _numbers(totals[0]) == pytest.approx(
        {CODES.volume.value: result.total_volume_ml, CODES.attenuation.value: result.mean_density_hu,
         CODES.laa950.value: result.laa950_percent}
    )  # fmt: skip
    for any_group in [*groups, *totals]:
        evaluations = any_group.get_qualitative_evaluations(name=CODES.intended_use)
        assert [e.value for e in evaluations] == [CODES.not_for_diagnostic_use]
        assert CODES.not_for_diagnostic_use.meaning.upper() == NOT_FOR_DIAGNOSTIC_USE
    algorithm = report.get_observer_contexts()[0]
    assert algorithm.observer_type == hd.sr.CodedConcept.from_code(codes.DCM.Device)
    referenced = {item.ReferencedSOPInstanceUID for ev in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in ev.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}  # fmt: skip
    assert seg.SOPInstanceUID in referenced


def test_key_images_have_banner_contours_and_burned_in_flag(
    written: dict[str, list[Path]], volume: Volume, result: LungResult
) -> None:
    width, level = LUNG_WINDOW
    for path in written["SC"]:
        sc = pydicom.dcmread(path)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.PhotometricInterpretation == "RGB"
        pixels = sc.pixel_array
        source_uid = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        index = [ds.SOPInstanceUID for ds in volume.datasets].index(source_uid)
        assert result.labels[index].any()
        banner_rows = pixels.shape[0] - ROWS
        assert banner_rows > 0
        plain = np.clip((volume.hu[index].astype(float) - (level - width / 2)) * 255 / width, 0, 255).astype(np.uint8)
        image = pixels[banner_rows:]
        grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
        # Outside the contours the CT is unchanged; the contours are coloured.
        np.testing.assert_array_equal(image[..., 0][grey], plain[grey])
        assert (~grey).sum() > 20
        banner = pixels[:banner_rows]
        assert banner.std() > 10  # text, not a plain band
        assert (banner[..., 0] != banner[..., 2]).any()  # yellow warning text


def test_key_slices_spread_over_lung(outputs: list[Dataset], volume: Volume) -> None:
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    indices = [uids.index(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in outputs[2:]]
    assert indices == sorted(set(indices))
    assert indices[0] >= 2 and indices[-1] <= SLICES - 3


def test_key_slices_are_the_centres_of_zones_of_equal_lung_volume(volume: Volume, result: LungResult) -> None:
    """Thin lung at both ends (slices 1 and 10), most of it in slices 5 to 7: the key images are there."""
    labels = np.zeros_like(result.labels)
    labels[1:11, 30:32, 30:32] = 1  # 4 voxels a slice
    labels[5:8] = np.where(result.labels[5:8] > 0, result.labels[5:8], labels[5:8])
    outputs = write(volume, replace(result, labels=labels), key_slices=3)
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    indices = [uids.index(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in outputs[2:]]
    area = np.count_nonzero(labels.reshape(SLICES, -1), axis=1)
    cumulative = np.cumsum(area) / area.sum()
    assert indices == [int(np.searchsorted(cumulative, q)) for q in (1 / 6, 3 / 6, 5 / 6)]
    assert indices == [5, 6, 7]
