"""The index: from a header-only read of each stored file to rows per Q/R level.

:func:`read_header` turns a stored file into an :class:`InstanceMeta`, the one
place where DICOM keywords map to our snake_case names (``_TRANSLATION``); it
also keeps the whole header, bulk data left out, in the DICOM JSON model
(:func:`header_json`). :func:`add_instance` writes the rows of one instance in
the caller's transaction and keeps the derived counts correct; a new patient,
study or series keeps that first header in its ``dicom_json``, and every
instance keeps its own. The hot path uses SQLAlchemy Core statements: one
C-STORE costs a handful of indexed lookups and inserts.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from sqlalchemy import Connection, CursorResult, Row, bindparam, func, select, update

from pacsnode.storage.errors import InvalidInstanceError, UnreadableInstanceError
from pacsnode.storage.models import Instance, Patient, Series, Study
from pacsnode.storage.query import pn_search_key
from pacsnode.storage.statements import HotStatement

__all__ = [
    "InstanceMeta",
    "Misfiling",
    "StudySummary",
    "read_header",
    "read_received_header",
    "header_json",
    "add_instance",
    "misfiling",
    "remove_instance",
    "find_instance",
    "KnownSeries",
    "add_to_known_series",
    "StaleSeriesError",
    "list_studies",
    "is_valid_uid",
    "utcnow",
]

logger = logging.getLogger(__name__)

_patients = Patient.__table__
_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__

# DICOM keyword -> (InstanceMeta field, maximum stored length or None for integers)
_TRANSLATION: dict[str, tuple[str, int | None]] = {
    "SpecificCharacterSet": ("specific_character_set", 160),
    "SOPClassUID": ("sop_class_uid", 64),
    "SOPInstanceUID": ("sop_instance_uid", 64),
    "StudyInstanceUID": ("study_instance_uid", 64),
    "SeriesInstanceUID": ("series_instance_uid", 64),
    "PatientID": ("patient_id", 64),
    "PatientName": ("patient_name", 324),
    "PatientBirthDate": ("patient_birth_date", 8),
    "PatientSex": ("patient_sex", 16),
    "StudyDate": ("study_date", 8),
    "StudyTime": ("study_time", 16),
    "AccessionNumber": ("accession_number", 16),
    "StudyID": ("study_id", 16),
    "StudyDescription": ("study_description", 64),
    "ReferringPhysicianName": ("referring_physician_name", 324),
    "Modality": ("modality", 16),
    "SeriesNumber": ("series_number", None),
    "SeriesDescription": ("series_description", 64),
    "BodyPartExamined": ("body_part_examined", 16),
    "InstanceNumber": ("instance_number", None),
}
_UID_CHARS = frozenset("0123456789.")

# What header_json leaves out: binary values, and any element (sequences included) larger than
# this many bytes as stored or characters as JSON. dcmread defers the larger values, unread.
_JSON_VALUE_LIMIT = 4096
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_STRING_NUMBER_VRS = frozenset({"DS", "IS"})


@dataclass(frozen=True, kw_only=True)
class InstanceMeta:
    """What the index keeps of one instance, read from its header."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    specific_character_set: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    instance_number: int | None = None
    # The header in the DICOM JSON model, bulk data left out (header_json); None: not kept.
    dicom_json: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class StudySummary:
    """One line of ``pacsnode studies``."""

    study_instance_uid: str
    patient_id: str
    patient_name: str | None
    study_date: str | None
    study_description: str | None
    accession_number: str | None
    modalities_in_study: str | None
    num_series: int
    num_instances: int


def is_valid_uid(value: str) -> bool:
    """A UID we accept, as received: 1-64 characters of digits and dots, no empty component (PS3.5 9.1).

    Never repaired: a longer value is not cut to 64 characters (two distinct
    UIDs would merge), and a leading, trailing or doubled dot is refused.
    Leading zeros in a component are tolerated: real devices send them and
    refusing their studies would lose data.
    """
    return (
        0 < len(value) <= 64
        and _UID_CHARS.issuperset(value)
        and ".." not in value
        and not value.startswith(".")
        and not value.endswith(".")
    )


def _text(value: Any, limit: int | None) -> str | int | None:
    if value is None:
        return None
    if limit is None:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] if text else None


