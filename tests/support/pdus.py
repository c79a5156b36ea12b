"""Upper-layer PDUs as bytes (PS3.8 9.3), for peers that no DICOM library would be.

Tests use these to send what pacsnode must survive: lengths that lie, PDUs out of
place, contexts that were never accepted, streams that never end. Everything is
built by hand from the standard's layouts, so a test can break any field it wants::

    with RawPeer(port) as peer:
        ac = peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        peer.send(p_data(pdv(99, c_echo_rq(1), command=True, last=True)))
        outcome = peer.outcome(timeout=10)
        assert outcome.aborted_by_provider, outcome

:class:`Outcome` is what came back on a connection (an A-ABORT, a close, a reset, or
nothing before the deadline); its ``str()`` says so for a failure message.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "APPLICATION_CONTEXT",
    "CT_IMAGE_STORAGE",
    "EXPLICIT_VR_LE",
    "IMPLICIT_VR_LE",
    "LIMIT_REASONS",
    "MR_IMAGE_STORAGE",
    "P_DATA_TF",
    "PROTOCOL_ERROR_REASONS",
    "VERIFICATION",
    "AssociateAC",
    "Outcome",
    "RawPeer",
    "abort",
    "ae_title",
    "associate_rq",
    "c_echo_rq",
    "c_store_rq",
    "command_set",
    "dimse_statuses",
    "item",
    "length_fields",
    "p_data",
    "parse_associate_ac",
    "parse_pdus",
    "pdu",
    "pdv",
    "presentation_context",
    "release_rq",
    "user_information",
]

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

# A-ABORT source and reasons (PS3.8 9.3.8)
SOURCE_SERVICE_PROVIDER = 2
REASON_UNRECOGNISED_PDU = 1
REASON_UNEXPECTED_PDU = 2
REASON_UNRECOGNISED_PARAMETER = 4
REASON_UNEXPECTED_PARAMETER = 5
REASON_INVALID_PARAMETER = 6
#: What pacsnode answers a length or limit exceeded, or a PDU out of place, with.
LIMIT_REASONS = (REASON_UNEXPECTED_PDU, REASON_INVALID_PARAMETER)
#: Every reason that names a protocol error (all but 0, "not specified"): for malformed streams.
PROTOCOL_ERROR_REASONS = (
    REASON_UNRECOGNISED_PDU,
    REASON_UNEXPECTED_PDU,
    REASON_UNRECOGNISED_PARAMETER,
    REASON_UNEXPECTED_PARAMETER,
    REASON_INVALID_PARAMETER,
)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

#: What the raw peer calls itself (Implementation Class UID under the test-data root).
RAW_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1432.99.1"

Context = tuple[int, str, Sequence[str]]  # (presentation context id, abstract syntax, transfer syntaxes)


# -- building ------------------------------------------------------------------------------------


def _text(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("ascii")


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length (``length`` overrides the true one), body."""
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def item(item_type: int, body: bytes, *, length: int | None = None) -> bytes:
    """A variable item or sub-item of an association PDU: type, reserved, 2-byte length, body."""
    return struct.pack(">BBH", item_type, 0, len(body) if length is None else length) + body


def ae_title(value: str | bytes) -> bytes:
    """An AE title field: 16 bytes, space padded (longer values are cut, as the field is fixed)."""
    return _text(value)[:16].ljust(16, b" ")


def presentation_context(
    context_id: int, abstract_syntax: str | bytes, transfer_syntaxes: Iterable[str | bytes]
) -> bytes:
    """A presentation context item of an A-ASSOCIATE-RQ (0x20) with its sub-items."""
    body = struct.pack(">BBBB", context_id, 0, 0, 0) + item(0x30, _text(abstract_syntax))
    body += b"".join(item(0x40, _text(ts)) for ts in transfer_syntaxes)
    return item(0x20, body)


def user_information(
    *, max_pdu: int = 16384, implementation_uid: str = RAW_IMPLEMENTATION_UID, version_name: str = "RAWPEER"
) -> bytes:
    """A user information item (0x50): maximum length, implementation class UID and version name."""
    body = item(0x51, struct.pack(">I", max_pdu)) + item(0x52, _text(implementation_uid))
    body += item(0x55, _text(version_name))
    return item(0x50, body)


