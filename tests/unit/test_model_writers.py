"""Tests of pacsnode.analysis.cnn.writers: SEG, SR and key images of CNN model outputs on the synthetic chest phantom."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pacsnode.analysis.cnn.writers import (
    MODEL_CODES,
    Finding,
    write_segmentation_results,
)
from pacsnode.analysis.errors import AnalysisError
from pacsnode.analysis.results.core import CODES, NOT_FOR_DIAGNOSTIC_USE
from pacsnode.analysis.types import Volume
from tests.support.cnn_outputs import (
    LABELS,
    MASS,
    NODULE,
    PIPELINE,
    SC_SOP_CLASS,
    SCORES,
    SEG_SOP_CLASS,
    SIZE,
    SLICES,
    SR_SOP_CLASS,
    make_findings,
    make_volume,
    save,
    write_cls,
    write_seg,
)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return make_volume(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def findings(volume: Volume) -> tuple[Finding, ...]:
    return make_findings(volume)


@pytest.fixture(scope="module")
def outputs(volume: Volume, findings: tuple[Finding, ...]) -> list[Dataset]:
    return write_seg(volume, findings)


@pytest.fixture(scope="module")
def files(outputs: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save(outputs, tmp_path_factory.mktemp("seg"))


def read_report(path: Path) -> hd.sr.MeasurementReport:
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def texts(group: Any, name: Code) -> list[str]:
    return [item.TextValue for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == name.value]  # fmt: skip


def presence(group: Any, concept: Code) -> list[Code]:
    return [evaluation.value for evaluation in group.get_qualitative_evaluations(name=concept)]


def uids_of(outputs: list[Dataset]) -> list[tuple[str, str]]:
    return [(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in outputs]


# --- segmentation results -----------------------------------------------------------------------


def test_seg_sr_and_key_images_in_new_series_of_the_study(outputs: list[Dataset], volume: Volume) -> None:
    source = volume.datasets[0]
    assert [ds.SOPClassUID for ds in outputs] == [SEG_SOP_CLASS, SR_SOP_CLASS, SC_SOP_CLASS, SC_SOP_CLASS]
    assert [ds.SeriesNumber for ds in outputs] == [9101, 9102, 9103, 9103]
    assert [ds.InstanceNumber for ds in outputs] == [1, 1, 1, 2]
    assert len({ds.SeriesInstanceUID for ds in outputs}) == 3
    assert source.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in outputs}
    for ds, kind in zip(outputs, ("SEG", "SR", "SC", "SC"), strict=True):
        assert ds.SeriesDescription == f"nodule-cnn 0.3.1 {kind} - {NOT_FOR_DIAGNOSTIC_USE}"
        assert ds.ManufacturerModelName == "nodule-cnn"
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyID"):
            assert str(ds[keyword].value) == str(source[keyword].value), (kind, keyword)


def test_seg_has_a_segment_per_finding_with_its_voxels(
    files: list[Path], volume: Volume, findings: tuple[Finding, ...]
) -> None:
    seg = hd.seg.segread(files[0])
    assert seg.SegmentationType == "BINARY"
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["nodule 1", "nodule 2"]
    for item in seg.SegmentSequence:
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == NODULE.type.value
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == NODULE.category.value
        assert item.SegmentAlgorithmName == "unet-nodule"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "2024.1"
        assert item.AnatomicRegionSequence[0].CodeValue == codes.SCT.Lung.value
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.datasets],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    assert pixels.shape == (*volume.hu.shape, 2)
    for k, finding in enumerate(findings):
        np.testing.assert_array_equal(pixels[..., k].astype(bool), finding.mask)


def test_overlapping_masks_keep_each_segment(volume: Volume, findings: tuple[Finding, ...], tmp_path: Path) -> None:
    bigger = replace(findings[0], number=3, mask=np.roll(findings[0].mask, 1, axis=2) | findings[0].mask)
    seg = write_seg(volume, [findings[0], bigger], max_key_images=0)[0]
    seg.save_as(tmp_path / "seg.dcm", enforce_file_format=True)
    pixels = hd.seg.segread(tmp_path / "seg.dcm").get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.datasets], segment_numbers=[1, 2]
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), findings[0].mask)
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), bigger.mask)


def test_sr_has_the_measurements_of_each_finding(
    files: list[Path], outputs: list[Dataset], findings: tuple[Finding, ...]
) -> None:
    report = read_report(files[1])
    groups = report.get_volumetric_roi_measurement_groups()
    assert [str(group.tracking_identifier) for group in groups] == ["nodule 1", "nodule 2"]
    for group, finding, item in zip(groups, findings, outputs[0].SegmentSequence, strict=True):
        assert group.tracking_uid == item.TrackingUID  # the same finding in the SEG and the SR
        segment = group.referenced_segment
        assert segment is not None
        assert segment.referenced_sop_instance_uid == outputs[0].SOPInstanceUID
        assert segment.referenced_segment_numbers == [item.SegmentNumber]
        values = {m.name.value: (m.value, m.unit) for m in group.get_measurements()}
        assert values == {
            MODEL_CODES.volume.value: (pytest.approx(finding.volume_ml), MODEL_CODES.milliliter),
            MODEL_CODES.long_axis.value: (pytest.approx(finding.longest_diameter_mm), MODEL_CODES.millimeter),
            MODEL_CODES.probability.value: (pytest.approx(finding.probability), MODEL_CODES.no_units),
        }
        assert group.finding_type == NODULE.type
        assert presence(group, NODULE.type) == [MODEL_CODES.present]
        assert presence(group, CODES.intended_use) == [CODES.not_for_diagnostic_use]
        site = group.finding_sites[0]
        assert site.value == codes.SCT.Lung
        assert site.laterality == finding.laterality
        [location] = texts(group, MODEL_CODES.location)
        assert location.startswith(finding.location + "; centroid x ")
        # Source images: the slices that hold the finding.
        sources = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in group[0].ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeMeaning == "Source Image for Segmentation"}  # fmt: skip
        assert len(sources) == int(finding.mask.any(axis=(1, 2)).sum())
    # The label without findings is reported absent.
    [mass] = report.get_image_measurement_groups()
    assert str(mass.tracking_identifier) == "mass"
    assert presence(mass, MASS.type) == [MODEL_CODES.absent]
    assert texts(mass, MODEL_CODES.comment) == ["No mass detected"]


def test_key_images_show_the_largest_finding_first(
    files: list[Path], volume: Volume, findings: tuple[Finding, ...]
) -> None:
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    for path, finding in zip(files[2:], (findings[1], findings[0]), strict=True):
        sc = pydicom.dcmread(path)
        assert sc.BurnedInAnnotation == "YES"
        assert sc.ImageLaterality == ("R" if finding.laterality == codes.cid244.Right else "L")
        index = uids.index(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert index == round(finding.centroid_index[0])
        pixels = sc.pixel_array
        image = pixels[pixels.shape[0] - SIZE :]
        red = (image[..., 0] == 255) & (image[..., 1] == 0) & (image[..., 2] == 0)
        rows, columns = np.nonzero(red)
        assert len(rows) > 8  # the contour, in the label's colour, around the finding
        assert abs(rows.mean() - finding.centroid_index[1]) < 2 and abs(columns.mean() - finding.centroid_index[2]) < 2
        assert pixels[: pixels.shape[0] - SIZE].std() > 10  # a banner with text


def test_max_key_images(volume: Volume, findings: tuple[Finding, ...]) -> None:
    outputs = write_seg(volume, findings, max_key_images=1)
    assert [ds.SOPClassUID for ds in outputs] == [SEG_SOP_CLASS, SR_SOP_CLASS, SC_SOP_CLASS]
    assert write_seg(volume, findings, max_key_images=0)[-1].SOPClassUID == SR_SOP_CLASS


def test_uids_are_deterministic(volume: Volume, findings: tuple[Finding, ...], outputs: list[Dataset]) -> None:
    again = write_seg(volume, tuple(reversed(findings)))  # the order of the findings does not matter
    assert uids_of(again) == uids_of(outputs)
    tracking = [[item.TrackingUID for item in ds.SegmentSequence] for ds in (again[0], outputs[0])]
    assert tracking[0] == tracking[1]
    other_version = {uid for pair in uids_of(write_seg(volume, findings, pipeline_version="0.4")) for uid in pair}
    assert not other_version & {uid for pair in uids_of(outputs) for uid in pair}
    classification = uids_of(write_cls(volume))
    assert classification == uids_of(write_cls(volume))
    assert not {uid for pair in classification for uid in pair} & {uid for pair in uids_of(outputs) for uid in pair}


def test_no_findings_gives_an_sr_and_one_key_image(volume: Volume, tmp_path: Path) -> None:
    sr, sc = write_seg(volume, [])
    assert (sr.SOPClassUID, sc.SOPClassUID) == (SR_SOP_CLASS, SC_SOP_CLASS)
    assert (sr.SeriesNumber, sc.SeriesNumber) == (9102, 9103)
    paths = save([sr, sc], tmp_path)
    report = read_report(paths[0])
    assert not report.get_volumetric_roi_measurement_groups()
    groups = report.get_image_measurement_groups()
    assert [str(group.tracking_identifier) for group in groups] == ["nodule", "mass"]
    for group, label in zip(groups, LABELS, strict=True):
        assert presence(group, label.type) == [MODEL_CODES.absent]
        assert texts(group, MODEL_CODES.comment) == [f"No {label.name} detected"]
    index = [ds.SOPInstanceUID for ds in volume.datasets].index(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
    assert index == SLICES // 2


# --- classification results ---------------------------------------------------------------------


def test_classification_sr_and_key_image(volume: Volume, tmp_path: Path) -> None:
    outputs = write_cls(volume, key_slice=7)
    assert [ds.SOPClassUID for ds in outputs] == [SR_SOP_CLASS, SC_SOP_CLASS]
    assert [ds.SeriesNumber for ds in outputs] == [9102, 9103]
    sr_path, sc_path = save(outputs, tmp_path)
    groups = read_report(sr_path).get_image_measurement_groups()
    assert [str(group.tracking_identifier) for group in groups] == ["nodule", "mass"]
    for group, score, expected in zip(groups, SCORES, (MODEL_CODES.present, MODEL_CODES.absent), strict=True):
        assert group.finding_type == score.code
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values == {MODEL_CODES.probability.value: pytest.approx(score.probability),
                          MODEL_CODES.threshold.value: pytest.approx(score.threshold)}  # fmt: skip
        assert presence(group, score.code) == [expected]
    sc = pydicom.dcmread(sc_path)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == volume.datasets[7].SOPInstanceUID
    banner = sc.pixel_array[: sc.Rows - SIZE]
    assert banner.shape[0] > 0 and banner.std() > 10
    default = write_cls(volume)[1]
    assert default.SourceImageSequence[0].ReferencedSOPInstanceUID == volume.datasets[SLICES // 2].SOPInstanceUID


# --- bad inputs ---------------------------------------------------------------------------------


def _bad_findings(findings: tuple[Finding, ...]) -> dict[str, tuple[list[Finding], str]]:
    first, second = findings
    other = replace(NODULE, name="tumour")
    return {
        "mask shape": ([replace(first, mask=first.mask[:-1])], "mask shape"),
        "empty mask": ([replace(first, mask=np.zeros_like(first.mask))], "empty"),
        "probability": ([replace(first, probability=1.5)], "outside 0..1"),
        "nan probability": ([replace(first, probability=float("nan"))], "outside 0..1"),
        "duplicate number": ([first, replace(second, number=1)], "unique"),
        "unknown label": ([replace(first, label=other)], "not one of the model's labels"),
        "laterality without site": ([replace(first, finding_site=None)], "laterality needs a finding site"),
        "negative volume": ([replace(first, volume_ml=-1.0)], "volume"),
        "model finding without probability": ([replace(first, probability=None)], "needs its probability"),
    }


@pytest.mark.parametrize(
    "case",
    ["mask shape", "empty mask", "probability", "nan probability", "duplicate number", "unknown label",
     "laterality without site", "negative volume", "model finding without probability"],
)  # fmt: skip
def test_inconsistent_findings_are_analysis_errors(case: str, volume: Volume, findings: tuple[Finding, ...]) -> None:
    bad, message = _bad_findings(findings)[case]
    with pytest.raises(AnalysisError, match=message):
        write_seg(volume, bad)


def test_bad_labels_scores_and_options(volume: Volume, findings: tuple[Finding, ...]) -> None:
    with pytest.raises(AnalysisError, match="unique"):
        write_segmentation_results(volume, [], [NODULE, replace(MASS, value=1)], **PIPELINE)
    with pytest.raises(AnalysisError, match="no labels"):
        write_segmentation_results(volume, [], [], **PIPELINE)
    with pytest.raises(AnalysisError, match="outside 0..1"):
        write_cls(volume, [replace(SCORES[0], probability=-0.1)])
    with pytest.raises(AnalysisError, match="threshold"):
        write_cls(volume, [replace(SCORES[0], threshold=2.0)])
    with pytest.raises(AnalysisError, match="unique"):
        write_cls(volume, [SCORES[0], SCORES[0]])
    with pytest.raises(AnalysisError, match="at least one score"):
        write_cls(volume, [])
    with pytest.raises(AnalysisError, match="key_slice"):
        write_cls(volume, key_slice=SLICES)
    with pytest.raises(TypeError, match="unknown equipment options: colour"):
        write_seg(volume, findings, colour="red")
    with pytest.raises(ValueError, match="max_key_images"):
        write_seg(volume, findings, max_key_images=-1)


def test_equipment_options_are_used(volume: Volume) -> None:
    sr, sc = write_cls(volume, manufacturer="Acme AI", software_version="9.9", procedure_reported=CODES.procedure)
    assert sr.Manufacturer == sc.Manufacturer == "Acme AI"
    assert sr.SoftwareVersions == "9.9"
    procedure = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == CODES.procedure.value


def test_a_finding_of_an_image_rule_has_no_probability_and_names_its_source(
    volume: Volume, findings: tuple[Finding, ...], tmp_path: Path
) -> None:
    mass = replace(findings[0], probability=None, source="image rule", kind="mass")
    paths = save(write_seg(volume, [mass], max_key_images=1), tmp_path)
    (group,) = read_report(paths[1]).get_volumetric_roi_measurement_groups()
    names = {m.name.value for m in group.get_measurements()}
    assert MODEL_CODES.probability.value not in names and MODEL_CODES.long_axis.value in names
    assert texts(group, MODEL_CODES.source) == ["image rule"]
    # A finding of the model names no source: it has its probability.
    model = read_report(save(write_seg(volume, [findings[0]], max_key_images=1), tmp_path / "model")[1])
    (group,) = model.get_volumetric_roi_measurement_groups()
    assert texts(group, MODEL_CODES.source) == []
    assert MODEL_CODES.probability.value in {m.name.value for m in group.get_measurements()}


def test_the_key_image_line_gives_the_probability_of_model_findings_only(findings: tuple[Finding, ...]) -> None:
    from pacsnode.analysis.cnn.writers import finding_line

    model = replace(findings[0], kind="nodule", probability=0.93, extent_mm=12.0)
    assert finding_line(model).startswith(f"nodule {model.number}: long axis ")
    assert finding_line(model).endswith(", p=0.93") and ", 3D 12.0 mm," in finding_line(model)
    mass = replace(model, kind="mass", probability=None, source="image rule")
    assert finding_line(mass).startswith(f"mass {mass.number} (image rule): long axis ")
    assert "p=" not in finding_line(mass)
