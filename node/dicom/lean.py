"""The lean data path: the data-transfer phase of storage associations, served in one loop.

pynetdicom negotiates every association (ACSE, the peer policy, presentation
contexts, maximum PDU, user identity, extended negotiation). For an association
whose requestor proposed only Verification and storage SOP classes (and no role
selection), the acceptor then takes the socket over: pynetdicom's DUL thread
stops right after it has sent the A-ASSOCIATE-AC, and the association's own
thread serves the rest here, without the DUL's queues, state machine, event
polling and PDU objects:

* whole PDUs read from the connection in large buffered reads; every byte still
  passes the :class:`~pacsnode.node.dicom.guard.GuardedSocket` first (PDU types
  and lengths, PDV items on accepted contexts, command sets, the dataset size
  limit, ARTIM and the network timeout), so a violation is answered with
  A-ABORT there and reaches this loop as the end of the stream;
* P-DATA-TF reassembly: several PDVs per PDU, fragments split across PDUs,
  command fragments gathered, dataset fragments written straight into a staging
  file in ``store/tmp`` behind the File Meta the node writes, hashed on the way
  (the same bytes :meth:`~pacsnode.storage.Archive.stage` would write, written once);
* C-ECHO and C-STORE requests go to the handlers bound to ``EVT_C_ECHO`` and
  ``EVT_C_STORE`` on the association, through pynetdicom's ``evt.trigger``, with
  the same request primitive pynetdicom would build: the decision, the checks,
  the archive, the status and the log lines are the one
  :class:`~pacsnode.node.dicom.handlers.StoreService` for both paths;
* responses encoded here (a DIMSE command set in Implicit VR Little Endian),
  fragmented to the peer's maximum PDU length;
* A-RELEASE-RQ answered with A-RELEASE-RP; a peer's A-ABORT ends the association;
  anything else unexpected is answered with A-ABORT (source service-provider,
  PS3.8 9.3.8) and logged. A dataset left unfinished by a release, an abort or
  a closed connection is removed, never kept.

``node.data_path: pynetdicom`` leaves every association to pynetdicom.
"""

from __future__ import annotations

import io
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation

from pacsnode.node.dicom import permissions, status
from pacsnode.node.dicom.contexts import STORAGE_SOP_CLASSES, Verification
from pacsnode.node.dicom.guard import (
    A_ABORT,
    A_RELEASE_RQ,
    P_DATA_TF,
    REASON_NOT_SPECIFIED,
    REASON_UNEXPECTED_PDU,
    REASON_UNRECOGNISED_PDU,
    a_abort,
)
from pacsnode.node.dicom.handlers import IN_MEMORY_ATTRIBUTE, STAGED_ATTRIBUTE, encode_file_header
from pacsnode.storage import Archive, StorageError
from pacsnode.storage.files import StageWriter

__all__ = ["LeanDataPath", "proposes_only_storage"]

logger = logging.getLogger(__name__)

_LEAN_SYNTAXES = frozenset(STORAGE_SOP_CLASSES.values()) | {str(Verification)}
_A_ASSOCIATE_AC = 0x02
_A_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
_A_ABORT_BY_USER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"  # source 0: service-user
_READ_SIZE = 1 << 20
# A dataset up to this size is also kept in memory as it arrives, so the handler checks and indexes
# it from there instead of mapping the staging file back in; a larger one is read from the file.
# Small on purpose: every established association may hold one (node.max_associations per process).
_IN_MEMORY_BYTES = 2 << 20
_HANDOVER_WAIT_S = 30.0

# DIMSE (PS3.7 E.1)
_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_C_ECHO_RQ = 0x0030
_C_ECHO_RSP = 0x8030
_C_CANCEL_RQ = 0x0FFF
_NO_DATA_SET = 0x0101
_AFFECTED_SOP_CLASS = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
_PRIORITY = 0x00000700
_DATA_SET_TYPE = 0x00000800
_STATUS = 0x00000900
_ERROR_COMMENT = 0x00000902
_AFFECTED_SOP_INSTANCE = 0x00001000
_MOVE_ORIGINATOR_AE = 0x00001030
_MOVE_ORIGINATOR_ID = 0x00001031
_US_TAGS = frozenset({_COMMAND_FIELD, _MESSAGE_ID, _PRIORITY, _DATA_SET_TYPE, _MOVE_ORIGINATOR_ID})
_TEXT_TAGS = frozenset({_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE, _MOVE_ORIGINATOR_AE})


