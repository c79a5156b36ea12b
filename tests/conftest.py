from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.app import Node, configure_pynetdicom
from node.config import Settings
from storage import Archive
from tests.helpers import make_settings


@pytest.fixture(scope="session", autouse=True)
def _pynetdicom_config() -> None:
    configure_pynetdicom()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


class RunningNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.archive = Archive.open(settings.storage)
        self.node = Node(settings, archive=self.archive)
        self.port = self.node.start()[1]

    def stop(self) -> None:
        self.node.stop(grace=2)


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


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run the README's test command, which installs it")
    return path
