"""The unit-test guard (tests/support/isolation.py) refuses each thing a unit test must not do."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy

from tests.support.isolation import GUARD, IsolationError

ATTEMPTS: dict[str, Callable[[Path], object]] = {
    "socket": lambda _: socket.socket(),
    "connection": lambda _: socket.create_connection(("127.0.0.1", 9), timeout=1),
    "name lookup": lambda _: socket.getaddrinfo("localhost", 80),
    "subprocess": lambda _: subprocess.run(["true"], check=False),
    "os.system": lambda _: os.system("true"),
    "sqlite file": lambda tmp: sqlite3.connect(tmp / "index.db"),
    "engine": lambda tmp: sqlalchemy.create_engine(f"sqlite:///{tmp / 'index.db'}"),
    "in-memory engine": lambda _: sqlalchemy.create_engine("sqlite://"),
}


@pytest.mark.parametrize("attempt", list(ATTEMPTS))
def test_the_guard_refuses(attempt: str, tmp_path: Path) -> None:
    with GUARD.expected() as refused, pytest.raises(IsolationError, match="move this test to tests/integration"):
        ATTEMPTS[attempt](tmp_path)
    assert len(refused) == 1, refused


def test_a_refusal_the_code_swallowed_is_still_recorded() -> None:
    with GUARD.expected() as refused:
        try:
            socket.socket()
        except Exception:  # code under test that hides errors must not hide this one
            pass
        assert GUARD.violations, "the refusal was not recorded: the test would pass"
    assert len(refused) == 1 and "creates a socket" in refused[0]


def test_threads_the_test_starts_are_guarded() -> None:
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            socket.socket()
        except IsolationError as exc:
            errors.append(exc)

    with GUARD.expected() as refused:
        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()
    assert len(errors) == 1 and len(refused) == 1


def test_files_and_in_memory_sqlite_are_allowed(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("files are fine")
    assert (tmp_path / "a.txt").read_text() == "files are fine"
    sqlite3.connect(":memory:").close()  # as highdicom does to write a SEG
    assert GUARD.active and GUARD.violations == []
