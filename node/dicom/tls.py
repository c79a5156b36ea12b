"""DICOM TLS (PS3.15 B.1, BCP 195): the listener's context, outgoing contexts, certificate subjects.

Layering on the listener: the accepted socket is wrapped in TLS first and the
:class:`~pacsnode.node.dicom.guard.PduGuard` reads the *decrypted* stream, so
every PDU check applies unchanged on a TLS port. The wrap does no I/O; the
handshake runs in the association's thread on its first read, inside the
connection's ARTIM time, so a peer that connects and never finishes the
handshake holds no thread beyond ARTIM, counts against ``max_pending_per_host``
meanwhile, and never blocks the accept loop (pynetdicom's own ``ssl_context``
handshakes inside ``accept``, where one silent peer would stop every other).

A failed handshake (a plain DICOM client on a TLS port, an untrusted or missing
client certificate, no common protocol) closes the connection and writes one
record with ``event: security-alert``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

from pacsnode.node.config import ListenerTls, RemoteNode, Settings
from pacsnode.node.dicom.guard import REASON_NOT_SPECIFIED, GuardedSocket, GuardLimits, GuardViolation
from pacsnode.node.errors import ConfigError

__all__ = [
    "GuardedTLSSocket",
    "check_tls",
    "Subject",
    "client_args",
    "client_context",
    "format_subject",
    "parse_subject",
    "server_context",
    "subject_of",
    "wrap_accepted",
]

logger = logging.getLogger(__name__)

Subject = frozenset[tuple[str, str]]

# Short names (RFC 4514 and common practice) for the attribute names Python's getpeercert() reports.
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "emailAddress": "EMAILADDRESS",
    "domainComponent": "DC",
    "serialNumber": "SERIALNUMBER",
}
_KNOWN = set(_SHORT.values())


def parse_subject(text: str) -> Subject:
    """``"CN=ct1.example.org, O=Hospital"`` as a set of (attribute, value) pairs.

    Raises
    ------
    ValueError
        A part without ``=``, an empty value, or an attribute name not in
        CN, O, OU, C, L, ST, EMAILADDRESS, DC, SERIALNUMBER.
    """
    pairs = set()
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name, value = name.strip().upper(), value.strip()
        if not sep or not value:
            raise ValueError(f"certificate_subject part {part.strip()!r} is not NAME=value")
        if name not in _KNOWN:
            raise ValueError(f"certificate_subject attribute {name!r} is not one of {', '.join(sorted(_KNOWN))}")
        pairs.add((name, value))
    if not pairs:
        raise ValueError("certificate_subject is empty")
    return frozenset(pairs)


def subject_of(peer_certificate: Mapping[str, Any] | None) -> Subject | None:
    """The subject of a verified peer certificate (``SSLSocket.getpeercert()``); None without one."""
    if not peer_certificate:
        return None
    pairs = set()
    for rdn in peer_certificate.get("subject", ()):
        for name, value in rdn:
            pairs.add((_SHORT.get(name, name).upper(), str(value)))
    return frozenset(pairs)


def format_subject(subject: Subject | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(subject)) if subject else "-"


def server_context(settings: ListenerTls) -> ssl.SSLContext:
    """The listener's context: TLS 1.2 or later, its certificate, and the client policy.

    Raises
    ------
    OSError, ssl.SSLError
        A file that cannot be read, or a key that does not fit the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.certificate, settings.private_key)
    if settings.ca_certificates is not None:
        context.load_verify_locations(cafile=settings.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
    context.sslsocket_class = GuardedTLSSocket
    return context


def client_context(remote: RemoteNode) -> ssl.SSLContext:
    """The context for associations pacsnode opens to ``remote`` (which must have ``tls``)."""
    tls = remote.tls
    if tls is None:
        raise ValueError(f"remote node {remote.ae_title} has no tls settings")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.certificate is not None and tls.private_key is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def client_args(remote: RemoteNode) -> dict[str, Any]:
    """Keyword arguments for ``AE.associate`` towards ``remote``: ``tls_args`` when it speaks TLS, else none."""
    if remote.tls is None:
        return {}
    return {"tls_args": (client_context(remote), remote.tls.server_name or remote.host)}


def wrap_accepted(
    context: ssl.SSLContext,
    accepted: socket.socket,
    limits: GuardLimits,
    *,
    peer: str,
    on_settled: Any = None,
) -> GuardedTLSSocket:
    """Wrap an accepted socket for TLS (no I/O yet) and start its guard."""
    wrapped = context.wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
    if not isinstance(wrapped, GuardedTLSSocket):  # the context was not made by server_context
        raise TypeError(f"the TLS context made a {type(wrapped).__name__}, not a GuardedTLSSocket")
    wrapped.start_guard(limits, peer=peer, on_settled=on_settled)
    return wrapped


class GuardedTLSSocket(GuardedSocket, ssl.SSLSocket):
    """A TLS connection whose decrypted bytes pass the guard; the handshake runs on the first read, within ARTIM."""

    _handshaken = False

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        if not self._handshaken and not self.aborted:
            if not self._handshake():
                return b""
        return super().recv(bufsize, flags)

    def _handshake(self) -> bool:
        left = self._connected_at + self.guard.limits.artim_s - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self.settimeout(left)
            self.do_handshake()
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            if self.aborted:  # the ARTIM timer closed it mid-handshake (and said so)
                return False
            return self._handshake_failed(exc)
        self._handshaken = True
        return True

    def _handshake_failed(self, exc: OSError) -> bool:
        if isinstance(exc, TimeoutError):
            self._abort(GuardViolation("no TLS handshake within the ARTIM timeout", REASON_NOT_SPECIFIED))
            return False
        if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
            logger.warning(
                "refused a TLS connection from %s: %s",
                self._peer,
                exc.reason or exc,
                extra={
                    "event": "security-alert",
                    "action": "tls-refused",
                    "peer": self._peer,
                    "reason": str(exc.reason or exc),
                },
            )
            self._abort(GuardViolation(f"TLS handshake failed: {exc.reason or exc}", REASON_NOT_SPECIFIED))
            return False
        self._settle()  # the peer went away before or during the handshake (a port probe, a health check)
        return False

    def peer_subject(self) -> Subject | None:
        """The subject of the peer's verified certificate, if it showed one."""
        if not self._handshaken:
            return None
        try:
            return subject_of(self.getpeercert())
        except (ValueError, OSError):
            return None

    def _artim_message(self) -> str:
        if not self._handshaken:
            return "no TLS handshake within the ARTIM timeout"
        return super()._artim_message()

    def _may_send_abort(self, from_timer: bool) -> bool:
        # No A-ABORT before the handshake (there is no TLS channel to send it on), and none from the
        # ARTIM timer's thread while the association's thread may be inside the TLS connection.
        return self._handshaken and not from_timer


def check_tls(settings: Settings) -> None:
    """Load every certificate, key and CA file the configuration names, as the node will.

    Raises
    ------
    ConfigError
        Naming the key (``node.tls``, ``remote_nodes.NAME.tls``) and what is wrong.
    """
    where = f"{settings.source}: " if settings.source else ""
    if settings.node.tls is not None:
        try:
            server_context(settings.node.tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(f"{where}node.tls: cannot load the certificate, key or CA file: {exc}") from exc
    for name, remote in settings.remote_nodes.items():
        if remote.tls is None:
            continue
        try:
            client_context(remote)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{where}remote_nodes.{name}.tls: cannot load a certificate, key or CA file: {exc}"
            ) from exc
