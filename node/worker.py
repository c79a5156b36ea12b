"""Worker processes: run analysis jobs, store their results, export them.

A worker process has three loops:

- the job loop (main thread) claims a job, runs its pipeline, stores the
  result objects through the archive (durable, indexed, like received
  instances) and, in one transaction, marks the job done and queues its
  exports; a pipeline that finds the images are not what the rule asks for
  (``match.anatomy``) raises :class:`~pacsnode.analysis.errors.SkipAnalysis` and
  the job is recorded skipped, with nothing stored or exported;
- the exporter (a thread) claims due exports for one destination at a time
  and sends them over one association, with retries and a dead-letter state;
- the scheduler (a thread) turns quiet studies into jobs.

A pipeline that runs several studies in one pass (``batches_jobs``, e.g. a
CNN whose slices share device batches) gets up to ``analysis.batch_jobs``
pending jobs of the same rule at once. While jobs run, a heartbeat thread
renews their leases. When the job passes its
timeout the heartbeat thread records the failure (retried with backoff while
attempts remain) and ends the process: a hung pipeline cannot be interrupted
from inside, so the supervisor starts a fresh worker instead. A worker killed
outright stops renewing; its lease expires and another worker takes the job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pacsnode.analysis.errors import AnalysisError, SkipAnalysis
from pacsnode.analysis.pipelines import PipelineInput, SeriesInput, resolve_pipeline
from pacsnode.analysis.routing import select_series
from pacsnode.node import metrics
from pacsnode.node.app import open_audit_trail
from pacsnode.node.config import Settings
from pacsnode.node.deid import BurnedInAnnotationError, Deidentifier, DeidentifyProfile
from pacsnode.node.dicom.auditing import WorkerAudit
from pacsnode.node.dicom.export import ExportOutcome, send_files
from pacsnode.node.scheduler import ImageSizes
from pacsnode.storage import Archive
from pacsnode.storage.activity import series_of_study
from pacsnode.storage.db import read_connection
from pacsnode.storage.index import find_instance
from pacsnode.storage.queue import (
    ExportQueue,
    ExportRecord,
    ExportState,
    JobQueue,
    JobRecord,
    JobState,
    RetryPolicy,
)

__all__ = ["Worker", "run_worker_process", "TIMEOUT_EXIT"]

logger = logging.getLogger(__name__)

TIMEOUT_EXIT = 75
"""Exit status of a worker process that ended a job past its timeout (the supervisor restarts it)."""


class _LeaseLost(Exception):
    """Another worker took the job over while this one ran it."""


def _owner(role: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{role}"


class _Batch:
    """Claimed jobs run together, and what the heartbeat thread and the runner know of each.

    ``lost`` (another worker took the lease) and ``recorded`` (the outcome is
    committed) are written from both threads, so every access holds the lock.
    """

    def __init__(self, *, jobs: list[JobRecord], owner: str, lease_s: float) -> None:
        self.jobs = jobs
        self.owner = owner
        self.lease_s = lease_s
        self.started = time.monotonic()
        self.timeout_s = min(job.timeout_s for job in jobs)
        self.beat_s = min(lease_s / 3, 5.0)
        # The pipeline gets a clean deadline a little before the heartbeat's hard timeout.
        self.deadline = self.started + self.timeout_s - min(2 * self.beat_s, self.timeout_s / 10)
        self.ids = ", ".join(str(job.id) for job in jobs)
        self._lock = threading.Lock()
        self._lost: set[int] = set()
        self._recorded: set[int] = set()

    def timed_out(self) -> bool:
        return time.monotonic() - self.started > self.timeout_s

    def mark_lost(self, job_id: int) -> bool:
        """Mark a job lost unless its outcome was recorded meanwhile; True when it was marked."""
        with self._lock:
            if job_id in self._recorded:
                return False
            self._lost.add(job_id)
            return True

    def mark_recorded(self, job_id: int) -> None:
        with self._lock:
            self._recorded.add(job_id)

    def is_lost(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._lost

    def unrecorded(self) -> list[JobRecord]:
        with self._lock:
            return [job for job in self.jobs if job.id not in self._recorded]

    def unsettled(self) -> list[JobRecord]:
        """Jobs neither recorded nor lost: the ones whose leases still need renewing."""
        with self._lock:
            return [job for job in self.jobs if job.id not in self._recorded and job.id not in self._lost]

    def settled(self) -> bool:
        with self._lock:
            return len(self._lost | self._recorded) == len(self.jobs)


class Worker:
    """The loops of one worker process, over one archive.

    Parameters
    ----------
    settings
        The node's settings.
    archive
        The archive results are stored in (and the queues live in).
    exit_process
        Called when a job passes its timeout, after the failure is recorded
        (default: end the process with :data:`TIMEOUT_EXIT`).
    """

    def __init__(self, settings: Settings, archive: Archive, *, exit_process: Callable[[int], Any] = os._exit) -> None:
        self.settings = settings
        self.archive = archive
        self.jobs = JobQueue(archive.engine)
        self.exports = ExportQueue(archive.engine)
        self._exit_process = exit_process
        analysis = settings.analysis
        self.job_retry = RetryPolicy(
            max_attempts=analysis.max_attempts,
            base_s=analysis.retry_backoff_seconds,
            cap_s=analysis.retry_backoff_max_seconds,
        )
        export = settings.export
        self.export_retry = RetryPolicy(
            max_attempts=export.max_attempts, base_s=export.backoff_seconds, cap_s=export.backoff_max_seconds
        )
        self._pipelines: dict[str, Any] = {}  # loaded once per process, kept warm
        self.image_sizes = ImageSizes(archive)  # the scheduler's reader: the same selection on both sides
        self.wake = threading.Event()  # set by the scheduler in this process when it queues a job
        self.export_wake = threading.Event()  # set when a job of this process queued exports
        self.audit = WorkerAudit(open_audit_trail(settings), archive=archive, ae_title=settings.node.ae_title)

    # -- jobs ------------------------------------------------------------------------------------
    def run_jobs(self, stop: threading.Event, *, poll_s: float = 1.0) -> None:
        owner = _owner("jobs")
        while not stop.is_set():
            try:
                job = self.jobs.claim(owner, lease_s=self.settings.analysis.lease_seconds)
            except Exception:
                logger.exception("cannot claim a job; trying again")
                stop.wait(poll_s)
                continue
            if job is None:
                self.wake.wait(poll_s)  # jobs queued by another process are seen within poll_s
                self.wake.clear()
                continue
            batch = [job, *self._claim_companions(job, owner)]
            try:
                self.run_batch(batch, owner)
            except Exception:  # bookkeeping failed (database away): the leases expire, the jobs run again
                logger.exception("job(s) %s: cannot record the outcome", ", ".join(str(j.id) for j in batch))
                stop.wait(poll_s)

    def _claim_companions(self, job: JobRecord, owner: str) -> list[JobRecord]:
        """More pending jobs of the same rule, when its pipeline runs several studies in one pass."""
        limit = self.settings.analysis.batch_jobs
        more: list[JobRecord] = []
        # Only first attempts share a pass: a job that failed, timed out or lost its worker before runs
        # alone, so one bad study cannot use up the attempts of others.
        if limit <= 1 or job.attempts > 1:
            return more
        try:
            if not getattr(resolve_pipeline(job.pipeline), "batches_jobs", False):
                return more
            while len(more) < limit - 1:
                other = self.jobs.claim(
                    owner,
                    lease_s=self.settings.analysis.lease_seconds,
                    rule=job.rule,
                    pipeline=job.pipeline,
                    first_attempt=True,
                )
                if other is None:
                    break
                more.append(other)
        except Exception:  # the jobs claimed so far run; the others stay pending
            logger.exception("cannot claim more jobs of rule %s", job.rule)
        return more

    def run_job(self, job: JobRecord, owner: str) -> JobState | None:
        """Run one claimed job to its outcome; returns the job's new state."""
        return self.run_batch([job], owner)[0]

    def run_batch(self, jobs: list[JobRecord], owner: str) -> list[JobState | None]:
        """Run claimed jobs (one, or several of one rule whose pipeline batches them) to their outcomes.

        A heartbeat thread renews every lease; the batch answers to its strictest timeout. Returns each
        job's new state (None where its lease was lost).
        """
        batch = _Batch(jobs=jobs, owner=owner, lease_s=self.settings.analysis.lease_seconds)
        finished = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(batch, finished), name=f"jobs-{batch.ids}-heartbeat", daemon=True
        )
        beat.start()  # leases renewed from now on: the audit writes below may wait on other processes' fsyncs
        try:
            self._log_started(jobs)  # audited before it runs: a trail that cannot be written stops it here
        except BaseException:
            finished.set()
            raise
        states: dict[int, JobState | None] = {}
        errors: list[BaseException] = []

        def still_ours(job: JobRecord) -> bool:
            return not batch.is_lost(job.id) and self.jobs.heartbeat(job.id, owner, lease_s=batch.lease_s)

        def finish(job: JobRecord, outcome: tuple[dict[str, Any], list[str]] | BaseException) -> None:
            """Record each job as soon as its outcome is known, while the heartbeat still renews the others."""
            try:
                states[job.id] = self._finish(job, owner, outcome, batch.started)
            except Exception as exc:  # the database is away: this job's lease expires and it runs again
                logger.exception("job %d: cannot record its outcome", job.id)
                errors.append(exc)
            else:
                batch.mark_recorded(job.id)
                metrics.job_finished(
                    job.pipeline, metrics.job_outcome(states[job.id]), time.monotonic() - batch.started
                )

        try:
            self._execute_batch(jobs, still_ours, finish, deadline=batch.deadline)
        finally:
            finished.set()
        if errors and len(jobs) == 1:
            raise errors[0]
        return [states.get(job.id) for job in jobs]

    def _log_started(self, jobs: list[JobRecord]) -> None:
        for job in jobs:
            self._audit_job(job, "started")
            logger.info(
                "job %d started: %s for study %s (attempt %d of %d)%s",
                job.id,
                job.pipeline,
                job.study_instance_uid,
                job.attempts,
                job.max_attempts,
                f", batched with {len(jobs) - 1} other job(s)" if len(jobs) > 1 else "",
                extra={"action": "job", "job_id": job.id, "pipeline": job.pipeline},
            )

    def _heartbeat(self, batch: _Batch, finished: threading.Event) -> None:
        """Renew the leases of the batch until it is finished; past its timeout, end the process."""
        while not finished.wait(batch.beat_s):
            if batch.timed_out():
                self._time_out(batch)
                return
            self._renew(batch)
            if batch.settled():
                return

    def _renew(self, batch: _Batch) -> None:
        for job in batch.unsettled():
            try:
                renewed = self.jobs.heartbeat(job.id, batch.owner, lease_s=batch.lease_s)
            except Exception as exc:  # database briefly unavailable: the lease is long enough to retry
                logger.warning("job %d: heartbeat failed: %s", job.id, exc)
                continue
            if not renewed and batch.mark_lost(job.id):
                logger.error("job %d: lease lost to another worker; its result will be discarded", job.id)

    def _time_out(self, batch: _Batch) -> None:
        """Record a timeout for every job not yet recorded, then exit the process (the supervisor restarts it)."""
        try:
            for job in batch.unrecorded():
                error = f"timed out after {batch.timeout_s:g} s (attempt {job.attempts} of {job.max_attempts})"
                try:
                    state = self.jobs.fail(job.id, batch.owner, error, retry=True, policy=self.job_retry)
                    metrics.job_finished(job.pipeline, "timeout", time.monotonic() - batch.started)
                    logger.error(
                        "job %d %s; now %s; restarting this worker",
                        job.id,
                        error,
                        state,
                        extra={"action": "job", "job_id": job.id, "pipeline": job.pipeline},
                    )
                except Exception:  # the lease will expire and another worker takes the job
                    logger.exception("job %d %s; cannot record it; restarting this worker", job.id, error)
        finally:
            logging.shutdown()
            self._exit_process(TIMEOUT_EXIT)

    def _finish(
        self, job: JobRecord, owner: str, outcome: tuple[dict[str, Any], list[str]] | BaseException, started: float
    ) -> JobState | None:
        """Record one job's outcome: done (and its exports queued, in one transaction), retried or failed."""
        state = self._record_outcome(job, owner, outcome, started)
        if state is not None:
            self._audit_job(job, "retry" if state is JobState.PENDING else state.value)
        return state

    def _audit_job(self, job: JobRecord, state: str) -> None:
        self.audit.job(
            job_id=job.id, pipeline=job.pipeline, rule=job.rule, study_instance_uid=job.study_instance_uid, state=state
        )

    def _record_outcome(
        self, job: JobRecord, owner: str, outcome: tuple[dict[str, Any], list[str]] | BaseException, started: float
    ) -> JobState | None:
        extra = {"action": "job", "job_id": job.id, "pipeline": job.pipeline}
        if isinstance(outcome, _LeaseLost):
            logger.error("job %d: lease lost to another worker; result discarded", job.id, extra=extra)
            return None
        if isinstance(outcome, SkipAnalysis):  # not for this rule after all (match.anatomy): no results, no failure
            skipped = self.jobs.skip(job.id, owner, str(outcome))
            if not skipped:
                logger.error("job %d skipped but its lease was lost; not recorded", job.id, extra=extra)
                return None
            logger.info("job %d skipped: %s", job.id, outcome, extra=extra)
            return JobState.SKIPPED
        if isinstance(outcome, AnalysisError):  # the input cannot be analysed: retrying would not help
            state = self.jobs.fail(job.id, owner, str(outcome), retry=False, policy=self.job_retry)
            logger.error("job %d failed: %s", job.id, outcome, extra=extra)
            return state
        if isinstance(outcome, BaseException):
            error = f"{type(outcome).__name__}: {outcome}"
            state = self.jobs.fail(job.id, owner, error, retry=True, policy=self.job_retry)
            logger.log(
                logging.ERROR if state is JobState.FAILED else logging.WARNING,
                "job %d attempt %d failed (%s): %s",
                job.id,
                job.attempts,
                state,
                error,
                exc_info=(type(outcome), outcome, outcome.__traceback__),
                extra=extra,
            )
            return state
        summary, stored = outcome
        summary["elapsed_s"] = round(time.monotonic() - started, 3)
        with self.jobs.transaction() as conn:
            done = self.jobs.complete(job.id, owner, summary, conn=conn)
            if done and job.destinations and stored:
                self.exports.enqueue(
                    stored, job.destinations, max_attempts=self.settings.export.max_attempts, job_id=job.id, conn=conn
                )
        if not done:
            logger.error("job %d finished but its lease was lost; result not recorded", job.id, extra=extra)
            return None
        if job.destinations and stored:
            self.export_wake.set()
        logger.info(
            "job %d done in %.1f s: %d result object(s)%s",
            job.id,
            summary["elapsed_s"],
            len(stored),
            f", queued for {', '.join(job.destinations)}" if job.destinations else "",
            extra=extra,
        )
        return JobState.DONE

    def _inputs(self, job: JobRecord, deadline: float) -> PipelineInput:
        with read_connection(self.archive.engine) as conn:
            received = series_of_study(conn, job.study_instance_uid, job.series_instance_uid)
        if not received:
            raise AnalysisError(
                f"study {job.study_instance_uid} has no received series"
                + (f" {job.series_instance_uid}" if job.series_instance_uid else "")
            )
        series = received
        rule = next((r for r in self.settings.analysis.rules if r.name == job.rule), None)
        if rule is not None and not job.series_instance_uid:
            # A study-scope job: the same selection the scheduler made, image sizes included.
            self.image_sizes.unreadable = False
            series = select_series(rule, received, self.image_sizes)
            if not series and self.image_sizes.unreadable:
                raise OSError(f"study {job.study_instance_uid}: an image header could not be read; trying again")
            if not series:
                raise AnalysisError(
                    f"none of the {len(received)} series of study {job.study_instance_uid} "
                    f"matches rule {rule.name!r} any more"
                )
        return PipelineInput(
            job_id=job.id,
            study_instance_uid=job.study_instance_uid,
            uid_root=self.settings.analysis.uid_root,
            deadline=deadline,
            anatomy=rule.match.anatomy if rule is not None else None,
            series=tuple(
                SeriesInput(
                    series_instance_uid=s.series_instance_uid,
                    modality=s.modality,
                    series_description=s.series_description,
                    paths=tuple(self.archive.instance_path(f) for f in s.files),
                )
                for s in series
            ),
        )

    def _execute_batch(
        self,
        jobs: list[JobRecord],
        still_ours: Callable[[JobRecord], bool],
        finish: Callable[[JobRecord, Any], None],
        deadline: float,
    ) -> None:
        """Run the jobs' pipeline (once for all jobs with the same params); store and finish each job in turn."""
        groups: dict[str, list[tuple[JobRecord, PipelineInput]]] = {}
        for job in jobs:
            try:
                inputs = self._inputs(job, deadline)
            except Exception as exc:  # noqa: BLE001 - recorded as this job's outcome
                finish(job, exc)
                continue
            groups.setdefault(json.dumps(job.params, sort_keys=True), []).append((job, inputs))
        for members in groups.values():
            first = members[0][0]
            try:
                pipeline_cls = resolve_pipeline(first.pipeline)
                pipeline = self._pipelines.get(first.pipeline)
                if pipeline is None:
                    pipeline = self._pipelines[first.pipeline] = pipeline_cls()
                params = pipeline_cls.Params.model_validate(first.params)
                if len(members) > 1:
                    results: list[Any] = pipeline.run_many([inputs for _, inputs in members], params)
                else:
                    try:
                        results = [pipeline.run(members[0][1], params)]
                    except Exception as exc:  # noqa: BLE001 - recorded as the job's outcome
                        results = [exc]
            except Exception as exc:  # noqa: BLE001 - the whole group fails alike
                results = [exc] * len(members)
            for (job, _), result in zip(members, results, strict=True):
                if not isinstance(result, BaseException):
                    try:
                        result = self._store(job, pipeline_cls.version, result, still_ours)
                    except Exception as exc:  # noqa: BLE001 - recorded as this job's outcome
                        result = exc
                finish(job, result)

    def _store(
        self, job: JobRecord, version: str, output: Any, still_ours: Callable[[JobRecord], bool]
    ) -> tuple[dict[str, Any], list[str]]:
        if not still_ours(job):  # another worker took the job over: its results, not these, are kept
            raise _LeaseLost
        t0 = time.perf_counter()
        stored: list[str] = []
        for ds in output.datasets:
            self.archive.add_dataset(ds, calling_ae_title=self.settings.node.ae_title)
            stored.append(str(ds.SOPInstanceUID))
        summary = dict(output.summary)
        summary.setdefault("timings", {})["store_s"] = round(time.perf_counter() - t0, 3)
        summary["pipeline_version"] = version
        summary["results"] = stored
        return summary, stored

    # -- exports ---------------------------------------------------------------------------------
    def run_exports(self, stop: threading.Event) -> None:
        owner = _owner("exports")
        poll = self.settings.export.poll_seconds
        while not stop.is_set():
            try:
                sent = self.export_once(owner)
            except Exception:
                logger.exception("export pass failed; trying again")
                sent = 0
            if not sent:
                self.export_wake.wait(poll)
                self.export_wake.clear()

    def export_once(self, owner: str) -> int:
        """Claim and send one batch; returns how many were claimed."""
        export = self.settings.export
        batch = self.exports.claim(owner, lease_s=export.lease_seconds, limit=export.batch)
        if not batch:
            return 0
        destination = batch[0].destination
        remote: Any = self.settings.remote_nodes.get(destination) or self.settings.dicomweb_nodes.get(destination)
        if remote is None:
            for item in batch:
                self._export_failed(
                    item, owner, f"destination {destination!r} is not in remote_nodes or dicomweb_nodes"
                )
            return len(batch)
        files: list[Path] = []
        by_path: dict[Path, ExportRecord] = {}
        with read_connection(self.archive.engine) as conn:
            for item in batch:
                row = find_instance(conn, item.sop_instance_uid)
                if row is None:
                    self._export_failed(item, owner, "the instance is no longer stored")
                    continue
                path = self.archive.instance_path(row.file_path)
                files.append(path)
                by_path[path] = item
        if not by_path:
            return len(batch)
        with tempfile.TemporaryDirectory(dir=self.archive.store.tmp_dir, prefix="deid-") as scratch:
            burned_in_unknown = 0
            deidentify = getattr(remote, "deidentify", None)  # DICOMweb destinations have no profile
            if deidentify is not None:  # what leaves is the de-identified copy, never the stored file
                files, by_path, burned_in_unknown = self._deidentified(
                    destination, deidentify, by_path, Path(scratch), owner
                )
                if not by_path:
                    return len(batch)
            self.audit.export(
                destination=destination,
                ae_title=getattr(remote, "ae_title", ""),
                host=getattr(remote, "host", None) or str(getattr(remote, "url", "")),
                sop_instance_uids=[item.sop_instance_uid for item in by_path.values()],
                deidentified=deidentify is not None,
                burned_in_unknown=burned_in_unknown,
            )
            pending = {item.id for item in by_path.values()}
            renewed = time.monotonic()

            def record(outcome: ExportOutcome) -> None:
                nonlocal renewed
                item = by_path[outcome.path]
                pending.discard(item.id)
                self._record_export(item, outcome, owner, destination, remote)
                if time.monotonic() - renewed > export.lease_seconds / 3:  # a slow peer: keep the rest ours
                    self.exports.renew(sorted(pending), owner, lease_s=export.lease_seconds)
                    renewed = time.monotonic()

            if destination in self.settings.dicomweb_nodes:
                from pacsnode.node.http.stow_client import send_files_stow

                send_files_stow(remote, files, progress=record)
            else:
                send_files(self.settings, remote, files, progress=record)
        return len(batch)

    def _deidentified(
        self,
        destination: str,
        profile: DeidentifyProfile,
        by_path: dict[Path, ExportRecord],
        scratch: Path,
        owner: str,
    ) -> tuple[list[Path], dict[Path, ExportRecord], int]:
        """De-identified copies of the files in ``scratch``; an instance that cannot be de-identified fails."""
        deidentifier = Deidentifier(self.archive, destination=destination, profile=profile)
        files: list[Path] = []
        out: dict[Path, ExportRecord] = {}
        unknown = 0
        for index, (path, item) in enumerate(by_path.items()):
            target = scratch / f"{index}.dcm"
            try:
                result = deidentifier.deidentify_file(path, target)
            except BurnedInAnnotationError as exc:
                self._export_failed(item, owner, str(exc))
                continue
            except Exception as exc:
                logger.exception("cannot de-identify %s for %s", item.sop_instance_uid, destination)
                self._export_failed(item, owner, f"cannot de-identify: {type(exc).__name__}")
                continue
            unknown += result.burned_in_unknown
            files.append(target)
            out[target] = item
        return files, out, unknown

    def _record_export(
        self, item: ExportRecord, outcome: ExportOutcome, owner: str, destination: str, remote: Any
    ) -> None:
        """Mark one send as it completes, so a crash mid-batch resends only what was not acknowledged."""
        if outcome.ok:
            self.exports.mark_sent(item, owner)
            metrics.export_finished(destination, "sent")
            logger.info(
                "exported %s to %s (%s)",
                item.sop_instance_uid,
                destination,
                getattr(remote, "url", None) or f"{remote.host}:{remote.port}",
                extra={"action": "export", "destination": destination},
            )
            return
        detail = outcome.error or ""
        if outcome.status is not None:
            detail = f"status 0x{outcome.status:04X} {detail}".strip()
        self._export_failed(item, owner, detail)

    def _export_failed(self, item: ExportRecord, owner: str, error: str) -> None:
        state = self.exports.mark_failed(item, owner, error, policy=self.export_retry)
        metrics.export_finished(item.destination, metrics.export_outcome(state))
        level = logging.ERROR if state is ExportState.DEAD else logging.WARNING
        logger.log(
            level,
            "export of %s to %s failed (attempt %d of %d, now %s): %s",
            item.sop_instance_uid,
            item.destination,
            item.attempts,
            item.max_attempts,
            state,
            error,
            extra={"action": "export-failed", "destination": item.destination},
        )


def run_worker_process(settings: Settings, *, scheduler: bool = True, exporter: bool = True) -> int:
    """Body of one worker process: job loop, exporter and scheduler threads, until SIGTERM/SIGINT."""
    from pacsnode.node.scheduler import Scheduler

    stop = threading.Event()

    archive = Archive(settings.storage)
    worker = Worker(settings, archive)

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()
        worker.wake.set()
        worker.export_wake.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    metrics.start_heartbeat("worker")
    threads = []
    if exporter:
        threads.append(threading.Thread(target=worker.run_exports, args=(stop,), name="exporter", daemon=True))
    if scheduler:
        threads.append(
            threading.Thread(
                target=Scheduler(settings, archive, on_queued=worker.wake.set).run,
                args=(stop,),
                name="scheduler",
                daemon=True,
            )
        )
    for thread in threads:
        thread.start()
    logger.info("worker process %d running", os.getpid())
    worker.run_jobs(stop, poll_s=settings.analysis.scan_interval_seconds)
    for thread in threads:
        thread.join(timeout=settings.node.timeouts.shutdown_grace)
    archive.close()
    logger.info("worker process %d stopped", os.getpid())
    return 0
