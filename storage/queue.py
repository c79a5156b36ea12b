"""Durable job and export queues in the index database.

Both queues are tables (:class:`pacsnode.storage.models.Job`, :class:`pacsnode.storage.models.Export`)
and every transition is one short transaction, so a crash at any moment leaves
each row in a state some worker can pick up again:

- A worker *claims* a row: it becomes running/sending with a lease (owner and
  expiry) and its attempt count grows. The worker renews the lease while it
  works (:meth:`JobQueue.heartbeat`); a row whose lease expired is claimable
  again, so a job of a worker killed with ``kill -9`` runs again elsewhere.
- A finished row is marked done, or failed with its error: retried after an
  exponential backoff while attempts remain, else failed (jobs) / dead
  (exports), visible and re-triable from the CLI. A job whose images are not
  what its rule asks for is skipped (terminal, no results, not a failure).
- On PostgreSQL the claim uses ``SELECT ... FOR UPDATE SKIP LOCKED``, so many
  workers on many machines claim different rows without waiting on each other.
  On SQLite every write transaction starts with ``BEGIN IMMEDIATE`` (see
  :mod:`pacsnode.storage.db`), which serialises claims. Either way the claim's UPDATE
  re-checks the state it read, so a row is never claimed twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Exists, Row, and_, case, or_, select, update
from sqlalchemy.exc import IntegrityError

from pacsnode.storage.db import WriteGate, read_connection
from pacsnode.storage.index import inserted_id, utcnow
from pacsnode.storage.models import Export, ExportState, Job, JobState

__all__ = [
    "JobState",
    "ExportState",
    "JobRecord",
    "ExportRecord",
    "RetryPolicy",
    "utcnow",
    "JobQueue",
    "ExportQueue",
]

logger = logging.getLogger(__name__)

_jobs = Job.__table__
_exports = Export.__table__


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff: ``base * 2**(attempt-1)`` seconds, at most ``cap``; ``max_attempts`` in all."""

    max_attempts: int
    base_s: float
    cap_s: float

    def delay(self, attempts: int) -> float:
        return float(min(self.cap_s, self.base_s * (2 ** max(0, attempts - 1))))


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    id: int
    rule: str
    pipeline: str
    study_instance_uid: str
    series_instance_uid: str
    state: JobState
    attempts: int
    max_attempts: int
    timeout_s: float
    params: dict[str, Any]
    destinations: list[str]
    last_error: str | None
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    not_before: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        data = dict(row._mapping)
        data["params"] = json.loads(data["params"] or "{}")
        data["destinations"] = json.loads(data["destinations"] or "[]")
        data["result"] = json.loads(data["result"]) if data["result"] else None
        data["state"] = JobState(data["state"])
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True, kw_only=True)
class ExportRecord:
    id: int
    sop_instance_uid: str
    destination: str
    job_id: int | None
    state: ExportState
    generation: int
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    not_before: datetime
    sent_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> ExportRecord:
        data = dict(row._mapping)
        data["state"] = ExportState(data["state"])
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return _as_dict(self)


def _as_dict(record: object) -> dict[str, Any]:
    """A record for JSON output: timestamps as ISO 8601 UTC, the state as its plain string."""
    out = dict(record.__dict__)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat(timespec="seconds") + "Z"
        elif isinstance(value, JobState | ExportState):
            out[key] = value.value
    return out


class _Queue:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._gate = WriteGate(engine)
        self._skip_locked = engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One write transaction, queued behind the write gate like the archive's."""
        with self._gate(), self.engine.begin() as conn:
            yield conn


