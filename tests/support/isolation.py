"""Unit tests touch no network, no database and start no process: a guard makes each attempt fail.

While a test of tests/unit sets up (tests/unit/conftest.py arms :data:`GUARD`), runs and tears down, a Python audit hook refuses what a unit
test must not do: create, bind or connect a socket or resolve a host name; start a process
(``subprocess.Popen``, ``os.system``, ``os.posix_spawn``, ``os.fork``, ``os.exec*``); open an
SQLite database file (``sqlite3.connect``; highdicom's private ``:memory:`` tables, which it builds
to write a SEG, are allowed) or create an SQLAlchemy engine, in-memory or not. The call raises
:class:`IsolationError`, and the test fails even when the code under test caught it. A test
that needs any of these belongs in tests/integration (or tests/acceptance for ``pacsnode`` run
as a process).

Only the test's own work counts: the test thread and the threads started during the test, and,
while fixtures are set up or torn down, calls made from code in tests/unit. A fixture of another
tier that pytest finalises after the last unit test (a PostgreSQL server, a peer) is not refused.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy.engine

UNIT_DIR = str(Path(__file__).resolve().parents[1] / "unit") + os.sep

#: Audit events (https://docs.python.org/3/library/audit_events.html) a unit test may not raise.
FORBIDDEN_EVENTS = {
    "socket.__new__": "creates a socket",
    "socket.bind": "binds a socket",
    "socket.connect": "connects a socket",
    "socket.getaddrinfo": "resolves a host name",
    "socket.gethostbyname": "resolves a host name",
    "socket.gethostbyaddr": "resolves an address",
    "subprocess.Popen": "starts a process",
    "os.system": "starts a process",
    "os.posix_spawn": "starts a process",
    "os.fork": "forks the process",
    "os.forkpty": "forks the process",
    "os.exec": "replaces the process",
    "os.spawn": "starts a process",
    "sqlite3.connect": "opens an SQLite database",
    "pacsnode.tests.create_engine": "creates an SQLAlchemy engine",
}


class IsolationError(RuntimeError):
    """A unit test tried to use the network, a database or a process."""


class _Guard:
    def __init__(self) -> None:
        self.active = False
        self.whole_stack = False  # True while the test function runs: any guarded call counts
        self.exempt_threads: frozenset[int] = frozenset()
        self.violations: list[str] = []

    def arm(self, *, whole_stack: bool) -> None:
        main = threading.get_ident()
        self.exempt_threads = frozenset(t.ident for t in threading.enumerate() if t.ident not in (None, main))
        self.whole_stack = whole_stack
        self.violations = []
        self.active = True

    def disarm(self) -> list[str]:
        self.active = False
        return self.violations

    @contextmanager
    def expected(self) -> Iterator[list[str]]:
        """For the guard's own tests: what is refused inside the block is listed, not held against the test."""
        start = len(self.violations)
        caught: list[str] = []
        try:
            yield caught
        finally:
            caught.extend(self.violations[start:])
            del self.violations[start:]

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or event not in FORBIDDEN_EVENTS:
            return
        if event == "sqlite3.connect" and _in_memory(args[0]):
            return  # highdicom indexes a SEG's source frames in a private in-memory SQLite: no file, no server
        if threading.get_ident() in self.exempt_threads:
            return  # a thread older than this test: another tier's leftover, not this test's doing
        if not self.whole_stack and not _called_from_unit_code():
            return
        detail = ", ".join(_short(a) for a in args[:3])
        message = f"{FORBIDDEN_EVENTS[event]} ({event}: {detail})"
        self.violations.append(message)
        raise IsolationError(
            f"a unit test {message}; unit tests touch no network, database or process: "
            "move this test to tests/integration (or tests/acceptance if it runs pacsnode)"
        )


def _called_from_unit_code() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(UNIT_DIR):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _in_memory(database: object) -> bool:
    name = database.decode() if isinstance(database, bytes) else str(database)
    return name == ":memory:" or name.startswith("file::memory:")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


GUARD = _Guard()
sys.addaudithook(GUARD.hook)  # audit hooks cannot be removed; GUARD.active confines it to tests/unit

_engine_init = sqlalchemy.engine.Engine.__init__


def _guarded_engine_init(self: sqlalchemy.engine.Engine, *args: Any, **kwargs: Any) -> None:
    # No audit event marks engine creation: raise one, so that the guard sees every engine however
    # create_engine was imported (a module-level ``from sqlalchemy import create_engine`` included).
    sys.audit("pacsnode.tests.create_engine", str(args[2]) if len(args) > 2 else "")
    _engine_init(self, *args, **kwargs)


sqlalchemy.engine.Engine.__init__ = _guarded_engine_init  # type: ignore[method-assign]
