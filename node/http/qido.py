"""QIDO-RS (PS3.18 10.6): a search's query parameters become a C-FIND identifier, answered by ``storage.query``.

The identifier goes through :func:`pacsnode.storage.query.parse_find` exactly as a relational
Study Root C-FIND does, so matching is the same for both (single values, ``*``/``?`` wildcards,
DA/TM ranges, UID lists, case-insensitive Person Names when ``query.case_insensitive_names``;
no fuzzy matching). The answer keys are the defaults of PS3.18 Table 10.6.3-3/4/5 for the
level (plus the levels above it in the all-series and all-instances forms), the keys matched
on, and ``includefield``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

from pacsnode.storage.query import FindQuery, Level, Model, QueryError, parse_find

__all__ = [
    "QidoError",
    "QidoRequest",
    "answer_json",
    "parse_qido",
]


class QidoError(ValueError):
    """A search request that cannot be answered (400 Bad Request)."""


_STUDY_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_SERIES_KEYS = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
_INSTANCE_KEYS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
# Answered by the node, not the index.
_NODE_KEYS = frozenset({"RetrieveURL", "InstanceAvailability", "QueryRetrieveLevel", "SpecificCharacterSet"})
_CONTROL = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
_TAG_HEX = re.compile(r"^[0-9A-Fa-f]{8}$")


@dataclass(frozen=True, kw_only=True)
class QidoRequest:
    """A parsed search: the identifier, its parsed query, paging, and what the answers carry."""

    identifier: Dataset
    query: FindQuery
    offset: int
    limit: int | None
    fuzzy_ignored: bool
    include_all: bool


def _tag(attribute: str) -> BaseTag:
    if _TAG_HEX.match(attribute):
        return BaseTag(int(attribute, 16))
    tag = tag_for_keyword(attribute)
    if tag is None:
        raise QidoError(f"{attribute!r} is neither a DICOM keyword nor a tag (8 hex digits)")
    return BaseTag(tag)


def _vr(tag: BaseTag) -> str:
    try:
        return str(dictionary_VR(tag)).split(" or ")[0]
    except KeyError:
        raise QidoError(f"{tag} is not in the DICOM dictionary") from None


def _non_negative(name: str, raw: str) -> int:
    if not re.fullmatch(r"\d{1,9}", raw.strip()):
        raise QidoError(f"{name} must be a non-negative integer, got {raw[:32]!r}")
    return int(raw)


def _default_keys(level: Level, scope: Level) -> tuple[str, ...]:
    """The level's own defaults, plus those of each level between it and the resource searched in."""
    keys: list[str] = []
    if scope.depth <= Level.STUDY.depth:  # e.g. /series or /instances: the study's keys as well
        keys.extend(_STUDY_KEYS)
    if level.depth >= Level.SERIES.depth:
        if level is Level.SERIES or scope.depth <= Level.SERIES.depth:
            keys.extend(_SERIES_KEYS)
    if level is Level.IMAGE:
        keys.extend(_INSTANCE_KEYS)
    if level is Level.STUDY:
        keys = list(_STUDY_KEYS)
    return tuple(keys)


def parse_qido(
    params: Sequence[tuple[str, str]],
    *,
    level: Level,
    scope: Level,
    study_uid: str | None = None,
    series_uid: str | None = None,
    case_insensitive_names: bool = True,
) -> QidoRequest:
    """Turn a search's query parameters into a parsed C-FIND.

    Parameters
    ----------
    params
        The query string's (name, value) pairs, repeats included.
    level
        What is searched for (STUDY, SERIES or IMAGE).
    scope
        The resource searched in: STUDY for ``/studies/{s}/series``, PATIENT (none) for ``/series``.
    study_uid, series_uid
        From the path.

    Raises
    ------
    QidoError
        An unknown attribute, a bad control parameter, or a value ``storage.query`` refuses.
    """
    includes: list[str] = []
    matches: dict[BaseTag, list[str]] = {}
    offset, limit, fuzzy = 0, None, False
    for name, value in params:
        lowered = name.lower()
        if lowered == "includefield":
            includes.extend(part.strip() for part in value.split(",") if part.strip())
        elif lowered == "limit":
            limit = _non_negative("limit", value)
        elif lowered == "offset":
            offset = _non_negative("offset", value)
        elif lowered == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
        elif "." in name:
            raise QidoError(f"{name!r}: matching on sequence items is not supported")
        else:
            matches.setdefault(_tag(name), []).append(value)
    include_all = any(item.lower() == "all" for item in includes)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level.value
    for keyword in _default_keys(level, scope):
        identifier.add_new(_tag(keyword), _vr(_tag(keyword)), None)
    for item in includes:
        if item.lower() == "all":
            continue
        tag = _tag(item)
        if keyword_for_tag(tag) not in _NODE_KEYS and tag not in identifier:
            identifier.add_new(tag, _vr(tag), None)
    for tag, values in matches.items():
        identifier[tag] = _matching_element(tag, values)
    if study_uid is not None:
        identifier.StudyInstanceUID = study_uid
    if series_uid is not None:
        identifier.SeriesInstanceUID = series_uid
    try:
        query = parse_find(identifier, Model.STUDY_ROOT, relational=True, case_insensitive_names=case_insensitive_names)
    except QueryError as exc:
        raise QidoError(str(exc)) from exc
    return QidoRequest(
        identifier=identifier, query=query, offset=offset, limit=limit, fuzzy_ignored=fuzzy, include_all=include_all
    )


