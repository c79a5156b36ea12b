"""A guard on every accepted connection: the received PDU stream is checked as it arrives.

pynetdicom reads a PDU's 6-byte header, then as many bytes as the header
announces, and only then decodes it; a dataset is assembled in memory before
any handler sees it. So a peer could announce a 2 GiB PDU, stream an endless
dataset, send fragments on a presentation context that was never accepted, or
connect and never speak, and the node would buffer or wait. The guard sits
between the socket and pynetdicom: :class:`GuardedSocket` is the accepted socket
pynetdicom reads from, and every byte it returns has passed :class:`PduGuard`,
which follows the stream (PDU headers, P-DATA-TF PDV items, DIMSE command sets)
without copying values. On the first violation it answers A-ABORT (PS3.8 9.3.8:
source service-provider, with the reason), closes the connection, writes one
log line and hands pynetdicom an end of stream, so pynetdicom only sees a
closed connection.

Checks, in order of arrival:

* before the association: a complete A-ASSOCIATE-RQ within ``artim`` seconds of
  the connect (PS3.8 ARTIM), no other PDU first, at most 1 MiB, and its
  variable items consistent in length;
* every PDU: a known type, a length within ``max_pdu`` (P-DATA-TF) or its
  fixed size (release and abort PDUs);
* P-DATA-TF: PDV items inside the PDU, on an accepted presentation context, a
  whole message (command and dataset) on one context, the command set a
  well-formed Implicit VR Little Endian group 0000 of at most 64 KiB whose SOP
  class is the context's abstract syntax, a dataset only where the command
  announces one, and a C-STORE dataset at most one PDU longer than
  ``max_instance_bytes`` (an instance just over the limit still arrives whole
  and gets 0xA700 from the handler; an endless one is cut off).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GuardLimits",
    "GuardViolation",
    "GuardedSocket",
    "PduGuard",
    "SilenceAbortedThreads",
    "a_abort",
]

logger = logging.getLogger(__name__)

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# A-ABORT (PS3.8 9.3.8): source 2 is the service provider; reasons
REASON_NOT_SPECIFIED = 0x00
REASON_UNRECOGNISED_PDU = 0x01
REASON_UNEXPECTED_PDU = 0x02
REASON_INVALID_PARAMETER = 0x06
_SOURCE_SERVICE_PROVIDER = 0x02

_MAX_ASSOCIATE_RQ = 1 << 20  # presentation contexts and user information: far below this in practice
_MAX_COMMAND_SET = 64 << 10
_UNLIMITED_PDU = 64 << 20  # what "max_pdu: 0" (no announced limit) still accepts
_FIXED_LENGTHS = {A_RELEASE_RQ: 4, A_RELEASE_RP: 4, A_ABORT: 4}

# DIMSE command set (PS3.7 E.1): the elements the guard reads
_AFFECTED_SOP_CLASS = 0x00000002
_REQUESTED_SOP_CLASS = 0x00000003
_COMMAND_FIELD = 0x00000100
_DATA_SET_TYPE = 0x00000800
_NO_DATA_SET = 0x0101
_C_STORE_RQ = 0x0001
_C_CANCEL_RQ = 0x0FFF
_MAX_IDENTIFIER = 16 << 20  # a C-FIND/C-GET/C-MOVE identifier or an N-service dataset
# Command elements a peer fills that end up in messages and logs: checked before pynetdicom decodes them.
_COMMAND_UIDS = {
    _AFFECTED_SOP_CLASS,
    _REQUESTED_SOP_CLASS,
    0x00001000,  # Affected SOP Instance UID
    0x00001001,  # Requested SOP Instance UID
}
_COMMAND_AE_TITLES = {0x00000600, 0x00001030}  # Move Destination, Move Originator AE Title


def a_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider with ``reason`` (PS3.8 9.3.8)."""
    return struct.pack(">BBIBBBB", A_ABORT, 0, 4, 0, 0, _SOURCE_SERVICE_PROVIDER, reason)


