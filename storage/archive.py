"""The archive: file store and index together, with the ordering that makes a store durable.

The order for every instance is fixed: the bytes are fsynced in ``tmp/``, moved
into ``objects/`` (rename + directory fsync), and only then is the index row
committed. A crash before the commit leaves at most a file no row points to;
a crash never leaves a row without its complete file.

An instance that contradicts the index (its study indexed under another
PatientID, its series under another study) follows ``storage.patient_mismatch``:
refused, indexed where the index has it, or moved to ``quarantine/`` (rename +
directory fsyncs, inside the transaction that records it) and never indexed.
"""

from __future__ import annotations

import enum
import io
import logging
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

from pacsnode.storage import index, quarantine, query
from pacsnode.storage.db import WriteGate, make_engine, migrate, read_connection
from pacsnode.storage.errors import DuplicateInstanceError, MisfiledInstanceError, StorageError
from pacsnode.storage.files import InstanceStore, StagedFile, StageWriter
from pacsnode.storage.index import InstanceMeta, Misfiling, StudySummary
from pacsnode.storage.quarantine import QuarantineEntry
from pacsnode.storage.settings import DuplicatePolicy, PatientMismatchPolicy, StorageSettings

__all__ = ["Archive", "AddOutcome"]

logger = logging.getLogger(__name__)

_ATTEMPTS = 5
# The most instances one group commit takes.
_GROUP_LIMIT = 64


class AddOutcome(enum.Enum):
    """How an instance ended up in the archive."""

    STORED = "stored"
    IDENTICAL_DUPLICATE = "identical duplicate, not stored again"
    KEPT_FIRST = "different duplicate, first copy kept"
    OVERWRITTEN = "different duplicate, overwrote the first copy"
    QUARANTINED = "contradicts the index, kept in the quarantine, not indexed"


@dataclass(frozen=True, kw_only=True)
class AddResult:
    outcome: AddOutcome
    file_path: str


@dataclass(frozen=True)
class _Decision:
    """What one instance's share of an index transaction decided (acted on once it commits)."""

    result: AddResult
    old_file: str | None = None
    known: index.KnownSeries | None = None


class _Quarantine(Exception):
    """Raised inside the index transaction to roll it back: the instance goes to the quarantine instead."""

    def __init__(self, misfiling: Misfiling) -> None:
        super().__init__(misfiling.value)
        self.misfiling = misfiling


@dataclass(frozen=True, kw_only=True)
class _Request:
    """One committed file to index, and how: the single argument of every indexing step.

    The group commit and the path alone (no group, or a retry after a race) both decide
    through :meth:`Archive._decide` on one of these, so the two cannot drift apart.
    """

    meta: InstanceMeta
    relative: str
    staged: StagedFile
    calling_ae_title: str | None
    is_result: bool = False
    policy: DuplicatePolicy | None = None
    may_overwrite: bool = True


class _Member:
    """One request waiting for the group commit, and then what became of it."""

    def __init__(self, request: _Request) -> None:
        self.request = request
        # Set when the member's transaction has ended, or when its thread is to commit ``batch``.
        self.wake = threading.Event()
        self.batch: list[_Member] | None = None
        self.decision: _Decision | None = None
        self.error: BaseException | None = None


