"""Durable file store and SQLAlchemy index of everything pacsnode holds.

No pynetdicom and no torch here: bytes in, rows out.
"""

from storage.archive import AddOutcome, AddResult, Archive
from storage.errors import (
    DuplicateInstanceError,
    InvalidInstanceError,
    OutOfSpaceError,
    StorageError,
    UnreadableInstanceError,
)
from storage.files import InstanceStore, StagedFile
from storage.index import InstanceMeta, StudySummary, read_header
from storage.settings import DuplicatePolicy, StorageSettings

__all__ = [
    "AddOutcome",
    "AddResult",
    "Archive",
    "DuplicateInstanceError",
    "DuplicatePolicy",
    "InstanceMeta",
    "InstanceStore",
    "InvalidInstanceError",
    "OutOfSpaceError",
    "StagedFile",
    "StorageError",
    "StorageSettings",
    "StudySummary",
    "UnreadableInstanceError",
    "read_header",
]