class GuardViolation(Exception):
    """The peer broke the protocol or a limit; the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = REASON_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class GuardLimits:
    """What a connection may send (from ``node.*`` settings)."""

    artim_s: float
    network_timeout_s: float
    max_pdu: int  # 0: no announced limit
    max_instance_bytes: int

    @property
    def max_p_data(self) -> int:
        return self.max_pdu if self.max_pdu else _UNLIMITED_PDU


@dataclass
class _Message:
    """The DIMSE message being received: its context, command and dataset so far."""

    context_id: int
    command: bytearray
    command_done: bool = False
    expects_dataset: bool = False
    dataset_bytes: int = 0
    dataset_limit: int = 0


class PduGuard:
    """Follows a received PDU stream incrementally and raises :class:`GuardViolation` on a fault.

    Parameters
    ----------
    limits
        The connection's limits.
    accepted_contexts
        Called when the first P-DATA-TF arrives: accepted presentation context
        ID -> abstract syntax UID (known once the A-ASSOCIATE-AC was sent).
    """

    def __init__(self, limits: GuardLimits, accepted_contexts: Callable[[], dict[int, str]]) -> None:
        self.limits = limits
        self._accepted_contexts = accepted_contexts
        self._contexts: dict[int, str] | None = None
        self.associate_received = False
        self._header = bytearray()
        self._pdu_type = 0
        self.pdu_started_at: float | None = None  # when the first byte of the PDU being received came
        self._pdu_left = 0  # body bytes of the current PDU still to come
        self._associate = bytearray()  # the A-ASSOCIATE-RQ body, checked when whole
        self._pdv_header = bytearray()
        self._pdv_left = 0  # PDV value bytes (after the 2 header bytes) still to come
        self._pdv_command = False
        self._pdv_last = False
        self._message: _Message | None = None

    # -- the stream ---------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Account for ``data``, the next bytes received; raise :class:`GuardViolation` on a fault."""
        if self.pdu_started_at is None and data:
            self.pdu_started_at = time.monotonic()
        view = memoryview(data)
        while view:
            if self._pdu_left == 0 and len(self._header) < 6:
                take = min(6 - len(self._header), len(view))
                self._header += view[:take]
                view = view[take:]
                if len(self._header) == 6:
                    self._start_pdu()
                continue
            take = min(self._pdu_left, len(view))
            self._body(view[:take])
            view = view[take:]
            self._pdu_left -= take
            if self._pdu_left == 0:
                self._end_pdu()

    def _start_pdu(self) -> None:
        pdu_type, _, length = struct.unpack(">BBI", self._header)
        if pdu_type not in (A_ASSOCIATE_RQ, P_DATA_TF, A_RELEASE_RQ, A_ABORT):
            # An acceptor never asks for a release, so an A-RELEASE-RP is never expected either.
            if pdu_type in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP):
                raise GuardViolation(f"unexpected PDU type 0x{pdu_type:02X} for an acceptor", REASON_UNEXPECTED_PDU)
            raise GuardViolation(f"unknown PDU type 0x{pdu_type:02X}", REASON_UNRECOGNISED_PDU)
        if not self.associate_received and pdu_type not in (A_ASSOCIATE_RQ, A_ABORT):
            raise GuardViolation(f"PDU type 0x{pdu_type:02X} before an A-ASSOCIATE-RQ", REASON_UNEXPECTED_PDU)
        if self.associate_received and pdu_type == A_ASSOCIATE_RQ:
            raise GuardViolation("a second A-ASSOCIATE-RQ", REASON_UNEXPECTED_PDU)
        if pdu_type == A_ASSOCIATE_RQ and not 68 <= length <= _MAX_ASSOCIATE_RQ:
            raise GuardViolation(f"A-ASSOCIATE-RQ of {length} bytes (68 to {_MAX_ASSOCIATE_RQ} allowed)")
        if pdu_type == P_DATA_TF and not 6 <= length <= self.limits.max_p_data:
            raise GuardViolation(f"P-DATA-TF of {length} bytes (at most {self.limits.max_p_data})")
        fixed = _FIXED_LENGTHS.get(pdu_type)
        if fixed is not None and length != fixed:
            raise GuardViolation(f"PDU type 0x{pdu_type:02X} of {length} bytes ({fixed} expected)")
        self._pdu_type = pdu_type
        self._pdu_left = length
        if length == 0:
            self._end_pdu()

    def _body(self, chunk: memoryview) -> None:
        if self._pdu_type == A_ASSOCIATE_RQ:
            self._associate += chunk
        elif self._pdu_type == P_DATA_TF:
            self._p_data(chunk)

    def _end_pdu(self) -> None:
        if self._pdu_type == A_ASSOCIATE_RQ:
            _check_associate_rq(bytes(self._associate))
            self._associate = bytearray()
            self.associate_received = True
        elif self._pdu_type == P_DATA_TF and (self._pdv_header or self._pdv_left):
            raise GuardViolation("a PDV item runs past the end of its P-DATA-TF PDU")
        self._header = bytearray()
        self._pdu_type = 0
        self.pdu_started_at = None

    # -- P-DATA-TF ---------------------------------------------------------------------------
    def _p_data(self, chunk: memoryview) -> None:
        while chunk:
            if self._pdv_left == 0:
                take = min(6 - len(self._pdv_header), len(chunk))
                self._pdv_header += chunk[:take]
                chunk = chunk[take:]
                if len(self._pdv_header) == 6:
                    self._start_pdv()
                continue
            take = min(self._pdv_left, len(chunk))
            self._pdv_value(chunk[:take])
            chunk = chunk[take:]
            self._pdv_left -= take
            if self._pdv_left == 0:
                self._end_pdv()

    def _start_pdv(self) -> None:
        length, context_id, control = struct.unpack(">IBB", self._pdv_header)
        self._pdv_header = bytearray()
        if length < 2 or length - 4 > self._pdu_left:
            raise GuardViolation(f"PDV item length {length} does not fit its P-DATA-TF PDU")
        if control & 0xFC:
            raise GuardViolation(f"PDV message control header 0x{control:02X} has reserved bits set")
        contexts = self._contexts_now()
        if context_id not in contexts:
            raise GuardViolation(f"PDV on presentation context {context_id}, which was not accepted")
        self._pdv_command = bool(control & 0x01)
        self._pdv_last = bool(control & 0x02)
        message = self._message
        if self._pdv_command:
            if message is not None and message.command_done and message.expects_dataset:
                raise GuardViolation("a command fragment while a dataset was expected", REASON_UNEXPECTED_PDU)
            if message is None or message.command_done:
                message = self._message = _Message(context_id=context_id, command=bytearray())
        else:
            if message is None or not message.command_done or not message.expects_dataset:
                raise GuardViolation("a dataset fragment without a command announcing one", REASON_UNEXPECTED_PDU)
        if context_id != message.context_id:
            raise GuardViolation(f"one message on two presentation contexts ({message.context_id} and {context_id})")
        self._pdv_left = length - 2
        if self._pdv_left == 0:
            self._end_pdv()

    def _pdv_value(self, chunk: memoryview) -> None:
        message = self._message
        if message is None:  # pragma: no cover - _start_pdv always sets it
            raise GuardViolation("PDV value without a message")
        if self._pdv_command:
            if len(message.command) + len(chunk) > _MAX_COMMAND_SET:
                raise GuardViolation(f"a command set over {_MAX_COMMAND_SET} bytes")
            message.command += chunk
            return
        message.dataset_bytes += len(chunk)
        if message.dataset_bytes > message.dataset_limit:
            raise GuardViolation(f"a dataset over {message.dataset_limit} bytes")

    def _end_pdv(self) -> None:
        message = self._message
        if message is None:  # pragma: no cover
            return
        if self._pdv_command and self._pdv_last:
            self._end_command(message)
        elif not self._pdv_command and self._pdv_last:
            self._message = None  # the dataset is whole: the next PDV starts a new message

    def _end_command(self, message: _Message) -> None:
        values = _command_values(bytes(message.command))
        message.command = bytearray()
        message.command_done = True
        field = values.get(_COMMAND_FIELD)
        if not isinstance(field, int):
            raise GuardViolation("a command set without a Command Field")
        data_set_type = values.get(_DATA_SET_TYPE)
        if not isinstance(data_set_type, int):
            raise GuardViolation("a command set without a Command Data Set Type")
        sop_class = values.get(_AFFECTED_SOP_CLASS, values.get(_REQUESTED_SOP_CLASS))
        abstract_syntax = self._contexts_now()[message.context_id]
        if isinstance(sop_class, str) and sop_class and field != _C_CANCEL_RQ and sop_class != abstract_syntax:
            raise GuardViolation(
                f"command 0x{field:04X} for SOP class {sop_class[:64]} on the presentation context of {abstract_syntax}"
            )
        message.expects_dataset = data_set_type != _NO_DATA_SET
        # An instance a little over the limit arrives whole and gets 0xA700 from the handler; a stream
        # still going one PDU past the limit is cut off here, so memory never holds more than that.
        if field == _C_STORE_RQ:
            message.dataset_limit = self.limits.max_instance_bytes + self.limits.max_p_data
        else:
            message.dataset_limit = _MAX_IDENTIFIER
        if not message.expects_dataset:
            self._message = None

    def _contexts_now(self) -> dict[int, str]:
        if self._contexts is None:
            contexts = self._accepted_contexts()
            if not contexts:
                raise GuardViolation("P-DATA-TF before any presentation context was accepted", REASON_UNEXPECTED_PDU)
            self._contexts = contexts
        return self._contexts


