"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET answered from the index.

The handlers parse the identifier (:mod:`pacsnode.storage.query`), let the database do
the matching, and turn every failure into the PS3.4 C.4 status with an Error
Comment: 0xA900 for an identifier that does not fit the model, 0xC000 for a
value that cannot be matched, 0xA700 when the match cap is exceeded, 0xA801
for an unknown move destination. Pending responses carry exactly the keys the
peer asked for: keys the index has no column for come from the stored header
with their stored VR (in a sequence, only the item keys asked for), and 0xFF01
says that a value in such a key was not used for matching.

Retrieves send what is stored. When the peer did not accept the stored
transfer syntax, the instance is decompressed to an uncompressed syntax the
peer did accept (the pylibjpeg plugins decode); if that is not possible the
instance is reported failed, never sent in a syntax the peer refused.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import PersonName
from pynetdicom import build_context, evt
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from pacsnode.node import metrics
from pacsnode.node.config import Settings
from pacsnode.node.dicom import status
from pacsnode.node.dicom.auditing import DimseAudit
from pacsnode.node.dicom.contexts import FIND_MODELS, GET_MODELS, MOVE_MODELS, Verification
from pacsnode.node.dicom.handlers import failure_status, set_nodelay
from pacsnode.node.dicom.tls import client_args
from pacsnode.storage import Archive, StorageError
from pacsnode.storage.query import (
    IdentifierError,
    InstanceLocation,
    Model,
    QueryValueError,
    TooManyMatchesError,
    parse_find,
    parse_retrieve,
)

__all__ = [
    "QueryRetrieveService",
    "handle_sop_extended",
]

logger = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_MAX_CONTEXTS = 128
_MAX_SUBOPERATIONS = 65535  # the sub-operation counters are US

# How each refusal from pacsnode.storage.query reads as a DIMSE status; any other storage error is 0xC000.
_FAILURE_STATUS: dict[type[Exception], int] = {
    IdentifierError: status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    QueryValueError: status.UNABLE_TO_PROCESS,
    TooManyMatchesError: status.OUT_OF_RESOURCES,
}


def handle_sop_extended(event: Event) -> dict[str, bytes]:
    """EVT_SOP_EXTENDED: agree to relational queries and retrieves and combined date-time matching.

    Byte 0 (relational) and byte 1 (combined date and time range matching,
    C-FIND only) are accepted as proposed; fuzzy semantic PN matching and
    timezone adjustment are not offered.
    """
    answer: dict[str, bytes] = {}
    # pynetdicom sets app_info (the requestor's items, {SOP class UID: bytes}) on this event only;
    # Event does not declare it.
    app_info: dict[str, bytes] | None = getattr(event, "app_info", None)
    for sop_class, info in (app_info or {}).items():
        info = bytes(info or b"")
        if sop_class in FIND_MODELS and info:
            answer[sop_class] = bytes([info[0] & 1, (info[1] & 1) if len(info) > 1 else 0])[: min(len(info), 2)]
        elif (sop_class in MOVE_MODELS or sop_class in GET_MODELS) and info:
            answer[sop_class] = bytes([info[0] & 1])
    return answer


def _negotiated(event: Event) -> tuple[bool, bool]:
    """(relational, combined date-time) as agreed for this context's SOP class."""
    info = event.assoc.requestor.sop_class_extended.get(event.context.abstract_syntax, b"")
    return bool(info and info[0] & 1), bool(len(info) > 1 and info[1] & 1)


def _charset_for(texts: list[str], requested: str) -> str | None:
    """The Specific Character Set a response needs: None for plain ASCII.

    A peer that queried in Latin-1 gets Latin-1 back when the values fit it;
    anything else non-ASCII is answered in UTF-8.
    """
    if all(text.isascii() for text in texts):
        return None
    if requested == "ISO_IR 100":
        try:
            for text in texts:
                text.encode("latin-1")
            return "ISO_IR 100"
        except UnicodeEncodeError:
            pass
    return "ISO_IR 192"


