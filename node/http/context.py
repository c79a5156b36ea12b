"""What the HTTP routes need, built once per HTTP process and passed in (no globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import Engine

from pacsnode.node.config import Settings
from pacsnode.node.dicom.handlers import AssociationLog, StoreService
from pacsnode.node.http.auth import Auth
from pacsnode.storage import Archive
from pacsnode.storage.queue import ExportQueue, JobQueue

__all__ = ["HttpContext"]


@dataclass(kw_only=True)
class HttpContext:
    """The node as the HTTP routes see it; ``request.app.state.ctx`` in an endpoint.

    Attributes
    ----------
    settings
        The whole configuration.
    archive
        The file store and index (``archive.engine``; read with ``storage.db.read_connection``).
    jobs, exports
        The analysis job queue and the export queue, on the same engine.
    auth
        Users, roles and the credential checks.
    store
        The C-STORE service: STOW-RS stores through it, with the same checks and statuses.
    started_at
        When the HTTP process started (``time.time()``).
    """

    settings: Settings
    archive: Archive
    jobs: JobQueue
    exports: ExportQueue
    auth: Auth
    store: StoreService
    started_at: float = field(default_factory=time.time)

    @property
    def engine(self) -> Engine:
        return self.archive.engine

    @classmethod
    def open(cls, settings: Settings, *, archive: Archive | None = None) -> HttpContext:
        """Everything for one HTTP process over ``settings`` (the archive is opened unless given)."""
        archive = archive if archive is not None else Archive(settings.storage)
        return cls(
            settings=settings,
            archive=archive,
            jobs=JobQueue(archive.engine),
            exports=ExportQueue(archive.engine),
            auth=Auth(settings.http.users, session_seconds=settings.http.session_seconds),
            store=StoreService(
                archive=archive, settings=settings.node, assoc_log=AssociationLog(), policy=settings.policy
            ),
        )