def _check_associate_rq(body: bytes) -> None:
    """The fixed fields and the variable items of an A-ASSOCIATE-RQ (PS3.8 9.3.2) are well formed.

    Item lengths nest consistently; one Application Context item comes first,
    then at least one Presentation Context item (a context ID, one Abstract
    Syntax and at least one Transfer Syntax sub-item), then one User Information
    item holding a Maximum Length sub-item; UIDs are 1-64 characters of digits
    and dots (a trailing NUL tolerated), and fixed-size sub-items have their size.
    """
    if len(body) < 68:
        raise GuardViolation("A-ASSOCIATE-RQ shorter than its fixed fields")
    _check_ae_title(body[4:20], "Called AE Title")
    _check_ae_title(body[20:36], "Calling AE Title")
    items = _items(body, 68, len(body))
    kinds = [kind for kind, _, _ in items]
    if not kinds or kinds[0] != 0x10 or kinds.count(0x10) != 1:
        raise GuardViolation("A-ASSOCIATE-RQ without one Application Context item first")
    if kinds.count(0x50) != 1 or 0x20 not in kinds:
        raise GuardViolation("A-ASSOCIATE-RQ without presentation contexts and one User Information item")
    for kind, start, end in items:
        if kind == 0x10:
            _check_uid(body[start:end], "Application Context Name")
        elif kind == 0x20:
            _check_presentation_context(body, start, end)
        elif kind == 0x50:
            _check_user_information(body, start, end)


