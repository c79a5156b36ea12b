"""Query translation: a C-FIND / C-MOVE / C-GET identifier becomes one SQL statement.

Matching follows PS3.4 C.2.2.2: universal (empty value), single value, wildcard
(``*`` and ``?``), range for DA/TM (open on either side, and the combined
date-time range of C.2.2.2.5.1 when negotiated), list of UIDs, and Person Name
matching that ignores case (configurable) and trailing empty components.
Everything is done by the database: rows are never loaded into Python to be
filtered, and the number of matches is capped with ``LIMIT``.

Return keys without a column of their own (PatientAge, ProtocolName, ContentDate
...) are answered from the ``dicom_json`` of the query level's row: the header
of the patient's, study's or series' first instance, or the instance's own.
Such keys are returned but not matched: a value in one makes the identifier
partly unsupported (reported in :attr:`FindQuery.unsupported`).

This module knows DICOM keywords and SQL; it knows nothing of DIMSE statuses.
:class:`IdentifierError` and :class:`QueryValueError` tell the caller which
kind of failure it is (PS3.4 C.4.1.1.4: 0xA900 and 0xC000).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag
from sqlalchemy import (
    ColumnElement,
    Connection,
    FromClause,
    and_,
    exists,
    func,
    literal,
    or_,
    select,
    true,
)

from pacsnode.storage.errors import StorageError
from pacsnode.storage.models import Instance, Patient, Series, Study

__all__ = [
    "FindQuery",
    "IdentifierError",
    "InstanceLocation",
    "Level",
    "Model",
    "QueryError",
    "QueryValueError",
    "TooManyMatchesError",
    "element_from_json",
    "find",
    "find_page",
    "locate",
    "parse_find",
    "parse_retrieve",
    "pn_search_key",
]

_patients = Patient.__table__
_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__


class QueryError(StorageError):
    """An identifier pacsnode cannot answer."""


class IdentifierError(QueryError):
    """The identifier's structure is wrong for the model (PS3.4: 0xA900)."""


class QueryValueError(QueryError):
    """A key holds a value that cannot be matched (PS3.4: 0xC000, unable to process)."""


class TooManyMatchesError(QueryError):
    """More matches than the configured cap (PS3.4: 0xA700, out of resources)."""


class Level(str, enum.Enum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}


class Model(str, enum.Enum):
    """The Query/Retrieve information model of the presentation context."""

    PATIENT_ROOT = "patient"
    STUDY_ROOT = "study"

    @property
    def levels(self) -> tuple[Level, ...]:
        if self is Model.PATIENT_ROOT:
            return (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE)
        return (Level.STUDY, Level.SERIES, Level.IMAGE)


_UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}


class _Kind(enum.Enum):
    TEXT = "text"  # LO, SH, CS ...: single value, wildcard, list
    PN = "pn"
    UID = "uid"
    DATE = "date"
    TIME = "time"
    INT = "int"
    DERIVED = "derived"  # counts: returned, never matched
    MODALITIES = "modalities"  # ModalitiesInStudy: matched through the study's series


@dataclass(frozen=True)
class _Attribute:
    level: Level
    kind: _Kind
    column: Any = None  # a table column, or a builder for derived values
    search_column: Any = None  # PN: the folded search key


def _patient_related(column_name: str) -> Any:
    return (
        select(func.coalesce(func.sum(_studies.c[column_name]), 0))
        .where(_studies.c.patient_fk == _patients.c.id)
        .scalar_subquery()
    )


