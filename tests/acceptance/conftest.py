"""Acceptance fixtures: a node a failed test left running is stopped, by its PID, before the next test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.support.served import Served


@pytest.fixture(autouse=True)
def _stop_nodes_left_running() -> Iterator[None]:
    yield
    for served in list(Served.running):
        if served.proc is None:
            continue
        try:
            served.stop()  # SIGTERM: the supervisor stops its acceptors and workers too
        except subprocess.TimeoutExpired:
            served.kill()
