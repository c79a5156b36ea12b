"""Wiring and lifecycle: build the AE, bind handlers, serve, shut down cleanly.

``serve`` runs ``acceptor_processes`` copies of the association server on one
listening socket. One Python process is limited by the GIL and by pynetdicom's
polling loops; several processes sharing the socket (created here, inherited by
forked children) let parallel senders use every core. Each child has its own
database connection; SQLite's WAL and ``BEGIN IMMEDIATE`` serialise the short
index transactions. The parent only supervises: it forwards SIGTERM/SIGINT,
restarts a child that died, and reports.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import signal
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext

from pacsnode.node import audit, metrics
from pacsnode.node.config import Settings, redact_url
from pacsnode.node.deid import Reidentifier
from pacsnode.node.dicom.auditing import DimseAudit
from pacsnode.node.dicom.contexts import qr_contexts, scp_contexts
from pacsnode.node.dicom.guard import GuardLimits
from pacsnode.node.dicom.handlers import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    AssociationLog,
    StoreService,
    handle_echo,
)
from pacsnode.node.dicom.lean import LeanDataPath
from pacsnode.node.dicom.permissions import AccessPolicy
from pacsnode.node.dicom.qr import QueryRetrieveService, handle_sop_extended
from pacsnode.node.dicom.server import UNLIMITED_FOR_PYNETDICOM, NodeServer
from pacsnode.node.dicom.tls import server_context
from pacsnode.storage import Archive

__all__ = ["Node", "configure_pynetdicom", "serve", "open_listen_socket"]

logger = logging.getLogger(__name__)


# pynetdicom's own UI check, remembered per UID string (see configure_pynetdicom).
_CACHED_UI_CHECK = functools.lru_cache(maxsize=4096)(pynetdicom_config.VALIDATORS["UI"])


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom switches; called once by the entry points.

    The per-PDU debug handlers cost time on every fragment even when their log
    records are dropped, so they are not bound. File sending streams the stored
    bytes without decoding them; received datasets are written to a file as
    their fragments arrive.
    """
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    # pynetdicom dumps Q/R identifiers (patient names, IDs, birth dates) into its log at INFO and
    # DEBUG; operational logs name UIDs, AE titles and counts only (the audit trail has the rest).
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    # Received datasets go to a file fragment by fragment, never whole into memory.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    # Negotiation: pynetdicom makes each UID of an A-ASSOCIATE-RQ a pydicom UID and checks it three
    # times with regular expressions. DCMTK's storescu proposes 128 contexts (about 1,100 UIDs), and
    # those checks were about 4 ms of the 19 ms of CPU a one-instance association cost. The same few
    # hundred SOP class and transfer syntax UIDs come back in every request, so pynetdicom's UI check
    # is cached, and pydicom's check of values it reads is off: it only ever warned, and the node
    # checks what it stores itself (storage.wire's walk, the C-STORE handler's UID checks).
    pynetdicom_config.VALIDATORS["UI"] = _CACHED_UI_CHECK
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def _abstract_syntax(cx: PresentationContext) -> UID:
    """The SOP class of one of our own contexts (built with one, so never ``None``)."""
    if cx.abstract_syntax is None:
        raise ValueError(f"presentation context without an abstract syntax: {cx}")
    return cx.abstract_syntax