_ATTRIBUTES: dict[str, _Attribute] = {
    # patient level
    "PatientName": _Attribute(Level.PATIENT, _Kind.PN, _patients.c.patient_name, _patients.c.patient_name_key),
    "PatientID": _Attribute(Level.PATIENT, _Kind.TEXT, _patients.c.patient_id),
    "PatientBirthDate": _Attribute(Level.PATIENT, _Kind.DATE, _patients.c.patient_birth_date),
    "PatientSex": _Attribute(Level.PATIENT, _Kind.TEXT, _patients.c.patient_sex),
    "NumberOfPatientRelatedStudies": _Attribute(Level.PATIENT, _Kind.DERIVED, _patients.c.num_studies),
    "NumberOfPatientRelatedSeries": _Attribute(Level.PATIENT, _Kind.DERIVED, "num_series"),
    "NumberOfPatientRelatedInstances": _Attribute(Level.PATIENT, _Kind.DERIVED, "num_instances"),
    # study level
    "StudyInstanceUID": _Attribute(Level.STUDY, _Kind.UID, _studies.c.study_instance_uid),
    "StudyDate": _Attribute(Level.STUDY, _Kind.DATE, _studies.c.study_date),
    "StudyTime": _Attribute(Level.STUDY, _Kind.TIME, _studies.c.study_time),
    "AccessionNumber": _Attribute(Level.STUDY, _Kind.TEXT, _studies.c.accession_number),
    "StudyID": _Attribute(Level.STUDY, _Kind.TEXT, _studies.c.study_id),
    "StudyDescription": _Attribute(Level.STUDY, _Kind.TEXT, _studies.c.study_description),
    "ReferringPhysicianName": _Attribute(
        Level.STUDY, _Kind.PN, _studies.c.referring_physician_name, _studies.c.referring_physician_name_key
    ),
    "ModalitiesInStudy": _Attribute(Level.STUDY, _Kind.MODALITIES, _studies.c.modalities_in_study),
    "NumberOfStudyRelatedSeries": _Attribute(Level.STUDY, _Kind.DERIVED, _studies.c.num_series),
    "NumberOfStudyRelatedInstances": _Attribute(Level.STUDY, _Kind.DERIVED, _studies.c.num_instances),
    # series level
    "SeriesInstanceUID": _Attribute(Level.SERIES, _Kind.UID, _series.c.series_instance_uid),
    "Modality": _Attribute(Level.SERIES, _Kind.TEXT, _series.c.modality),
    "SeriesNumber": _Attribute(Level.SERIES, _Kind.INT, _series.c.series_number),
    "SeriesDescription": _Attribute(Level.SERIES, _Kind.TEXT, _series.c.series_description),
    "BodyPartExamined": _Attribute(Level.SERIES, _Kind.TEXT, _series.c.body_part_examined),
    "NumberOfSeriesRelatedInstances": _Attribute(Level.SERIES, _Kind.DERIVED, _series.c.num_instances),
    # image level
    "SOPInstanceUID": _Attribute(Level.IMAGE, _Kind.UID, _instances.c.sop_instance_uid),
    "SOPClassUID": _Attribute(Level.IMAGE, _Kind.UID, _instances.c.sop_class_uid),
    "InstanceNumber": _Attribute(Level.IMAGE, _Kind.INT, _instances.c.instance_number),
    "AvailableTransferSyntaxUID": _Attribute(Level.IMAGE, _Kind.UID, _instances.c.transfer_syntax_uid),
}

