"""Tests of a rule's ``match``: SOP class keywords become UIDs (from pydicom's UID dictionary); study and
series descriptions and the protocol name are regular expressions searched case-insensitively."""

from __future__ import annotations

from datetime import datetime

import pytest

from pacsnode.analysis.routing import series_matches
from pacsnode.analysis.settings import Rule, RuleMatch
from pacsnode.storage.activity import SeriesFacts


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


# -- descriptions and protocol: regular expressions searched case-insensitively ----------------------


def _facts(**values: object) -> SeriesFacts:
    defaults: dict[str, object] = {
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.4",
        "patient_id": "P1",
        "modality": "CT",
        "body_part_examined": None,
        "series_description": "5mm",
        "study_description": "Chest",
        "protocol_name": "2 Chest C-/Thorax",
        "num_instances": 64,
        "sop_class_uids": frozenset({"1.2.840.10008.5.1.4.1.1.2"}),
        "calling_ae_titles": frozenset({"CT1"}),
        "last_received_at": datetime(2024, 1, 1),
        "sample_file": "x",
    }
    return SeriesFacts(**{**defaults, **values})  # type: ignore[arg-type]


def _matches(facts: SeriesFacts, **match: object) -> bool:
    rule = Rule.model_validate({"name": "r", "pipeline": "ct-lung", "match": match})
    return series_matches(rule, facts, lambda _facts: None)


@pytest.mark.parametrize("key", ["study_description", "series_description", "protocol_name"])
def test_description_and_protocol_patterns_are_searched_case_insensitively(key: str) -> None:
    facts = _facts(study_description="CT CHEST W/O", series_description="Lung 1.0 B70f", protocol_name="Thorax^Routine")
    assert _matches(facts, **{key: "chest|lung|thorax"})
    assert _matches(facts, **{key: "(?i)CHEST|LUNG|THORAX"})
    assert not _matches(facts, **{key: "abdomen|head"})
    assert not _matches(facts, **{key: "^chest$|^lung$|^thorax$"})  # searched, but anchors still anchor
    # A series without the value does not match a pattern that needs text; an empty pattern matches it.
    assert not _matches(_facts(**{key: None}), **{key: "chest|lung|thorax"})
    assert _matches(_facts(**{key: None}), **{key: ""})


def test_every_given_pattern_must_hold() -> None:
    facts = _facts()  # the real chest CT's values: study "Chest", series "5mm", protocol "2 Chest C-/Thorax"
    assert _matches(facts, study_description="^chest$", series_description="mm$", protocol_name="thorax")
    assert not _matches(facts, study_description="^chest$", series_description="lung", protocol_name="thorax")
    assert not _matches(facts, study_description="^abdomen", protocol_name="thorax")


@pytest.mark.parametrize("key", ["study_description", "protocol_name"])
def test_a_bad_pattern_is_refused_when_the_config_loads(key: str) -> None:
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RuleMatch.model_validate({key: "chest("})


def test_anatomy_is_not_a_header_condition() -> None:
    # Decided by the pipeline on the decoded images: routing queues the series whatever its header says.
    assert _matches(_facts(body_part_examined="HEAD", study_description="Head"), anatomy="chest")
    assert not _matches(_facts(body_part_examined="HEAD"), anatomy="chest", body_part=["CHEST"])