class _GroupCommit:
    """Group commit, leader and followers: every instance that has arrived is indexed in one transaction.

    No committer thread: an instance that arrives while no transaction is being committed is
    committed at once in its sender's own thread, so a lone sender pays no hand-over to another
    thread and back. Instances arriving while a transaction commits (its fsync) queue up; when
    it ends, its leader hands the queue to the thread of the first queued instance, which commits
    them all together (at most ``limit``) and then hands on in turn. A leader that has to wait for
    the write gate (another process is committing) takes in the instances that queued meanwhile
    once it has it. Each caller returns only once the transaction holding its row has ended.
    """

    def __init__(
        self,
        commit: Callable[[list[_Member]], None],
        gate: Callable[[], AbstractContextManager[None]],
        limit: int = _GROUP_LIMIT,
    ) -> None:
        self._commit = commit
        self._limit = limit
        self._gate = gate
        self._cond = threading.Condition()  # guards the fields below
        self._queue: list[_Member] = []
        self._leading = False  # a transaction is being committed: newcomers queue
        self._closed = False
        self.batches = 0  # transactions begun (for tests)

    def submit(self, member: _Member) -> bool:
        """Index ``member`` in the next transaction; False: closed, or to be indexed alone."""
        with self._cond:
            if self._closed:
                return False
            if self._leading:
                self._queue.append(member)
                batch = None
            else:
                self._leading, batch = True, [member]
                self.batches += 1
        if batch is None:
            member.wake.wait()
            batch = member.batch  # None: committed by another member's thread
        if batch is not None:
            self._lead(batch)
        return not isinstance(member.error, (IntegrityError, index.StaleSeriesError))

    def _lead(self, batch: list[_Member]) -> None:
        """Commit ``batch``, then hand the queue that formed meanwhile to one of its threads.

        ``commit`` runs holding the ``gate`` (the write lock other processes take too); the batch takes in
        the members that queued while the leader waited for it: they would wait for the same lock next."""
        try:
            with self._gate():
                with self._cond:
                    joining = self._queue[: max(self._limit - len(batch), 0)]
                    del self._queue[: len(joining)]
                batch.extend(joining)
                self._commit(batch)
        except BaseException as exc:  # never leave a sender waiting, never call it stored
            logger.exception("group commit failed")
            for member in batch:
                member.decision = None
                member.error = StorageError(f"index transaction failed: {type(exc).__name__}")
        finally:
            with self._cond:
                following = self._queue[: self._limit]
                self._queue = self._queue[self._limit :]
                if following:
                    self.batches += 1
                    following[0].batch = following
                else:
                    self._leading = False
            for member in batch:
                member.batch = None
                member.wake.set()
            if following:
                following[0].wake.set()

    def close(self) -> None:
        """Refuse new members (they are indexed alone); a transaction under way still ends normally."""
        with self._cond:
            self._closed = True


