"""STOW-RS (PS3.18 10.5): a multipart/related body of Part 10 files, stored through the C-STORE path.

The body is parsed as it arrives (python-multipart's streaming parser); each part goes to a
file in the store's ``tmp/`` and then through :meth:`StoreService.store_file`, the checks,
durability order, duplicate and patient-mismatch policies and statuses of a C-STORE. So a
STOW-RS upload is indexed, scheduled and analysed exactly like a pushed instance. The answer is
the PS3.18 Store Instances Response: ReferencedSOPSequence for what was stored, FailedSOPSequence
with the C-STORE status as FailureReason for what was not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from python_multipart.multipart import MultipartParser, parse_options_header

from pacsnode.node.dicom import status
from pacsnode.node.dicom.handlers import StoreService

__all__ = ["StowError", "StowParts", "StowResult", "parse_content_type", "store_parts"]

logger = logging.getLogger(__name__)


class StowError(ValueError):
    """A request that is not a STOW-RS body at all (400, or 415 for the media type)."""

    def __init__(self, message: str, *, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


def parse_content_type(header: str) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` request."""
    media, params = parse_options_header(header)
    if media.lower() != b"multipart/related":
        raise StowError(f"STOW-RS takes multipart/related, not {media.decode('latin-1')!r}", http_status=415)
    inner = params.get(b"type", b"application/dicom").lower()
    if inner != b"application/dicom":
        raise StowError(f"only application/dicom parts are stored, not {inner.decode('latin-1')!r}", http_status=415)
    boundary = params.get(b"boundary")
    if not boundary:
        raise StowError("multipart/related without a boundary")
    return boundary


@dataclass
class _Part:
    path: Path
    content_type: str = ""


@dataclass
class StowParts:
    """Receives a STOW-RS body chunk by chunk, one temporary file per part (in ``tmp_dir``)."""

    boundary: bytes
    tmp_dir: Path
    max_bytes: int
    parts: list[_Part] = field(default_factory=list)
    received: int = 0

    def __post_init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[str, str] = {}
        self._parser = MultipartParser(
            self.boundary,
            {
                "on_part_begin": self._begin,
                "on_part_data": self._data,
                "on_part_end": self._end,
                "on_header_field": self._field,
                "on_header_value": self._value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
            },
        )

    def _begin(self) -> None:
        self._headers = {}
        fd, name = tempfile.mkstemp(prefix="stow-", suffix=".part", dir=self.tmp_dir)
        self._file = os.fdopen(fd, "wb")
        self.parts.append(_Part(Path(name)))

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").strip().lower()] = self._header_value.decode("latin-1")
        self._header_field = self._header_value = b""

    def _headers_done(self) -> None:
        self.parts[-1].content_type = self._headers.get("content-type", "application/dicom").strip()

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._file is not None
        self._file.write(data[start:end])

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise StowError(f"the request body exceeds http.max_stow_bytes ({self.max_bytes})", http_status=413)
        try:
            self._parser.write(chunk)
        except StowError:
            raise
        except Exception as exc:  # python-multipart's MultipartParseError and friends
            raise StowError(f"malformed multipart body: {exc}") from exc

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except Exception as exc:
            raise StowError(f"malformed multipart body: {exc}") from exc
        if self._file is not None:  # the body ended inside a part
            self._end()
            raise StowError("the multipart body ends inside a part")

    def discard(self) -> None:
        self._end()
        for part in self.parts:
            part.path.unlink(missing_ok=True)


@dataclass
class StowResult:
    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP Class UID, SOP Instance UID)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)  # (..., status, comment)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self, study_url: str | None, instance_url: Any) -> dict[str, Any]:
        """The Store Instances Response Module (PS3.18 Table 10.5.3-1) as DICOM JSON."""
        ds = Dataset()
        if study_url:
            ds.RetrieveURL = study_url
        if self.stored:
            ds.ReferencedSOPSequence = [_referenced(c, i, instance_url(i)) for c, i in self.stored]
        if self.failed:
            ds.FailedSOPSequence = [_failed(c, i, code) for c, i, code, _ in self.failed]
        document: dict[str, Any] = ds.to_json_dict()
        return document


def _referenced(sop_class_uid: str, sop_instance_uid: str, url: str | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    if url:
        item.RetrieveURL = url
    return item


def _failed(sop_class_uid: str, sop_instance_uid: str, code: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    item.FailureReason = code
    return item


@contextlib.contextmanager
def _consumed(path: Path) -> Iterator[Path]:
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def store_parts(
    parts: list[_Part], *, service: StoreService, calling: str, study_uid: str | None
) -> tuple[StowResult, dict[str, tuple[str, str]]]:
    """Store each received part; returns the outcome and, per stored instance, its (study, series) UIDs."""
    result = StowResult()
    where: dict[str, tuple[str, str]] = {}
    for part in parts:
        with _consumed(part.path):
            media = part.content_type.split(";", 1)[0].strip().lower()
            if media != "application/dicom":
                result.failed.append(("", "", status.SOP_CLASS_NOT_SUPPORTED, f"part of type {media!r} not stored"))
                continue
            try:
                meta = read_file_meta_info(part.path)
                sop_class_uid = str(meta.get("MediaStorageSOPClassUID", ""))
                sop_instance_uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
                syntax = str(meta.get("TransferSyntaxUID", ""))
            except (InvalidDicomError, OSError, ValueError, KeyError) as exc:
                result.failed.append(("", "", status.CANNOT_UNDERSTAND, f"not a DICOM file: {exc}"))
                continue
            if not sop_class_uid or not sop_instance_uid or not syntax:
                result.failed.append(
                    (sop_class_uid, sop_instance_uid, status.CANNOT_UNDERSTAND, "incomplete File Meta Information")
                )
                continue
            found, series = _location_of(part.path)
            if study_uid is not None:
                if found != study_uid:
                    result.failed.append(
                        (
                            sop_class_uid,
                            sop_instance_uid,
                            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                            f"instance of study {found!r}, not of the target study",
                        )
                    )
                    continue
            code, comment = service.store_file(
                part.path,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                transfer_syntax_uid=syntax,
                calling=calling,
            )
            if code == status.SUCCESS:
                result.stored.append((sop_class_uid, sop_instance_uid))
                where[sop_instance_uid] = (found or "", series or "")
            else:
                result.failed.append((sop_class_uid, sop_instance_uid, code, comment))
    return result, where


def _location_of(path: Path) -> tuple[str | None, str | None]:
    """(StudyInstanceUID, SeriesInstanceUID) of a received file, read before it is stored."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
    except Exception:
        return None, None
    study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
    return (str(study) if study else None), (str(series) if series else None)
