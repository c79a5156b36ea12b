"""Who may associate, and which services each peer may use.

``policy.allowed_peers`` entries match on the calling AE title, optionally the
host it connects from, and optionally (over TLS) the subject of its verified
client certificate. A peer that no entry matches, or whose entries grant no
service, gets A-ASSOCIATE-RJ (rejected-permanent, service-user, "calling AE
title not recognised"). Once associated, every DIMSE request passes
:func:`gate_requests` before pynetdicom's service class runs: a service the
matching entries do not grant, or a C-MOVE to a destination they do not list,
is answered 0x0124 (Refused: Not Authorized, PS3.7 C.5) with an Error Comment
and nothing else happens (no sub-association, no query, a received dataset is
discarded). An empty allow list lets every peer do everything (the default,
meant for loopback; ``check-config`` warns otherwise).

Every refusal is one log record with ``event: security-alert`` and the peer's
AE title, address and the service.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE

from pacsnode.node.config import ALL_SERVICES, AllowedPeer, PolicySettings, Service, Settings
from pacsnode.node.dicom import status
from pacsnode.node.dicom.tls import Subject, format_subject, parse_subject

__all__ = ["AccessPolicy", "Grant", "exposure_warnings", "gate_requests", "service_of"]

logger = logging.getLogger(__name__)

_COMMENT_MAX = 64


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What one associated peer may do: services, and C-MOVE destinations (None: any remote node)."""

    services: frozenset[str]
    move_destinations: frozenset[str] | None = None

    def allows(self, service: str, move_destination: str | None = None) -> bool:
        if service not in self.services:
            return False
        if service == "move" and self.move_destinations is not None:
            return (move_destination or "").strip() in self.move_destinations
        return True


OPEN = Grant(services=frozenset(ALL_SERVICES))


@dataclass(frozen=True)
class _Entry:
    ae_title: str
    host: str | None
    subject: Subject | None
    services: frozenset[str]
    move_destinations: frozenset[str] | None

    @classmethod
    def of(cls, peer: AllowedPeer) -> _Entry:
        return cls(
            ae_title=peer.ae_title,
            host=peer.host,
            subject=parse_subject(peer.certificate_subject) if peer.certificate_subject else None,
            services=frozenset(peer.services),
            move_destinations=frozenset(peer.move_destinations) if peer.move_destinations is not None else None,
        )

    def matches(self, calling: str, host: str, subject: Subject | None) -> bool:
        if self.ae_title != calling or (self.host is not None and self.host != host):
            return False
        return self.subject is None or (subject is not None and self.subject <= subject)


class AccessPolicy:
    """The allow list with its permissions, built once from ``policy``."""

    def __init__(self, settings: PolicySettings) -> None:
        self._entries = [_Entry.of(peer) for peer in settings.allowed_peers]

    @property
    def restricts(self) -> bool:
        return bool(self._entries)

    def grant(self, calling_ae_title: str, host: str, subject: Subject | None = None) -> Grant | None:
        """What this peer may do (the union over the entries it matches); None when no entry matches."""
        if not self._entries:
            return OPEN
        calling = calling_ae_title.strip()
        matched = [e for e in self._entries if e.matches(calling, host, subject)]
        if not matched:
            return None
        services = frozenset().union(*(e.services for e in matched))
        destinations: frozenset[str] | None = frozenset()
        for entry in matched:
            if "move" not in entry.services:
                continue
            if entry.move_destinations is None or destinations is None:
                destinations = None
            else:
                destinations = destinations | entry.move_destinations
        return Grant(services=services, move_destinations=destinations)


_SERVICES: dict[type, Service] = {C_ECHO: "echo", C_STORE: "store", C_FIND: "find", C_MOVE: "move", C_GET: "get"}


def service_of(message: object) -> Service | None:
    """The service a DIMSE request asks for (None: a message the permissions do not cover)."""
    return _SERVICES.get(type(message))


def security_alert(message: str, *args: object, **fields: Any) -> None:
    """One WARNING record with ``event: security-alert`` (the audit trail picks these up)."""
    logger.warning(message, *args, extra={"event": "security-alert", **fields})