def open_listen_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen; non-blocking so that processes sharing it never hang in accept()."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Node:
    """One acceptor: an AE serving C-ECHO, C-STORE and Query/Retrieve over an archive.

    Parameters
    ----------
    settings
        The whole configuration.
    archive
        The archive to store into (opened by the caller).
    listen_socket
        A listening socket to serve on; ``None`` binds the configured host and port.
    tls_listen_socket
        With ``node.tls.port`` set: the listening socket of the TLS port (``None`` binds it).
    share
        How many acceptor processes share the association limit.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        archive: Archive,
        listen_socket: socket.socket | None = None,
        tls_listen_socket: socket.socket | None = None,
        share: int = 1,
    ) -> None:
        self.settings = settings
        self.archive = archive
        self._listen_socket = listen_socket
        self._tls_listen_socket = tls_listen_socket
        self.tls_server: NodeServer | None = None
        self.assoc_log = AssociationLog()
        self.audit_trail = open_audit_trail(settings)
        self.audit = DimseAudit(self.audit_trail, archive=archive, ae_title=settings.node.ae_title)
        self._alerts = audit.SecurityAlertHandler(self.audit_trail)
        deidentifying = {name: r.ae_title for name, r in settings.remote_nodes.items() if r.deidentify is not None}
        self.store_service = StoreService(
            archive=archive,
            settings=settings.node,
            assoc_log=self.assoc_log,
            policy=settings.policy,
            audit=self.audit,
            reidentifier=Reidentifier(archive, destinations=deidentifying) if deidentifying else None,
        )
        self.qr_service = QueryRetrieveService(settings=settings, archive=archive, audit=self.audit)
        self._share = share
        self.ae = self._build_ae(share)
        self.server: NodeServer | None = None

    def _build_ae(self, share: int) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.maximum_associations = UNLIMITED_FOR_PYNETDICOM  # NodeServer counts established ones
        ae.maximum_pdu_size = node.max_pdu
        ae.acse_timeout = node.timeouts.acse
        ae.dimse_timeout = node.timeouts.dimse
        ae.network_timeout = node.timeouts.network
        ae.require_called_aet = self.settings.policy.require_called_ae_title
        for cx in scp_contexts():
            # Both roles: a C-GET requestor proposes the SCP role for the storage classes it takes.
            ae.add_supported_context(_abstract_syntax(cx), cx.transfer_syntax, scu_role=True, scp_role=True)
        for cx in qr_contexts():
            ae.add_supported_context(_abstract_syntax(cx), cx.transfer_syntax)
        return ae

    def _handlers(self) -> list[EventHandlerType]:
        log = self.assoc_log
        return [
            (evt.EVT_CONN_OPEN, log.on_open),
            (evt.EVT_ESTABLISHED, log.on_established),
            (evt.EVT_REJECTED, log.on_rejected),
            (evt.EVT_ABORTED, log.on_aborted),
            (evt.EVT_CONN_CLOSE, log.on_close),
            (evt.EVT_ESTABLISHED, self.audit.on_established),
            (evt.EVT_REJECTED, self.audit.on_rejected),
            (evt.EVT_CONN_CLOSE, self.audit.on_close),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, self.store_service.handle_store),
            (evt.EVT_C_FIND, self.qr_service.handle_find),
            (evt.EVT_C_MOVE, self.qr_service.handle_move),
            (evt.EVT_C_GET, self.qr_service.handle_get),
            (evt.EVT_SOP_EXTENDED, handle_sop_extended),
        ]

    @property
    def address(self) -> tuple[str, int]:
        if self.server is None:
            raise RuntimeError("the node is not started")
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """(host, port) of the TLS listener beside the plain one (``node.tls.port``), if any."""
        if self.tls_server is None:
            return None
        host, port = self.tls_server.server_address[:2]
        return str(host), int(port)

    def _server(self, port: int, listen_socket: socket.socket | None, tls: ssl.SSLContext | None) -> NodeServer:
        node = self.settings.node
        server = self.ae.make_server(
            (node.host, port),
            evt_handlers=self._handlers(),
            server_class=NodeServer,
            listen_socket=listen_socket,
            policy=AccessPolicy(self.settings.policy),
            limits=GuardLimits(
                artim_s=node.timeouts.artim,
                network_timeout_s=node.timeouts.network,
                max_pdu=node.max_pdu,
                max_instance_bytes=node.max_instance_bytes,
            ),
            max_established=max(1, math.ceil(node.max_associations / self._share)),
            max_pending_per_host=node.max_pending_per_host,
            data_path=LeanDataPath(archive=self.archive) if node.data_path == "lean" else None,
            tls=tls,
        )
        if not isinstance(server, NodeServer):  # make_server returns server_class | ThreadedAssociationServer
            raise TypeError(f"make_server returned a {type(server).__name__}, not a NodeServer")
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="pacsnode-acceptor", daemon=True).start()
        return server

    def start(self) -> tuple[str, int]:
        """Start accepting associations in a background thread; return (host, port).

        With ``node.tls`` and no ``tls.port`` that port speaks TLS only; with
        ``tls.port`` a second listener speaks TLS there (:attr:`tls_address`).
        """
        node = self.settings.node
        logging.getLogger("pacsnode").addHandler(self._alerts)  # refusals logged as security alerts are audited
        tls = server_context(node.tls) if node.tls is not None else None
        main_tls = tls if node.tls is not None and node.tls.port is None else None
        self.server = self._server(node.port, self._listen_socket, main_tls)
        logger.info(
            "accepting associations as %r on %s:%d%s (pid %d)",
            node.ae_title,
            *self.address,
            " (TLS only)" if main_tls is not None else "",
            os.getpid(),
        )
        if node.tls is not None and node.tls.port is not None:
            self.tls_server = self._server(node.tls.port, self._tls_listen_socket, tls)
            logger.info("accepting DICOM TLS associations on %s:%d", *self.address_tls())
        return self.address

    def address_tls(self) -> tuple[str, int]:
        address = self.tls_address
        if address is None:
            raise RuntimeError("no TLS listener beside the plain one")
        return address

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish within ``grace`` seconds, then abort the rest."""
        grace = self.settings.node.timeouts.shutdown_grace if grace is None else grace
        for server in (self.server, self.tls_server):
            if server is not None:
                server.shutdown()  # stops serve_forever, closes the listening socket
        self.server = self.tls_server = None
        # Only established associations carry work to wait for: a connection still negotiating
        # is dropped with the process (its thread is a daemon), never waited on.
        deadline = time.monotonic() + grace
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = self._in_flight()
        if remaining:
            logger.warning("aborting %d association(s) still open after %.0f s", len(remaining), grace)
            for assoc in remaining:
                assoc.abort()
        logging.getLogger("pacsnode").removeHandler(self._alerts)
        self.audit_trail.close()
        self.archive.close()

    def _in_flight(self) -> list[Any]:
        """Established associations still open: the work a shutdown waits for."""
        return [assoc for assoc in self.ae.active_associations if assoc.is_established]


