"""DIMSE and association event handlers: the node's side of each service.

The C-STORE handler runs in the association's thread. It stages the received
bytes, reads the header, hands the instance to the archive and turns the
outcome into a status; every failure becomes a precise DIMSE status with an
Error Comment and a log line, never an exception out of the handler.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from pacsnode.node import metrics
from pacsnode.node.config import NodeSettings, PolicySettings
from pacsnode.node.deid import Reidentifier
from pacsnode.node.dicom import status
from pacsnode.node.dicom.auditing import DimseAudit
from pacsnode.storage import (
    AddOutcome,
    Archive,
    DuplicateInstanceError,
    DuplicatePolicy,
    InvalidInstanceError,
    OutOfSpaceError,
    StagedFile,
    StorageError,
    UnreadableInstanceError,
)
from pacsnode.storage.index import is_valid_uid, read_received_header
from pacsnode.storage.wire import check_dataset

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "AssociationLog",
    "IN_MEMORY_ATTRIBUTE",
    "STAGED_ATTRIBUTE",
    "StoreService",
    "encode_file_header",
    "failure_status",
    "handle_echo",
    "set_nodelay",
]

logger = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "2.25.72606423819277013431187671076741499341"
IMPLEMENTATION_VERSION_NAME = "PACSNODE_010"

_PREAMBLE = b"\x00" * 128 + b"DICM"
_COMMENT_MAX = 64  # Error Comment is LO


def set_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN: disable Nagle on the association's socket (both directions).

    Without it each small DIMSE response waits for the peer's delayed ACK,
    which caps a loopback push at about 25 instances/s.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # pragma: no cover - a socket already closed
            logger.debug("could not set TCP_NODELAY: %s", exc)


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: Verification always succeeds on an established association."""
    return status.SUCCESS


def failure_status(code: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (LO: cut to 64 characters)."""
    rsp = Dataset()
    rsp.Status = code
    rsp.ErrorComment = comment[:_COMMENT_MAX]
    return rsp


@dataclass
class _AssocStats:
    peer: str
    started: float
    calling_ae_title: str = ""
    called_ae_title: str = ""
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    outcome: str = "closed"
    failure_reasons: dict[str, int] = field(default_factory=dict)


class AssociationLog:
    """One log line per association: peer, AE titles, instances, bytes, duration, failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[int, _AssocStats] = {}

    def _get(self, event: Event) -> _AssocStats:
        key = id(event.assoc)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                addr = event.assoc.requestor.address
                port = event.assoc.requestor.port
                stats = _AssocStats(peer=f"{addr}:{port}", started=time.monotonic())
                self._stats[key] = stats
            return stats

    def on_open(self, event: Event) -> None:
        set_nodelay(event)
        self._get(event)

    def on_established(self, event: Event) -> None:
        stats = self._get(event)
        stats.calling_ae_title = event.assoc.requestor.ae_title
        stats.called_ae_title = event.assoc.acceptor.ae_title
        stats.outcome = "released"

    def on_rejected(self, event: Event) -> None:
        stats = self._get(event)
        stats.calling_ae_title = event.assoc.requestor.ae_title
        stats.outcome = "rejected"

    def on_aborted(self, event: Event) -> None:
        self._get(event).outcome = "aborted"

    def record(self, event: Event, *, size: int, failure: str | None) -> None:
        stats = self._get(event)
        if failure is None:
            stats.instances += 1
            stats.bytes += size
        else:
            stats.failures += 1
            stats.failure_reasons[failure] = stats.failure_reasons.get(failure, 0) + 1

    def on_close(self, event: Event) -> None:
        # A dataset an abort left half received would stay referenced by the association's DIMSE
        # provider until the thread object is collected: let it go now.
        dimse = getattr(event.assoc, "dimse", None)
        if dimse is not None:
            _discard_partial_file(dimse.message)
            dimse.message = None
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        guarded = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if (stats.outcome == "closed" and event.assoc.is_aborted) or getattr(guarded, "aborted", False):
            stats.outcome = "aborted"
        duration = time.monotonic() - stats.started
        metrics.association_closed(stats.calling_ae_title, stats.outcome, duration)
        level = logging.WARNING if stats.failures or stats.outcome in ("aborted", "rejected") else logging.INFO
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.failure_reasons.items()))
        logger.log(
            level,
            "association %s from %s calling=%r called=%r: %d instance(s), %d byte(s), %.2f s, %d failure(s)%s",
            stats.outcome,
            stats.peer,
            stats.calling_ae_title,
            stats.called_ae_title,
            stats.instances,
            stats.bytes,
            duration,
            stats.failures,
            f" ({reasons})" if reasons else "",
            extra={
                "action": "association",
                "outcome": stats.outcome,
                "peer": stats.peer,
                "calling_ae_title": stats.calling_ae_title,
                "called_ae_title": stats.called_ae_title,
                "instances": stats.instances,
                "bytes": stats.bytes,
                "duration_s": round(duration, 3),
                "failures": stats.failures,
            },
        )