def associate_rq(
    contexts: Sequence[Context] = ((1, VERIFICATION, (IMPLICIT_VR_LE,)),),
    *,
    called: str | bytes = "PACSNODE",
    calling: str | bytes = "RAWPEER",
    max_pdu: int = 16384,
    application_context: str | bytes = APPLICATION_CONTEXT,
    items: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU.

    ``items`` replaces every variable item (application context, presentation contexts,
    user information) with the given bytes; ``length`` overrides the PDU length.
    """
    if items is None:
        items = item(0x10, _text(application_context))
        items += b"".join(presentation_context(cid, abstract, ts) for cid, abstract, ts in contexts)
        items += user_information(max_pdu=max_pdu)
    fixed = struct.pack(">HH", 1, 0) + ae_title(called) + ae_title(calling) + b"\x00" * 32
    return pdu(A_ASSOCIATE_RQ, fixed + items, length=length)


def pdv(context_id: int, data: bytes, *, command: bool, last: bool, length: int | None = None) -> bytes:
    """A presentation data value item: 4-byte length, context id, message control header, fragment."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    body = struct.pack(">BB", context_id, header) + data
    return struct.pack(">I", len(body) if length is None else length) + body


def p_data(*pdvs: bytes, length: int | None = None) -> bytes:
    """A P-DATA-TF PDU holding the given PDV items."""
    return pdu(P_DATA_TF, b"".join(pdvs), length=length)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, b"\x00" * 4)


