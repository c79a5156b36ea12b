"""Durable file store and SQLAlchemy index of everything pacsnode holds.

No pynetdicom and no torch here: bytes in, rows out.
"""

from pacsnode.storage.archive import AddOutcome, AddResult, Archive
from pacsnode.storage.errors import (
    DuplicateInstanceError,
    InvalidInstanceError,
    MisfiledInstanceError,
    OutOfSpaceError,
    StorageError,
    UnreadableInstanceError,
)
from pacsnode.storage.files import InstanceStore, StagedFile
from pacsnode.storage.index import InstanceMeta, StudySummary, read_header
from pacsnode.storage.quarantine import QuarantineEntry
from pacsnode.storage.settings import DuplicatePolicy, PatientMismatchPolicy, StorageSettings

__all__ = [
    "AddOutcome",
    "AddResult",
    "Archive",
    "DuplicateInstanceError",
    "DuplicatePolicy",
    "InstanceMeta",
    "InstanceStore",
    "InvalidInstanceError",
    "MisfiledInstanceError",
    "OutOfSpaceError",
    "PatientMismatchPolicy",
    "QuarantineEntry",
    "StagedFile",
    "StorageError",
    "StorageSettings",
    "StudySummary",
    "UnreadableInstanceError",
    "read_header",
]
