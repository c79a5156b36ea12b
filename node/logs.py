"""Logging set-up for the entry points (the only place handlers are attached)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from datetime import UTC, datetime
from typing import Any

__all__ = ["printable", "setup_logging"]

# C0 controls, DEL and C1 controls: what a terminal or a log reader would
# act on. A peer can put any of them in an AE title, a UID or a PatientName.
_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): safe for one log line or a terminal."""
    return text.translate(_CONTROL)


class _TextFormatter(logging.Formatter):
    """One line per record: the message's control characters are escaped (tracebacks stay as they are)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        # A traceback's lines are marked and escaped: an exception message quoting peer bytes can
        # neither forge a log line nor reach the terminal raw.
        return "\n".join(f"  | {printable(line)}" for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return "\n".join(f"  | {printable(line)}" for line in stack_info.splitlines())


_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that escaped a thread (pynetdicom's reactor, a handler) becomes one record of ours.

    Python would print a bare traceback to stderr, outside the log format. If the
    thread served an association, the association is aborted (A-ABORT, connection
    closed), so the peer is not left waiting on a reactor that died.
    """
    if args.exc_type is SystemExit:
        return
    thread = args.thread
    name = thread.name if thread is not None else "?"
    logging.getLogger("pacsnode.node").error(
        "internal error in thread %s: %s: %s",
        name,
        args.exc_type.__name__,
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback) if args.exc_value is not None else None,
        extra={"action": "thread-error"},
    )
    _abort_association_of(thread)


def _abort_association_of(thread: threading.Thread | None) -> None:
    from pacsnode.node.dicom.guard import GuardedSocket, GuardViolation

    association = getattr(thread, "assoc", thread)  # pynetdicom's reactor has .assoc; an association is a thread
    dul = getattr(association, "dul", None)
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if isinstance(sock, GuardedSocket):
        sock.abort(GuardViolation("internal error while serving the association", 0x00))


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A Python warning (pydicom, highdicom on odd data) as one record of ours, without its text.

    Library warnings quote the values they complain about, patient names
    included; operational logs name UIDs, AE titles and counts only. The
    category and where it was raised are enough to find the cause.
    """
    logging.getLogger("py.warnings").warning(
        "%s raised in %s:%d (its text is not logged: it may quote patient data)",
        category.__name__,
        os.path.basename(filename),
        lineno,
        extra={"action": "warning", "category": category.__name__},
    )


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send log records to stderr as text lines or JSON lines.

    pynetdicom's own INFO lines (one per request) are kept at WARNING unless
    the level is DEBUG: the association summary line says what happened.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"))
    from pacsnode.node.dicom.guard import SilenceAbortedThreads

    handler.addFilter(SilenceAbortedThreads())  # pynetdicom's echo of a connection the guard closed
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    threading.excepthook = _log_thread_exception
    warnings.showwarning = _log_warning
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
