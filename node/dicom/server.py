"""The association server: socket options and association policy on top of pynetdicom.

* accepted sockets get ``TCP_NODELAY`` (see :func:`pacsnode.node.dicom.handlers.set_nodelay`)
  and a :class:`~pacsnode.node.dicom.guard.GuardedSocket` that checks what they receive;
* a host may hold at most ``max_pending_per_host`` connections that have not yet
  sent a whole A-ASSOCIATE-RQ; more are closed at once, and each gets ``artim``
  seconds to send it, so port scans and trickling peers cannot take the node's slots;
* ``max_associations`` counts established associations only: a connection still
  negotiating, or one that went away, never makes a legitimate peer wait;
* a listening socket can be handed in, so several acceptor processes share one port;
* the calling-AE allow list may also name the host each AE must come from (and over
  TLS the client certificate's subject); a peer that does not match, or may use no
  service, gets A-ASSOCIATE-RJ "calling AE title not recognised" (rejected-permanent,
  service-user, reason 3), as pynetdicom's own AE-only check does; each request of an
  accepted peer passes its permissions (:mod:`pacsnode.node.dicom.permissions`);
* with a TLS context the accepted socket is wrapped first and the guard reads the
  decrypted stream (:mod:`pacsnode.node.dicom.tls`).
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import threading
import time
from typing import Any

from pynetdicom.acse import ACSE
from pynetdicom.events import EVT_REJECTED, trigger
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from pacsnode.node import metrics
from pacsnode.node.dicom import permissions
from pacsnode.node.dicom.guard import GuardedSocket, GuardLimits
from pacsnode.node.dicom.lean import LeanDataPath
from pacsnode.node.dicom.permissions import AccessPolicy, Grant
from pacsnode.node.dicom.tls import wrap_accepted

__all__ = ["NodeServer", "PeerPolicy"]

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason
_RJ_PERMANENT = 0x01
_RJ_TRANSIENT = 0x02
_RJ_SOURCE_SERVICE_USER = 0x01
_RJ_SOURCE_PROVIDER_PRESENTATION = 0x03
_RJ_CALLING_AE_NOT_RECOGNISED = 0x03
_RJ_LOCAL_LIMIT_EXCEEDED = 0x02

# pynetdicom's own association limit counts every connection, negotiated or not; ours counts
# established associations, so pynetdicom's is set out of reach.
UNLIMITED_FOR_PYNETDICOM = 1 << 20


# Who may associate and use which service: see pacsnode.node.dicom.permissions.
PeerPolicy = AccessPolicy

_NOTHING = Grant(services=frozenset())


class _PolicyACSE(ACSE):
    def __init__(self, assoc: Any, policy: AccessPolicy, max_established: int) -> None:
        super().__init__(assoc)
        self._policy = policy
        self._max_established = max_established
        self.grant = _NOTHING  # what the peer may do, decided below

    def _negotiate_as_acceptor(self) -> None:
        established = sum(1 for a in self.assoc.ae.active_associations if a.is_acceptor and a.is_established)
        if established >= self._max_established:
            logger.warning(
                "rejected association from %s: %d associations established (the limit)",
                self.assoc.requestor.address,
                established,
            )
            self.send_reject(_RJ_TRANSIENT, _RJ_SOURCE_PROVIDER_PRESENTATION, _RJ_LOCAL_LIMIT_EXCEEDED)
            trigger(self.assoc, EVT_REJECTED, {})
            self.assoc.kill()
            return
        request = self.requestor.primitive
        if request is None:  # set from the A-ASSOCIATE-RQ before negotiation starts
            raise RuntimeError("no A-ASSOCIATE request to negotiate")
        calling = str(request.calling_ae_title)
        host = str(self.assoc.requestor.address)
        subject = permissions.peer_subject(self.assoc)
        grant = self._policy.grant(calling, host, subject)
        if grant is None or not grant.services:
            self.requestor.ae_title = calling
            permissions.security_alert(
                "rejected association from %s: calling AE title %r is not allowed from this host%s",
                host,
                calling,
                "" if subject is None else f" with certificate {permissions.describe_subject(subject)}",
                action="association-rejected",
                peer=host,
                calling_ae_title=calling,
                certificate_subject=permissions.describe_subject(subject),
            )
            self.send_reject(_RJ_PERMANENT, _RJ_SOURCE_SERVICE_USER, _RJ_CALLING_AE_NOT_RECOGNISED)
            trigger(self.assoc, EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.grant = grant
        super()._negotiate_as_acceptor()


class _NodeRequestHandler(RequestHandler):
    server: NodeServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        acse = assoc.acse = _PolicyACSE(assoc, self.server.policy, self.server.max_established)
        permissions.gate_requests(assoc, lambda: acse.grant)
        if isinstance(self.request, GuardedSocket):
            self.request.bind_association(assoc)
        if self.server.data_path is not None:
            self.server.data_path.install(assoc)
        return assoc


class _SupportedContexts(list):  # type: ignore[type-arg]
    """The supported contexts, copied cheaply for each association.

    pynetdicom deep-copies the server's contexts for every association; with
    every storage class in every transfer syntax (about 6,600 UID objects) that
    alone cost about 40 ms per association. Each association gets its own
    context objects and transfer-syntax lists (the only state negotiation
    touches); the immutable UID strings are shared.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for cx in self:
            clone = copy.copy(cx)
            clone._transfer_syntax = list(cx._transfer_syntax)
            out.append(clone)
        return out


