"""Typed settings owned by the storage package."""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field

from pacsnode.storage.model_base import StrictModel

__all__ = ["DuplicatePolicy", "PatientMismatchPolicy", "StorageSettings"]


class DuplicatePolicy(str, enum.Enum):
    """What to do when a SOP Instance UID arrives again with different bytes."""

    KEEP_FIRST = "keep_first"
    OVERWRITE = "overwrite"
    REJECT = "reject"


class PatientMismatchPolicy(str, enum.Enum):
    """What to do with an instance that contradicts the index about whom or where it belongs.

    Its StudyInstanceUID is indexed under another PatientID, or its
    SeriesInstanceUID under another study.
    """

    REJECT = "reject"  # refused with 0xA900, nothing kept
    ACCEPT = "accept"  # indexed under the study (series) already indexed, and logged
    QUARANTINE = "quarantine"  # Success; kept under quarantine/, recorded, never indexed


class StorageSettings(StrictModel):
    """Where and how instances are stored and indexed."""

    root: Path = Field(
        default=Path("var/store"),
        description=(
            "Directory of the file store; a relative path in a config file resolves against the file's "
            "folder, the default against the working directory."
        ),
    )
    database_url: str = Field(
        default="sqlite:///var/pacsnode.db",
        description="SQLAlchemy URL of the index database.",
    )
    duplicate_policy: DuplicatePolicy = Field(
        default=DuplicatePolicy.KEEP_FIRST,
        description=(
            "Same SOP Instance UID, different bytes. overwrite replaces the stored copy only for peers "
            "marked overwrite: true in policy.allowed_peers; others get 0x0111."
        ),
    )
    patient_mismatch: PatientMismatchPolicy = Field(
        default=PatientMismatchPolicy.REJECT,
        description=(
            "An instance whose study is indexed under another PatientID, or whose series under another study: "
            "reject (0xA900), accept (indexed under the existing study or series), or quarantine (kept apart)."
        ),
    )
    min_free_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="Refuse instances (0xA700) when the store's disk would drop below this.",
    )
    fsync: bool = Field(
        default=True,
        description="fsync files and directories before acknowledging; turn off only for throwaway test stores.",
    )
    group_commit: bool = Field(
        default=True,
        description=(
            "Concurrent instances of one process share index transactions: all that arrived while the previous "
            "one committed go in one, each Success waits for the commit holding its row. false: one each."
        ),
    )