class Archive:
    """Durable storage of instances: call :meth:`stage`, then :meth:`add`.

    Parameters
    ----------
    settings
        Storage settings (store root, database URL, duplicate policy).
    engine
        An engine to reuse; by default one is created from ``settings.database_url``.
    """

    def __init__(self, settings: StorageSettings, *, engine: Engine | None = None) -> None:
        self.settings = settings
        self.store = InstanceStore(settings)
        self.engine = engine if engine is not None else make_engine(settings.database_url)
        self._write_gate = WriteGate(self.engine)
        # Series this process committed: the next instance of one is indexed in three statements.
        self._known_series = index.KnownSeriesCache()
        # Concurrent instances share index transactions (storage.group_commit), led by their own threads.
        self._group = _GroupCommit(self._commit_group, self._write_gate) if settings.group_commit else None

    @classmethod
    def open(cls, settings: StorageSettings) -> Archive:
        """Open the archive for serving: migrate the schema and sweep crash debris."""
        archive = cls(settings)
        migrate(archive.engine)
        archive.store.sweep_tmp()
        return archive

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
        self.engine.dispose()

    # -- ingest ------------------------------------------------------------------------------
    def check_space(self, incoming_bytes: int) -> None:
        self.store.check_space(incoming_bytes)

    def stage(self, chunks: Iterable[bytes | memoryview]) -> StagedFile:
        return self.store.stage(chunks)

    def open_stage(self) -> StageWriter:
        """A staging file to write an arriving instance into, piece by piece (then :meth:`add`)."""
        return self.store.open_stage()

    def discard(self, staged: StagedFile) -> None:
        self.store.discard(staged.path)

    def add(
        self,
        staged: StagedFile,
        meta: InstanceMeta,
        *,
        calling_ae_title: str | None,
        is_result: bool = False,
        policy: DuplicatePolicy | None = None,
        may_overwrite: bool = True,
    ) -> AddResult:
        """Make a staged instance durable and indexed, applying the duplicate and patient-mismatch policies.

        Returns only after the file is in place and the index transaction has
        committed; any failure raises :class:`StorageError` and leaves no row.
        ``is_result`` marks pacsnode's own results; ``policy`` overrides the
        configured duplicate policy (results always overwrite their previous run).
        ``may_overwrite`` False: the sender is not trusted to overwrite, so under the
        overwrite policy a different duplicate raises :class:`DuplicateInstanceError`.
        An instance that contradicts the index raises :class:`MisfiledInstanceError`
        (policy reject), is indexed where the index has its study or series (accept),
        or comes back as :attr:`AddOutcome.QUARANTINED` (quarantine; a result is refused instead).
        """
        relative = self.store.relative_path_for(meta.sop_instance_uid, staged.sha256)
        self.store.commit(staged, relative)
        request = _Request(
            meta=meta,
            relative=relative,
            staged=staged,
            calling_ae_title=calling_ae_title,
            is_result=is_result,
            policy=policy,
            may_overwrite=may_overwrite,
        )
        try:
            try:
                result = self._index(request)
            except _Quarantine as misfiled:
                result = self._quarantine(request, misfiled.misfiling)
        except BaseException:
            self._forget(relative, meta)
            raise
        if result.file_path != relative:
            # Not ours to keep (a duplicate), or moved to the quarantine; never delete the path the index points at.
            self.store.remove(relative)
        return result

    def _forget(self, relative: str, meta: InstanceMeta) -> None:
        """Remove a committed file whose index transaction failed, unless a row now points at it."""
        try:
            with self.engine.connect() as conn:
                row = index.find_instance(conn, meta.sop_instance_uid)
        except Exception:  # the database is the problem; leave the file, it is only unindexed
            return
        if row is None or row.file_path != relative:
            self.store.remove(relative)

    def add_dataset(self, ds: Dataset, *, calling_ae_title: str | None = None) -> AddResult:
        """Store and index a dataset pacsnode made (an analysis result), replacing an earlier run's copy.

        The dataset needs its ``file_meta`` (transfer syntax); it is written in
        the DICOM File Format through the same durable path as a received instance.
        """
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        staged = self.stage([buffer.getvalue()])
        try:
            meta = index.read_header(
                staged.path,
                expected_sop_class_uid=str(ds.SOPClassUID),
                expected_sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
        except BaseException:
            self.discard(staged)
            raise
        return self.add(
            staged, meta, calling_ae_title=calling_ae_title, is_result=True, policy=DuplicatePolicy.OVERWRITE
        )

    def _index(self, request: _Request) -> AddResult:
        meta = request.meta
        if self._group is not None:
            member = _Member(request)
            if self._group.submit(member):
                if member.error is not None:
                    raise member.error
                assert member.decision is not None
                return self._after_commit(member.decision, request)
            # Not indexed in the group (a race with another process, a series changed meanwhile): alone.
        last_exc: Exception | None = None
        for attempt in range(_ATTEMPTS):
            try:
                return self._index_once(request)
            except IntegrityError as exc:
                # Another association indexed the same patient/study/series/instance
                # between our read and our insert: read again and re-decide.
                last_exc = exc
                logger.debug("index race on %s (attempt %d): %s", meta.sop_instance_uid, attempt + 1, exc)
                self._known_series.discard(meta.series_instance_uid)
            except index.StaleSeriesError as exc:
                # The series this process remembered was deleted or changed meanwhile: the long way.
                last_exc = exc
                logger.debug("index changed under %s (attempt %d): %s", meta.sop_instance_uid, attempt + 1, exc)
                self._known_series.discard(meta.series_instance_uid)
            except OperationalError as exc:
                self._known_series.discard(meta.series_instance_uid)
                raise StorageError(f"index database error: {exc.orig}") from exc
        raise StorageError(f"index kept conflicting after {_ATTEMPTS} attempts: {last_exc}")

    def _index_once(self, request: _Request) -> AddResult:
        with self._write_gate(), self.engine.begin() as conn:
            decision = self._decide(conn, request)
        return self._after_commit(decision, request)

    def _decide(self, conn: Connection, request: _Request) -> _Decision:
        """Index one instance in the caller's transaction (or decide it is not to be indexed)."""
        meta, relative, staged = request.meta, request.relative, request.staged
        calling_ae_title, is_result = request.calling_ae_title, request.is_result
        policy = request.policy
        old_file: str | None = None
        existing = index.find_instance(conn, meta.sop_instance_uid)
        if existing is not None:
            if existing.sha256 == staged.sha256:
                return _Decision(AddResult(outcome=AddOutcome.IDENTICAL_DUPLICATE, file_path=existing.file_path))
            policy = policy or self.settings.duplicate_policy
            if policy is DuplicatePolicy.REJECT:
                logger.warning(
                    "rejected instance %s: already stored with other content (policy reject)",
                    meta.sop_instance_uid,
                )
                raise DuplicateInstanceError(f"already stored with different content: {meta.sop_instance_uid}")
            if policy is DuplicatePolicy.KEEP_FIRST:
                logger.warning(
                    "ignored instance %s from %s: already stored with other content (policy keep_first)",
                    meta.sop_instance_uid,
                    calling_ae_title,
                )
                return _Decision(AddResult(outcome=AddOutcome.KEPT_FIRST, file_path=existing.file_path))
            if not request.may_overwrite:
                logger.warning(
                    "refused instance %s from %r: already stored with other content, and the peer is not "
                    "trusted to overwrite (policy overwrite)",
                    meta.sop_instance_uid,
                    calling_ae_title,
                    extra={
                        "action": "overwrite-refused",
                        "sop_instance_uid": meta.sop_instance_uid,
                        "calling_ae_title": calling_ae_title,
                    },
                )
                raise DuplicateInstanceError("already stored; this peer is not trusted to overwrite")
            index.remove_instance(conn, existing)
            old_file = existing.file_path
            self._known_series.clear()  # the removal may have deleted a series, study or patient
        known = None if old_file is not None or is_result else self._known_series.get(meta.series_instance_uid)
        if known is not None and known.holds(meta):
            # Not misfiled: this series, of this study and patient, was committed before.
            index.add_to_known_series(
                conn,
                meta,
                known,
                file_path=relative,
                file_size=staged.size,
                sha256=staged.sha256,
                calling_ae_title=calling_ae_title,
            )
            known = None  # nothing new to remember
        else:
            misfiled = index.misfiling(conn, meta)
            if misfiled is not None:
                self._misfiled(misfiled, meta, calling_ae_title, is_result)  # raises unless accepted
            known = index.add_instance(
                conn,
                meta,
                file_path=relative,
                file_size=staged.size,
                sha256=staged.sha256,
                calling_ae_title=calling_ae_title,
                is_result=is_result,
            )
            if misfiled is not None:
                known = None
        outcome = AddOutcome.STORED if old_file is None else AddOutcome.OVERWRITTEN
        return _Decision(AddResult(outcome=outcome, file_path=relative), old_file=old_file, known=known)

    def _after_commit(self, decision: _Decision, request: _Request) -> AddResult:
        """What follows the commit that holds the instance: remember its series, remove an overwritten file."""
        if decision.known is not None:  # committed: remembered only now
            self._known_series.put(decision.known)
        old_file = decision.old_file
        if old_file is not None:
            logger.warning(
                "overwrote instance %s with other content from %s (policy overwrite)",
                request.meta.sop_instance_uid,
                request.calling_ae_title,
            )
            if old_file != request.relative:
                self.store.remove(old_file)
        return decision.result

    def _commit_group(self, batch: list[_Member]) -> None:
        """Index a batch of instances in one transaction, each in a savepoint of its own; the caller (the
        group's leader) holds the write gate.

        A member refused (duplicate, misfiled, to be quarantined) or caught in a race rolls back
        its savepoint only and carries its exception; the others commit together. A failure of
        the transaction itself fails every member with :class:`StorageError`: none is indexed.
        A batch of one needs no savepoint: its failure rolls the transaction back.
        """
        alone = len(batch) == 1
        try:
            with self.engine.begin() as conn:
                for member in batch:
                    if alone:
                        member.decision = self._decide(conn, member.request)
                        continue
                    try:
                        with conn.begin_nested():
                            member.decision = self._decide(conn, member.request)
                    except OperationalError:
                        raise
                    except Exception as exc:
                        member.error = exc
        except Exception as exc:
            if alone and not isinstance(exc, OperationalError):
                batch[0].decision, batch[0].error = None, exc
            else:
                cause = exc.orig if isinstance(exc, OperationalError) else exc
                logger.error("index transaction of %d instance(s) failed: %s", len(batch), cause)
                for member in batch:
                    self._known_series.discard(member.request.meta.series_instance_uid)
                    member.decision = None
                    member.error = StorageError(f"index database error: {cause}")

    def _misfiled(
        self, misfiling: Misfiling, meta: InstanceMeta, calling_ae_title: str | None, is_result: bool
    ) -> None:
        """Apply ``storage.patient_mismatch`` to an instance that contradicts the index.

        Returns (accept: the caller indexes it where the index has it) or raises:
        :class:`MisfiledInstanceError` (reject) or :class:`_Quarantine`. A result of
        pacsnode's own is never quarantined: it is refused, so its job fails visibly.
        """
        mode = self.settings.patient_mismatch
        if mode is PatientMismatchPolicy.QUARANTINE and not is_result:
            raise _Quarantine(misfiling)
        accepted = mode is PatientMismatchPolicy.ACCEPT
        logger.warning(
            "%s instance %s from %r in study %s, series %s: %s (policy %s)%s",
            "accepted" if accepted else "refused",
            meta.sop_instance_uid,
            calling_ae_title,
            meta.study_instance_uid,
            meta.series_instance_uid,
            misfiling.comment,
            mode.value,
            "; indexed where the index has its study and series" if accepted else "",
            extra=self._misfiling_extra(misfiling, meta, calling_ae_title, "accepted" if accepted else "refused"),
        )
        if not accepted:
            raise MisfiledInstanceError(misfiling.comment, reason=misfiling.value)

    @staticmethod
    def _misfiling_extra(
        misfiling: Misfiling, meta: InstanceMeta, calling_ae_title: str | None, outcome: str
    ) -> dict[str, Any]:
        return {
            "action": misfiling.value,
            "outcome": outcome,
            "study_instance_uid": meta.study_instance_uid,
            "series_instance_uid": meta.series_instance_uid,
            "sop_instance_uid": meta.sop_instance_uid,
            "calling_ae_title": calling_ae_title,
        }

    def _quarantine(self, request: _Request, misfiling: Misfiling) -> AddResult:
        """Move a committed file from ``objects/`` to ``quarantine/`` and record it, in one transaction.

        The move happens inside the transaction, after the row is decided: a failure
        before the commit removes the moved file again, a crash leaves at most a file
        no row points to. The same bytes quarantined again keep the one row and file.
        """
        meta, relative, staged, calling_ae_title = (
            request.meta,
            request.relative,
            request.staged,
            request.calling_ae_title,
        )
        target = self.store.quarantine_path_for(meta.sop_instance_uid, staged.sha256)
        moved = False
        try:
            with self._write_gate(), self.engine.begin() as conn:
                existing = quarantine.find(conn, meta.sop_instance_uid, staged.sha256)
                if existing is not None:
                    target = existing.file_path
                if existing is None or not self.store.absolute(target).is_file():
                    self.store.move(relative, target)
                    moved = True
                if existing is None:
                    quarantine.record(
                        conn,
                        meta,
                        reason=misfiling,
                        file_path=target,
                        file_size=staged.size,
                        sha256=staged.sha256,
                        calling_ae_title=calling_ae_title,
                    )
        except BaseException as exc:
            if moved:
                self._forget_quarantined(target, meta.sop_instance_uid, staged.sha256)
            if isinstance(exc, OperationalError):
                raise StorageError(f"index database error: {exc.orig}") from exc
            raise
        logger.warning(
            "quarantined instance %s from %r in study %s, series %s: %s (policy quarantine)%s",
            meta.sop_instance_uid,
            calling_ae_title,
            meta.study_instance_uid,
            meta.series_instance_uid,
            misfiling.comment,
            "" if existing is None else "; already quarantined with the same content",
            extra=self._misfiling_extra(misfiling, meta, calling_ae_title, "quarantined"),
        )
        return AddResult(outcome=AddOutcome.QUARANTINED, file_path=target)

    def _forget_quarantined(self, relative: str, sop_instance_uid: str, sha256: str) -> None:
        """Remove a quarantined file whose row was not committed, unless a row records it."""
        try:
            with self.engine.connect() as conn:
                row = quarantine.find(conn, sop_instance_uid, sha256)
        except Exception:  # the database is the problem; leave the file, it is only unrecorded
            return
        if row is None:
            self.store.remove(relative)

    def quarantined(self, *, limit: int | None = None) -> list[QuarantineEntry]:
        """The quarantined instances, newest first (``pacsnode quarantine``)."""
        try:
            with read_connection(self.engine) as conn:
                return quarantine.list_entries(conn, limit=limit)
        except OperationalError as exc:
            raise StorageError(f"index database error: {exc.orig}") from exc

    # -- reading -----------------------------------------------------------------------------
    def studies(self) -> list[StudySummary]:
        with read_connection(self.engine) as conn:
            return index.list_studies(conn)

    def find(self, parsed: query.FindQuery, *, limit: int | None) -> list[dict[str, Any]]:
        """Answer a parsed C-FIND from the index (see :mod:`pacsnode.storage.query`)."""
        try:
            with read_connection(self.engine) as conn:
                return query.find(conn, parsed, limit=limit)
        except OperationalError as exc:
            raise StorageError(f"index database error: {exc.orig}") from exc

    def locate(self, parsed: query.FindQuery, *, limit: int | None = None) -> list[query.InstanceLocation]:
        """The stored instances a C-MOVE / C-GET identifier selects."""
        try:
            with read_connection(self.engine) as conn:
                return query.locate(conn, parsed, limit=limit)
        except OperationalError as exc:
            raise StorageError(f"index database error: {exc.orig}") from exc

    def instance_path(self, relative: str) -> Path:
        return self.store.absolute(relative)