class QueryRetrieveService:
    """C-FIND, C-MOVE and C-GET over one archive.

    Parameters
    ----------
    settings
        The whole configuration: query limits, known remote nodes, this node's AE title.
    archive
        The archive answering the queries and holding the files.
    audit
        Where queries and retrieves are audited before they are answered; None: not audited.
    """

    def __init__(self, *, settings: Settings, archive: Archive, audit: DimseAudit | None = None) -> None:
        self.settings = settings
        self.archive = archive
        self.audit = audit

    # -- C-FIND --------------------------------------------------------------------------------
    def handle_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """EVT_C_FIND: one pending response per matching entity, then success."""
        started = time.perf_counter()
        model = FIND_MODELS[event.context.abstract_syntax]
        peer = event.assoc.requestor.ae_title
        try:
            identifier = event.identifier
        except Exception as exc:
            logger.warning("C-FIND from %r: identifier cannot be decoded: %s", peer, exc)
            yield failure_status(status.CANNOT_UNDERSTAND, f"identifier cannot be decoded: {exc}"), None
            return
        relational, combined = _negotiated(event)
        query_settings = self.settings.query
        try:
            parsed = parse_find(
                identifier,
                model,
                relational=relational,
                combined_datetime=combined,
                case_insensitive_names=query_settings.case_insensitive_names,
            )
            rows = self.archive.find(parsed, limit=query_settings.max_matches)
        except StorageError as exc:
            yield self._refuse("C-FIND", peer, exc), None
            return
        metrics.query_answered("C-FIND", parsed.level.value, time.perf_counter() - started)
        pending = status.PENDING_WARNING if parsed.unsupported else status.PENDING
        logger.info(
            "C-FIND from %r: %s level, %s root, %d match(es)%s",
            peer,
            parsed.level.value,
            model.value,
            len(rows),
            f"; keys not supported: {', '.join(parsed.unsupported)}" if parsed.unsupported else "",
            extra={"action": "c-find", "level": parsed.level.value, "matches": len(rows)},
        )
        if self.audit is not None:
            self.audit.query(event, identifier=identifier, level=parsed.level.value, rows=rows)
        for row in rows:
            _let_reactor_catch_up(event.assoc)
            if event.is_cancelled:
                logger.info("C-FIND from %r cancelled", peer)
                yield status.CANCEL, None
                return
            yield pending, self._response(identifier, parsed.level.value, row)

    def _refuse(self, service: str, peer: str, exc: Exception) -> Dataset:
        """Log a refused request and build its failure status from the storage error."""
        code = _FAILURE_STATUS.get(type(exc), status.UNABLE_TO_PROCESS)
        if service != "C-FIND" and code == status.OUT_OF_RESOURCES:
            code = status.OUT_OF_RESOURCES_MATCHES  # C-MOVE / C-GET: unable to calculate the number of matches
        comment = str(exc)
        logger.warning(
            "%s from %r refused with 0x%04X: %s",
            service,
            peer,
            code,
            comment,
            extra={"action": service.lower(), "status": code},
        )
        return failure_status(code, comment)

    def _response(self, identifier: Dataset, level: str, row: dict[str, Any]) -> Dataset:
        rsp = Dataset()
        texts: list[str] = []
        for element in identifier:
            keyword = element.keyword
            if element.tag.element == 0 or keyword == "SpecificCharacterSet":
                continue
            if keyword == "QueryRetrieveLevel":
                rsp.QueryRetrieveLevel = level
            elif keyword == "RetrieveAETitle":
                rsp.RetrieveAETitle = self.settings.node.ae_title
            elif keyword == "InstanceAvailability":
                rsp.InstanceAvailability = "ONLINE"
            elif isinstance(row.get(keyword), DataElement):  # from the stored header
                stored = _as_requested(row[keyword], element)
                rsp.add(stored)
                texts.extend(_texts_of(stored))
            elif keyword in row:
                value = row[keyword]
                rsp.add_new(element.tag, element.VR, value)
                if isinstance(value, str):
                    texts.append(value)
                elif isinstance(value, list):
                    texts.extend(str(v) for v in value)
            elif element.VR == "SQ":
                rsp.add_new(element.tag, "SQ", [])
            else:
                rsp.add_new(element.tag, element.VR, None)
        if "QueryRetrieveLevel" not in rsp:
            rsp.QueryRetrieveLevel = level
        requested = identifier.get("SpecificCharacterSet", "") or ""
        if not isinstance(requested, str):
            requested = "\\".join(str(v) for v in requested)
        charset = _charset_for(texts, requested)
        if charset is not None:
            rsp.SpecificCharacterSet = charset
        elif requested and "SpecificCharacterSet" in identifier:
            rsp.SpecificCharacterSet = identifier.SpecificCharacterSet
        return rsp

    # -- retrieves -----------------------------------------------------------------------------
    def _locate(self, event: Event, models: dict[str, Model], service: str) -> list[InstanceLocation] | Dataset:
        peer = event.assoc.requestor.ae_title
        try:
            identifier = event.identifier
            parsed = parse_retrieve(identifier, models[event.context.abstract_syntax])
            return self.archive.locate(parsed, limit=_MAX_SUBOPERATIONS)
        except StorageError as exc:
            return self._refuse(service, peer, exc)
        except Exception as exc:  # an identifier pydicom cannot decode
            return self._refuse(service, peer, ValueError(f"identifier cannot be decoded: {exc}"))

    def handle_move(self, event: Event) -> Iterator[Any]:
        """EVT_C_MOVE: resolve the destination, then one store association with the needed contexts."""
        peer = event.assoc.requestor.ae_title
        destination_ae = (event.move_destination or "").strip()
        remote = next((node for node in self.settings.remote_nodes.values() if node.ae_title == destination_ae), None)
        if remote is None:
            logger.warning(
                "C-MOVE from %r refused with 0xA801: move destination %r is not a known remote node",
                peer,
                destination_ae,
                extra={"action": "c-move", "status": status.MOVE_DESTINATION_UNKNOWN},
            )
            yield None, None
            return
        located = self._locate(event, MOVE_MODELS, "C-MOVE")
        store_assoc: list[Any] = []

        def _established(store_event: Event) -> None:
            _stream_stored_files(store_event.assoc)
            store_assoc.append(store_event.assoc)

        contexts = _store_contexts(located) if isinstance(located, list) else [build_context(Verification)]
        yield (
            remote.host,
            remote.port,
            {
                "contexts": contexts,
                "evt_handlers": [(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_ESTABLISHED, _established)],
                **client_args(remote),
            },
        )
        if isinstance(located, Dataset):
            yield 1  # pynetdicom sends failures only once the sub-association exists
            yield located, None
            return
        logger.info(
            "C-MOVE from %r: %d instance(s) to %r at %s:%d",
            peer,
            len(located),
            destination_ae,
            remote.host,
            remote.port,
            extra={"action": "c-move", "instances": len(located), "destination": destination_ae},
        )
        if self.audit is not None:
            self.audit.retrieve(
                event,
                service="C-MOVE",
                sop_instance_uids=[loc.sop_instance_uid for loc in located],
                destination_ae_title=destination_ae,
                destination_host=remote.host,
            )
        yield len(located)
        yield from self._send(event, located, lambda: _accepted(store_assoc[0] if store_assoc else None))

    def handle_get(self, event: Event) -> Iterator[Any]:
        """EVT_C_GET: the same instances, sent back over the requesting association."""
        peer = event.assoc.requestor.ae_title
        located = self._locate(event, GET_MODELS, "C-GET")
        if isinstance(located, Dataset):
            yield 1
            yield located, None
            return
        logger.info(
            "C-GET from %r: %d instance(s)",
            peer,
            len(located),
            extra={"action": "c-get", "instances": len(located)},
        )
        if self.audit is not None:
            self.audit.retrieve(
                event,
                service="C-GET",
                sop_instance_uids=[loc.sop_instance_uid for loc in located],
                destination_ae_title=str(peer).strip(),
                destination_host=str(event.assoc.requestor.address),
            )
        _stream_stored_files(event.assoc)
        yield len(located)
        yield from self._send(event, located, lambda: _accepted(event.assoc))

    def _send(self, event: Event, located: list[InstanceLocation], accepted: Any) -> Iterator[Any]:
        for location in located:
            if event.is_cancelled:
                logger.info("retrieve for %r cancelled", event.assoc.requestor.ae_title)
                yield status.CANCEL, None
                return
            yield status.PENDING, self._dataset_for_peer(location, accepted())

    def _dataset_for_peer(self, location: InstanceLocation, accepted: dict[str, set[str]]) -> Dataset:
        """The stored instance in a transfer syntax the peer accepted, or an unsendable stub.

        A stub (no SOP Class UID) makes the sub-operation fail before anything
        is sent, and its SOP Instance UID lands in the Failed SOP Instance UID List.
        """
        stored = location.transfer_syntax_uid
        syntaxes = accepted.get(location.sop_class_uid, set())
        path = self.archive.instance_path(location.file_path)
        if stored in syntaxes:
            if path.is_file():
                return _StoredFile(location, path)  # sent from the file as stored, never read whole
            logger.error("cannot read stored instance %s: %s is missing", location.sop_instance_uid, path)
            return _unsendable(location.sop_instance_uid)
        try:
            ds = dcmread(path)
        except Exception as exc:
            logger.error("cannot read stored instance %s: %s", location.sop_instance_uid, exc)
            return _unsendable(location.sop_instance_uid)
        if stored in syntaxes:
            return ds
        if not syntaxes:
            logger.warning(
                "instance %s not sent: the peer accepted no context for SOP class %s",
                location.sop_instance_uid,
                location.sop_class_uid,
            )
            return _unsendable(location.sop_instance_uid)
        uncompressed = [ts for ts in _UNCOMPRESSED if ts in syntaxes]
        if not uncompressed:
            logger.warning(
                "instance %s not sent: stored as %s, the peer accepted only %s",
                location.sop_instance_uid,
                stored,
                ", ".join(sorted(syntaxes)),
            )
            return _unsendable(location.sop_instance_uid)
        ts = UID(stored)
        if ts.is_compressed:
            try:
                ds.decompress(generate_instance_uid=False)
            except Exception as exc:
                logger.warning(
                    "instance %s not sent: cannot decompress %s: %s", location.sop_instance_uid, ts.name, exc
                )
                return _unsendable(location.sop_instance_uid)
            logger.info("instance %s decompressed from %s for the peer", location.sop_instance_uid, ts.name)
        elif not ts.is_little_endian:
            logger.warning("instance %s not sent: big endian cannot be converted", location.sop_instance_uid)
            return _unsendable(location.sop_instance_uid)
        elif ts.is_deflated:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds  # explicit <-> implicit little endian: pynetdicom re-encodes for the accepted context


