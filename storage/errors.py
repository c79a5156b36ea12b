"""Exceptions raised by the storage package."""

from __future__ import annotations

__all__ = [
    "StorageError",
    "OutOfSpaceError",
    "InvalidInstanceError",
    "MisfiledInstanceError",
    "DuplicateInstanceError",
    "UnreadableInstanceError",
]


class StorageError(Exception):
    """Base class of every error raised by :mod:`storage`."""


class OutOfSpaceError(StorageError):
    """The store cannot take the data: disk full or below the free-space floor."""


class InvalidInstanceError(StorageError):
    """The instance cannot be indexed: a required UID is missing or malformed."""


class MisfiledInstanceError(InvalidInstanceError):
    """The instance contradicts the index: its study belongs to another patient, or its series to another study.

    ``reason`` is the log action (``patient-mismatch``, ``series-mismatch``); the message names
    no patient, so it can go into an Error Comment as it is.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DuplicateInstanceError(StorageError):
    """An instance with this SOP Instance UID but other content exists and the policy rejects it."""


class UnreadableInstanceError(StorageError):
    """The bytes are not a DICOM dataset that can be parsed."""
