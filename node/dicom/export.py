"""SCU side: C-ECHO and C-STORE to remote nodes.

Files are sent as stored (pynetdicom's chunked send: no decode, no re-encode),
so each file needs a presentation context in its own transfer syntax. The
contexts are grouped so that no association proposes more than 128.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association

from pacsnode.node.config import RemoteNode, Settings
from pacsnode.node.dicom import status
from pacsnode.node.dicom.contexts import Verification
from pacsnode.node.dicom.handlers import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    set_nodelay,
)
from pacsnode.node.dicom.tls import client_args
from pacsnode.node.errors import UnknownNodeError

__all__ = ["ExportOutcome", "resolve_node", "echo", "collect_files", "send_files", "make_ae", "why_not_established"]

logger = logging.getLogger(__name__)

_MAX_CONTEXTS = 128
_AD_HOC = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+|\[[^\]]+\]):(?P<port>\d{1,5})$")


@dataclass(frozen=True, kw_only=True)
class ExportOutcome:
    """What happened to one file."""

    path: Path
    sop_instance_uid: str | None
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == status.SUCCESS or (self.status & 0xF000) == 0xB000)


def resolve_node(settings: Settings, name: str) -> RemoteNode:
    """A configured node by name, or an ad-hoc ``AET@HOST:PORT``."""
    if name in settings.remote_nodes:
        return settings.remote_nodes[name]
    match = _AD_HOC.match(name)
    if match:
        return RemoteNode(ae_title=match["aet"], host=match["host"].strip("[]"), port=int(match["port"]))
    known = ", ".join(sorted(settings.remote_nodes)) or "none configured"
    raise UnknownNodeError(f"unknown node {name!r} (known: {known}; or write AET@HOST:PORT)")


def make_ae(settings: Settings) -> AE:
    """An AE for requesting associations: our AE title, implementation UID, timeouts and PDU size."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = settings.node.timeouts.acse
    ae.dimse_timeout = settings.node.timeouts.dimse
    ae.network_timeout = settings.node.timeouts.network
    ae.maximum_pdu_size = settings.node.max_pdu
    return ae


def echo(settings: Settings, remote: RemoteNode) -> tuple[bool, str]:
    """C-ECHO the remote; return (ok, message)."""
    ae = make_ae(settings)
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        remote.host,
        remote.port,
        ae_title=remote.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
        **client_args(remote),
    )
    if not assoc.is_established:
        return False, why_not_established(assoc, remote)
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        return False, f"no C-ECHO response from {remote.ae_title}@{remote.host}:{remote.port}"
    code = int(rsp.Status)
    return code == status.SUCCESS, f"C-ECHO status 0x{code:04X} from {remote.ae_title}@{remote.host}:{remote.port}"


def why_not_established(assoc: object, remote: RemoteNode) -> str:
    where = f"{remote.ae_title}@{remote.host}:{remote.port}"
    if getattr(assoc, "is_rejected", False):
        return f"association rejected by {where} (check the AE titles and the peer's allow list)"
    if getattr(assoc, "is_aborted", False):
        return f"association aborted by {where}"
    return f"cannot connect to {where}"


def collect_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, and every file under each folder named, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


@dataclass(frozen=True)
class _Identity:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _identify(path: Path) -> _Identity | ExportOutcome:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        ts = ds.file_meta.get("TransferSyntaxUID")
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        sop_inst = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        return ExportOutcome(path=path, sop_instance_uid=None, status=None, error=f"not a readable DICOM file: {exc}")
    if not ts or not sop_class or not sop_inst:
        return ExportOutcome(
            path=path, sop_instance_uid=None, status=None, error="no File Meta transfer syntax or SOP UIDs"
        )
    return _Identity(path, str(sop_class), str(sop_inst), str(ts))


def _batches(items: list[_Identity]) -> Iterator[list[_Identity]]:
    """Split into groups whose distinct (SOP class, transfer syntax) pairs fit one association."""
    batch: list[_Identity] = []
    contexts: set[tuple[str, str]] = set()
    for item in items:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in contexts and len(contexts) >= _MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        yield batch


def _established(assoc: Association) -> bool:
    """Whether ``assoc`` is still established: it can drop while files are sent.

    A call rather than the property, so that a type checker does not carry over
    what the check right after associating found.
    """
    return assoc.is_established


def send_files(
    settings: Settings,
    remote: RemoteNode,
    files: list[Path],
    *,
    progress: Callable[[ExportOutcome], object] | None = None,
) -> list[ExportOutcome]:
    """C-STORE every file to ``remote``; one outcome per file, in order."""
    outcomes: list[ExportOutcome] = []

    def done(outcome: ExportOutcome) -> None:
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)

    identities: list[_Identity] = []
    for path in files:
        ident = _identify(path)
        if isinstance(ident, ExportOutcome):
            done(ident)
        else:
            identities.append(ident)

    for batch in _batches(identities):
        ae = make_ae(settings)
        for sop_class, ts in dict.fromkeys((i.sop_class_uid, i.transfer_syntax_uid) for i in batch):
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(
            remote.host,
            remote.port,
            ae_title=remote.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            **client_args(remote),
        )
        if not assoc.is_established:
            reason = why_not_established(assoc, remote)
            for item in batch:
                done(ExportOutcome(path=item.path, sop_instance_uid=item.sop_instance_uid, status=None, error=reason))
            continue
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        try:
            for item in batch:
                if not _established(assoc):
                    done(
                        ExportOutcome(
                            path=item.path,
                            sop_instance_uid=item.sop_instance_uid,
                            status=None,
                            error="association lost",
                        )
                    )
                    continue
                if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                    done(
                        ExportOutcome(
                            path=item.path,
                            sop_instance_uid=item.sop_instance_uid,
                            status=None,
                            error="the peer accepted no context for this SOP class and transfer syntax",
                        )
                    )
                    continue
                try:
                    rsp = assoc.send_c_store(item.path)
                except Exception as exc:  # pynetdicom raises on a file it cannot send
                    done(
                        ExportOutcome(
                            path=item.path,
                            sop_instance_uid=item.sop_instance_uid,
                            status=None,
                            error=f"{type(exc).__name__}: {exc}",
                        )
                    )
                    continue
                if "Status" in rsp:
                    comment = rsp.get("ErrorComment")
                    done(
                        ExportOutcome(
                            path=item.path,
                            sop_instance_uid=item.sop_instance_uid,
                            status=int(rsp.Status),
                            error=str(comment) if comment else None,
                        )
                    )
                else:
                    done(
                        ExportOutcome(
                            path=item.path,
                            sop_instance_uid=item.sop_instance_uid,
                            status=None,
                            error="no response (timeout or association aborted)",
                        )
                    )
        finally:
            if assoc.is_established:
                assoc.release()
    return outcomes