def abort(source: int = 0, reason: int = 0) -> bytes:
    return pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def _element(tag: int, value: bytes) -> bytes:
    """One implicit VR little endian element of the command group (0000,eeee)."""
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def command_set(elements: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set (implicit VR little endian, as PS3.7 requires) with its group length first.

    ``elements`` are (element number, value bytes) of group 0000, in ascending order.
    """
    body = b"".join(_element(tag, value) for tag, value in elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def c_echo_rq(message_id: int) -> bytes:
    return command_set(
        [
            (0x0002, _text(VERIFICATION)),
            (0x0100, struct.pack("<H", 0x0030)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0800, struct.pack("<H", 0x0101)),  # no dataset
        ]
    )


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    return command_set(
        [
            (0x0002, _text(sop_class_uid)),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0)),  # priority: medium
            (0x0800, struct.pack("<H", 0x0000)),  # a dataset follows
            (0x1000, _text(sop_instance_uid)),
        ]
    )


# -- reading -------------------------------------------------------------------------------------


def parse_pdus(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The complete PDUs at the start of ``data`` as (type, body), and the bytes left over."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while len(data) - offset >= 6:
        pdu_type, _, length = struct.unpack_from(">BBI", data, offset)
        if len(data) - offset - 6 < length:
            break
        out.append((pdu_type, data[offset + 6 : offset + 6 + length]))
        offset += 6 + length
    return out, data[offset:]


@dataclass
class AssociateAC:
    """What an A-ASSOCIATE-AC said: each context's result and transfer syntax, and the acceptor's max PDU."""

    contexts: dict[int, tuple[int, str]]  # id -> (result: 0 acceptance, transfer syntax)
    max_pdu: int  # 0: no limit announced

    @property
    def accepted(self) -> dict[int, str]:
        return {cid: ts for cid, (result, ts) in self.contexts.items() if result == 0}

    def fragment_size(self, ceiling: int = 65536) -> int:
        """The most dataset bytes one PDV may carry in a P-DATA within the acceptor's limit."""
        limit = self.max_pdu or ceiling
        return max(1, min(limit, ceiling) - 6)  # PDV item: 4-byte length, id, control header


def _items(body: bytes) -> Iterable[tuple[int, bytes]]:
    offset = 0
    while len(body) - offset >= 4:
        item_type, _, length = struct.unpack_from(">BBH", body, offset)
        yield item_type, body[offset + 4 : offset + 4 + length]
        offset += 4 + length


def parse_associate_ac(body: bytes) -> AssociateAC:
    """Decode the body of an A-ASSOCIATE-AC (everything after the 6-byte PDU header)."""
    contexts: dict[int, tuple[int, str]] = {}
    max_pdu = 0
    for item_type, value in _items(body[68:]):
        if item_type == 0x21 and len(value) >= 4:
            ts = ""
            for sub_type, sub in _items(value[4:]):
                if sub_type == 0x40:
                    ts = sub.rstrip(b"\x00 ").decode("ascii", "replace")
            contexts[value[0]] = (value[2], ts)
        elif item_type == 0x50:
            for sub_type, sub in _items(value):
                if sub_type == 0x51 and len(sub) == 4:
                    max_pdu = struct.unpack(">I", sub)[0]
    return AssociateAC(contexts=contexts, max_pdu=max_pdu)


def length_fields(stream: bytes) -> list[tuple[int, int, str]]:
    """Where the length fields of a PDU stream are: (offset, size in bytes, "pdu" | "item" | "pdv").

    Walks PDU headers, the variable items and sub-items of association PDUs and the
    PDV items of P-DATA-TF, as far as the stream is well formed. A PDU's type byte is
    2 bytes before its length field, an item's too. For fuzzing.
    """
    fields: list[tuple[int, int, str]] = []

    def walk_items(start: int, end: int, depth: int) -> None:
        offset = start
        while end - offset >= 4:
            item_type = stream[offset]
            length = struct.unpack_from(">H", stream, offset + 2)[0]
            fields.append((offset + 2, 2, "item"))
            inner = offset + 4
            if depth == 0 and item_type in (0x20, 0x21):
                walk_items(inner + 4, min(end, inner + length), 1)
            elif depth == 0 and item_type == 0x50:
                walk_items(inner, min(end, inner + length), 1)
            offset = inner + length

    offset = 0
    while len(stream) - offset >= 6:
        pdu_type = stream[offset]
        length = struct.unpack_from(">I", stream, offset + 2)[0]
        fields.append((offset + 2, 4, "pdu"))
        end = min(len(stream), offset + 6 + length)
        if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
            walk_items(offset + 6 + 68, end, 0)
        elif pdu_type == P_DATA_TF:
            pos = offset + 6
            while end - pos >= 4:
                fields.append((pos, 4, "pdv"))
                pos += 4 + struct.unpack_from(">I", stream, pos)[0]
        offset += 6 + length
    return fields


def dimse_statuses(pdus: Iterable[tuple[int, bytes]]) -> list[int]:
    """The Status (0000,0900) of each command set carried whole in one PDV of the given P-DATA-TF PDUs."""
    statuses: list[int] = []
    for pdu_type, body in pdus:
        if pdu_type != P_DATA_TF:
            continue
        pos = 0
        while len(body) - pos >= 6:
            length = struct.unpack_from(">I", body, pos)[0]
            control = body[pos + 5]
            data = body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if control & 0x03 != 0x03:  # not a whole command set in this fragment
                continue
            at = 0
            while len(data) - at >= 8:
                group, element, size = struct.unpack_from("<HHI", data, at)
                if (group, element) == (0x0000, 0x0900) and size == 2:
                    statuses.append(struct.unpack_from("<H", data, at + 8)[0])
                at += 8 + size
    return statuses


@dataclass
class Outcome:
    """What a peer saw on a connection after sending something the node should refuse."""

    kind: str  # "abort": an A-ABORT arrived; "closed": EOF; "reset": ECONNRESET/EPIPE; "open": neither by the deadline
    received: bytes = b""
    pdus: list[tuple[int, bytes]] = field(default_factory=list)
    waited: float = 0.0

    @property
    def abort(self) -> tuple[int, int] | None:
        """(source, reason) of the first A-ABORT received, if any."""
        for pdu_type, body in self.pdus:
            if pdu_type == A_ABORT and len(body) >= 4:
                return body[2], body[3]
        return None

    @property
    def aborted_by_provider(self) -> bool:
        """An A-ABORT from the service provider for a bad parameter or an unexpected PDU (PS3.8 9.3.8)."""
        return self.provider_abort(LIMIT_REASONS)

    def provider_abort(self, reasons: Iterable[int]) -> bool:
        """An A-ABORT from the service provider (source 2) with one of ``reasons``."""
        found = self.abort
        return found is not None and found[0] == SOURCE_SERVICE_PROVIDER and found[1] in set(reasons)

    @property
    def ended(self) -> bool:
        """The node ended the connection: an A-ABORT, a close or a reset."""
        return self.kind in ("abort", "closed", "reset")

    def __str__(self) -> str:
        types = [f"0x{t:02x}" for t, _ in self.pdus]
        detail = f"; A-ABORT source={self.abort[0]} reason={self.abort[1]}" if self.abort else ""
        head = self.received[:48].hex()
        return (
            f"{self.kind} after {self.waited:.1f} s; {len(self.received)} byte(s) received, PDU types {types}{detail}"
            f"{'; first bytes ' + head if head else ''}"
        )


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether ``sock`` has data, an end of stream or an error to read, waiting up to ``timeout`` seconds."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(max(0, int(timeout * 1000))))


class RawPeer:
    """A TCP connection to the node that sends raw bytes, optionally from another loopback address.

    ``source`` binds the client side (any 127.0.0.0/8 address reaches a node on 127.0.0.1).
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1", source: str | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if source is not None:
                self.sock.bind((source, 0))
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        except BaseException:
            self.sock.close()
            raise
        self.connected_at = time.monotonic()
        self._buffer = b""

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def half_close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def is_quiet(self) -> bool:
        """Whether the connection is still open with nothing from the node on it (a peek, no wait).

        False once the node has closed or reset it, or sent anything (an A-ABORT before a close).
        """
        return not _readable(self.sock, 0)  # readable: data, an end of stream or an error is waiting

    def read_pdu(self, timeout: float) -> tuple[int, bytes] | None:
        """The next whole PDU, or None when the connection ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            pdus, _ = parse_pdus(self._buffer)
            if pdus:
                pdu_type, body = pdus[0]
                self._buffer = self._buffer[6 + len(body) :]
                return pdu_type, body
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            chunk = self._recv(left)
            if not chunk:
                return None

    def _recv(self, timeout: float) -> bytes:
        if not _readable(self.sock, timeout):
            return b""
        try:
            chunk = self.sock.recv(65536)
        except OSError:
            return b""
        self._buffer += chunk
        return chunk

    def associate(self, contexts: Sequence[Context], *, timeout: float = 10.0, **rq: object) -> AssociateAC:
        """Send an A-ASSOCIATE-RQ and return the A-ASSOCIATE-AC; AssertionError (saying what came) otherwise."""
        self.send(associate_rq(contexts, **rq))  # type: ignore[arg-type]
        answer = self.read_pdu(timeout)
        if answer is None or answer[0] != A_ASSOCIATE_AC:
            got = "nothing" if answer is None else f"PDU type 0x{answer[0]:02x} {answer[1][:16].hex()}"
            raise AssertionError(f"association not accepted: the node answered {got}")
        return parse_associate_ac(answer[1])

    def outcome(self, timeout: float, *, until_closed: bool = False) -> Outcome:
        """Read until an A-ABORT arrives or the node closes or resets the connection, or ``timeout`` passes.

        With ``until_closed`` an A-ABORT does not end the wait: the close must follow too.
        """
        start = time.monotonic()
        deadline = start + timeout
        received = self._buffer
        self._buffer = b""
        kind = "open"
        late_looks = 0
        while True:
            pdus, _ = parse_pdus(received)
            if not until_closed and any(t == A_ABORT for t, _ in pdus):
                kind = "abort"
                break
            left = deadline - time.monotonic()
            if left <= 0:
                late_looks += 1  # a few looks past the deadline: what already arrived counts
                if late_looks > 4:
                    break
            if not _readable(self.sock, left):
                if left <= 0:
                    break
                continue
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
                    kind = "reset"
                    break
                raise
            if not chunk:
                kind = "closed"
                break
            received += chunk
        pdus, _ = parse_pdus(received)
        if kind in ("closed", "reset") and any(t == A_ABORT for t, _ in pdus):
            kind = "abort"
        return Outcome(kind=kind, received=received, pdus=pdus, waited=time.monotonic() - start)
