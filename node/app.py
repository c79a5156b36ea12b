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

import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext

from pacsnode.node.config import Settings, redact_url
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
from pacsnode.node.dicom.qr import QueryRetrieveService, handle_sop_extended
from pacsnode.node.dicom.server import UNLIMITED_FOR_PYNETDICOM, NodeServer, PeerPolicy
from pacsnode.storage import Archive

__all__ = ["Node", "configure_pynetdicom", "serve", "open_listen_socket"]

logger = logging.getLogger(__name__)


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom switches; called once by the entry points.

    The per-PDU debug handlers cost time on every fragment even when their log
    records are dropped, so they are not bound. File sending streams the stored
    bytes without decoding them; received datasets are written to a file as
    their fragments arrive.
    """
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    # Received datasets go to a file fragment by fragment, never whole into memory.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True


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
    share
        How many acceptor processes share the association limit.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        archive: Archive,
        listen_socket: socket.socket | None = None,
        share: int = 1,
    ) -> None:
        self.settings = settings
        self.archive = archive
        self._listen_socket = listen_socket
        self.assoc_log = AssociationLog()
        self.store_service = StoreService(
            archive=archive, settings=settings.node, assoc_log=self.assoc_log, policy=settings.policy
        )
        self.qr_service = QueryRetrieveService(settings=settings, archive=archive)
        self._share = share
        self.ae = self._build_ae(share)
        self.server: NodeServer | None = None
        self._thread: threading.Thread | None = None

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

    def start(self) -> tuple[str, int]:
        """Start accepting associations in a background thread; return (host, port)."""
        node = self.settings.node
        server = self.ae.make_server(
            (node.host, node.port),
            evt_handlers=self._handlers(),
            server_class=NodeServer,
            listen_socket=self._listen_socket,
            policy=PeerPolicy(self.settings.policy),
            limits=GuardLimits(
                artim_s=node.timeouts.artim,
                network_timeout_s=node.timeouts.network,
                max_pdu=node.max_pdu,
                max_instance_bytes=node.max_instance_bytes,
            ),
            max_established=max(1, math.ceil(node.max_associations / self._share)),
            max_pending_per_host=node.max_pending_per_host,
            data_path=LeanDataPath(archive=self.archive) if node.data_path == "lean" else None,
        )
        if not isinstance(server, NodeServer):  # make_server returns server_class | ThreadedAssociationServer
            raise TypeError(f"make_server returned a {type(server).__name__}, not a NodeServer")
        self.ae._servers.append(server)
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, name="pacsnode-acceptor", daemon=True)
        self._thread.start()
        logger.info(
            "accepting associations as %r on %s:%d (pid %d)",
            node.ae_title,
            *self.address,
            os.getpid(),
        )
        return self.address

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish within ``grace`` seconds, then abort the rest."""
        grace = self.settings.node.timeouts.shutdown_grace if grace is None else grace
        if self.server is not None:
            self.server.shutdown()  # stops serve_forever, closes the listening socket
            self.server = None
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


def _run_acceptor(settings: Settings, listen_socket: socket.socket, share: int) -> int:
    """Body of one acceptor (in the serve process itself or in a forked child)."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    archive = Archive(settings.storage)
    # pynetdicom writes received datasets to temporary files: keep them in the store's tmp/ (the
    # store's disk and its free-space floor, swept at start-up), not in a tmpfs /tmp.
    tempfile.tempdir = str(archive.store.tmp_dir)
    node = Node(settings, archive=archive, listen_socket=listen_socket, share=share)
    node.start()
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
    node = settings.node
    listen_socket = open_listen_socket(node.host, node.port)
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
    if count == 1 and workers == 0:
        return _run_acceptor(settings, listen_socket, 1)
    return _supervise(settings, listen_socket, count, workers)


def run_workers(settings: Settings, count: int) -> int:
    """``pacsnode worker``: run ``count`` worker processes against the configured database."""
    archive = Archive.open(settings.storage)
    archive.close()
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


def _spawn(settings: Settings, listen_socket: socket.socket | None, share: int, role: str) -> int:
    if role == "acceptor":
        assert listen_socket is not None
        return _fork(lambda: _run_acceptor(settings, listen_socket, share), "acceptor")
    from pacsnode.node.worker import run_worker_process

    return _fork(lambda: run_worker_process(settings), "worker")


def _supervise(settings: Settings, listen_socket: socket.socket | None, count: int, workers: int) -> int:
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    children: dict[int, str] = {}
    for _ in range(count):
        children[_spawn(settings, listen_socket, count, "acceptor")] = "acceptor"
    for _ in range(workers):
        children[_spawn(settings, listen_socket, count, "worker")] = "worker"
    while not stop.event.is_set():
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            stop.event.wait(0.2)
            continue
        role = children.pop(pid, "unknown")
        if role == "unknown":
            continue
        if role == "worker" and os.waitstatus_to_exitcode(wait_status) == _timeout_exit():
            logger.warning("worker process %d ended a job past its timeout; starting another", pid)
        else:
            logger.error("%s process %d exited (%s); starting another", role, pid, _describe(wait_status))
        time.sleep(0.5)
        children[_spawn(settings, listen_socket, count, role)] = role
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
    if listen_socket is not None:
        listen_socket.close()
    logger.info("pacsnode stopped")
    return code


def _timeout_exit() -> int:
    from pacsnode.node.worker import TIMEOUT_EXIT

    return TIMEOUT_EXIT


def _describe(wait_status: int) -> str:
    code = os.waitstatus_to_exitcode(wait_status)
    return f"signal {-code}" if code < 0 else f"status {code}"
