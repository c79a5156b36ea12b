"""Typed settings owned by the storage package."""

from __future__ import annotations

import enum
from pathlib import Path

from pydantic import Field

from pacsnode.storage.model_base import StrictModel

__all__ = ["DuplicatePolicy", "StorageSettings"]


class DuplicatePolicy(str, enum.Enum):
    """What to do when a SOP Instance UID arrives again with different bytes."""

    KEEP_FIRST = "keep_first"
    OVERWRITE = "overwrite"
    REJECT = "reject"


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
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST
    min_free_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="Refuse instances (0xA700) when the store's disk would drop below this.",
    )
    fsync: bool = Field(
        default=True,
        description="fsync files and directories before acknowledging; turn off only for throwaway test stores.",
    )