class JobQueue(_Queue):
    """The analysis job queue.

    Parameters
    ----------
    engine
        The index database's engine (the tables come with the migrations).
    """

    def enqueue(
        self,
        *,
        rule: str,
        pipeline: str,
        study_instance_uid: str,
        series_instance_uid: str = "",
        params: dict[str, Any] | None = None,
        destinations: Sequence[str] = (),
        max_attempts: int,
        timeout_s: float,
        conn: Connection | None = None,
    ) -> tuple[int, bool]:
        """Queue a job unless one is already pending for the same pipeline, study and series.

        Returns ``(job id, created)``; ``created`` is False when the pending job
        that already existed was kept (it will see the new instances too).
        """
        if conn is None:
            with self.transaction() as own:
                return self.enqueue(
                    rule=rule,
                    pipeline=pipeline,
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    params=params,
                    destinations=destinations,
                    max_attempts=max_attempts,
                    timeout_s=timeout_s,
                    conn=own,
                )
        key = and_(
            _jobs.c.pipeline == pipeline,
            _jobs.c.study_instance_uid == study_instance_uid,
            _jobs.c.series_instance_uid == series_instance_uid,
            _jobs.c.state == JobState.PENDING.value,
        )
        existing = conn.execute(select(_jobs.c.id).where(key)).scalar()
        if existing is not None:
            return int(existing), False
        now = utcnow()
        try:
            with conn.begin_nested():
                job_id = inserted_id(
                    conn.execute(
                        _jobs.insert().values(
                            rule=rule,
                            pipeline=pipeline,
                            study_instance_uid=study_instance_uid,
                            series_instance_uid=series_instance_uid,
                            state=JobState.PENDING.value,
                            attempts=0,
                            max_attempts=max_attempts,
                            timeout_s=timeout_s,
                            params=json.dumps(params or {}, sort_keys=True),
                            destinations=json.dumps(list(destinations)),
                            created_at=now,
                            updated_at=now,
                            not_before=now,
                        )
                    )
                )
        except IntegrityError:  # another scheduler queued it between our read and our insert
            existing = conn.execute(select(_jobs.c.id).where(key)).scalar()
            if existing is None:
                raise
            return int(existing), False
        logger.info(
            "queued job %d: pipeline %s (rule %s) for study %s%s",
            job_id,
            pipeline,
            rule,
            study_instance_uid,
            f" series {series_instance_uid}" if series_instance_uid else "",
            extra={"action": "job-queued", "job_id": job_id, "pipeline": pipeline},
        )
        return int(job_id), True

    def claim(
        self,
        owner: str,
        *,
        lease_s: float,
        rule: str | None = None,
        pipeline: str | None = None,
        first_attempt: bool = False,
    ) -> JobRecord | None:
        """Take the next due job (pending, or running with an expired lease); None when there is none.

        ``rule`` and ``pipeline`` restrict it to pending jobs of that rule and pipeline, and
        ``first_attempt`` to jobs never tried (a worker filling a batch).

        A job whose lease expired had a worker die under it: the attempt it
        used counts, and when none are left it is failed instead of claimed.
        """
        while True:
            now = utcnow()
            claimable = _claimable_jobs(now, rule=rule, pipeline=pipeline, first_attempt=first_attempt)
            with self.transaction() as conn:
                row = self._next_job(conn, claimable)
                if row is None:
                    return None
                if _out_of_attempts(row, JobState.RUNNING):
                    _fail_abandoned_job(conn, row, now)
                    continue
                claimed = _lease_job(conn, row, owner, now=now, lease_s=lease_s)
                if claimed is None:  # another worker changed the row since it was read
                    continue
            return JobRecord.from_row(claimed)

    def _next_job(self, conn: Connection, claimable: ColumnElement[bool]) -> Row[Any] | None:
        """The claimable job due first; on PostgreSQL locked, skipping rows other workers hold."""
        stmt = select(_jobs).where(claimable).order_by(_jobs.c.not_before, _jobs.c.id).limit(1)
        if self._skip_locked:
            stmt = stmt.with_for_update(skip_locked=True)
        return conn.execute(stmt).first()

    def heartbeat(self, job_id: int, owner: str, *, lease_s: float) -> bool:
        """Renew the lease; False if the job is no longer this worker's (it must stop)."""
        with self.transaction() as conn:
            done = conn.execute(
                update(_jobs)
                .where(_jobs.c.id == job_id, _jobs.c.lease_owner == owner, _jobs.c.state == JobState.RUNNING.value)
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            )
        return done.rowcount == 1

    def complete(self, job_id: int, owner: str, result: dict[str, Any], *, conn: Connection | None = None) -> bool:
        """Mark the job done with its result summary; False if the lease was lost meanwhile.

        Pass ``conn`` to make it part of a larger transaction (the job's exports).
        """
        if conn is None:
            with self.transaction() as own:
                return self.complete(job_id, owner, result, conn=own)
        now = utcnow()
        done = conn.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id, _jobs.c.lease_owner == owner, _jobs.c.state == JobState.RUNNING.value)
            .values(
                state=JobState.DONE.value,
                result=json.dumps(result, sort_keys=True, default=str),
                last_error=None,
                finished_at=now,
                updated_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        return done.rowcount == 1

    def skip(self, job_id: int, owner: str, reason: str) -> bool:
        """Mark the job skipped: it ran, the images were not what its rule asks for; False if the lease was lost.

        A terminal state like done, without results and not a failure; ``reason`` is kept in ``last_error``.
        """
        now = utcnow()
        with self.transaction() as conn:
            done = conn.execute(
                update(_jobs)
                .where(_jobs.c.id == job_id, _jobs.c.lease_owner == owner, _jobs.c.state == JobState.RUNNING.value)
                .values(
                    state=JobState.SKIPPED.value,
                    result=json.dumps({"skipped": reason}),
                    last_error=reason[:4000],
                    finished_at=now,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
        return done.rowcount == 1

    def fail(self, job_id: int, owner: str, error: str, *, retry: bool, policy: RetryPolicy) -> JobState | None:
        """Record a failed attempt: pending again after a backoff, or failed for good.

        Returns the new state, or None when the job was no longer this worker's.
        """
        now = utcnow()
        with self.transaction() as conn:
            row = conn.execute(
                select(_jobs).where(
                    _jobs.c.id == job_id, _jobs.c.lease_owner == owner, _jobs.c.state == JobState.RUNNING.value
                )
            ).first()
            if row is None:
                return None
            again = retry and row.attempts < row.max_attempts
            if again:
                # One pending job per key: if the scheduler queued another meanwhile, that one will run.
                other = conn.execute(
                    select(_jobs.c.id).where(
                        _jobs.c.pipeline == row.pipeline,
                        _jobs.c.study_instance_uid == row.study_instance_uid,
                        _jobs.c.series_instance_uid == row.series_instance_uid,
                        _jobs.c.state == JobState.PENDING.value,
                    )
                ).scalar()
                again = other is None
            state = JobState.PENDING if again else JobState.FAILED
            values: dict[str, Any] = {
                "state": state.value,
                "last_error": error[:4000],
                "updated_at": now,
                "lease_owner": None,
                "lease_expires_at": None,
            }
            if again:
                values.update(not_before=now + timedelta(seconds=policy.delay(row.attempts)))
            else:
                values.update(finished_at=now)
            # Only while still running under this owner: a completion committed since the read stands.
            still_ours = (_jobs.c.id == job_id, _jobs.c.lease_owner == owner, _jobs.c.state == JobState.RUNNING.value)
            try:
                with conn.begin_nested():
                    done = conn.execute(update(_jobs).where(*still_ours).values(**values))
            except IntegrityError:  # a scheduler queued a pending job for the same key meanwhile: it will run
                state = JobState.FAILED
                values.update(state=state.value, finished_at=now)
                done = conn.execute(update(_jobs).where(*still_ours).values(**values))
            if done.rowcount != 1:
                return None
        return state

    def retry(self, job_id: int) -> JobRecord:
        """Queue a job again from the CLI, due now, with its attempts reset.

        A failed or done job runs again; a pending one waiting out a backoff
        becomes due at once.

        Raises
        ------
        LookupError
            No such job, a running one, or another job for the same pipeline
            and study is already pending.
        """
        now = utcnow()
        with self.transaction() as conn:
            row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).first()
            if row is None:
                raise LookupError(f"no job {job_id}")
            if row.state == JobState.RUNNING.value:
                raise LookupError(f"job {job_id} is running (worker {row.lease_owner})")
            try:
                with conn.begin_nested():
                    conn.execute(
                        update(_jobs)
                        .where(_jobs.c.id == job_id)
                        .values(
                            state=JobState.PENDING.value,
                            attempts=0,
                            not_before=now,
                            updated_at=now,
                            finished_at=None,
                        )
                    )
            except IntegrityError as exc:
                raise LookupError(
                    f"job {job_id}: another job for the same pipeline and study is already pending"
                ) from exc
            out = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).one()
        logger.info("job %d queued again by an operator", job_id, extra={"action": "job-retry", "job_id": job_id})
        return JobRecord.from_row(out)

    def ran_before(self, conn: Connection, *, rule: str, study_instance_uid: str, series_instance_uid: str) -> bool:
        """Whether a job of ``rule`` for this study/series is done, skipped or running (in the caller's transaction)."""
        return (
            conn.execute(
                select(_jobs.c.id)
                .where(
                    _jobs.c.rule == rule,
                    _jobs.c.study_instance_uid == study_instance_uid,
                    _jobs.c.series_instance_uid == series_instance_uid,
                    _jobs.c.state.in_([JobState.DONE.value, JobState.SKIPPED.value, JobState.RUNNING.value]),
                )
                .limit(1)
            ).first()
            is not None
        )

    def get(self, job_id: int) -> JobRecord | None:
        with read_connection(self.engine) as conn:
            row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).first()
        return None if row is None else JobRecord.from_row(row)

    def list(
        self, *, state: JobState | None = None, study_instance_uid: str | None = None, limit: int = 1000
    ) -> list[JobRecord]:
        stmt = select(_jobs).order_by(_jobs.c.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(_jobs.c.state == JobState(state).value)
        if study_instance_uid:
            stmt = stmt.where(_jobs.c.study_instance_uid == study_instance_uid)
        with read_connection(self.engine) as conn:
            return [JobRecord.from_row(r) for r in conn.execute(stmt)]


class ExportQueue(_Queue):
    """Instances waiting to be sent to remote nodes."""

    def enqueue(
        self,
        sop_instance_uids: Sequence[str],
        destinations: Sequence[str],
        *,
        max_attempts: int,
        job_id: int | None = None,
        conn: Connection | None = None,
    ) -> int:
        """Queue each instance for each destination; an instance queued before is queued again.

        A row that exists already (a re-analysis replaced the instance) goes
        back to pending with its attempts reset and its generation bumped, so
        the new content is sent once and never twice. Returns the rows queued.
        """
        if conn is None:
            with self.transaction() as own:
                return self.enqueue(sop_instance_uids, destinations, max_attempts=max_attempts, job_id=job_id, conn=own)
        now = utcnow()
        count = 0
        for destination in destinations:
            for uid in sop_instance_uids:
                row = conn.execute(
                    select(_exports.c.id).where(
                        _exports.c.sop_instance_uid == uid, _exports.c.destination == destination
                    )
                ).first()
                if row is None:
                    conn.execute(
                        _exports.insert().values(
                            sop_instance_uid=uid,
                            destination=destination,
                            job_id=job_id,
                            state=ExportState.PENDING.value,
                            generation=0,
                            attempts=0,
                            max_attempts=max_attempts,
                            created_at=now,
                            updated_at=now,
                            not_before=now,
                        )
                    )
                else:
                    # A row being sent right now keeps its lease; the bumped generation sends it again after.
                    conn.execute(
                        update(_exports)
                        .where(_exports.c.id == row.id)
                        .values(
                            job_id=job_id,
                            generation=_exports.c.generation + 1,
                            attempts=0,
                            max_attempts=max_attempts,
                            not_before=now,
                            updated_at=now,
                            last_error=None,
                            state=_pending_unless_sending(),
                        )
                    )
                count += 1
        return count

    def claim(self, owner: str, *, lease_s: float, limit: int) -> list[ExportRecord]:
        """Take up to ``limit`` due exports, all for one destination (one association sends them)."""
        now = utcnow()
        claimable = _claimable_exports(now)
        with self.transaction() as conn:
            destination = self._first_due_destination(conn, claimable)
            if destination is None:
                return []
            claimed: list[ExportRecord] = []
            for row in self._due_exports(conn, claimable, destination, limit):
                if _out_of_attempts(row, ExportState.SENDING):
                    _bury_abandoned_export(conn, row, now)
                    continue
                export = _lease_export(conn, row, owner, now=now, lease_s=lease_s)
                if export is not None:
                    claimed.append(export)
        return claimed

    def _first_due_destination(self, conn: Connection, claimable: ColumnElement[bool]) -> str | None:
        """The destination of the claimable export due first."""
        stmt = select(_exports.c.destination).where(claimable).order_by(_exports.c.not_before, _exports.c.id)
        if self._skip_locked:
            stmt = stmt.with_for_update(skip_locked=True)
        destination = conn.execute(stmt.limit(1)).scalar()
        return None if destination is None else str(destination)

    def _due_exports(
        self, conn: Connection, claimable: ColumnElement[bool], destination: str, limit: int
    ) -> Sequence[Row[Any]]:
        """Up to ``limit`` claimable exports to ``destination``, in the order they fell due."""
        stmt = (
            select(_exports)
            .where(claimable, _exports.c.destination == destination)
            .order_by(_exports.c.not_before, _exports.c.id)
            .limit(limit)
        )
        if self._skip_locked:
            stmt = stmt.with_for_update(skip_locked=True)
        return conn.execute(stmt).all()

    def renew(self, export_ids: Sequence[int], owner: str, *, lease_s: float) -> None:
        """Extend the lease of exports this sender is still working on."""
        if not export_ids:
            return
        with self.transaction() as conn:
            conn.execute(
                update(_exports)
                .where(
                    _exports.c.id.in_(list(export_ids)),
                    _exports.c.lease_owner == owner,
                    _exports.c.state == ExportState.SENDING.value,
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            )

    def mark_sent(self, export: ExportRecord, owner: str) -> bool:
        """Done -- unless the instance was queued again while it was being sent (then pending again)."""
        now = utcnow()
        with self.transaction() as conn:
            done = conn.execute(
                update(_exports)
                .where(
                    _exports.c.id == export.id,
                    _exports.c.lease_owner == owner,
                    _exports.c.generation == export.generation,
                )
                .values(
                    state=ExportState.DONE.value,
                    sent_at=now,
                    updated_at=now,
                    last_error=None,
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
            if done.rowcount != 1:
                conn.execute(
                    update(_exports)
                    .where(_exports.c.id == export.id, _exports.c.lease_owner == owner)
                    .values(state=ExportState.PENDING.value, lease_owner=None, lease_expires_at=None, updated_at=now)
                )
        return done.rowcount == 1

    def mark_failed(self, export: ExportRecord, owner: str, error: str, *, policy: RetryPolicy) -> ExportState | None:
        """A failed send: pending again after a backoff, or dead after the last attempt."""
        now = utcnow()
        with self.transaction() as conn:
            row = conn.execute(
                select(_exports).where(_exports.c.id == export.id, _exports.c.lease_owner == owner)
            ).first()
            if row is None:
                return None
            if row.generation != export.generation:  # queued again meanwhile: a fresh start
                state = ExportState.PENDING
                values: dict[str, Any] = {"not_before": now}
            elif row.attempts >= row.max_attempts:
                state = ExportState.DEAD
                values = {}
            else:
                state = ExportState.PENDING
                values = {"not_before": now + timedelta(seconds=policy.delay(row.attempts))}
            conn.execute(
                update(_exports)
                .where(_exports.c.id == export.id)
                .values(
                    state=state.value,
                    last_error=error[:4000],
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    **values,
                )
            )
        return state

    def retry(self, *, export_id: int | None = None, destination: str | None = None) -> int:
        """Queue dead exports again (one, all of a destination, or all); returns how many."""
        now = utcnow()
        stmt = update(_exports).where(_exports.c.state == ExportState.DEAD.value)
        if export_id is not None:
            stmt = stmt.where(_exports.c.id == export_id)
        if destination is not None:
            stmt = stmt.where(_exports.c.destination == destination)
        with self.transaction() as conn:
            done = conn.execute(
                stmt.values(state=ExportState.PENDING.value, attempts=0, not_before=now, updated_at=now)
            )
        if done.rowcount:
            logger.info(
                "%d dead export(s) queued again by an operator", done.rowcount, extra={"action": "export-retry"}
            )
        return int(done.rowcount)

    def list(self, *, state: ExportState | None = None, limit: int = 1000) -> list[ExportRecord]:
        stmt = select(_exports).order_by(_exports.c.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(_exports.c.state == ExportState(state).value)
        with read_connection(self.engine) as conn:
            return [ExportRecord.from_row(r) for r in conn.execute(stmt)]


# -- claiming: the steps of JobQueue.claim and ExportQueue.claim ----------------------------------


def _claimable_jobs(
    now: datetime, *, rule: str | None, pipeline: str | None, first_attempt: bool
) -> ColumnElement[bool]:
    """Due pending jobs, and running jobs whose lease expired (their worker died).

    With ``rule``, ``pipeline`` or ``first_attempt``: only the due pending jobs that fit.
    """
    due = and_(_jobs.c.state == JobState.PENDING.value, _jobs.c.not_before <= now, ~_same_key_running(now))
    if rule is None and pipeline is None and not first_attempt:
        abandoned = and_(_jobs.c.state == JobState.RUNNING.value, _jobs.c.lease_expires_at < now)
        return or_(due, abandoned)
    return and_(
        due,
        *([_jobs.c.rule == rule] if rule is not None else []),
        *([_jobs.c.pipeline == pipeline] if pipeline is not None else []),
        *([_jobs.c.attempts == 0] if first_attempt else []),
    )


def _same_key_running(now: datetime) -> Exists:
    """A job for the same pipeline, study and series runs under a live lease.

    A pending job waits for it: the newer job must finish last, or older results would replace its own.
    """
    running = _jobs.alias("running")
    return (
        select(running.c.id)
        .where(
            running.c.state == JobState.RUNNING.value,
            running.c.lease_expires_at >= now,
            running.c.pipeline == _jobs.c.pipeline,
            running.c.study_instance_uid == _jobs.c.study_instance_uid,
            running.c.series_instance_uid == _jobs.c.series_instance_uid,
        )
        .exists()
    )


def _out_of_attempts(row: Row[Any], leased: JobState | ExportState) -> bool:
    """A leased row (running job, export being sent) whose lease expired on its last attempt."""
    return bool(row.state == leased.value and row.attempts >= row.max_attempts)


def _fail_abandoned_job(conn: Connection, row: Row[Any], now: datetime) -> None:
    """Its worker died on the last attempt: the job fails instead of running again."""
    error = (
        f"worker {row.lease_owner} stopped responding (lease expired) on attempt "
        f"{row.attempts} of {row.max_attempts}; {row.last_error or ''}".rstrip("; ")
    )
    conn.execute(
        update(_jobs)
        .where(_jobs.c.id == row.id, _jobs.c.state == JobState.RUNNING.value)
        .values(
            state=JobState.FAILED.value,
            last_error=error,
            finished_at=now,
            updated_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    logger.error("job %d failed: %s", row.id, error, extra={"action": "job-failed", "job_id": row.id})


def _lease_job(conn: Connection, row: Row[Any], owner: str, *, now: datetime, lease_s: float) -> Row[Any] | None:
    """Make the job ``owner``'s (running, one more attempt); None when the row changed since it was read."""
    if row.state == JobState.RUNNING.value:
        logger.warning(
            "job %d: worker %s stopped renewing its lease; %s takes the job over",
            row.id,
            row.lease_owner,
            owner,
            extra={"action": "job-reclaimed", "job_id": row.id},
        )
    done = conn.execute(
        update(_jobs)
        .where(
            _jobs.c.id == row.id,
            _jobs.c.state == row.state,
            _jobs.c.attempts == row.attempts,
        )
        .values(
            state=JobState.RUNNING.value,
            attempts=row.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            started_at=now,
            updated_at=now,
            finished_at=None,
        )
    )
    if done.rowcount != 1:
        return None
    return conn.execute(select(_jobs).where(_jobs.c.id == row.id)).one()


def _claimable_exports(now: datetime) -> ColumnElement[bool]:
    """Due pending exports, and exports whose sender's lease expired."""
    return or_(
        and_(_exports.c.state == ExportState.PENDING.value, _exports.c.not_before <= now),
        and_(_exports.c.state == ExportState.SENDING.value, _exports.c.lease_expires_at < now),
    )


def _bury_abandoned_export(conn: Connection, row: Row[Any], now: datetime) -> None:
    """Its sender died on the last attempt (crash or hang while sending): dead, not sent again."""
    conn.execute(
        update(_exports)
        .where(_exports.c.id == row.id, _exports.c.state == row.state)
        .values(
            state=ExportState.DEAD.value,
            updated_at=now,
            lease_owner=None,
            lease_expires_at=None,
            last_error=f"sender {row.lease_owner} stopped responding on the last attempt",
        )
    )


def _lease_export(conn: Connection, row: Row[Any], owner: str, *, now: datetime, lease_s: float) -> ExportRecord | None:
    """Make the export ``owner``'s (sending, one more attempt); None when the row changed since it was read."""
    done = conn.execute(
        update(_exports)
        .where(_exports.c.id == row.id, _exports.c.state == row.state, _exports.c.attempts == row.attempts)
        .values(
            state=ExportState.SENDING.value,
            attempts=row.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
    )
    if done.rowcount != 1:
        return None
    return ExportRecord.from_row(conn.execute(select(_exports).where(_exports.c.id == row.id)).one())


def _pending_unless_sending() -> Any:
    return case(
        (_exports.c.state == ExportState.SENDING.value, ExportState.SENDING.value),
        else_=ExportState.PENDING.value,
    )
