"""The durable file store: bytes on disk, written atomically, named by hashes.

Layout under the store root::

    tmp/                      files being written; anything here at start-up is debris
    objects/ab/<h>-<c>.dcm    h = sha256(SOP Instance UID), ab its first two hex digits,
                              c = the first 16 hex digits of the content's sha256
    quarantine/<h>-<c>.dcm    instances kept but not indexed (``storage.patient_mismatch: quarantine``)

The 256 fan-out directories are made once, when the store is opened, so that
storing an instance never creates a directory on the hot path.

No path component is ever built from UID text, so a hostile UID cannot name a
location outside the store.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pacsnode.storage.errors import OutOfSpaceError, StorageError
from pacsnode.storage.settings import StorageSettings

__all__ = ["InstanceStore", "StageWriter", "StagedFile", "uid_digest"]

logger = logging.getLogger(__name__)

_TMP = "tmp"
_OBJECTS = "objects"
_QUARANTINE = "quarantine"


def uid_digest(uid: str) -> str:
    """Return the hex sha256 of a UID: the only form in which a UID reaches a path."""
    return hashlib.sha256(uid.encode("ascii", "backslashreplace")).hexdigest()


# check_space reads the free space again after this long, or sooner when less than the slack remains above the floor.
_SPACE_FRESH_S = 0.25
_SPACE_SLACK = 256 << 20

_PRIVATE_DIR = 0o700
_PRIVATE_FILE = 0o600


@dataclass(frozen=True, kw_only=True)
class StagedFile:
    """A complete file in the store's ``tmp/``: written, not yet durable or visible."""

    path: Path
    size: int
    sha256: str


