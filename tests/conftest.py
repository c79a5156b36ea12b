from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pacsnode.node.app import configure_pynetdicom
from pacsnode.node.config import Settings
from tests.support.helpers import make_settings
from tests.support.node import RunningNode
from tests.support.peers import Modality, OrthancPeer, StorescpPeer, require_private_netns


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """Tests that run the CLI in-process attach handlers to pytest's captured streams: undo that.

    Otherwise a later test's threads log into a stream pytest has closed.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _pynetdicom_config() -> None:
    configure_pynetdicom()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def start_node() -> Iterator[type[RunningNode]]:
    started: list[RunningNode] = []

    def _start(settings: Settings) -> RunningNode:
        node = RunningNode(settings)
        started.append(node)
        return node

    yield _start  # type: ignore[misc]
    for node in started:
        node.stop()


@pytest.fixture
def node(start_node, settings: Settings) -> RunningNode:  # type: ignore[no-untyped-def]
    return start_node(settings)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancPeer]]:
    """Start Orthanc peers: ``orthanc_factory(modalities={"NODE": (aet, host, port)}, ae_title=...)``.

    Each gets its own folder under ``tmp_path``; all are stopped (by PID) after the test.
    Fails unless pytest runs in a private network namespace (``bash .ci/test``).
    """
    require_private_netns()
    started: list[OrthancPeer] = []

    def _start(
        *, ae_title: str = "ORTHANC", modalities: dict[str, Modality] | None = None, **config: object
    ) -> OrthancPeer:
        peer = OrthancPeer(
            tmp_path / f"orthanc-{len(started)}", ae_title=ae_title, modalities=modalities, config=config
        )
        started.append(peer)
        return peer.start()

    yield _start
    for peer in started:
        peer.stop()


@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StorescpPeer]]:
    """Start DCMTK storescp peers: ``storescp_factory(ae_title="STORESCP")``; stopped after the test."""
    require_private_netns()
    started: list[StorescpPeer] = []

    def _start(*, ae_title: str = "STORESCP") -> StorescpPeer:
        peer = StorescpPeer(tmp_path / f"storescp-{len(started)}", ae_title=ae_title)
        started.append(peer)
        return peer.start()

    yield _start
    for peer in started:
        peer.stop()


# -- PostgreSQL: a real server started by the tests (tests/support/pg.py) --------------------------------

import itertools  # noqa: E402  (this block is self-contained)
import re  # noqa: E402

from tests.support.pg import PostgresNotInstalledError, PostgresServer  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run (initdb in a temporary folder, 127.0.0.1, trust auth).

    Fails, never skips, when PostgreSQL is not installed. Stopped by its PID after the run.
    """
    try:
        server = PostgresServer()
    except PostgresNotInstalledError as exc:
        pytest.fail(f"{exc}: run the README's test command (`bash .ci/test`), which installs it")
    with server:
        yield server


_pg_databases = itertools.count()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test: its SQLAlchemy URL (``postgresql+psycopg://...``).

    Dropped after the test (sessions still connected to it are ended).
    """
    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())
    name = f"t{next(_pg_databases)}_{stem}"[:63]
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)
