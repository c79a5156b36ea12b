"""The HTTP process: uvicorn serving :func:`~pacsnode.node.http.app.build_app` on a socket opened by ``serve``.

``serve`` binds the HTTP port itself (so a port in use fails at start-up, not in a restart loop) and
forks this process under its supervisor; SIGTERM makes uvicorn finish the requests in flight and stop.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from types import FrameType

from pacsnode.node.config import Settings

__all__ = ["open_http_socket", "run_http_process"]

logger = logging.getLogger(__name__)


def open_http_socket(settings: Settings) -> socket.socket:
    """Bind and listen on ``http.host:http.port`` (blocking; uvicorn accepts on it)."""
    http = settings.http
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: a response written in two pieces (head, body) must not
    # wait for the client's delayed ACK (about 40 ms a request on loopback).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((http.host, http.port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_http_process(settings: Settings, sock: socket.socket) -> int:
    """Body of the HTTP process: serve until SIGTERM/SIGINT."""
    import uvicorn

    from pacsnode.node.http.app import build_app
    from pacsnode.node.http.context import HttpContext

    ctx = HttpContext.open(settings)
    http = settings.http
    config = uvicorn.Config(
        build_app(ctx),
        log_config=None,  # the node's logging, set up by the entry point
        access_log=False,
        ssl_certfile=str(http.tls_cert) if http.tls_cert else None,
        ssl_keyfile=str(http.tls_key) if http.tls_key else None,
        timeout_graceful_shutdown=int(settings.node.timeouts.shutdown_grace),
        server_header=False,
    )
    server = uvicorn.Server(config)
    scheme = "https" if http.tls_cert else "http"
    host, port = sock.getsockname()[:2]
    logger.info("HTTP serving on %s://%s:%d (pid %d)", scheme, host, port, os.getpid())
    # uvicorn catches SIGTERM/SIGINT while it runs and raises the signal again once it has stopped,
    # with the handlers it found: a no-op here, so a requested stop ends the process with status 0.
    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
    try:
        server.run(sockets=[sock])
    finally:
        ctx.archive.close()
    return 0


def _stopped(signum: int, _frame: FrameType | None) -> None:
    logger.info("signal %d: HTTP server stopped (pid %d)", signum, os.getpid())
