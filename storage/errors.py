"""Exceptions raised by the storage package."""

from __future__ import annotations

__all__ = [
    "StorageError",
    "OutOfSpaceError",
    "InvalidInstanceError",
    "DuplicateInstanceError",
    "UnreadableInstanceError",
]


class StorageError(Exception):
    """Base class of every error raised by :mod:`storage`."""


class OutOfSpaceError(StorageError):
    """The store cannot take the data: disk full or below the free-space floor."""


class InvalidInstanceError(StorageError):
    """The instance cannot be indexed: a required UID is missing or malformed."""


class DuplicateInstanceError(StorageError):
    """An instance with this SOP Instance UID but other content exists and the policy rejects it."""


class UnreadableInstanceError(StorageError):
    """The bytes are not a DICOM dataset that can be parsed."""