class StoreService:
    """The C-STORE SCP: received bytes -> durable, indexed instance -> status.

    Parameters
    ----------
    archive
        Where instances go.
    settings
        The node settings (size limit).
    assoc_log
        Per-association accounting, for the association's log line.
    policy
        The peer policy: which peers ``storage.duplicate_policy: overwrite`` trusts.
        None: no peer is trusted to overwrite.
    audit
        Where the first instance of each study of an association is audited before it is
        acknowledged; None: not audited.
    reidentifier
        Maps instances sent back under a pseudonymous study (a de-identifying destination's
        results) onto the original study and patient; None: no destination de-identifies.
    """

    def __init__(
        self,
        *,
        archive: Archive,
        settings: NodeSettings,
        assoc_log: AssociationLog,
        policy: PolicySettings | None = None,
        audit: DimseAudit | None = None,
        reidentifier: Reidentifier | None = None,
    ) -> None:
        self.archive = archive
        self.audit = audit
        self.reidentifier = reidentifier
        self.max_instance_bytes = settings.max_instance_bytes
        self.max_inflated_bytes = min(settings.max_inflated_bytes, settings.max_instance_bytes)
        self.assoc_log = assoc_log
        self.policy = policy if policy is not None else PolicySettings()
        if archive.settings.duplicate_policy is DuplicatePolicy.OVERWRITE and not any(
            peer.overwrite for peer in self.policy.allowed_peers
        ):
            logger.warning(
                "storage.duplicate_policy is overwrite, but no policy.allowed_peers entry has overwrite: true; "
                "a different instance under a stored SOP Instance UID is refused (0x0111) from every peer",
                extra={"action": "config"},
            )

    def handle_store(self, event: Event) -> int | Dataset:
        """EVT_C_STORE: store the dataset exactly as received and index it."""
        request: Any = event.request
        sop_class_uid = str(request.AffectedSOPClassUID or "")
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        transfer_syntax_uid = str(event.context.transfer_syntax)
        calling = event.assoc.requestor.ae_title
        # The peer sending the instance: the requestor, or the acceptor when this node pulls with C-GET.
        peer = event.assoc.acceptor if event.assoc.is_requestor else event.assoc.requestor
        may_overwrite = self.policy.trusted_to_overwrite(str(peer.ae_title), str(peer.address))
        size = 0
        try:
            with _received_dataset(request) as received:
                size = received.view.nbytes
                code, comment = self._store(
                    received, size, sop_class_uid, sop_instance_uid, transfer_syntax_uid, calling, may_overwrite, event
                )
        except Exception as exc:  # a bug must cost one instance, not the association
            logger.exception("unexpected error storing %.80s", sop_instance_uid)
            code, comment = status.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}"
        metrics.instance_received(calling, code, size)
        if code == status.SUCCESS:
            self.assoc_log.record(event, size=size, failure=None)
            return status.SUCCESS
        self.assoc_log.record(event, size=size, failure=f"0x{code:04X}")
        logger.warning(
            "C-STORE of %.80s from %r failed with 0x%04X: %s",
            sop_instance_uid,
            calling,
            code,
            comment,
            extra={"action": "c-store", "status": code, "sop_instance_uid": sop_instance_uid[:80]},
        )
        return failure_status(code, comment)

    def _store(
        self,
        received: _Received,
        size: int,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling: str,
        may_overwrite: bool,
        event: Event | None = None,
    ) -> tuple[int, str]:
        if not is_valid_uid(sop_class_uid) or not is_valid_uid(sop_instance_uid):
            return status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Affected SOP Class/Instance UID is not a valid UID"
        if size == 0:
            return status.CANNOT_UNDERSTAND, "empty dataset"
        if size > self.max_instance_bytes:
            return status.OUT_OF_RESOURCES, f"instance exceeds the limit: {size} > {self.max_instance_bytes} bytes"
        try:
            # Only a whole, consistent dataset is acknowledged: every element inside the bytes
            # received, sequences and fragments closed, pixel data as long as the image needs,
            # no File Meta elements, the encoding of the negotiated transfer syntax.
            walked = check_dataset(received.view, transfer_syntax_uid, max_inflated_bytes=self.max_inflated_bytes)
        except UnreadableInstanceError as exc:
            return status.CANNOT_UNDERSTAND, str(exc)
        try:
            # The lean data path wrote the very bytes stage() would write while they arrived.
            staged = received.staged
            if staged is not None:
                self.archive.check_space(staged.size)
            else:
                header = encode_file_header(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
                self.archive.check_space(size + len(header))
                staged = self.archive.stage(itertools.chain((header,), received.chunks()))
        except OutOfSpaceError as exc:
            return status.OUT_OF_RESOURCES, str(exc)
        except StorageError as exc:
            return status.OUT_OF_RESOURCES, str(exc)
        try:
            # From the received bytes, as walked: the staged file holds the same, behind our File Meta.
            meta = read_received_header(
                received.view,
                pixel_data_offset=walked.pixel_data_offset,
                path=staged.path,
                expected_sop_class_uid=sop_class_uid,
                expected_sop_instance_uid=sop_instance_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                top_level_headers=walked.top_level_headers,
            )
        except UnreadableInstanceError as exc:
            self.archive.discard(staged)
            return status.CANNOT_UNDERSTAND, str(exc)
        except InvalidInstanceError as exc:
            self.archive.discard(staged)
            return status.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)
        reidentified = False
        if self.reidentifier is not None:
            try:
                swapped = self.reidentifier.reidentify(staged, meta, calling_ae_title=calling)
            except Exception as exc:
                self.archive.discard(staged)
                logger.exception("cannot re-identify %.80s", sop_instance_uid)
                return status.CANNOT_UNDERSTAND, f"cannot re-identify: {type(exc).__name__}"
            if swapped is not None:
                (staged, meta), reidentified = swapped, True
        try:
            result = self.archive.add(staged, meta, calling_ae_title=calling, may_overwrite=may_overwrite)
        except DuplicateInstanceError as exc:
            return status.DUPLICATE_SOP_INSTANCE, str(exc)
        except InvalidInstanceError as exc:  # contradicts the index (storage.patient_mismatch: reject)
            return status.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc)
        except OutOfSpaceError as exc:
            return status.OUT_OF_RESOURCES, str(exc)
        except StorageError as exc:
            logger.error("cannot store %s: %s", sop_instance_uid, exc)
            return status.OUT_OF_RESOURCES, str(exc)
        if result.outcome is not AddOutcome.STORED:
            logger.info("instance %s from %r: %s", sop_instance_uid, calling, result.outcome.value)
        if self.audit is not None and event is not None:
            self.audit.instance_stored(event, meta, reidentified=reidentified)  # on disk before the Success below
        return status.SUCCESS, ""

    def store_file(
        self, path: Path, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, calling: str
    ) -> tuple[int, str]:
        """Store a Part 10 file received another way (STOW-RS) through the C-STORE path.

        The same checks, durability and statuses as :meth:`handle_store`; the UIDs come from the
        file's File Meta Information. ``path`` is consumed (removed afterwards). Returns the
        status and its comment ("" on success); never raises.
        """
        try:
            with _received_dataset(_FileRequest(_dataset_path=str(path))) as received:
                return self._store(
                    received,
                    received.view.nbytes,
                    sop_class_uid,
                    sop_instance_uid,
                    transfer_syntax_uid,
                    calling,
                    False,
                )
        except UnreadableInstanceError as exc:
            return status.CANNOT_UNDERSTAND, str(exc)
        except Exception as exc:  # a bug must cost one instance, not the request
            logger.exception("unexpected error storing %.80s", sop_instance_uid)
            return status.PROCESSING_FAILURE, f"internal error: {type(exc).__name__}"