def _matching_element(tag: BaseTag, values: list[str]) -> DataElement:
    vr = _vr(tag)
    if keyword_for_tag(tag) in _NODE_KEYS:
        raise QidoError(f"{keyword_for_tag(tag)} cannot be matched")
    if vr == "SQ":
        raise QidoError(f"{keyword_for_tag(tag) or tag}: matching on a sequence is not supported")
    items: list[str] = []
    for value in values:
        # A list of UIDs or codes may be written with commas (PS3.18 8.3.4.1) or backslashes.
        parts = re.split(r"[,\\]", value) if vr in ("UI", "CS") else value.split("\\")
        items.extend(part.strip() for part in parts)
    items = [item for item in items if item]
    if not items:
        return DataElement(tag, vr, None)
    return DataElement(tag, vr, items[0] if len(items) == 1 else items)


def _retrieve_url(root: str, row: Mapping[str, Any], level: Level) -> str:
    study = row.get("StudyInstanceUID")
    url = f"{root}/studies/{study}"
    if level.depth >= Level.SERIES.depth:
        url += f"/series/{row.get('SeriesInstanceUID')}"
    if level is Level.IMAGE:
        url += f"/instances/{row.get('SOPInstanceUID')}"
    return url


_NUMBER_VRS = frozenset({"IS", "DS", "SL", "SS", "UL", "US", "FL", "FD", "SV", "UV"})


def _json_number(vr: str, value: Any) -> Any:
    if isinstance(value, int | float):
        return value
    text = str(value).strip()
    try:
        return int(text) if vr in ("IS", "SL", "SS", "UL", "US", "SV", "UV") else float(text)
    except ValueError:
        return text


def _pn_json(value: str) -> dict[str, str]:
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), str(value).split("="), strict=False))
    return {k: v for k, v in groups.items() if v}


def _json_attribute(vr: str, value: Any) -> dict[str, Any]:
    """One attribute in the DICOM JSON model (PS3.18 F.2) from an index column's value."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    values = value if isinstance(value, list | tuple) else [value]
    if vr == "PN":
        items: list[Any] = [_pn_json(v) for v in values]
    elif vr in _NUMBER_VRS:
        items = [_json_number(vr, v) for v in values]
    else:
        items = [str(v) for v in values]
    return {"vr": vr, "Value": items}


def answer_json(request: QidoRequest, row: Mapping[str, Any], *, root: str) -> dict[str, Any]:
    """One match as a DICOM JSON object: the identifier's keys from the row, plus the node's own.

    Index columns are written straight into the JSON model; keys answered from the stored header
    (a :class:`~pydicom.dataelem.DataElement`) go through pydicom's own JSON conversion.
    """
    level = request.query.level
    document: dict[str, Any] = {}
    for element in request.identifier:
        keyword = element.keyword
        if keyword in _NODE_KEYS or element.tag.element == 0:
            continue
        value = row.get(keyword)
        key = f"{element.tag:08X}"
        if isinstance(value, DataElement):
            document[key] = value.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1 << 20)
        else:
            document[key] = _json_attribute(element.VR, value)
    document["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
    if "StudyInstanceUID" in row and (level is Level.STUDY or "SeriesInstanceUID" in row):
        document["00081190"] = {"vr": "UR", "Value": [_retrieve_url(root, row, level)]}
    return dict(sorted(document.items()))