def read_header(
    path: Path,
    *,
    expected_sop_class_uid: str,
    expected_sop_instance_uid: str,
    transfer_syntax_uid: str,
) -> InstanceMeta:
    """Read the header of a stored file (no pixel data) and check its identity.

    The same read gives the header for ``dicom_json`` (:func:`header_json`); values
    larger than its limit are deferred by dcmread and never loaded.

    Parameters
    ----------
    path
        The file, in the DICOM File Format.
    expected_sop_class_uid, expected_sop_instance_uid
        The Affected SOP Class/Instance UIDs of the C-STORE request: the dataset
        must carry the same values.
    transfer_syntax_uid
        The transfer syntax the dataset is encoded in.

    Raises
    ------
    UnreadableInstanceError
        The bytes do not parse as a DICOM dataset.
    InvalidInstanceError
        A required UID is missing, malformed or differs from the request's.
    """
    try:
        ds: Dataset = dcmread(path, stop_before_pixels=True, defer_size=_JSON_VALUE_LIMIT)
        values = {name: _text(ds.get(keyword), limit) for keyword, (name, limit) in _TRANSLATION.items()}
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError) as exc:
        raise UnreadableInstanceError(f"cannot parse the dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises a wide range on hostile bytes
        raise UnreadableInstanceError(f"cannot parse the dataset: {type(exc).__name__}: {exc}") from exc
    return _checked_meta(
        ds,
        values,
        expected_sop_class_uid=expected_sop_class_uid,
        expected_sop_instance_uid=expected_sop_instance_uid,
        transfer_syntax_uid=transfer_syntax_uid,
    )


_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"})
_TRANSLATED_TAGS = [
    (keyword, BaseTag(tag)) for keyword in _TRANSLATION if (tag := tag_for_keyword(keyword)) is not None
]
# Where dcmread(stop_before_pixels=True) stops: Pixel Data, Float and Double Float Pixel Data.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_TAGS


def read_received_header(
    data: bytes | memoryview,
    *,
    pixel_data_offset: int | None,
    path: Path,
    expected_sop_class_uid: str,
    expected_sop_instance_uid: str,
    transfer_syntax_uid: str,
    top_level_headers: Sequence[tuple[int, int, int, int, bytes]] | None = None,
) -> InstanceMeta:
    """:func:`read_header` from the received dataset bytes (no File Meta), as walked already.

    The same result as :func:`read_header` on ``path`` (the staged file: our File Meta, then
    ``data``), without opening, reading and parsing the file a second time: pydicom reads the
    elements before ``pixel_data_offset`` (from ``check_dataset``) straight from ``data``, values
    larger than the JSON limit skipped unread, never copied. A deflated dataset, or one whose
    indexed attributes are that large, is read from ``path`` instead.

    With ``top_level_headers`` (``check_dataset``'s, of these bytes) the elements are taken from
    where the walk found them (:func:`_header_from_walk`), and pydicom parses only the few that
    its conversion must decide; a dataset that this cannot serve exactly is parsed as a whole.
    """
    checks = {
        "expected_sop_class_uid": expected_sop_class_uid,
        "expected_sop_instance_uid": expected_sop_instance_uid,
        "transfer_syntax_uid": transfer_syntax_uid,
    }
    uid = transfer_syntax_uid.strip(" \x00")
    if uid in _DEFLATED:
        return read_header(path, **checks)
    if top_level_headers is not None and uid != _EXPLICIT_VR_BIG_ENDIAN:
        try:
            meta = _header_from_walk(
                data, top_level_headers, pixel_data_offset, uid == _IMPLICIT_VR_LITTLE_ENDIAN, checks
            )
        except Exception:  # odd bytes the shortcut did not foresee: the whole parse decides, and words any error
            logger.debug("header from the walk failed; parsing the whole header", exc_info=True)
            meta = None
        if meta is not None:
            return meta
    view = memoryview(data)
    if pixel_data_offset is not None:
        view = view[:pixel_data_offset]
    try:
        ds = read_dataset(
            cast(BinaryIO, _ViewReader(view)),
            uid == _IMPLICIT_VR_LITTLE_ENDIAN,
            uid != _EXPLICIT_VR_BIG_ENDIAN,
            stop_when=_at_pixel_data,
            defer_size=_JSON_VALUE_LIMIT,
        )
        for _, tag in _TRANSLATED_TAGS:
            # Typed DataElement by pydicom's overload, but an element not converted yet comes back raw.
            raw: DataElement | RawDataElement | None = ds.get_item(tag, keep_deferred=True) if tag in ds else None
            if isinstance(raw, RawDataElement) and raw.length and _deferred(raw):
                # deferred: only the file can give it (pydicom re-reads a deferred value from its file)
                return read_header(path, **checks)
        values = _translated_values(ds)
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError) as exc:
        raise UnreadableInstanceError(f"cannot parse the dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises a wide range on hostile bytes
        raise UnreadableInstanceError(f"cannot parse the dataset: {type(exc).__name__}: {exc}") from exc
    finally:
        view.release()
    return _checked_meta(ds, values, **checks)


_TRANSLATED_BY_TAG = {int(tag): keyword for keyword, tag in _TRANSLATED_TAGS}
_IDENTITY_FIELDS = ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid")
_SPECIFIC_CHARACTER_SET = 0x00080005
# Elements pydicom reads to decide an ambiguous VR ("US or SS" and the like): a partial parse carries them.
_VR_CONTEXT_TAGS = frozenset({0x00280100, 0x00280103})
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _header_from_walk(
    data: bytes | memoryview,
    elements: Sequence[tuple[int, int, int, int, bytes]],
    pixel_data_offset: int | None,
    implicit: bool,
    checks: dict[str, str],
) -> InstanceMeta | None:
    """The :class:`InstanceMeta` and header JSON of a little-endian dataset from its walked elements.

    Plain values (UIDs, codes, dates, numbers, short texts, integers) are converted from their
    bytes by :func:`_short_value`; the rest (sequences, person names, unusual values) is parsed
    by pydicom from a copy of just those elements, so every value is pydicom's. The result
    equals :func:`read_header`'s. None: not this way (another character set, an indexed value
    over the JSON limit, an identity that does not check out): the caller parses the whole.
    """
    view = memoryview(data)
    end = len(view) if pixel_data_offset is None else pixel_data_offset
    count = len(elements)
    plain_charset = True
    # In tag order: (tag, JSON) of plain values, (tag, None) of those pydicom converts.
    documents: list[tuple[int, dict[str, Any] | None]] = []
    slow: list[tuple[int, int]] = []  # their bytes, header included
    context: list[tuple[int, int]] = []
    for index, (start, tag, value_at, length, code) in enumerate(elements):
        if start >= end:
            break
        stop = elements[index + 1][0] if index + 1 < count else len(view)
        if stop > end:
            stop = end
        if implicit:
            vr = _implicit_vr(tag) if length != _UNDEFINED_LENGTH else None
        else:
            vr = code.decode("ascii")
        group, element = tag >> 16, tag & 0xFFFF
        if tag in _VR_CONTEXT_TAGS or tag == _SPECIFIC_CHARACTER_SET:
            context.append((start, stop))  # decides how pydicom reads the others
        if group & 1 or element == 0 or group == 0x0002:
            continue  # never in the JSON, never indexed
        document: dict[str, Any] | None = None
        if length != _UNDEFINED_LENGTH:
            if length > _JSON_VALUE_LIMIT:
                if tag in _TRANSLATED_BY_TAG:
                    return None  # the whole parse reads it from the file
                continue
            if vr is not None and vr in _BINARY_VRS and vr != "UN" and tag not in _TRANSLATED_BY_TAG:
                continue  # (UN of a known tag: pydicom may read it with the dictionary's VR; an indexed one: its value)
            if vr is not None and vr != "SQ" and " " not in vr and value_at + length == stop:
                document = _short_value(vr, bytes(view[value_at:stop]), plain_charset)
        if tag == _SPECIFIC_CHARACTER_SET:
            items = document.get("Value", []) if document is not None else None
            if (
                items is None
                or len(items) > 1
                or (items and (not isinstance(items[0], str) or items[0].strip() not in _PLAIN_CHARSETS))
            ):
                return None  # another character set (or an odd value): pydicom decodes the whole
        if document is None:
            slow.append((start, stop))
        documents.append((tag, document))
    parsed: Dataset | None = None
    if slow:
        parsed = _parse_elements(view, slow, context, implicit)
        if parsed is None:
            return None
    out: dict[str, Any] = {}
    values: dict[str, str | int | None] = {name: None for name, _ in _TRANSLATION.values()}
    uids: dict[str, str] = {}  # the identifying UIDs as received (the index's values are cut to 64)
    for tag, document in documents:
        keyword = _TRANSLATED_BY_TAG.get(tag)
        if document is None:
            assert parsed is not None
            document = _parsed_json(parsed, tag)
            if keyword is not None:
                name, limit = _TRANSLATION[keyword]
                value = parsed.get(keyword)
                values[name] = _text(value, limit)
                uids[name] = str(value).strip()
        elif keyword is not None:
            name, limit = _TRANSLATION[keyword]
            text = _short_text(document)
            values[name] = _text(text, limit)
            uids[name] = text.strip() if isinstance(text, str) else ""
        if document is not None:
            out[f"{tag:08X}"] = document
    for name in _IDENTITY_FIELDS:
        if not values[name] or not is_valid_uid(uids.get(name, "")):
            return None  # the whole parse gives the precise error
    if values["sop_class_uid"] != checks["expected_sop_class_uid"]:
        return None
    if values["sop_instance_uid"] != checks["expected_sop_instance_uid"]:
        return None
    return InstanceMeta(
        transfer_syntax_uid=checks["transfer_syntax_uid"],
        dicom_json=out,
        **values,  # type: ignore[arg-type]
    )


def _parse_elements(
    view: memoryview, spans: list[tuple[int, int]], context: list[tuple[int, int]], implicit: bool
) -> Dataset | None:
    """pydicom's reading of some elements of a little-endian dataset (``spans``: their bytes), with the
    elements it needs to decide their VRs; None: they do not parse on their own."""
    chosen = sorted(set(spans) | set(context))
    blob = b"".join(view[start:stop] for start, stop in chosen)
    try:
        return read_dataset(cast(BinaryIO, _ViewReader(memoryview(blob))), implicit, True, defer_size=_JSON_VALUE_LIMIT)
    except Exception:  # pydicom raises a wide range on odd bytes; the whole parse decides
        return None


def _parsed_json(ds: Dataset, tag: int) -> dict[str, Any] | None:
    """An element's JSON as :func:`header_json` gives it (None: left out)."""
    base = BaseTag(tag)
    if base not in ds or not _kept(ds, base):
        return None
    try:
        document = _element_json(ds, base)
    except _TooLarge:
        return None
    if document is None:
        return None
    try:
        size = len(json.dumps(document, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError):
        return None
    return document if size <= _JSON_VALUE_LIMIT else None


def _translated_values(ds: Dataset) -> dict[str, str | int | None]:
    """The ``_TRANSLATION`` values of ``ds``, as ``_text(ds.get(keyword))`` gives them.

    A short plain value is taken from its bytes the way :func:`header_json` takes it
    (:func:`_short_value_json`, which gives exactly pydicom's conversion); anything else
    (person names, other character sets) is converted by pydicom.
    """
    plain_charset = _plain_charset(ds)
    values: dict[str, str | int | None] = {}
    for keyword, tag in _TRANSLATED_TAGS:
        name, limit = _TRANSLATION[keyword]
        # Typed DataElement by pydicom's overload, but an element not converted yet comes back raw.
        raw: DataElement | RawDataElement | None = ds.get_item(tag, keep_deferred=True) if tag in ds else None
        short = _short_value_json(raw, plain_charset) if isinstance(raw, RawDataElement) else None
        if short is None:
            values[name] = _text(ds.get(keyword), limit)
        else:
            values[name] = _text(_short_text(short), limit)
    return values


def _deferred(raw: RawDataElement) -> bool:
    """Whether dcmread left the value unread (``defer_size``): it has no bytes."""
    value: object = raw.value
    return value is None


class _ViewReader:
    """A read-only file over a memoryview for pydicom: reads copy only the bytes asked for."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        start = self._pos
        end = len(self._view) if size < 0 else min(len(self._view), start + size)
        self._pos = max(start, end)
        return bytes(self._view[start:end])

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _checked_meta(
    ds: Dataset,
    values: dict[str, str | int | None],
    *,
    expected_sop_class_uid: str,
    expected_sop_instance_uid: str,
    transfer_syntax_uid: str,
) -> InstanceMeta:
    """The :class:`InstanceMeta` of a parsed header, once its identity checks out."""
    identity = ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid")
    if not any(values[name] for name in identity):
        raise UnreadableInstanceError("no identifying attribute could be parsed: not a DICOM dataset")
    for name in identity:
        keyword = _keyword_of(name)
        if not values[name]:
            raise InvalidInstanceError(f"{keyword} missing or empty")
        received = str(ds.get(keyword)).strip()  # as received: the index column would cut it to 64
        if not is_valid_uid(received):
            raise InvalidInstanceError(f"{keyword} not a valid UID: {received[:80]!r}")
    if values["sop_class_uid"] != expected_sop_class_uid:
        raise InvalidInstanceError(
            f"SOPClassUID differs from the request: dataset {values['sop_class_uid']}, "
            f"Affected SOP Class UID {expected_sop_class_uid}"
        )
    if values["sop_instance_uid"] != expected_sop_instance_uid:
        raise InvalidInstanceError(
            f"SOPInstanceUID differs from the request: dataset {values['sop_instance_uid']}, "
            f"Affected SOP Instance UID {expected_sop_instance_uid}"
        )
    return InstanceMeta(
        transfer_syntax_uid=transfer_syntax_uid,
        dicom_json=header_json(ds),
        **values,  # type: ignore[arg-type]
    )


def header_json(ds: Dataset) -> dict[str, Any]:
    """The attributes of a dataset read by :func:`read_header`, in the DICOM JSON model (PS3.18 F.2).

    Left out: group lengths, File Meta Information (group 0002), private
    elements, binary values (OB, OD, OF, OL, OV, OW, UN, also inside sequences),
    and any top-level element, a sequence included, larger than 4 KiB as stored
    or as JSON. Values that dcmread deferred are skipped, so the file is not read
    again. DS and IS values keep the text they were written with (not JSON
    numbers), so an answer gives them back unchanged. An element pydicom cannot
    decode is left out; this never raises for a dataset dcmread accepted.
    """
    out: dict[str, Any] = {}
    plain_charset = _plain_charset(ds)
    for tag in list(ds.keys()):
        if not _kept(ds, tag):
            continue
        # Typed DataElement by pydicom's overload, but an element not converted yet comes back raw.
        raw: DataElement | RawDataElement = ds.get_item(tag, keep_deferred=True)
        short = _short_value_json(raw, plain_charset) if isinstance(raw, RawDataElement) else None
        if short is not None:  # within the limit by construction
            out[f"{tag:08X}"] = short
            continue
        try:
            document = _element_json(ds, tag)
        except _TooLarge:
            continue
        if document is None:
            continue
        try:
            size = len(json.dumps(document, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError):  # NaN or infinity in FL/FD, or a value JSON cannot hold
            continue
        if size <= _JSON_VALUE_LIMIT:
            out[f"{tag:08X}"] = document
    return out


# Text VRs whose values are in the default repertoire whatever the Specific Character Set, and
# which pydicom decodes by splitting and stripping only (DA and TM unless it converts dates).
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "TM", "UI"})
# Text VRs in the dataset's character set: taken the short way only when that set reads ASCII bytes
# as ASCII (_PLAIN_CHARSETS). Multi-valued ones, then one-value texts.
_TEXT_VRS = frozenset({"LO", "SH", "UC"})
_LONG_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_PLAIN_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192"})
_NUMBER_TEXT = {
    "DS": re.compile(r" *[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)? *"),
    "IS": re.compile(r" *[+-]?[0-9]+ *"),
}
_BINARY_INTEGERS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("I", 4), "SL": ("i", 4)}
# A value this long as stored cannot exceed _JSON_VALUE_LIMIT as JSON (a printable ASCII byte
# becomes at most two characters and each text value adds four; a 2-byte integer at most 8).
_SHORT_VALUE = 400


def _plain_charset(ds: Dataset) -> bool:
    """Whether the dataset's Specific Character Set decodes ASCII bytes as ASCII, one set only."""
    try:
        charset = ds.get("SpecificCharacterSet")
    except Exception:  # pydicom raises a wide range on malformed values
        return False
    if charset is None:
        return True
    return isinstance(charset, str) and charset.strip() in _PLAIN_CHARSETS


def _short_value_json(raw: RawDataElement, plain_charset: bool) -> dict[str, Any] | None:
    """The JSON of a short, plain value straight from its bytes, exactly as pydicom's conversion and
    :func:`_element_json` give it; None: take that way.

    Most of a header is such values (UIDs, codes, dates, numbers as text, short texts, small
    integers): converting them through pydicom's data elements costs more than the rest of an
    instance's indexing. Anything unusual (non-ASCII or control characters, an invalid number,
    another character set, an ambiguous VR) goes through pydicom.
    """
    value = raw.value
    if not isinstance(value, bytes):
        return None
    vr = raw.VR
    if vr is None:  # implicit VR: the dictionary's, as pydicom takes it (an unknown or ambiguous one: its way)
        vr = _implicit_vr(raw.tag)
        if vr is None:
            return None
    return _short_value(vr, value, plain_charset, little_endian=raw.is_little_endian)


def _implicit_vr(tag: int) -> str | None:
    """The dictionary VR pydicom gives an implicit-VR element (None: not in the dictionary)."""
    vr = _IMPLICIT_VRS.get(tag, "")
    if vr == "":
        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = None
        if len(_IMPLICIT_VRS) < 4096:
            _IMPLICIT_VRS[tag] = vr
    return vr


_IMPLICIT_VRS: dict[int, str | None] = {}


def _short_value(vr: str, value: bytes, plain_charset: bool, *, little_endian: bool = True) -> dict[str, Any] | None:
    """:func:`_short_value_json` of a value's bytes and its VR."""
    if len(value) > _SHORT_VALUE:
        return None
    integer = _BINARY_INTEGERS.get(vr)
    if integer is not None:
        code, size = integer
        if len(value) % size:
            return None
        if not value:
            return {"vr": vr}
        order = "<" if little_endian else ">"
        return {"vr": vr, "Value": list(struct.unpack(f"{order}{len(value) // size}{code}", value))}
    number = _NUMBER_TEXT.get(vr)
    if number is None and vr not in _ASCII_VRS:
        if not plain_charset or (vr not in _TEXT_VRS and vr not in _LONG_TEXT_VRS and vr != "PN"):
            return None
    elif vr in ("DA", "TM") and pydicom_config.datetime_conversion:
        return None
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        return None
    if vr == "AE":
        if "\x00" in text:
            return None
        items = [item.strip() for item in text.split("\\")]
    elif vr in _TEXT_VRS:
        items = [item.rstrip("\x00 ") for item in text.split("\\")]
    elif vr in _LONG_TEXT_VRS:
        items = [text.rstrip("\x00 ")]
    elif vr == "UI":  # pydicom's UID strips each value's surrounding whitespace
        items = [item.strip() for item in text.rstrip(" \x00").split("\\")]
    else:
        items = text.rstrip(" \x00").split("\\")
    if len(items) == 1 and not items[0]:
        return {"vr": vr}
    if not all(item.isascii() and item.isprintable() for item in items):
        return None
    if number is not None:
        if not all(number.fullmatch(item) for item in items):
            return None
        return {"vr": vr, "Value": [item.strip() for item in items]}
    if vr == "PN":  # each name's component groups, as pydicom's PersonName splits them
        if any(not item or "=" in item for item in items):
            return None  # empty names, ideographic or phonetic groups: pydicom's own rules decide
        return {"vr": vr, "Value": [{"Alphabetic": item} for item in items]}
    return {"vr": vr, "Value": items}


def _short_text(document: dict[str, Any]) -> Any:
    """What ``_text`` takes for an indexed value given as :func:`_short_value` JSON: as pydicom's
    value would give it (a person name as the text it was written as)."""
    items = document.get("Value") or []
    if document.get("vr") == "PN":
        items = [name["Alphabetic"] for name in items]
    return items[0] if len(items) == 1 else items or None


def _kept(ds: Dataset, tag: BaseTag) -> bool:
    """Whether an element may go into the JSON: public, not a group length, not File Meta, read already."""
    if tag.is_private or tag.element == 0 or tag.group == 0x0002:
        return False
    # Typed DataElement by pydicom's overload, but an element not read yet comes back raw.
    raw: DataElement | RawDataElement = ds.get_item(tag, keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF:
        return raw.length <= _JSON_VALUE_LIMIT  # a longer value was deferred: reading it would open the file
    return True


class _TooLarge(Exception):
    """A sequence outgrew the limit while it was converted: the top-level element is left out whole."""


def _element_json(ds: Dataset, tag: BaseTag, budget: int = _JSON_VALUE_LIMIT) -> dict[str, Any] | None:
    """One element in the DICOM JSON model, or None for binary or undecodable values.

    Raises :class:`_TooLarge` when a sequence needs more than ``budget`` characters.
    """
    try:
        element = ds[tag]
        vr = str(element.VR)
        if any(part in _BINARY_VRS for part in vr.split(" or ")):
            return None
        if vr == "SQ":
            return _sequence_json(element, budget)
        if vr in _STRING_NUMBER_VRS:
            return _string_number_json(element)
        document: dict[str, Any] = element.to_json_dict(None, 0)
        return document
    except _TooLarge:
        raise
    except Exception:  # pydicom raises a wide range on malformed values
        return None


def _sequence_json(element: DataElement, budget: int) -> dict[str, Any]:
    """A sequence item by item, given up as soon as it outgrows ``budget`` (a long per-frame
    sequence costs a few items, not all of them)."""
    items: list[dict[str, Any]] = []
    used = 0
    for item in element.value:
        document = _item_json(item, budget - used)
        used += len(json.dumps(document, ensure_ascii=False))
        if used > budget:
            raise _TooLarge
        items.append(document)
    return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}


def _item_json(item: Dataset, budget: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in list(item.keys()):
        if _kept(item, tag):
            document = _element_json(item, tag, budget)
            if document is not None:
                out[f"{tag:08X}"] = document
    return out


def _string_number_json(element: DataElement) -> dict[str, Any]:
    """DS / IS as the strings they were written with: ``80`` stays ``80``, not ``80.0``."""
    if element.is_empty:
        return {"vr": element.VR}
    values = element.value if element.VM > 1 else [element.value]
    return {"vr": element.VR, "Value": [None if v is None or str(v) == "" else str(v).strip() for v in values]}


def _keyword_of(name: str) -> str:
    for keyword, (meta_field, _) in _TRANSLATION.items():
        if meta_field == name:
            return keyword
    return name


def utcnow() -> datetime:
    """Naive UTC, as every timestamp in the index."""
    return datetime.now(UTC).replace(tzinfo=None)


def inserted_id(result: CursorResult[Any]) -> int:
    """The integer primary key of the row a single-row INSERT made."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the INSERT reported no primary key")
    return int(key[0])


# Statements of the hot path, built once: SQLAlchemy memoizes a statement's cache key on the
# object, so executing the same object skips both building it and looking up its compiled form anew.
_FIND_INSTANCE = select(_instances).where(_instances.c.sop_instance_uid == bindparam("uid"))
# Whether the instance is indexed at all: the common answer, no, in one lean statement.
_INSTANCE_INDEXED = HotStatement(select(_instances.c.id).where(_instances.c.sop_instance_uid == bindparam("uid")))
_INSERT_INSTANCE = HotStatement(_instances.insert())


def find_instance(conn: Connection, sop_instance_uid: str) -> Row[Any] | None:
    """Return the instance row for a SOP Instance UID, or ``None``."""
    if _INSTANCE_INDEXED.first(conn, {"uid": sop_instance_uid}) is None:
        return None
    return conn.execute(_FIND_INSTANCE, {"uid": sop_instance_uid}).first()


class Misfiling(enum.Enum):
    """How an instance contradicts the index (:func:`misfiling`); the value is the log action."""

    PATIENT_MISMATCH = "patient-mismatch"
    SERIES_MISMATCH = "series-mismatch"

    @property
    def comment(self) -> str:
        """What is wrong, for an Error Comment and a log line: UIDs' roles only, never a patient's ID or name."""
        if self is Misfiling.PATIENT_MISMATCH:
            return "StudyInstanceUID belongs to another patient"
        return "SeriesInstanceUID belongs to another study"


def misfiling(conn: Connection, meta: InstanceMeta) -> Misfiling | None:
    """Whether the index holds the instance's study under another patient, or its series under another study.

    PatientID is compared as the patients table keys it: as received, an absent
    or empty PatientID being the empty one (so it contradicts a study indexed
    under a PatientID, and the other way round). Call it in the transaction
    that would add the instance: a study keeps its patient and a series its
    study for as long as they exist, so the answer holds until the commit.
    """
    study = conn.execute(
        select(_studies.c.id, _patients.c.patient_id)
        .join(_patients, _patients.c.id == _studies.c.patient_fk)
        .where(_studies.c.study_instance_uid == meta.study_instance_uid)
    ).first()
    if study is not None and study.patient_id != (meta.patient_id or ""):
        return Misfiling.PATIENT_MISMATCH
    series = conn.execute(
        select(_series.c.study_fk).where(_series.c.series_instance_uid == meta.series_instance_uid)
    ).first()
    if series is not None and (study is None or series.study_fk != study.id):
        return Misfiling.SERIES_MISMATCH
    return None


def _log_conflicts(level: str, study_uid: str, row: Row[Any], meta: InstanceMeta, names: tuple[str, ...]) -> None:
    """Log the attributes of ``meta`` that differ from the indexed ``row``: their names, never their values."""
    for name in names:
        new = getattr(meta, name)
        old = getattr(row, name)
        if new is not None and old is not None and new != old:
            logger.warning(
                "%s of study %s: %s differs from the indexed value (kept the indexed value)",
                level,
                study_uid,
                name,
            )


_PATIENT_ATTRIBUTES = ("patient_name", "patient_birth_date", "patient_sex")
_STUDY_ATTRIBUTES = ("study_date", "accession_number", "study_description")


def add_instance(
    conn: Connection,
    meta: InstanceMeta,
    *,
    file_path: str,
    file_size: int,
    sha256: str,
    calling_ae_title: str | None,
    is_result: bool = False,
) -> KnownSeries | None:
    """Insert one instance and its patient/study/series in the caller's transaction.

    The caller has checked that no row for this SOP Instance UID exists, and
    has decided with :func:`misfiling` whether an instance that contradicts
    the index may be added at all. One that is added anyway goes where the
    index already has it: into its series as indexed (and that series' study),
    else into its study as indexed (and that study's patient); no row is made
    for the patient or study it names instead. Counts and ModalitiesInStudy
    are updated in the same transaction. Attribute conflicts with rows
    already indexed are logged and the indexed value kept.
    ``is_result`` marks pacsnode's own analysis results: their series is
    flagged and the study's quiet-time clock (``last_received_at``) is left alone.
    A patient, study or series created here keeps ``meta.dicom_json`` (its first header).

    Returns what :func:`add_to_known_series` needs for the next instance of the series, or
    None when the instance went somewhere other than the study and patient it names.
    """
    now = utcnow()
    series = conn.execute(
        select(_series.c.id, _series.c.study_fk).where(_series.c.series_instance_uid == meta.series_instance_uid)
    ).first()
    study_fk, facts = _study_for(conn, meta, now, indexed_study_fk=None if series is None else int(series.study_fk))
    if series is None:
        series_fk = _insert_series(conn, meta, study_fk, now, is_result)
    else:
        series_fk = series.id
        _count_instance_in_series(conn, series_fk, now)
    _count_instance_in_study(conn, study_fk, now, new_series=series is None, is_result=is_result)
    _insert_instance(
        conn,
        meta,
        series_fk,
        now,
        file_path=file_path,
        file_size=file_size,
        sha256=sha256,
        calling_ae_title=calling_ae_title,
    )
    if facts is None:
        return None
    patient_fk, patient_values, study_values = facts
    return KnownSeries(
        series_instance_uid=meta.series_instance_uid,
        series_id=int(series_fk),
        study_instance_uid=meta.study_instance_uid,
        study_id=study_fk,
        patient_key=meta.patient_id or "",
        patient_id=patient_fk,
        patient_values=patient_values,
        study_values=study_values,
    )


@dataclass(frozen=True, kw_only=True)
class KnownSeries:
    """A series as a committed transaction indexed it: its row ids, its study's and patient's keys,
    and the study and patient attributes as indexed (for the conflict log lines)."""

    series_instance_uid: str
    series_id: int
    study_instance_uid: str
    study_id: int
    patient_key: str
    patient_id: int
    patient_values: tuple[Any, ...]
    study_values: tuple[Any, ...]

    def holds(self, meta: InstanceMeta) -> bool:
        """Whether ``meta`` names this series, its study and its patient (so it is not misfiled)."""
        return (
            meta.series_instance_uid == self.series_instance_uid
            and meta.study_instance_uid == self.study_instance_uid
            and (meta.patient_id or "") == self.patient_key
        )


class StaleSeriesError(Exception):
    """The index no longer holds a :class:`KnownSeries` as remembered (deleted meanwhile, perhaps by
    another process): the caller rolls back and indexes the instance the long way."""


class KnownSeriesCache:
    """Series committed by this process, by SeriesInstanceUID, for :func:`add_to_known_series`.

    Only committed rows go in (:meth:`put` after the commit). An entry is never trusted
    blindly: :func:`add_to_known_series` checks every id against its UID and parent in
    the statements that count the instance, so a series, study or patient deleted by
    another process (or its id reused) costs one rolled-back attempt, never a misfiled row.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._entries: dict[str, KnownSeries] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, series_instance_uid: str) -> KnownSeries | None:
        return self._entries.get(series_instance_uid)

    def put(self, known: KnownSeries) -> None:
        with self._lock:
            if len(self._entries) >= self._limit:
                self._entries.clear()
            self._entries[known.series_instance_uid] = known

    def discard(self, series_instance_uid: str) -> None:
        with self._lock:
            self._entries.pop(series_instance_uid, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# Count one more instance in a known study, only if it still is that study of that patient.
_BUMP_KNOWN_STUDY = HotStatement(
    update(_studies)
    .where(
        _studies.c.id == bindparam("k_study_id"),
        _studies.c.study_instance_uid == bindparam("k_study_uid"),
        _studies.c.patient_fk
        == select(_patients.c.id)
        .where(_patients.c.id == bindparam("k_patient_id"), _patients.c.patient_id == bindparam("k_patient_key"))
        .scalar_subquery(),
    )
    .values(num_instances=_studies.c.num_instances + 1, last_received_at=bindparam("k_now"))
)
# ... and in a known series, only if it still is that series of that study.
_BUMP_KNOWN_SERIES = HotStatement(
    update(_series)
    .where(
        _series.c.id == bindparam("k_series_id"),
        _series.c.series_instance_uid == bindparam("k_series_uid"),
        _series.c.study_fk == bindparam("k_study_id"),
    )
    .values(num_instances=_series.c.num_instances + 1, last_received_at=bindparam("k_now"))
)


def add_to_known_series(
    conn: Connection,
    meta: InstanceMeta,
    known: KnownSeries,
    *,
    file_path: str,
    file_size: int,
    sha256: str,
    calling_ae_title: str | None,
) -> None:
    """:func:`add_instance` for a received instance (not a result) of a series the index holds,
    in three statements: the study and series counts, each checked against the ids, UIDs and
    parents remembered, then the instance row.

    The caller has checked ``known.holds(meta)`` (so the instance is not misfiled) and that no
    row for its SOP Instance UID exists. Raises :class:`StaleSeriesError` when the index no
    longer matches ``known``; the caller must then roll the transaction back. The study is
    counted (and on PostgreSQL locked) before the series, in the order :func:`add_instance` locks them.
    """
    _log_known_conflicts("study", known, known.study_values, meta, _STUDY_ATTRIBUTES)
    _log_known_conflicts("patient", known, known.patient_values, meta, _PATIENT_ATTRIBUTES)
    now = utcnow()
    params = {
        "k_study_id": known.study_id,
        "k_study_uid": known.study_instance_uid,
        "k_patient_id": known.patient_id,
        "k_patient_key": known.patient_key,
        "k_series_id": known.series_id,
        "k_series_uid": known.series_instance_uid,
        "k_now": now,
    }
    if _BUMP_KNOWN_STUDY.execute(conn, params) != 1:
        raise StaleSeriesError(f"study {known.study_instance_uid} changed in the index")
    if _BUMP_KNOWN_SERIES.execute(conn, params) != 1:
        raise StaleSeriesError(f"series {known.series_instance_uid} changed in the index")
    _insert_instance(
        conn,
        meta,
        known.series_id,
        now,
        file_path=file_path,
        file_size=file_size,
        sha256=sha256,
        calling_ae_title=calling_ae_title,
    )


def _log_known_conflicts(
    level: str, known: KnownSeries, indexed: tuple[Any, ...], meta: InstanceMeta, names: tuple[str, ...]
) -> None:
    """:func:`_log_conflicts` against the values a :class:`KnownSeries` remembers."""
    for name, old in zip(names, indexed, strict=True):
        new = getattr(meta, name)
        if new is not None and old is not None and new != old:
            logger.warning(
                "%s of study %s: %s differs from the indexed value (kept the indexed value)",
                level,
                known.study_instance_uid,
                name,
            )


def _patient_for(conn: Connection, meta: InstanceMeta) -> tuple[int, tuple[Any, ...]]:
    """The id of the patient a new study belongs to, inserted when new (its counts start at zero),
    with its attributes as indexed."""
    patient_key = meta.patient_id or ""
    patient = conn.execute(select(_patients).where(_patients.c.patient_id == patient_key)).first()
    if patient is not None:
        _log_conflicts("patient", meta.study_instance_uid, patient, meta, _PATIENT_ATTRIBUTES)
        return int(patient.id), _values(patient, _PATIENT_ATTRIBUTES)
    patient_fk = inserted_id(
        conn.execute(
            _patients.insert().values(
                patient_id=patient_key,
                patient_name=meta.patient_name,
                patient_name_key=pn_search_key(meta.patient_name),
                patient_birth_date=meta.patient_birth_date,
                patient_sex=meta.patient_sex,
                specific_character_set=meta.specific_character_set,
                num_studies=0,
                dicom_json=meta.dicom_json,
            )
        )
    )
    return patient_fk, _values(meta, _PATIENT_ATTRIBUTES)


def _values(row: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in names)


# The patient's id and attributes, then the study's attributes, as indexed.
_StudyFacts = tuple[int, tuple[Any, ...], tuple[Any, ...]]


def _study_for(
    conn: Connection, meta: InstanceMeta, now: datetime, *, indexed_study_fk: int | None
) -> tuple[int, _StudyFacts | None]:
    """The id of the instance's study, locked for the counts; a new study counts for its patient.

    With it, the facts a :class:`KnownSeries` keeps, or None when the study indexed is not
    the one the instance names, or belongs to another patient.

    ``indexed_study_fk``: the study of the instance's series when that is indexed already (the
    instance goes there whatever StudyInstanceUID it names).
    """
    # FOR UPDATE: another writer adding a series to this study waits, so ModalitiesInStudy and the
    # counts see its series (PostgreSQL; SQLite writers are serialised already).
    where = (
        _studies.c.study_instance_uid == meta.study_instance_uid
        if indexed_study_fk is None
        else _studies.c.id == indexed_study_fk
    )
    study = conn.execute(select(_studies).where(where).with_for_update()).first()
    if study is not None:
        facts: _StudyFacts | None = None
        if study.study_instance_uid == meta.study_instance_uid:
            _log_conflicts("study", study.study_instance_uid, study, meta, _STUDY_ATTRIBUTES)
            patient = conn.execute(select(_patients).where(_patients.c.id == study.patient_fk)).one()
            if patient.patient_id == (meta.patient_id or ""):
                _log_conflicts("patient", study.study_instance_uid, patient, meta, _PATIENT_ATTRIBUTES)
                facts = (int(patient.id), _values(patient, _PATIENT_ATTRIBUTES), _values(study, _STUDY_ATTRIBUTES))
        return int(study.id), facts
    patient_fk, patient_values = _patient_for(conn, meta)
    study_fk = inserted_id(
        conn.execute(
            _studies.insert().values(
                patient_fk=patient_fk,
                study_instance_uid=meta.study_instance_uid,
                study_date=meta.study_date,
                study_time=meta.study_time,
                accession_number=meta.accession_number,
                study_id=meta.study_id,
                study_description=meta.study_description,
                referring_physician_name=meta.referring_physician_name,
                referring_physician_name_key=pn_search_key(meta.referring_physician_name),
                specific_character_set=meta.specific_character_set,
                num_series=0,
                num_instances=0,
                created_at=now,
                last_received_at=now,
                dicom_json=meta.dicom_json,
            )
        )
    )
    conn.execute(update(_patients).where(_patients.c.id == patient_fk).values(num_studies=_patients.c.num_studies + 1))
    return study_fk, (patient_fk, patient_values, _values(meta, _STUDY_ATTRIBUTES))


def _insert_series(conn: Connection, meta: InstanceMeta, study_fk: int, now: datetime, is_result: bool) -> int:
    """A new series, holding this one instance."""
    return inserted_id(
        conn.execute(
            _series.insert().values(
                study_fk=study_fk,
                series_instance_uid=meta.series_instance_uid,
                modality=meta.modality,
                series_number=meta.series_number,
                series_description=meta.series_description,
                body_part_examined=meta.body_part_examined,
                num_instances=1,
                last_received_at=now,
                is_result=is_result,
                dicom_json=meta.dicom_json,
            )
        )
    )


def _count_instance_in_series(conn: Connection, series_fk: int, now: datetime) -> None:
    """One more instance in a series indexed already."""
    conn.execute(
        update(_series)
        .where(_series.c.id == series_fk)
        .values(num_instances=_series.c.num_instances + 1, last_received_at=now)
    )


def _count_instance_in_study(
    conn: Connection, study_fk: int, now: datetime, *, new_series: bool, is_result: bool
) -> None:
    """One more instance in the study; a new series also counts and may add to ModalitiesInStudy.

    Results leave the study's quiet-time clock alone.
    """
    values: dict[str, Any] = {"num_instances": _studies.c.num_instances + 1}
    if new_series:
        values["num_series"] = _studies.c.num_series + 1
        values["modalities_in_study"] = _modalities_in_study(conn, study_fk)
    if not is_result:
        values["last_received_at"] = now
    conn.execute(update(_studies).where(_studies.c.id == study_fk).values(**values))


def _modalities_in_study(conn: Connection, study_fk: int) -> str | None:
    """ModalitiesInStudy from the study's series as indexed now: sorted, backslash-separated."""
    modalities = (
        conn.execute(
            select(_series.c.modality)
            .where(_series.c.study_fk == study_fk, _series.c.modality.is_not(None))
            .distinct()
            .order_by(_series.c.modality)
        )
        .scalars()
        .all()
    )
    return "\\".join(modalities) or None


def _insert_instance(
    conn: Connection,
    meta: InstanceMeta,
    series_fk: int,
    now: datetime,
    *,
    file_path: str,
    file_size: int,
    sha256: str,
    calling_ae_title: str | None,
) -> None:
    _INSERT_INSTANCE.execute(
        conn,
        {
            "series_fk": series_fk,
            "sop_instance_uid": meta.sop_instance_uid,
            "sop_class_uid": meta.sop_class_uid,
            "instance_number": meta.instance_number,
            "specific_character_set": meta.specific_character_set,
            "transfer_syntax_uid": meta.transfer_syntax_uid,
            "file_path": file_path,
            "file_size": file_size,
            "sha256": sha256,
            "calling_ae_title": calling_ae_title,
            "received_at": now,
            "dicom_json": meta.dicom_json,
        },
    )


def remove_instance(conn: Connection, row: Row[Any]) -> None:
    """Delete an instance row and undo its share of the derived counts.

    A series, study or patient left empty is deleted too.
    """
    conn.execute(_instances.delete().where(_instances.c.id == row.id))
    series = conn.execute(select(_series).where(_series.c.id == row.series_fk)).one()
    conn.execute(select(_studies.c.id).where(_studies.c.id == series.study_fk).with_for_update())
    if series.num_instances <= 1:
        conn.execute(_series.delete().where(_series.c.id == series.id))
        conn.execute(
            update(_studies)
            .where(_studies.c.id == series.study_fk)
            .values(
                num_series=_studies.c.num_series - 1,
                num_instances=_studies.c.num_instances - 1,
                modalities_in_study=_modalities_in_study(conn, series.study_fk),
            )
        )
    else:
        conn.execute(update(_series).where(_series.c.id == series.id).values(num_instances=_series.c.num_instances - 1))
        conn.execute(
            update(_studies).where(_studies.c.id == series.study_fk).values(num_instances=_studies.c.num_instances - 1)
        )
    study = conn.execute(select(_studies).where(_studies.c.id == series.study_fk)).one()
    if study.num_series <= 0:
        conn.execute(_studies.delete().where(_studies.c.id == study.id))
        conn.execute(
            update(_patients).where(_patients.c.id == study.patient_fk).values(num_studies=_patients.c.num_studies - 1)
        )
        patient = conn.execute(select(_patients.c.num_studies).where(_patients.c.id == study.patient_fk)).one()
        if patient.num_studies <= 0:
            conn.execute(_patients.delete().where(_patients.c.id == study.patient_fk))


def list_studies(conn: Connection) -> list[StudySummary]:
    """Every indexed study with its patient, newest study date first."""
    rows = conn.execute(
        select(
            _studies.c.study_instance_uid,
            _patients.c.patient_id,
            _patients.c.patient_name,
            _studies.c.study_date,
            _studies.c.study_description,
            _studies.c.accession_number,
            _studies.c.modalities_in_study,
            _studies.c.num_series,
            _studies.c.num_instances,
        )
        .join(_patients, _patients.c.id == _studies.c.patient_fk)
        .order_by(_studies.c.study_date.desc(), _studies.c.id)
    ).all()
    return [StudySummary(**row._asdict()) for row in rows]


def count_rows(conn: Connection) -> dict[str, int]:
    """Row counts per table (for checks and tests)."""
    return {
        table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
        for table in (_patients, _studies, _series, _instances)
    }