@dataclass(frozen=True)
class _FileRequest:
    """A stand-in for a C-STORE request whose dataset pynetdicom wrote to a file: a Part 10 file."""

    _dataset_path: str


def _discard_partial_file(message: Any) -> None:
    """Remove the file pynetdicom was writing a dataset into when the association ended mid-way."""
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    try:
        partial.close()
    except OSError:
        pass
    Path(partial.name).unlink(missing_ok=True)


@dataclass
class _Received:
    """A received dataset: ``view`` for the structural walk (only element headers are read),
    ``chunks()`` for copying it into the store without mapping every page into the process."""

    view: memoryview
    file: BinaryIO | None = None
    offset: int = 0
    staged: StagedFile | None = None  # already staged with our File Meta (the lean data path)

    def chunks(self) -> Iterator[bytes | memoryview]:
        if self.file is None:
            yield self.view
            return
        self.file.seek(self.offset)
        while chunk := self.file.read(_COPY_CHUNK):
            yield chunk


_COPY_CHUNK = 1 << 20


@contextlib.contextmanager
def _received_dataset(request: Any) -> Iterator[_Received]:
    """The dataset bytes of a C-STORE request, as received, without holding them in memory.

    With pynetdicom's chunked receive (the node's setting) the fragments were
    written to a temporary file as they arrived: the dataset is mapped from it
    (page cache, not process memory) and the file is removed afterwards. An
    in-memory dataset (the other setting) is viewed in place.
    """
    received = getattr(request, "_dataset_path", None)
    if received is None:
        with request.DataSet.getbuffer() as view:
            yield _Received(view=view)
        return
    in_memory = getattr(request, IN_MEMORY_ATTRIBUTE, None)
    staged = getattr(request, STAGED_ATTRIBUTE, None)
    if in_memory is not None and staged is not None:
        # The lean data path kept the bytes it staged: no need to map the file back in.
        with memoryview(in_memory) as view:
            yield _Received(view=view, staged=staged)
        return
    path = Path(received)
    try:
        with path.open("rb") as fh:
            offset = _after_file_meta(fh)
            if os.fstat(fh.fileno()).st_size <= offset:
                yield _Received(view=memoryview(b""))
                return
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)[offset:]
                try:
                    yield _Received(view=view, file=fh, offset=offset, staged=staged)
                finally:
                    view.release()
    finally:
        path.unlink(missing_ok=True)