class StageWriter:
    """A file in ``tmp/`` written piece by piece as the bytes arrive, hashed on the way.

    Made by :meth:`InstanceStore.open_stage`; :meth:`finish` (fsync, when the store
    fsyncs) returns the :class:`StagedFile`, :meth:`abandon` removes what was written.
    """

    def __init__(self, path: Path, fd: int, *, fsync: bool) -> None:
        self.path = path
        self._fd = fd
        self._fsync = fsync
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes | memoryview) -> None:
        """Append ``chunk``; a write error removes the file and raises :class:`StorageError`."""
        self._digest.update(chunk)
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.abandon()
            raise InstanceStore._os_error("cannot write to the store", exc) from exc
        self.size += len(chunk)

    def finish(self) -> StagedFile:
        """Close the file (fsynced first where the store fsyncs) and return it as a staged file."""
        try:
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self.abandon()
            raise InstanceStore._os_error("cannot write to the store", exc) from exc
        self._close()
        return StagedFile(path=self.path, size=self.size, sha256=self._digest.hexdigest())

    def abandon(self) -> None:
        """Close and remove the file (an association ended before the dataset was whole)."""
        self._close()
        InstanceStore.discard(self.path)

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class InstanceStore:
    """Stores encoded instances under one root directory.

    Parameters
    ----------
    settings
        The storage settings; ``settings.root`` is created if missing.
    """

    def __init__(self, settings: StorageSettings) -> None:
        self.root = settings.root.resolve()
        self.min_free_bytes = settings.min_free_bytes
        self.fsync = settings.fsync
        self.tmp_dir = self.root / _TMP
        self.objects_dir = self.root / _OBJECTS
        self.quarantine_dir = self.root / _QUARANTINE
        # (free bytes at the last reading less what was checked in since, when it was read)
        self._space: tuple[int, float] = (0, -1e9)
        self._space_lock = threading.Lock()
        # Owner-only: the store holds patient data. An existing folder keeps its mode.
        self.root.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
        self.tmp_dir.mkdir(mode=_PRIVATE_DIR, exist_ok=True)
        self.objects_dir.mkdir(mode=_PRIVATE_DIR, exist_ok=True)
        self.quarantine_dir.mkdir(mode=_PRIVATE_DIR, exist_ok=True)
        for i in range(256):
            (self.objects_dir / f"{i:02x}").mkdir(mode=_PRIVATE_DIR, exist_ok=True)

    # -- space -------------------------------------------------------------------------------
    def check_space(self, incoming_bytes: int) -> None:
        """Raise :class:`OutOfSpaceError` if writing ``incoming_bytes`` would cross the floor.

        The free space is read again unless a reading younger than a quarter of a second,
        less what was checked in since, leaves far more than the floor (``_SPACE_SLACK``):
        near the floor every instance reads it.
        """
        now = time.monotonic()
        with self._space_lock:
            free, read_at = self._space
            free -= incoming_bytes
            if now - read_at < _SPACE_FRESH_S and free - self.min_free_bytes > _SPACE_SLACK:
                self._space = (free, read_at)
                return
        free = shutil.disk_usage(self.root).free
        with self._space_lock:
            self._space = (free - incoming_bytes, now)
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfSpaceError(
                f"free-space floor reached: {free} bytes free, {incoming_bytes} incoming, floor {self.min_free_bytes}"
            )

    # -- writing -----------------------------------------------------------------------------
    def stage(self, chunks: Iterable[bytes | memoryview]) -> StagedFile:
        """Write ``chunks`` to a new file in ``tmp/`` and return it with its size and sha256.

        The file is not yet fsynced: :meth:`commit` does that. On any error the
        partial file is removed and a :class:`StorageError` raised.
        """
        path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PRIVATE_FILE)
        except OSError as exc:
            raise self._os_error("cannot create a file in the store", exc) from exc
        try:
            with os.fdopen(fd, "wb", buffering=0) as fh:
                for chunk in chunks:
                    digest.update(chunk)
                    view = memoryview(chunk)
                    while view:
                        written = fh.write(view)
                        view = view[written:]
                    size += len(chunk)
                if self.fsync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            self.discard(path)
            raise self._os_error("cannot write to the store", exc) from exc
        except BaseException:
            self.discard(path)
            raise
        return StagedFile(path=path, size=size, sha256=digest.hexdigest())

    def open_stage(self) -> StageWriter:
        """A new file in ``tmp/`` to write an arriving instance into (see :class:`StageWriter`)."""
        path = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _PRIVATE_FILE)
        except OSError as exc:
            raise self._os_error("cannot create a file in the store", exc) from exc
        return StageWriter(path, fd, fsync=self.fsync)

    def relative_path_for(self, sop_instance_uid: str, sha256: str) -> str:
        """Return the store-relative path of an instance's content (POSIX separators)."""
        h = uid_digest(sop_instance_uid)
        return f"{_OBJECTS}/{h[0:2]}/{h}-{sha256[:16]}.dcm"

    def quarantine_path_for(self, sop_instance_uid: str, sha256: str) -> str:
        """Return the store-relative path of a quarantined instance's content (POSIX separators)."""
        return f"{_QUARANTINE}/{uid_digest(sop_instance_uid)}-{sha256[:16]}.dcm"

    def commit(self, staged: StagedFile, relative_path: str) -> Path:
        """Move a staged file to ``relative_path`` atomically and make the move durable."""
        final = self.root / relative_path
        try:
            self._make_dirs(final.parent)
            os.replace(staged.path, final)
            if self.fsync:
                self._fsync_dir(final.parent)
        except OSError as exc:
            self.discard(staged.path)
            raise self._os_error("cannot move the file into place", exc) from exc
        return final

    def move(self, source: str, destination: str) -> None:
        """Move a committed file to another store-relative path atomically and make the move durable.

        Both folders are fsynced: after a crash the file is under one name, never two or none.
        """
        src, dst = self.absolute(source), self.absolute(destination)
        try:
            self._make_dirs(dst.parent)
            os.replace(src, dst)
            if self.fsync:
                self._fsync_dir(dst.parent)
                if src.parent != dst.parent:
                    self._fsync_dir(src.parent)
        except OSError as exc:
            raise self._os_error("cannot move the file within the store", exc) from exc

    # -- reading and removal -----------------------------------------------------------------
    def absolute(self, relative_path: str) -> Path:
        """Return the absolute path of a store-relative path, refusing anything outside the root."""
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"path {relative_path!r} is outside the store")
        return path

    def remove(self, relative_path: str) -> None:
        """Delete a committed file (after its index row stopped pointing at it)."""
        try:
            os.unlink(self.absolute(relative_path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("could not remove %s: %s", relative_path, exc)

    @staticmethod
    def discard(path: Path) -> None:
        """Delete a staged file, ignoring one that is already gone."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - nothing more to do than say so
            logger.warning("could not remove temporary file %s: %s", path, exc)

    def sweep_tmp(self) -> int:
        """Remove files left in ``tmp/`` by a crash; return how many. Call before serving."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            if entry.is_file():
                self.discard(entry)
                removed += 1
        if removed:
            logger.warning("removed %d unfinished file(s) from %s", removed, self.tmp_dir)
        return removed

    # -- helpers -----------------------------------------------------------------------------
    def _make_dirs(self, directory: Path) -> None:
        if directory.is_dir():
            return
        missing = []
        d = directory
        while not d.is_dir():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=_PRIVATE_DIR)
            except FileExistsError:
                continue
            if self.fsync:
                self._fsync_dir(d.parent)

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _os_error(what: str, exc: OSError) -> StorageError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OutOfSpaceError(f"disk full: {what} ({exc.strerror})")
        return StorageError(f"{what}: {exc}")