def proposes_only_storage(assoc: Any) -> bool:
    """Whether the requestor proposed only Verification and storage SOP classes, without role selection."""
    request = assoc.requestor.primitive
    if request is None:
        return False
    contexts = request.presentation_context_definition_list
    if not contexts or any(str(cx.abstract_syntax) not in _LEAN_SYNTAXES for cx in contexts):
        return False
    return not any(isinstance(item, SCP_SCU_RoleSelectionNegotiation) for item in request.user_information)


class _Closed(Exception):
    """The connection ended (the peer closed it, or the guard aborted it)."""


class _Abort(Exception):
    """The peer sent something this path cannot serve: answered with A-ABORT."""

    def __init__(self, message: str, reason: int = REASON_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


class _Handover:
    """Set by the DUL thread once it has sent the A-ASSOCIATE-AC and stopped reading."""

    def __init__(self) -> None:
        self.taken = False


class LeanDataPath:
    """Installs the lean data-transfer loop on the node's associations.

    Parameters
    ----------
    archive
        Where received datasets are staged (``store/tmp``).
    """

    def __init__(self, *, archive: Archive) -> None:
        self.archive = archive

    def install(self, assoc: Any) -> None:
        """Called for each new acceptor association, before negotiation.

        The DUL stops itself right after sending an A-ASSOCIATE-AC for an
        association :func:`proposes_only_storage` accepts; the association's
        reactor then serves the data-transfer phase with :class:`_LeanConnection`.
        """
        handover = _Handover()
        transport = assoc.dul.socket
        send = transport.send

        def send_then_hand_over(bytestream: bytes) -> None:
            send(bytestream)
            if bytestream[:1] == bytes((_A_ASSOCIATE_AC,)) and proposes_only_storage(assoc):
                handover.taken = True
                assoc.dul.kill_dul()  # the DUL loop ends before it reads another byte

        def run_reactor() -> None:
            self._run(assoc, handover)

        transport.send = send_then_hand_over
        assoc._run_reactor = run_reactor

    def _run(self, assoc: Any, handover: _Handover) -> None:
        if proposes_only_storage(assoc):
            assoc.dul.join(_HANDOVER_WAIT_S)
            if handover.taken and not assoc.dul.is_alive():
                _LeanConnection(assoc, self.archive).serve()
                return
        Association._run_reactor(assoc)


@dataclass
class _Command:
    """The fields of a received command set this path uses."""

    field: int
    message_id: int
    has_dataset: bool
    sop_class_uid: str
    sop_instance_uid: str
    priority: int
    move_originator_ae: str | None
    move_originator_id: int | None


class _LeanConnection:
    """One association's data-transfer phase."""

    def __init__(self, assoc: Any, archive: Archive) -> None:
        self.assoc = assoc
        self.archive = archive
        self.transport = assoc.dul.socket
        self.sock = self.transport.socket
        self.peer_max_pdu = int(assoc.requestor.maximum_length or 0)
        self.contexts = {int(cx.context_id): cx for cx in assoc.accepted_contexts}
        self._context_tuples: dict[int, Any] = {}
        self.buf = bytearray()
        self.pos = 0
        # the message being received
        self.command = bytearray()
        self.command_context = 0
        self.pending: _Command | None = None
        self.writer: StageWriter | None = None
        self.write_error: StorageError | None = None
        self.dataset: bytearray | None = None  # the dataset's bytes while within _IN_MEMORY_BYTES

    # -- the loop -----------------------------------------------------------------------------
    def serve(self) -> None:
        assoc = self.assoc
        assoc.abort = self.abort_locally  # pynetdicom's abort() would queue its A-ABORT for the stopped DUL
        outcome = "closed"
        logger.debug("lean data path serving the association from %s", self._peer(), extra={"action": "lean"})
        try:
            while True:
                pdu_type, length = struct.unpack(">BxI", self._read(6))
                if pdu_type == P_DATA_TF:
                    self._p_data(length)
                elif pdu_type == A_RELEASE_RQ:
                    self._read(length)
                    self._discard_message()
                    self.sock.sendall(_A_RELEASE_RP)
                    outcome = "released"
                    break
                elif pdu_type == A_ABORT:
                    self._read(length)
                    outcome = "aborted"
                    break
                else:  # the guard refuses these first; without a guard, still never served
                    raise _Abort(f"unexpected PDU type 0x{pdu_type:02X}", REASON_UNEXPECTED_PDU)
        except _Closed:
            outcome = "aborted"
        except _Abort as exc:
            self._abort(str(exc), exc.reason)
            outcome = "aborted"
        except OSError as exc:
            logger.info("connection from %s ended: %s", self._peer(), exc)
            outcome = "aborted"
        finally:
            self._discard_message()
            self._close(outcome)
        if outcome == "released":
            evt.trigger(assoc, evt.EVT_RELEASED, {})
        else:
            evt.trigger(assoc, evt.EVT_ABORTED, {})

    def _read(self, n: int) -> memoryview:
        """The next ``n`` bytes (a view valid until the next read)."""
        while len(self.buf) - self.pos < n:
            data = self.sock.recv(max(_READ_SIZE, n - len(self.buf) + self.pos))
            if not data:
                raise _Closed()
            try:
                if self.pos:
                    del self.buf[: self.pos]
                    self.pos = 0
                self.buf += data
            except BufferError:
                # A view of an earlier PDU is still referenced (a frame kept by an exception a
                # handler stored): leave that buffer to it and continue in a new one.
                self.buf = self.buf[self.pos :] + data
                self.pos = 0
        start = self.pos
        self.pos += n
        return memoryview(self.buf)[start : start + n]

    # -- P-DATA-TF ----------------------------------------------------------------------------
    def _p_data(self, length: int) -> None:
        body = self._read(length)
        try:
            offset = 0
            while offset < length:
                if length - offset < 6:
                    raise _Abort("a PDV item header runs past its P-DATA-TF PDU")
                item_length, context_id, control = struct.unpack_from(">IBB", body, offset)
                end = offset + 4 + item_length
                if item_length < 2 or end > length:
                    raise _Abort(f"PDV item length {item_length} does not fit its P-DATA-TF PDU")
                self._pdv(context_id, control, body[offset + 6 : end])
                offset = end
        finally:
            body.release()

    def _pdv(self, context_id: int, control: int, value: memoryview) -> None:
        if context_id not in self.contexts:
            raise _Abort(f"PDV on presentation context {context_id}, which was not accepted")
        last = bool(control & 0x02)
        if control & 0x01:  # command fragment
            if self.pending is not None:
                raise _Abort("a command fragment while a dataset was expected", REASON_UNEXPECTED_PDU)
            if self.command and context_id != self.command_context:
                raise _Abort("one command on two presentation contexts")
            self.command_context = context_id
            self.command += value
            if last:
                command = _parse_command(bytes(self.command))
                self.command = bytearray()
                self._command(context_id, command)
            return
        pending = self.pending
        if pending is None or context_id != self.command_context:
            raise _Abort("a dataset fragment without a command announcing one", REASON_UNEXPECTED_PDU)
        if self.writer is not None:
            try:
                self.writer.write(value)
            except StorageError as exc:  # disk full: the rest of the dataset is read and dropped
                self.writer = None
                self.write_error = exc
        dataset = self.dataset
        if dataset is not None:
            if len(dataset) + len(value) <= _IN_MEMORY_BYTES:
                dataset += value
            else:
                self.dataset = None
        if last:
            self.pending = None
            self._store(context_id, pending)

    def _command(self, context_id: int, command: _Command) -> None:
        if command.field == _C_CANCEL_RQ:
            return
        if command.field == _C_ECHO_RQ and not command.has_dataset:
            self._echo(context_id, command)
            return
        if command.field != _C_STORE_RQ:
            raise _Abort(f"DIMSE command 0x{command.field:04X} on a storage association", REASON_UNRECOGNISED_PDU)
        abstract_syntax = str(self.contexts[context_id].abstract_syntax)
        if command.sop_class_uid != abstract_syntax:
            raise _Abort(f"C-STORE of {command.sop_class_uid[:64]} on the context of {abstract_syntax}")
        if not command.has_dataset:
            self._store(context_id, command)  # the handler answers an empty dataset
            return
        self.pending = command
        self.write_error = None
        self.dataset = bytearray()
        try:
            self.writer = self.archive.open_stage()
            transfer_syntax = str(self.contexts[context_id].transfer_syntax[0])
            self.writer.write(encode_file_header(command.sop_class_uid, command.sop_instance_uid, transfer_syntax))
        except StorageError as exc:
            self.writer = None
            self.write_error = exc

    # -- services -----------------------------------------------------------------------------
    def _context_tuple(self, context_id: int) -> Any:
        cx = self._context_tuples.get(context_id)
        if cx is None:
            cx = self._context_tuples[context_id] = self.contexts[context_id].as_tuple
        return cx

    def _echo(self, context_id: int, command: _Command) -> None:
        allowed, refusal = permissions.allows(self.assoc, "echo")
        if not allowed:
            self._respond(context_id, _C_ECHO_RSP, command, status.NOT_AUTHORIZED, refusal, with_instance=False)
            return
        request = C_ECHO()
        request.MessageID = command.message_id
        request.AffectedSOPClassUID = command.sop_class_uid
        try:
            result = evt.trigger(
                self.assoc, evt.EVT_C_ECHO, {"request": request, "context": self._context_tuple(context_id)}
            )
        except Exception:
            logger.exception("exception in the C-ECHO handler")
            result = status.PROCESSING_FAILURE
        code, comment = _status_of(result)
        self._respond(context_id, _C_ECHO_RSP, command, code, comment, with_instance=False)

    def _store(self, context_id: int, command: _Command) -> None:
        writer, self.writer = self.writer, None
        request = C_STORE()
        request.MessageID = command.message_id
        request.AffectedSOPClassUID = command.sop_class_uid
        request.AffectedSOPInstanceUID = command.sop_instance_uid
        request.Priority = command.priority if command.priority in (0, 1, 2) else 2
        if command.move_originator_ae:
            request.MoveOriginatorApplicationEntityTitle = command.move_originator_ae
        if command.move_originator_id is not None:
            request.MoveOriginatorMessageID = command.move_originator_id
        allowed, refusal = permissions.allows(self.assoc, "store")
        if not allowed:  # the same refusal as on pynetdicom's path; nothing received is kept
            self.write_error = None
            if writer is not None:
                writer.abandon()
            self._respond(context_id, _C_STORE_RSP, command, status.NOT_AUTHORIZED, refusal)
            return
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            logger.warning(
                "C-STORE of %.80s from %s failed: %s",
                command.sop_instance_uid,
                self._peer(),
                error,
                extra={"action": "c-store", "status": status.OUT_OF_RESOURCES},
            )
            self._respond(context_id, _C_STORE_RSP, command, status.OUT_OF_RESOURCES, str(error))
            return
        if writer is None:
            request.DataSet = io.BytesIO(b"")
        else:
            try:
                staged = writer.finish()
            except StorageError as exc:
                self._respond(context_id, _C_STORE_RSP, command, status.OUT_OF_RESOURCES, str(exc))
                return
            request._dataset_path = staged.path
            setattr(request, STAGED_ATTRIBUTE, staged)
            if self.dataset is not None:
                setattr(request, IN_MEMORY_ATTRIBUTE, self.dataset)
        self.dataset = None
        try:
            result = evt.trigger(
                self.assoc, evt.EVT_C_STORE, {"request": request, "context": self._context_tuple(context_id)}
            )
        except Exception:
            logger.exception("exception in the C-STORE handler")
            result = status.PROCESSING_FAILURE
        finally:
            if writer is not None:
                self.archive.store.discard(writer.path)  # gone already once committed
        code, comment = _status_of(result)
        self._respond(context_id, _C_STORE_RSP, command, code, comment)

    def _respond(
        self,
        context_id: int,
        field: int,
        command: _Command,
        code: int,
        comment: str | None,
        *,
        with_instance: bool = True,
    ) -> None:
        elements: list[tuple[int, bytes]] = [
            (_AFFECTED_SOP_CLASS, _ui(command.sop_class_uid)),
            (_COMMAND_FIELD, struct.pack("<H", field)),
            (_MESSAGE_ID_BEING_RESPONDED_TO, struct.pack("<H", command.message_id)),
            (_DATA_SET_TYPE, struct.pack("<H", _NO_DATA_SET)),
            (_STATUS, struct.pack("<H", code)),
        ]
        if comment:
            raw = comment[:64].encode("ascii", "replace")
            elements.append((_ERROR_COMMENT, raw + b" " * (len(raw) % 2)))
        if with_instance:
            elements.append((_AFFECTED_SOP_INSTANCE, _ui(command.sop_instance_uid)))
        self.sock.sendall(_p_data_pdus(context_id, _command_set(elements), self.peer_max_pdu))

    # -- ending -------------------------------------------------------------------------------
    def _discard_message(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.abandon()
        self.pending = None
        self.dataset = None
        self.command = bytearray()

    def _abort(self, why: str, reason: int) -> None:
        logger.warning(
            "aborted the association from %s: %s",
            self._peer(),
            why,
            extra={"action": "a-abort", "peer": self._peer(), "reason": reason},
        )
        try:
            self.sock.sendall(a_abort(reason))
        except OSError:
            pass

    def abort_locally(self, block: bool = True) -> None:
        """A-ABORT from this node (source service-user), as ``Association.abort`` sends it (shutdown)."""
        if self.assoc.is_released or self.assoc.is_aborted:
            return
        try:
            self.sock.sendall(_A_ABORT_BY_USER)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _close(self, outcome: str) -> None:
        assoc = self.assoc
        assoc.is_established = False
        if outcome == "released":
            assoc.is_released = True
        else:
            assoc.is_aborted = True
        assoc.dul.state_machine.current_state = "Sta1"
        self.transport.close()
        self.sock.close()  # the transport skips close() when shutdown() fails (a peer already gone)
        evt.trigger(assoc, evt.EVT_CONN_CLOSE, {"address": assoc.requestor.address_info.as_tuple})
        assoc.kill()

    def _peer(self) -> str:
        return f"{self.assoc.requestor.address}:{self.assoc.requestor.port}"


def _status_of(result: Any) -> tuple[int, str | None]:
    """The status code and Error Comment of a handler's answer (an int or a status Dataset)."""
    if isinstance(result, int):
        return result, None
    if isinstance(result, Dataset) and isinstance(result.get("Status"), int):
        comment = result.get("ErrorComment")
        return int(result.Status), str(comment) if comment else None
    logger.error("a service handler returned %r, not a status", type(result).__name__)
    return status.PROCESSING_FAILURE, "internal error: no status"


def _parse_command(raw: bytes) -> _Command:
    """The fields of a command set (Implicit VR Little Endian, group 0000) this path needs."""
    values: dict[int, int | str] = {}
    offset = 0
    while offset < len(raw):
        if len(raw) - offset < 8:
            raise _Abort("a command set cut inside an element header")
        group, element, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        if group != 0 or offset + length > len(raw):
            raise _Abort(f"a malformed command set at element ({group:04X},{element:04X})")
        tag = element
        if tag in _US_TAGS:
            if length != 2:
                raise _Abort(f"command element (0000,{element:04X}) of {length} bytes")
            values[tag] = struct.unpack_from("<H", raw, offset)[0]
        elif tag in _TEXT_TAGS:
            values[tag] = raw[offset : offset + length].rstrip(b"\0 ").decode("ascii", "replace")
        offset += length
    field = values.get(_COMMAND_FIELD)
    data_set_type = values.get(_DATA_SET_TYPE)
    if not isinstance(field, int) or not isinstance(data_set_type, int):
        raise _Abort("a command set without a Command Field or a Command Data Set Type")
    message_id = values.get(_MESSAGE_ID, 0)
    originator_id = values.get(_MOVE_ORIGINATOR_ID)
    return _Command(
        field=field,
        message_id=message_id if isinstance(message_id, int) else 0,
        has_dataset=data_set_type != _NO_DATA_SET,
        sop_class_uid=str(values.get(_AFFECTED_SOP_CLASS, "")),
        sop_instance_uid=str(values.get(_AFFECTED_SOP_INSTANCE, "")),
        priority=int(values.get(_PRIORITY, 2)),
        move_originator_ae=str(values[_MOVE_ORIGINATOR_AE]) if _MOVE_ORIGINATOR_AE in values else None,
        move_originator_id=originator_id if isinstance(originator_id, int) else None,
    )


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set in Implicit VR Little Endian, its Command Group Length first (PS3.7 6.3.1)."""
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _p_data_pdus(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """``command`` as P-DATA-TF PDUs, each within the peer's maximum PDU length (0: no limit)."""
    room = peer_max_pdu - 6 if peer_max_pdu else len(command)
    room = max(room, 1)
    out = bytearray()
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        control = 0x01 | (0x02 if start + room >= len(command) else 0x00)
        out += struct.pack(">BxIIBB", P_DATA_TF, 6 + len(fragment), 2 + len(fragment), context_id, control)
        out += fragment
    return bytes(out)