# Keys answered by the caller, not by the index.
_HANDLED_ELSEWHERE = frozenset(
    {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability"}
)
# Derived from a study's instances (PS3.4 C.6.1.1.3), never in a header: not supported.
_NOT_IN_HEADERS = frozenset({"SOPClassesInStudy", "AnatomicRegionsInStudyCodeSequence"})

_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_WILDCARDS = frozenset("*?")


def _level_of(keyword: str, model: Model) -> Level | None:
    attribute = _ATTRIBUTES.get(keyword)
    if attribute is None:
        return None
    if model is Model.STUDY_ROOT and attribute.level is Level.PATIENT:
        return Level.STUDY  # in the Study Root model patient attributes belong to the study
    return attribute.level


# -- values -------------------------------------------------------------------------------------


def _pn_alphabetic(value: str) -> str:
    """The alphabetic component group, without padding and empty trailing components."""
    components = [part.strip() for part in value.split("=", 1)[0].split("^")]
    while components and not components[-1]:
        components.pop()
    return "^".join(components)


def pn_search_key(value: str | None) -> str | None:
    """The folded form of a Person Name that case-insensitive matching compares.

    Only the alphabetic component group is kept (ideographic and phonetic groups
    follow ``=``); empty trailing components and padding are dropped, so
    ``Doe^John^^^`` and ``DOE^JOHN`` fold alike. Wildcards pass through.
    """
    if value is None:
        return None
    return _pn_alphabetic(value).casefold() or None


def _values(raw: Any) -> list[str]:
    """The element's value as a list of strings ([] for an empty, universal key)."""
    if raw is None:
        return []
    if isinstance(raw, MultiValue | list | tuple):
        items = [str(v) for v in raw]
    else:
        text = str(raw)
        items = text.split("\\") if "\\" in text else [text]
    return [item.strip() for item in items if item.strip()]


def _has_wildcard(value: str) -> bool:
    return not _WILDCARDS.isdisjoint(value)


def _wildcard_condition(column: ColumnElement[Any], pattern: str, dialect: str) -> ColumnElement[bool]:
    """``*`` any run, ``?`` one character; case-sensitive on every dialect."""
    if pattern.strip("*") == "":
        return column.is_not(None) if pattern else true()
    prefix = re.split(r"[*?]", pattern, maxsplit=1)[0]
    if dialect == "sqlite":
        # GLOB is case-sensitive and uses the column's index for a literal prefix.
        glob = pattern.replace("[", "[[]")
        return column.op("GLOB")(glob)
    if dialect == "postgresql":
        # Byte order for the prefix range: under ICU or national collations 'doe^john' < 'doe_' is false.
        column = column.collate("C")
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    like = escaped.replace("*", "%").replace("?", "_")
    condition: ColumnElement[bool] = column.like(like, escape="\\")
    if prefix:  # lets a B-tree index narrow the scan on databases that do not do it for LIKE
        condition = and_(column >= prefix, column < prefix[:-1] + chr(ord(prefix[-1]) + 1), condition)
    return condition


def _split_range(value: str) -> tuple[str, str] | None:
    if "-" not in value:
        return None
    low, _, high = value.partition("-")
    return low.strip(), high.strip()


def _check_date(keyword: str, value: str) -> str:
    if not _DATE.match(value):
        raise QueryValueError(f"{keyword}: {value!r} is not a date (YYYYMMDD) or a date range")
    return value


def _check_time(keyword: str, value: str) -> str:
    if not _TIME.match(value):
        raise QueryValueError(f"{keyword}: {value!r} is not a time (HHMMSS.FFFFFF) or a time range")
    return value


@dataclass(frozen=True)
class _Condition:
    keyword: str
    values: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class FindQuery:
    """A parsed C-FIND identifier."""

    model: Model
    level: Level
    return_keys: tuple[str, ...]  # with the keys answered from the level's dicom_json
    conditions: tuple[_Condition, ...]
    unsupported: tuple[str, ...] = ()  # keys neither matched nor returned, or returned but not matched
    combined_datetime: bool = False
    case_insensitive_names: bool = True


@dataclass(frozen=True, kw_only=True)
class InstanceLocation:
    """Where one matched instance is, for a retrieve."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    file_path: str


# -- parsing ------------------------------------------------------------------------------------


def _parse_level(identifier: Dataset, model: Model) -> Level:
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not raw:
        raise IdentifierError("Query/Retrieve Level (0008,0052) is missing")
    try:
        level = Level(raw)
    except ValueError:
        raise IdentifierError(f"unknown Query/Retrieve Level {raw!r}") from None
    if level not in model.levels:
        raise IdentifierError(f"level {level.value} is not in the {model.value} root information model")
    return level


def _element_values(identifier: Dataset, keyword: str) -> list[str]:
    return _values_of(identifier[keyword])


def _values_of(element: DataElement) -> list[str]:
    value = element.value
    if element.VR == "PN":
        if isinstance(value, MultiValue | list):
            return [str(v) for v in value if str(v)]
        return [str(value)] if value is not None and str(value) != "" else []
    return _values(value)


def _in_headers(element: DataElement) -> bool:
    """A key without a column that a stored header can answer: public, outside group 0002."""
    return (
        bool(element.keyword)
        and element.tag.group > 0x0002
        and not element.tag.is_private
        and element.keyword not in _NOT_IN_HEADERS
    )


def _is_universal(element: DataElement) -> bool:
    """An empty value (PS3.4 C.2.2.2.3); a sequence: no item holds a value."""
    if element.VR == "SQ":
        return all(_is_universal(sub) for item in element.value or () for sub in item)
    return not _values_of(element)


def _check_unique_keys_above(identifier: Dataset, model: Model, level: Level) -> None:
    for upper in model.levels:
        if upper.depth >= level.depth:
            break
        keyword = _UNIQUE_KEY[upper]
        values = _element_values(identifier, keyword) if keyword in identifier else []
        if len(values) != 1 or _has_wildcard(values[0]):
            raise IdentifierError(
                f"hierarchical query at {level.value} level needs one {keyword} (unique key of {upper.value})"
            )


def parse_find(
    identifier: Dataset,
    model: Model,
    *,
    relational: bool = False,
    combined_datetime: bool = False,
    case_insensitive_names: bool = True,
) -> FindQuery:
    """Parse a C-FIND identifier; raise :class:`IdentifierError` / :class:`QueryValueError`."""
    level = _parse_level(identifier, model)
    if not relational:
        _check_unique_keys_above(identifier, model, level)
    return_keys: list[str] = []
    conditions: list[_Condition] = []
    unsupported: list[str] = []
    for element in identifier:
        keyword = element.keyword
        if element.tag.element == 0 or keyword in _HANDLED_ELSEWHERE:
            continue
        attr_level = _level_of(keyword, model) if keyword else None
        if attr_level is None:
            if _in_headers(element):
                return_keys.append(keyword)  # from the level's dicom_json
                if not _is_universal(element):
                    unsupported.append(keyword)  # returned, but not matched
            else:
                unsupported.append(keyword or str(element.tag))
            continue
        if attr_level.depth > level.depth:
            continue  # a key below the query level: neither matched nor returned
        return_keys.append(keyword)
        if element.VR == "SQ":
            continue
        values = _element_values(identifier, keyword)
        if values:
            _validate(keyword, values)
            conditions.append(_Condition(keyword, tuple(values)))
    return FindQuery(
        model=model,
        level=level,
        return_keys=tuple(return_keys),
        conditions=tuple(conditions),
        unsupported=tuple(unsupported),
        combined_datetime=combined_datetime,
        case_insensitive_names=case_insensitive_names,
    )


def parse_retrieve(identifier: Dataset, model: Model) -> FindQuery:
    """Parse a C-MOVE / C-GET identifier: the level and its unique keys (lists allowed at the level)."""
    level = _parse_level(identifier, model)
    conditions: list[_Condition] = []
    for upper in model.levels:
        if upper.depth > level.depth:
            break
        keyword = _UNIQUE_KEY[upper]
        values = _element_values(identifier, keyword) if keyword in identifier else []
        if upper is level and not values:
            raise IdentifierError(f"retrieve at {level.value} level needs {keyword}")
        if values:
            if any(_has_wildcard(v) for v in values):
                raise IdentifierError(f"{keyword} may not hold wildcards in a retrieve")
            _validate(keyword, values)
            conditions.append(_Condition(keyword, tuple(values)))
    return FindQuery(model=model, level=level, return_keys=(), conditions=tuple(conditions))


def _validate(keyword: str, values: Sequence[str]) -> None:
    kind = _ATTRIBUTES[keyword].kind
    if kind is _Kind.UID:
        for value in values:
            if _has_wildcard(value) or not re.fullmatch(r"[0-9.]{1,64}", value):
                raise QueryValueError(f"{keyword}: {value[:64]!r} is not a UID")
    elif kind is _Kind.DATE or kind is _Kind.TIME:
        check = _check_date if kind is _Kind.DATE else _check_time
        if len(values) != 1:
            raise QueryValueError(f"{keyword}: a list of values cannot be matched")
        bounds = _split_range(values[0])
        if bounds is None:
            check(keyword, values[0])
        else:
            if not bounds[0] and not bounds[1]:
                raise QueryValueError(f"{keyword}: {values[0]!r} is an empty range")
            for bound in bounds:
                if bound:
                    check(keyword, bound)
    elif kind is _Kind.INT:
        for value in values:
            if not re.fullmatch(r"[+-]?\d{1,10}", value):
                raise QueryValueError(f"{keyword}: {value[:32]!r} is not an integer")


# -- SQL ----------------------------------------------------------------------------------------

_TABLES = {Level.PATIENT: _patients, Level.STUDY: _studies, Level.SERIES: _series, Level.IMAGE: _instances}


def _from_clause(level: Level) -> FromClause:
    clause: FromClause = _patients
    if level.depth >= 1:
        clause = clause.join(_studies, _studies.c.patient_fk == _patients.c.id)
    if level.depth >= 2:
        clause = clause.join(_series, _series.c.study_fk == _studies.c.id)
    if level.depth >= 3:
        clause = clause.join(_instances, _instances.c.series_fk == _series.c.id)
    return clause


def _text_condition(column: Any, values: Sequence[str], dialect: str) -> ColumnElement[bool]:
    parts: list[ColumnElement[bool]] = []
    exact = [v for v in values if not _has_wildcard(v)]
    if len(exact) == 1:
        parts.append(column == exact[0])
    elif exact:
        parts.append(column.in_(exact))
    parts.extend(_wildcard_condition(column, v, dialect) for v in values if _has_wildcard(v))
    return or_(*parts) if len(parts) > 1 else parts[0]


def _pn_condition(attribute: _Attribute, values: Sequence[str], query: FindQuery, dialect: str) -> ColumnElement[bool]:
    parts: list[ColumnElement[bool]] = []
    for value in values:
        if query.case_insensitive_names:
            key = pn_search_key(value) or ""
            column = attribute.search_column
        else:
            key = _pn_alphabetic(value)
            column = attribute.column
        if _has_wildcard(key):
            parts.append(_wildcard_condition(column, key, dialect))
        else:
            parts.append(column == key)
    return or_(*parts) if len(parts) > 1 else parts[0]


def _range_condition(column: ColumnElement[Any], value: str, *, is_time: bool) -> ColumnElement[bool]:
    bounds = _split_range(value)
    if bounds is None:
        return column == value
    low, high = bounds
    parts: list[ColumnElement[bool]] = [column.is_not(None), column != ""]
    if low:
        parts.append(column >= low)
    if high:
        # An inclusive upper time bound: 1015 also covers 10:15:30 (compare the same number of digits).
        parts.append(func.substr(column, 1, len(high)) <= high if is_time else column <= high)
    return and_(*parts)


def _combined_datetime_condition(date_value: str, time_value: str) -> ColumnElement[bool] | None:
    """PS3.4 C.2.2.2.5.1: StudyDate and StudyTime ranges read as one date-time range."""
    date_bounds, time_bounds = _split_range(date_value), _split_range(time_value)
    if date_bounds is None or time_bounds is None:
        return None
    date, time = _studies.c.study_date, func.coalesce(_studies.c.study_time, "")
    parts: list[ColumnElement[bool]] = [date.is_not(None)]
    (date_low, date_high), (time_low, time_high) = date_bounds, time_bounds
    if date_low:
        parts.append(or_(date > date_low, and_(date == date_low, time >= (time_low or ""))))
    if date_high:
        high_time = func.substr(time, 1, len(time_high)) <= time_high if time_high else true()
        parts.append(or_(date < date_high, and_(date == date_high, high_time)))
    return and_(*parts)


def _conditions(query: FindQuery, dialect: str) -> list[ColumnElement[bool]]:
    out: list[ColumnElement[bool]] = []
    by_keyword = {c.keyword: c for c in query.conditions}
    combined = None
    if query.combined_datetime and "StudyDate" in by_keyword and "StudyTime" in by_keyword:
        combined = _combined_datetime_condition(by_keyword["StudyDate"].values[0], by_keyword["StudyTime"].values[0])
        if combined is not None:
            out.append(combined)
    for condition in query.conditions:
        if combined is not None and condition.keyword in ("StudyDate", "StudyTime"):
            continue
        attribute = _ATTRIBUTES[condition.keyword]
        values = condition.values
        match attribute.kind:
            case _Kind.PN:
                out.append(_pn_condition(attribute, values, query, dialect))
            case _Kind.UID:
                out.append(attribute.column.in_(values) if len(values) > 1 else attribute.column == values[0])
            case _Kind.DATE:
                out.append(_range_condition(attribute.column, values[0], is_time=False))
            case _Kind.TIME:
                out.append(_range_condition(attribute.column, values[0], is_time=True))
            case _Kind.INT:
                numbers = [int(v) for v in values]
                out.append(attribute.column.in_(numbers) if len(numbers) > 1 else attribute.column == numbers[0])
            case _Kind.TEXT:
                out.append(_text_condition(attribute.column, values, dialect))
            case _Kind.MODALITIES:
                out.append(
                    exists(
                        select(literal(1))
                        .select_from(_series)
                        .where(
                            _series.c.study_fk == _studies.c.id, _text_condition(_series.c.modality, values, dialect)
                        )
                    )
                )
            case _Kind.DERIVED:
                continue  # counts are returned, not matched (reported as unsupported for matching)
    return out


def _select_column(keyword: str, level: Level) -> Any:
    attribute = _ATTRIBUTES.get(keyword)
    if attribute is None:  # no column: the element of the level's dicom_json (NULL when absent)
        return _TABLES[level].c.dicom_json[_json_key(keyword)].label(keyword)
    if isinstance(attribute.column, str):  # a sum over the patient's studies
        return _patient_related(attribute.column).label(keyword)
    return attribute.column.label(keyword)


def _tag_of(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise QueryError(f"{keyword} is not a DICOM keyword")
    return BaseTag(tag)


def _json_key(keyword: str) -> str:
    """The key of an attribute in the DICOM JSON model: its tag in 8 upper-case hex digits."""
    return f"{_tag_of(keyword):08X}"


def element_from_json(tag: int, document: Any) -> DataElement | None:
    """A data element from its DICOM JSON model form as ``dicom_json`` keeps it; None if there is none.

    The element gets the VR it was stored with. DS and IS come back as the text
    they were written with (``80`` stays ``80``), which is why pydicom's
    ``Dataset.from_json`` (it turns them into numbers) is not used.
    """
    if not isinstance(document, dict) or not isinstance(document.get("vr"), str):
        return None
    vr = document["vr"].split(" or ")[0]  # an ambiguous VR pydicom could not resolve: its first reading
    values = document.get("Value") or []
    try:
        if vr == "SQ":
            return DataElement(tag, vr, DicomSequence([_item_from_json(item) for item in values]))
        if vr == "PN":
            values = [_person_name(v) for v in values]
        elif vr == "AT":
            values = [int(v, 16) for v in values if v]
        values = ["" if v is None else v for v in values]
        if not values:
            return DataElement(tag, vr, None)
        return DataElement(tag, vr, values[0] if len(values) == 1 else values)
    except (TypeError, ValueError, AttributeError):  # not as pacsnode writes it: answered empty
        return None


def _item_from_json(document: Any) -> Dataset:
    item = Dataset()
    for key, value in (document or {}).items():
        element = element_from_json(int(key, 16), value)
        if element is not None:
            item.add(element)
    return item


def _person_name(groups: Any) -> str:
    """``Alphabetic=Ideographic=Phonetic``, empty trailing groups dropped."""
    if not isinstance(groups, dict):
        return ""
    parts = [str(groups.get(name) or "") for name in ("Alphabetic", "Ideographic", "Phonetic")]
    while parts and not parts[-1]:
        parts.pop()
    return "=".join(parts)


def find(conn: Connection, query: FindQuery, *, limit: int | None) -> list[dict[str, Any]]:
    """Run a parsed C-FIND: one dict (keyword -> value or None) per matching entity.

    A key without a column maps to a :class:`~pydicom.dataelem.DataElement` with
    the stored VR, or to None where the entity's header does not hold it.

    Raises :class:`TooManyMatchesError` when more than ``limit`` entities match.
    """
    rows = _find_rows(conn, query, fetch=None if limit is None else limit + 1, offset=0)
    if limit is not None and len(rows) > limit:
        raise TooManyMatchesError(f"more than {limit} matches; narrow the query")
    return _decoded(query, rows)


def find_page(conn: Connection, query: FindQuery, *, offset: int, count: int) -> tuple[list[dict[str, Any]], bool]:
    """One page of a find (QIDO-RS ``offset`` and ``limit``), in the same order as :func:`find`.

    Returns the rows (as :func:`find` does) and whether more matches follow the page.
    """
    rows = _find_rows(conn, query, fetch=count + 1, offset=offset)
    more = len(rows) > count
    return _decoded(query, rows[:count]), more


def _find_keys(query: FindQuery) -> list[str]:
    return list(dict.fromkeys([*query.return_keys, _UNIQUE_KEY[query.level]]))


def _find_rows(conn: Connection, query: FindQuery, *, fetch: int | None, offset: int) -> list[dict[str, Any]]:
    dialect = conn.dialect.name
    table = _TABLES[query.level]
    statement = (
        select(*(_select_column(k, query.level) for k in _find_keys(query)))
        .select_from(_from_clause(query.level))
        .where(*_conditions(query, dialect))
        .order_by(table.c.id)
    )
    if fetch is not None:
        statement = statement.limit(fetch)
    if offset:
        statement = statement.offset(offset)
    return [dict(row._mapping) for row in conn.execute(statement)]


def _decoded(query: FindQuery, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = _find_keys(query)
    if "ModalitiesInStudy" in keys:
        for row in rows:
            value = row.get("ModalitiesInStudy")
            row["ModalitiesInStudy"] = value.split("\\") if value else None
    for keyword in (k for k in keys if k not in _ATTRIBUTES):
        tag = _tag_of(keyword)
        for row in rows:
            row[keyword] = element_from_json(tag, row[keyword])
    return rows


def locate(conn: Connection, query: FindQuery, *, limit: int | None = None) -> list[InstanceLocation]:
    """The instances a retrieve identifier selects, in series and instance order."""
    statement = (
        select(
            _instances.c.sop_class_uid,
            _instances.c.sop_instance_uid,
            _instances.c.transfer_syntax_uid,
            _instances.c.file_path,
        )
        .select_from(_from_clause(Level.IMAGE))
        .where(*_conditions(query, conn.dialect.name))
        .order_by(_series.c.id, _instances.c.instance_number, _instances.c.id)
    )
    if limit is not None:
        statement = statement.limit(limit + 1)
    rows = conn.execute(statement).all()
    if limit is not None and len(rows) > limit:
        raise TooManyMatchesError(f"more than {limit} instances match; retrieve less at once")
    return [
        InstanceLocation(
            sop_class_uid=row.sop_class_uid,
            sop_instance_uid=row.sop_instance_uid,
            transfer_syntax_uid=row.transfer_syntax_uid,
            file_path=row.file_path,
        )
        for row in rows
    ]