class NodeServer(ThreadedAssociationServer):
    """A threaded association server with our request handler and socket handling.

    Parameters
    ----------
    listen_socket
        An already bound and listening socket to serve on (shared between acceptor
        processes); ``None`` binds ``address`` here.
    policy
        The peer allow list and permissions.
    tls
        A context from :func:`pacsnode.node.dicom.tls.server_context`: this listener speaks TLS only.
    """

    daemon_threads = True

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        ae_title: str,
        contexts: Any,
        ssl_context: Any = None,
        evt_handlers: Any = None,
        *,
        listen_socket: socket.socket | None = None,
        policy: AccessPolicy,
        limits: GuardLimits,
        max_established: int,
        max_pending_per_host: int,
        data_path: LeanDataPath | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._listen_socket = listen_socket
        self.data_path = data_path  # None: pynetdicom serves every association's data transfer
        self.tls = tls
        self.policy = policy
        self.limits = limits
        self.max_established = max_established
        self.max_pending_per_host = max_pending_per_host
        self._pending: dict[str, int] = {}
        self._pending_lock = threading.Lock()
        super().__init__(
            ae,
            address,
            ae_title,
            _SupportedContexts(contexts),
            ssl_context,
            evt_handlers,
            request_handler=_NodeRequestHandler,
        )

    def server_bind(self) -> None:
        if self._listen_socket is None:
            super().server_bind()
            return
        if self.socket is not None:  # the one socketserver made: we serve on the shared one instead
            self.socket.close()
        self.socket = self._listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listen_socket is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        active = len(self.active_associations) if self._listen_socket is not None else 0
        if active:
            # Several acceptor processes race for each connection on the shared socket: one that is
            # already serving associations waits a moment, so an idle process takes it and parallel
            # senders spread over the processes (and cores). The losers' accept() raises
            # BlockingIOError, which socketserver ignores.
            time.sleep(min(0.001 * active, 0.005))
        client, address = super().get_request()
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover
            pass
        host = str(address[0])
        with self._pending_lock:
            pending = self._pending.get(host, 0)
            if pending < self.max_pending_per_host:
                self._pending[host] = pending + 1
        if pending >= self.max_pending_per_host:
            client.close()
            metrics.connection_refused("pending-per-host")
            logger.warning(
                "closed a connection from %s: %d connections from this host are still negotiating (the limit)",
                host,
                pending,
                extra={"action": "connection-refused", "peer": host},
            )
            raise ConnectionRefusedError("too many pending connections from one host")  # socketserver skips it
        peer, on_settled = f"{host}:{address[1]}", lambda: self._settled(host)
        if self.tls is not None:
            return wrap_accepted(self.tls, client, self.limits, peer=peer, on_settled=on_settled), address
        return GuardedSocket.adopt(client, self.limits, peer=peer, on_settled=on_settled), address

    def _settled(self, host: str) -> None:
        """A connection from ``host`` sent its A-ASSOCIATE-RQ, or went away: it no longer counts as pending."""
        with self._pending_lock:
            left = self._pending.get(host, 0) - 1
            if left > 0:
                self._pending[host] = left
            else:
                self._pending.pop(host, None)