# -- the serve process ---------------------------------------------------------------------------


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        self.event.set()


def _run_acceptor(
    settings: Settings, listen_socket: socket.socket, share: int, tls_socket: socket.socket | None = None
) -> int:
    """Body of one acceptor (in the serve process itself or in a forked child)."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    archive = Archive(settings.storage)
    # pynetdicom writes received datasets to temporary files: keep them in the store's tmp/ (the
    # store's disk and its free-space floor, swept at start-up), not in a tmpfs /tmp.
    tempfile.tempdir = str(archive.store.tmp_dir)
    node = Node(settings, archive=archive, listen_socket=listen_socket, tls_listen_socket=tls_socket, share=share)
    node.start()
    metrics.start_heartbeat("acceptor")
    stop.event.wait()
    logger.info("signal %d: shutting down acceptor (pid %d)", stop.signum, os.getpid())
    node.stop()
    return 0


def serve(settings: Settings) -> int:
    """Run the node until SIGTERM/SIGINT. Returns the process exit status.

    Starts ``node.acceptor_processes`` acceptors and ``analysis.workers``
    worker processes (jobs, exports, scheduling), and restarts any that dies.
    """
    configure_pynetdicom()
    archive = Archive.open(settings.storage)  # migrate + sweep before anyone accepts
    archive.close()
    trail = _audit_start(settings, "serve")
    try:
        return _serve(settings)
    finally:
        _audit_stop(trail, "serve")


def open_audit_trail(settings: Settings) -> audit.AuditTrail:
    """The audit trail this process writes (see :mod:`pacsnode.node.audit`)."""
    return audit.trail_for(settings.audit, storage_root=settings.storage.root, ae_title=settings.node.ae_title)


def _audit_start(settings: Settings, role: str) -> audit.AuditTrail:
    """Application Start and the configuration loaded, recorded before the process serves anyone."""
    trail = open_audit_trail(settings)
    trail.record(audit.application_activity(started=True, role=role))
    digest = hashlib.sha256(settings.source.read_bytes()).hexdigest() if settings.source is not None else None
    trail.record(audit.configuration_loaded(source=settings.source, sha256=digest))
    return trail


def _audit_stop(trail: audit.AuditTrail, role: str) -> None:
    try:
        trail.record(audit.application_activity(started=False, role=role))
    finally:
        trail.close()


def _serve(settings: Settings) -> int:
    metrics.install_temporary()  # before the fork: every process counts into one folder
    node = settings.node
    listen_socket = open_listen_socket(node.host, node.port)
    tls_port = node.tls.port if node.tls is not None else None
    tls_socket = open_listen_socket(node.host, tls_port) if tls_port is not None else None
    count = node.acceptor_processes
    workers = settings.analysis.workers
    logger.info(
        "pacsnode serving %r on %s:%d with %d acceptor process(es) and %d worker process(es); store %s; index %s",
        node.ae_title,
        node.host,
        node.port,
        count,
        workers,
        settings.storage.root.resolve(),
        redact_url(settings.storage.database_url),
    )
    if not settings.analysis.rules and workers:
        logger.info("no analysis rules configured: workers only export what is queued")
    http_socket = _open_http(settings)
    if count == 1 and workers == 0 and http_socket is None:
        return _run_acceptor(settings, listen_socket, 1, tls_socket)
    return _supervise(settings, listen_socket, count, workers, tls_socket, http_socket=http_socket)


def _open_http(settings: Settings) -> socket.socket | None:
    """The HTTP server's listening socket (``http.enabled``), bound before any child starts."""
    if not settings.http.enabled:
        return None
    from pacsnode.node.http.server import open_http_socket

    return open_http_socket(settings)