def _as_requested(stored: DataElement, requested: DataElement) -> DataElement:
    """A stored element as a C-FIND answer: a sequence keeps only the item keys the peer asked for.

    An empty requested sequence (or one empty item) asks for the stored items whole.
    """
    if stored.VR != "SQ" or requested.VR != "SQ" or not stored.value:
        return stored
    asked = {sub.tag: sub for item in requested.value or () for sub in item}
    if not asked:
        return stored
    items = []
    for item in stored.value:
        answer = Dataset()
        for tag, sub in asked.items():
            if tag in item:
                answer.add(_as_requested(item[tag], sub))
            else:
                answer.add_new(tag, sub.VR, [] if sub.VR == "SQ" else None)
        items.append(answer)
    return DataElement(stored.tag, "SQ", Sequence(items))


def _texts_of(element: DataElement) -> list[str]:
    """Every text value of an element, in its items too (to choose the answer's character set)."""
    if element.VR == "SQ":
        return [text for item in element.value or () for sub in item for text in _texts_of(sub)]
    value = element.value
    values = value if isinstance(value, list | tuple) else [value]
    return [str(v) for v in values if isinstance(v, str | PersonName)]


_QUEUED_PDUS = 8


class _StoredFile(Dataset):
    """A stored instance to send as it is on disk: what pynetdicom checks, and the file's path.

    pynetdicom's C-GET and C-MOVE service classes take only Datasets from the
    handler; :func:`_stream_stored_files` makes the association send this one
    from its file (pynetdicom's chunked send), so a retrieve never holds an
    instance in memory.
    """

    def __init__(self, location: InstanceLocation, path: Path) -> None:
        super().__init__()
        self.SOPClassUID = location.sop_class_uid
        self.SOPInstanceUID = location.sop_instance_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(location.transfer_syntax_uid)
        self.stored_path = path


