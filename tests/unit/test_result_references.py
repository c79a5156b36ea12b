"""Results of a source whose Referenced Study Sequence is incomplete, as real archives hold them.

highdicom copies the source's General Study module into the SEG and the SR. An
item without a Referenced SOP Class UID (de-identified or scanner data) would make
the result invalid, so such items are dropped and complete ones kept.
"""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pacsnode.analysis.results.core import drop_incomplete_study_references
from tests.support.lung_outputs import SEG_SOP_CLASS, SR_SOP_CLASS, make_result, make_volume, write

STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management SOP Class


def _reference(*, with_class: bool, uid: str) -> Dataset:
    item = Dataset()
    if with_class:
        item.ReferencedSOPClassUID = STUDY_MANAGEMENT
    item.ReferencedSOPInstanceUID = uid
    return item


@pytest.mark.parametrize(
    ("items", "kept"),
    [
        ([False], None),  # the real chest CT's case: one item, no class UID
        ([True, False], ["1.2.3.1"]),
        ([True], ["1.2.3.1"]),
    ],
)
def test_seg_and_sr_keep_only_complete_study_references(items: list[bool], kept: list[str] | None) -> None:
    volume = make_volume()
    for ds in volume.datasets:
        ds.ReferencedStudySequence = [_reference(with_class=c, uid=f"1.2.3.{i + 1}") for i, c in enumerate(items)]
    outputs = {str(ds.SOPClassUID): ds for ds in write(volume, make_result(volume))}
    for sop_class in (SEG_SOP_CLASS, SR_SOP_CLASS):
        result = outputs[sop_class]
        if kept is None:
            assert "ReferencedStudySequence" not in result
        else:
            assert [str(item.ReferencedSOPInstanceUID) for item in result.ReferencedStudySequence] == kept
            assert all(item.ReferencedSOPClassUID == STUDY_MANAGEMENT for item in result.ReferencedStudySequence)


def test_a_dataset_without_the_sequence_is_left_alone() -> None:
    ds = Dataset()
    ds.PatientID = "P1"
    drop_incomplete_study_references(ds)
    assert list(ds.keys()) == [0x00100020]
