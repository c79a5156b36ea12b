"""Engine creation and schema migration: one engine per process."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from pacsnode.storage.errors import StorageError

__all__ = ["READ_ONLY", "make_engine", "migrate", "read_connection", "WriteGate"]

logger = logging.getLogger(__name__)

READ_ONLY = "pacsnode_read_only"
"""Execution option marking a connection that only reads."""

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _create_private(database: Path) -> None:
    """Create the SQLite file (and missing folders) readable by the owner only, before SQLite does.

    The index holds names, IDs and birth dates. SQLite gives its WAL and shared-memory files the
    database file's permissions, so they stay private too. An existing file keeps its mode.
    """
    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def json_text(document: Any) -> str:
    """``document`` as JSON text (orjson; the standard library for what orjson refuses, e.g. huge ints)."""
    try:
        return orjson.dumps(document).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(document)


def make_engine(database_url: str) -> Engine:
    """Create the process's engine for ``database_url``.

    SQLite gets WAL journaling, ``synchronous=FULL`` (a commit survives power loss),
    a long busy timeout (several acceptor processes share one file) and
    ``BEGIN IMMEDIATE`` transactions, so that two writers never deadlock on a
    read-to-write lock upgrade. The directory of a SQLite file is created.
    """
    url = make_url(database_url)
    # JSON columns (the header documents) are written with orjson: about a tenth of the stdlib's
    # time per header, which every received instance pays.
    kwargs: dict[str, Any] = {"json_serializer": json_text}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            _create_private(Path(url.database))
        kwargs["connect_args"] = {"timeout": 60, "check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(url, **kwargs)
    except Exception as exc:  # unknown dialect, missing driver
        raise StorageError(f"cannot use database URL {url!r}: {exc}") from exc
    # Statement parameters carry patient names, IDs and birth dates: an error message or a log
    # line from the engine shows the statement only (the attribute create_engine(hide_parameters=)
    # sets; every StatementError and engine log line reads it).
    engine.hide_parameters = True
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Readers (C-FIND, retrieves) take a deferred snapshot and never queue behind writers.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection for reading: on SQLite a plain (deferred) transaction, a consistent WAL snapshot."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY: True})
        yield conn


def _alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (creates it on an empty database)."""
    try:
        command.upgrade(_alembic_config(engine), "head")
    except Exception as exc:
        raise StorageError(f"cannot migrate the index database: {exc}") from exc


class WriteGate:
    """Serialises index write transactions so waiting writers wake at once.

    SQLite admits one writer at a time; a writer that finds the lock taken
    sleeps in SQLite's busy handler for 1 ms, then 2, 5, 10 ... before it
    looks again, which with several acceptor processes costs more than the
    transactions themselves. Writers here queue on a thread lock and, across
    processes, on ``flock`` of a file beside the database, both of which wake
    the next writer as soon as the lock is released. For other databases the
    gate is open: their own row locks do the work.
    """

    def __init__(self, engine: Engine) -> None:
        self._thread_lock = threading.Lock()
        self._path: str | None = None
        url = engine.url
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            self._path = f"{url.database}.writelock"
        # The lock file, opened once per process: a flock belongs to the open file, and a forked
        # child shares its parent's, so a child opens its own (the thread lock orders this process).
        self._fd = -1
        self._fd_pid = 0

    def _lock_fd(self) -> int:
        assert self._path is not None
        if self._fd < 0 or self._fd_pid != os.getpid():
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._fd_pid = os.getpid()
        return self._fd

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self._path is None:
            yield
            return
        with self._thread_lock:
            fd = self._lock_fd()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