def _stream_stored_files(assoc: Any) -> None:
    """Make ``assoc.send_c_store`` send a :class:`_StoredFile` from its path (once per association)."""
    if getattr(assoc, "_pacsnode_streams_files", False):
        return
    send_c_store = assoc.send_c_store

    def send(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(dataset, _StoredFile):
            return send_c_store(dataset.stored_path, *args, **kwargs)
        return send_c_store(dataset, *args, **kwargs)

    assoc.send_c_store = send
    assoc._pacsnode_streams_files = True
    # pynetdicom queues every PDU of a message before its reactor sends them: reading a file
    # faster than the peer takes it would fill memory with the file after all. Wait while the
    # queue holds a few PDUs already.
    dul = assoc.dul
    send_pdu = dul.send_pdu

    def paced(primitive: Any) -> None:
        while dul.to_provider_queue.qsize() >= _QUEUED_PDUS and dul.is_alive() and not assoc.is_aborted:
            time.sleep(0.0005)
        send_pdu(primitive)

    dul.send_pdu = paced


def _unsendable(sop_instance_uid: str) -> Dataset:
    stub = Dataset()
    stub.SOPInstanceUID = sop_instance_uid
    return stub


def _accepted(assoc: Any) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes in which we may send C-STORE on ``assoc``."""
    out: dict[str, set[str]] = {}
    if assoc is None:
        return out
    for cx in assoc.accepted_contexts:
        if cx.as_scu:
            out.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return out


def _store_contexts(located: list[InstanceLocation]) -> list[PresentationContext]:
    """The contexts a move needs: each (SOP class, stored syntax), plus an uncompressed fallback.

    The fallbacks (for peers that refuse a compressed syntax) are dropped first
    when the 128-context limit is reached.
    """
    exact: dict[tuple[str, str], None] = {}
    fallback: dict[str, None] = {}
    for location in located:
        exact[(location.sop_class_uid, location.transfer_syntax_uid)] = None
        if location.transfer_syntax_uid not in _UNCOMPRESSED:
            fallback[location.sop_class_uid] = None
    contexts = [build_context(sop_class, [ts]) for sop_class, ts in exact]
    for sop_class in fallback:
        if len(contexts) >= _MAX_CONTEXTS:
            break
        contexts.append(build_context(sop_class, list(_UNCOMPRESSED)))
    if len(contexts) > _MAX_CONTEXTS:
        logger.warning(
            "a retrieve needs %d presentation contexts; proposing the first %d", len(contexts), _MAX_CONTEXTS
        )
    return contexts[:_MAX_CONTEXTS] or [build_context(Verification)]


def _let_reactor_catch_up(assoc: Any, max_queued: int = 64, limit_s: float = 0.05) -> None:
    """Hold the next response while the peer has sent something the reactor has not read.

    pynetdicom's reactor sends before it reads: while responses are queued it
    never looks at the socket, so a C-CANCEL that the peer sent after the first
    answer would be read only after the last one. When the socket has data (or
    the outgoing queue is long), wait until the reactor has drained the queue
    and read it, so the cancel lands mid-stream (PS3.4 C.4.1.2.3) and a long
    stream does not pile up in memory. In the usual case, one select() call.
    """
    dul = assoc.dul
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        return
    deadline: float | None = None
    while True:
        try:
            readable = bool(select.select([sock], [], [], 0)[0])
        except (OSError, ValueError):
            return
        queued = dul.to_provider_queue.qsize()
        if not readable and queued <= max_queued and dul.event_queue.qsize() == 0:
            return
        if deadline is None:
            deadline = time.monotonic() + limit_s
        elif time.monotonic() > deadline:
            return
        time.sleep(0.0002)
