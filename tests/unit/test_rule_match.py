"""Tests of a rule's ``match.sop_class``: keywords become UIDs, from pydicom's UID dictionary."""

from __future__ import annotations

import pytest

from pacsnode.analysis.settings import RuleMatch


@pytest.mark.parametrize(
    ("keyword", "uid"),
    [
        ("CTImageStorage", "1.2.840.10008.5.1.4.1.1.2"),
        ("SegmentationStorage", "1.2.840.10008.5.1.4.1.1.66.4"),
        ("EnhancedCTImageStorage", "1.2.840.10008.5.1.4.1.1.2.1"),
        # Newer than pydicom 3.0's dictionary: pacsnode lists it itself.
        ("LabelMapSegmentationStorage", "1.2.840.10008.5.1.4.1.1.66.7"),
    ],
)
def test_sop_class_keywords_become_uids(keyword: str, uid: str) -> None:
    assert RuleMatch(sop_class=[keyword, "1.2.840.10008.5.1.4.1.1.4"]).sop_class == [uid, "1.2.840.10008.5.1.4.1.1.4"]


@pytest.mark.parametrize("keyword", ["CTImage", "ExplicitVRLittleEndian", "DICOMApplicationContext"])
def test_keywords_that_are_not_sop_classes_are_refused(keyword: str) -> None:
    with pytest.raises(ValueError, match=f"unknown SOP class '{keyword}'"):
        RuleMatch(sop_class=[keyword])