def run_workers(settings: Settings, count: int) -> int:
    """``pacsnode worker``: run ``count`` worker processes against the configured database."""
    archive = Archive.open(settings.storage)
    archive.close()
    trail = _audit_start(settings, "worker")
    try:
        return _run_workers(settings, count)
    finally:
        _audit_stop(trail, "worker")


def _run_workers(settings: Settings, count: int) -> int:
    logger.info("pacsnode worker: %d process(es) on index %s", count, redact_url(settings.storage.database_url))
    return _supervise(settings, None, 0, count)


def _fork(body: Callable[[], int], what: str) -> int:
    pid = os.fork()
    if pid == 0:  # child
        # Not the supervisor's handlers: a SIGTERM before the child installs its own must stop it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = 1
        try:
            code = body()
        except BaseException:
            logger.exception("%s process failed", what)
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def _spawn(
    settings: Settings,
    listen_socket: socket.socket | None,
    share: int,
    role: str,
    tls_socket: socket.socket | None = None,
    http_socket: socket.socket | None = None,
) -> int:
    if role == "http":
        from pacsnode.node.http.server import run_http_process

        assert http_socket is not None
        return _fork(lambda: run_http_process(settings, http_socket), "http")
    if role == "acceptor":
        assert listen_socket is not None
        return _fork(lambda: _run_acceptor(settings, listen_socket, share, tls_socket), "acceptor")
    from pacsnode.node.worker import run_worker_process

    return _fork(lambda: run_worker_process(settings), "worker")


def _supervise(
    settings: Settings,
    listen_socket: socket.socket | None,
    count: int,
    workers: int,
    tls_socket: socket.socket | None = None,
    *,
    http_socket: socket.socket | None = None,
) -> int:
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children: dict[int, str] = {}
    for _ in range(count):
        children[_spawn(settings, listen_socket, count, "acceptor", tls_socket)] = "acceptor"
    for _ in range(workers):
        children[_spawn(settings, listen_socket, count, "worker")] = "worker"
    if http_socket is not None:
        children[_spawn(settings, listen_socket, count, "http", http_socket=http_socket)] = "http"
    while not stop.event.is_set():
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            stop.event.wait(0.2)
            continue
        role = children.pop(pid, "unknown")
        metrics.process_ended(pid)
        if role == "unknown":
            continue
        if role == "worker" and os.waitstatus_to_exitcode(wait_status) == _timeout_exit():
            logger.warning("worker process %d ended a job past its timeout; starting another", pid)
        else:
            logger.error("%s process %d exited (%s); starting another", role, pid, _describe(wait_status))
        time.sleep(0.5)
        children[_spawn(settings, listen_socket, count, role, tls_socket, http_socket)] = role
    logger.info("signal %d: stopping %d process(es)", stop.signum, len(children))
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + settings.node.timeouts.shutdown_grace + 10
    code = 0
    while children and time.monotonic() < deadline:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        children.pop(pid, None)
        if os.waitstatus_to_exitcode(wait_status) != 0:
            code = 1
    for pid, role in children.items():  # did not stop in time
        logger.error("%s process %d did not stop; killing it", role, pid)
        os.kill(pid, signal.SIGKILL)
        code = 1
    for sock in (listen_socket, tls_socket, http_socket):
        if sock is not None:
            sock.close()
    logger.info("pacsnode stopped")
    return code


def _timeout_exit() -> int:
    from pacsnode.node.worker import TIMEOUT_EXIT

    return TIMEOUT_EXIT


def _describe(wait_status: int) -> str:
    code = os.waitstatus_to_exitcode(wait_status)
    return f"signal {-code}" if code < 0 else f"status {code}"