def gate_requests(assoc: Any, grant: Callable[[], Grant]) -> None:
    """Check every DIMSE request on an accepted association against the peer's grant before it is served.

    Wraps the association's request dispatcher (``Association._serve_request``,
    checked by ``tests/unit/test_pynetdicom_internals.py``).
    """
    serve = assoc._serve_request

    def gated(message: Any, context_id: int) -> None:
        service = service_of(message)
        destination = str(getattr(message, "MoveDestination", "") or "").strip() if service == "move" else None
        if service is None or grant().allows(service, destination):
            serve(message, context_id)
            return
        _refuse(assoc, message, context_id, service, destination)

    assoc._serve_request = gated


def allows(assoc: Any, service: Service) -> tuple[bool, str]:
    """Whether the peer of an accepted association may use ``service``; (False, comment) after logging the refusal.

    For data paths that serve requests without pynetdicom's dispatcher (``node.dicom.lean``):
    the same grant, alert and comment as :func:`gate_requests`.
    """
    grant = getattr(getattr(assoc, "acse", None), "grant", None)
    if isinstance(grant, Grant) and grant.allows(service, None):
        return True, ""
    return False, _refusal(assoc, service, None)


def _refusal(assoc: Any, service: Service, destination: str | None) -> str:
    """Log the refusal as a security alert; the Error Comment for the response."""
    calling = str(assoc.requestor.ae_title)
    host = str(assoc.requestor.address)
    what = f"C-{service.upper()}" + (f" to {destination!r}" if destination is not None else "")
    comment = f"{what} not authorized for {calling}"[:_COMMENT_MAX]
    security_alert(
        "refused %s from %r at %s with 0x%04X: not authorized",
        what,
        calling,
        host,
        status.NOT_AUTHORIZED,
        action="not-authorized",
        peer=host,
        calling_ae_title=calling,
        service=service,
        move_destination=destination,
        status=status.NOT_AUTHORIZED,
    )
    return comment


def _refuse(assoc: Any, request: Any, context_id: int, service: Service, destination: str | None) -> None:
    comment = _refusal(assoc, service, destination)
    received = getattr(request, "_dataset_path", None)
    if received is not None:  # a C-STORE dataset pynetdicom already wrote to a file
        Path(received).unlink(missing_ok=True)
    rsp = type(request)()
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    if service == "store":
        rsp.AffectedSOPInstanceUID = request.AffectedSOPInstanceUID
    rsp.Status = status.NOT_AUTHORIZED
    rsp.ErrorComment = comment
    assoc.dimse.send_msg(rsp, context_id)


def peer_subject(assoc: Any) -> Subject | None:
    """The verified client certificate subject of an accepted association (None on a plain connection)."""
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(sock, "socket", None)
    subject = getattr(sock, "peer_subject", None)
    return subject() if callable(subject) else None


def describe_subject(subject: Subject | None) -> str:
    return format_subject(subject)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: treat it as reachable from the network
        return False


def exposure_warnings(settings: Settings) -> list[str]:
    """What an admin should fix before the node listens beyond loopback (``check-config`` prints these).

    Empty while ``node.host`` is a loopback address.
    """
    node, policy = settings.node, settings.policy
    if _loopback(node.host):
        return []
    where = f"the node listens on {node.host}"
    out = []
    if not policy.allowed_peers:
        out.append(f"{where} and policy.allowed_peers is empty: any peer may store, query, retrieve and move")
    if node.tls is None:
        out.append(f"{where} without TLS (node.tls): patient data and AE titles cross the network in clear text")
    elif node.tls.port is not None:
        out.append(f"{where} with a plain port ({node.port}) beside the TLS port ({node.tls.port})")
    for peer in policy.allowed_peers:
        if peer.host is None and peer.certificate_subject is None and peer.services:
            out.append(
                f"policy.allowed_peers: {peer.ae_title} names neither a host nor a certificate_subject: "
                f"anyone claiming that AE title may {', '.join(peer.services)}"
            )
        elif "move" in peer.services and peer.move_destinations is None:
            out.append(
                f"policy.allowed_peers: {peer.ae_title} may C-MOVE to every remote node (move_destinations unset)"
            )
    return out
