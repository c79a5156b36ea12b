"""A pacsnode node running in this process, on a port of its own, for integration tests."""

from __future__ import annotations

from pacsnode.node.app import Node
from pacsnode.node.config import Settings
from pacsnode.storage import Archive
from tests.support.helpers import wait_until


class RunningNode:
    """The archive named by ``settings`` opened and a :class:`Node` started on it; :meth:`stop` stops it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.archive = Archive.open(settings.storage)
        self.node = Node(settings, archive=self.archive)
        self.port = self.node.start()[1]

    def stop(self) -> None:
        self.node.stop(grace=2)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Wait until the node has finished every association (its threads ended, released or aborted)."""
        wait_until(
            lambda: not self.node.ae.active_associations,
            timeout,
            "the node to finish its associations",
            details=lambda: f"still active: {self.node.ae.active_associations}",
        )