def _items(body: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of the items between ``start`` and ``end``; lengths must nest."""
    items = []
    offset = start
    while offset < end:
        if end - offset < 4:
            raise GuardViolation(f"A-ASSOCIATE-RQ item header cut at byte {offset}")
        kind, _, length = struct.unpack_from(">BBH", body, offset)
        value = offset + 4
        if value + length > end:
            raise GuardViolation(f"A-ASSOCIATE-RQ item 0x{kind:02X} of {length} bytes runs past its parent")
        items.append((kind, value, value + length))
        offset = value + length
    return items


def _check_ae_title(value: bytes, what: str) -> None:
    """An AE title (PS3.5 AE): printable ASCII, no backslash, not only spaces (trailing NULs tolerated)."""
    title = value.rstrip(b"\0")
    if not title.strip(b" ") or any(byte < 0x20 or byte > 0x7E or byte == 0x5C for byte in title):
        raise GuardViolation(f"{what} is not a valid AE title")


def _check_uid(value: bytes, what: str) -> None:
    uid = value[:-1] if value.endswith(b"\0") else value
    if not 0 < len(uid) <= 64 or uid.strip(b"0123456789."):
        raise GuardViolation(f"{what} is not a UID")


def _check_presentation_context(body: bytes, start: int, end: int) -> None:
    if end - start < 4:
        raise GuardViolation("presentation context item shorter than its fixed fields")
    context_id = body[start]
    if context_id % 2 == 0:
        raise GuardViolation(f"presentation context ID {context_id} is even")
    subitems = _items(body, start + 4, end)
    kinds = [kind for kind, _, _ in subitems]
    if kinds.count(0x30) != 1 or kinds.count(0x40) < 1 or set(kinds) - {0x30, 0x40}:
        raise GuardViolation(f"presentation context {context_id} needs one abstract and some transfer syntaxes")
    for kind, value, value_end in subitems:
        _check_uid(body[value:value_end], "Abstract Syntax" if kind == 0x30 else "Transfer Syntax")


_USER_ITEM_SIZES = {0x51: (4, 4), 0x52: (1, 65), 0x53: (4, 4), 0x55: (1, 16)}


def _check_user_information(body: bytes, start: int, end: int) -> None:
    subitems = _items(body, start, end)
    if sum(1 for kind, _, _ in subitems if kind == 0x51) != 1:
        raise GuardViolation("User Information without one Maximum Length sub-item")
    for kind, value, value_end in subitems:
        sizes = _USER_ITEM_SIZES.get(kind)
        if sizes is not None and not sizes[0] <= value_end - value <= sizes[1]:
            raise GuardViolation(f"User Information sub-item 0x{kind:02X} of {value_end - value} bytes")
        if kind == 0x52:
            _check_uid(body[value:value_end], "Implementation Class UID")


def _command_values(command: bytes) -> dict[int, int | str]:
    """The US and UI elements of a DIMSE command set (Implicit VR Little Endian, group 0000)."""
    values: dict[int, int | str] = {}
    offset = 0
    previous = -1
    while offset < len(command):
        if len(command) - offset < 8:
            raise GuardViolation("a command set cut inside an element header")
        group, element, length = struct.unpack_from("<HHI", command, offset)
        tag = (group << 16) | element
        offset += 8
        if group != 0x0000 or tag <= previous or offset + length > len(command):
            raise GuardViolation(f"a malformed command set at element ({group:04X},{element:04X})")
        previous = tag
        value = command[offset : offset + length]
        offset += length
        if tag in (_COMMAND_FIELD, _DATA_SET_TYPE):
            if length != 2:
                raise GuardViolation(f"command element ({group:04X},{element:04X}) of {length} bytes")
            values[tag] = struct.unpack("<H", value)[0]
        elif tag in _COMMAND_UIDS:
            _check_uid(value.rstrip(b"\0 "), f"command element ({group:04X},{element:04X})")
            values[tag] = value.rstrip(b"\0 ").decode("ascii")
        elif tag in _COMMAND_AE_TITLES:
            _check_ae_title(value.rstrip(b" "), f"command element ({group:04X},{element:04X})")
    return values


class SilenceAbortedThreads(logging.Filter):
    """Drops pynetdicom's records about a connection the guard closed, from the thread that read it.

    The guard has written its own line; pynetdicom would add "connection closed
    before the entire PDU was received" and a traceback for the same event.
    """

    _local = threading.local()

    @classmethod
    def silence_this_thread(cls) -> None:
        cls._local.silenced = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("pynetdicom") and getattr(self._local, "silenced", False))


class GuardedSocket(socket.socket):
    """An accepted connection whose received bytes pass a :class:`PduGuard` before pynetdicom sees them.

    Also keeps time: until a whole A-ASSOCIATE-RQ has arrived every read waits
    at most until ``artim`` seconds after the connect; after that at most
    ``network_timeout`` seconds for the next bytes.

    Create it with :meth:`adopt`; :meth:`bind_association` gives the guard the
    association whose accepted contexts it checks.
    """

    guard: PduGuard
    _connected_at: float
    _peer: str
    _settled: Callable[[], None] | None
    _association: Any
    _aborted: bool

    @classmethod
    def adopt(
        cls, accepted: socket.socket, limits: GuardLimits, *, peer: str, on_settled: Callable[[], None] | None = None
    ) -> GuardedSocket:
        """Take over an accepted socket (its file descriptor moves to the new object)."""
        timeout = accepted.gettimeout()
        sock = cls(accepted.family, accepted.type, accepted.proto, fileno=accepted.detach())
        sock.settimeout(timeout)
        sock.start_guard(limits, peer=peer, on_settled=on_settled)
        return sock

    def start_guard(self, limits: GuardLimits, *, peer: str, on_settled: Callable[[], None] | None = None) -> None:
        """Set up the guard and start the ARTIM clock (from :meth:`adopt`, or after a TLS wrap)."""
        self._connected_at = time.monotonic()
        self._peer = peer
        self._settled = on_settled
        self._association = None
        self._aborted = False
        self.guard = PduGuard(limits, self._accepted_contexts)
        # A peer that connects and never speaks makes no read happen: a timer enforces ARTIM.
        timer = threading.Timer(limits.artim_s, self._artim_expired)
        timer.daemon = True
        timer.start()

    def _artim_expired(self) -> None:
        if self._aborted or self.guard.associate_received or self.fileno() < 0:
            return
        self._abort(GuardViolation(self._artim_message(), REASON_NOT_SPECIFIED), from_timer=True)

    def _artim_message(self) -> str:
        return "no A-ASSOCIATE-RQ within the ARTIM timeout"

    @property
    def aborted(self) -> bool:
        """Whether the guard aborted this connection."""
        return self._aborted

    def bind_association(self, association: Any) -> None:
        """The pynetdicom association reading this socket (its accepted contexts are checked)."""
        self._association = association

    def _accepted_contexts(self) -> dict[int, str]:
        association = self._association
        if association is None:
            return {}
        return {int(cx.context_id): str(cx.abstract_syntax) for cx in association.accepted_contexts}

    def _settle(self) -> None:
        settled, self._settled = self._settled, None
        if settled is not None:
            settled()
            if not self.guard.associate_received:
                self._release_waiting_association()

    def _release_waiting_association(self) -> None:
        """The connection ended before an A-ASSOCIATE-RQ: let pynetdicom's acceptor stop waiting for one.

        Its reactor waits ``acse_timeout`` for the request on the DUL's queue; an empty
        item there ends that wait at once, so a closed connection holds no thread.
        """
        association = self._association
        queue = getattr(getattr(association, "dul", None), "to_user_queue", None)
        if queue is not None:
            queue.put(None)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._aborted:
            return b""
        guard = self.guard
        try:
            if not guard.associate_received:
                left = self._connected_at + guard.limits.artim_s - time.monotonic()
                if left <= 0:
                    raise GuardViolation("no A-ASSOCIATE-RQ within the ARTIM timeout", REASON_NOT_SPECIFIED)
                super().settimeout(left)
            elif guard.pdu_started_at is not None:
                # Inside a PDU: all of it within network_timeout of its first byte, so a peer
                # trickling a byte now and then cannot hold an association (and its slot) forever.
                left = guard.pdu_started_at + guard.limits.network_timeout_s - time.monotonic()
                if left <= 0:
                    raise GuardViolation("a PDU not received within the network timeout", REASON_NOT_SPECIFIED)
                super().settimeout(left)
            elif self.gettimeout() != guard.limits.network_timeout_s:
                super().settimeout(guard.limits.network_timeout_s)  # between PDUs: set once, two syscalls each
            try:
                data = super().recv(bufsize, flags)
            except TimeoutError as exc:
                what = "no A-ASSOCIATE-RQ within the ARTIM timeout" if not guard.associate_received else "idle"
                raise GuardViolation(what, REASON_NOT_SPECIFIED) from exc
            if not data:
                self._settle()
                return data
            guard.feed(data)
            if guard.associate_received:
                self._settle()
            return data
        except GuardViolation as violation:
            self._abort(violation)
            return b""

    def abort(self, violation: GuardViolation) -> None:
        """Answer A-ABORT with ``violation``'s reason, log it, and close the connection (once)."""
        if not self._aborted:
            self._abort(violation, from_timer=True)

    def _may_send_abort(self, from_timer: bool) -> bool:
        """Whether an A-ABORT PDU can be written now (always on a plain socket)."""
        return True

    def _abort(self, violation: GuardViolation, *, from_timer: bool = False) -> None:
        self._aborted = True
        self._settle()
        SilenceAbortedThreads.silence_this_thread()
        logger.warning(
            "aborted the connection from %s: %s",
            self._peer,
            violation,
            extra={"action": "a-abort", "peer": self._peer, "reason": violation.reason},
        )
        if self._may_send_abort(from_timer):
            try:
                super().settimeout(1.0)
                super().sendall(a_abort(violation.reason))
            except (OSError, ValueError):
                pass
        try:
            socket.socket.shutdown(self, socket.SHUT_RDWR)  # the descriptor itself, also under TLS
        except OSError:
            pass

    def close(self) -> None:
        self._settle()
        super().close()