def _after_file_meta(fh: BinaryIO) -> int:
    """Where the dataset starts in a file pynetdicom wrote: after preamble, prefix and group 0002."""
    head = fh.read(_PREAMBLE_AND_GROUP_LENGTH)
    if len(head) < _PREAMBLE_AND_GROUP_LENGTH or head[128:132] != b"DICM" or head[132:138] != b"\x02\x00\x00\x00UL":
        raise UnreadableInstanceError("the received dataset's temporary file has no File Meta Information")
    group_length = int.from_bytes(head[140:144], "little")
    return _PREAMBLE_AND_GROUP_LENGTH + group_length


_PREAMBLE_AND_GROUP_LENGTH = 144  # 128 + "DICM" + (0002,0000) UL 4

#: Set on a C-STORE request whose ``_dataset_path`` is a :class:`StagedFile` beginning with
#: :func:`encode_file_header`'s bytes: the handler commits that file instead of copying it.
STAGED_ATTRIBUTE = "pacsnode_staged"
#: Set beside :data:`STAGED_ATTRIBUTE` by the lean data path: the dataset's bytes (what the staged
#: file holds after its File Meta), kept in memory as they arrived.
IN_MEMORY_ATTRIBUTE = "pacsnode_dataset"


def _element(group_element: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (short-length VRs, or OB)."""
    tag = struct.pack("<HH", *group_element)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1) for a received dataset.

    Encoded directly: this runs once per C-STORE, and building a pydicom
    FileMetaDataset costs more than the rest of the header handling together.
    The unit tests check the bytes against pydicom's own encoding.
    """
    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    body = b"".join(
        (
            _element((0x0002, 0x0001), b"OB", b"\x00\x01"),
            _element((0x0002, 0x0002), b"UI", _ui(sop_class_uid)),
            _element((0x0002, 0x0003), b"UI", _ui(sop_instance_uid)),
            _element((0x0002, 0x0010), b"UI", _ui(transfer_syntax_uid)),
            _element((0x0002, 0x0012), b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element((0x0002, 0x0013), b"SH", version + b" " * (len(version) % 2)),
        )
    )
    group_length = _element((0x0002, 0x0000), b"UL", struct.pack("<I", len(body)))
    return _PREAMBLE + group_length + body
