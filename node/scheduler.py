"""Scheduler: quiet studies and series become jobs, per the routing rules.

One pass reads the units (series, and studies when a rule has study scope)
whose newest received instance is newer than their scheduling mark, applies
each enabled rule, queues a job for every rule that matches and is ready, and
marks the unit -- all in one transaction, so a crash leaves either both or
neither. A unit is marked only once every rule that matches it is ready, so
the longest quiet time among them applies. Several schedulers (the serve
process and ``pacsnode worker`` processes) may run at once: the mark is
optimistic (it names the clock value it read) and the queue keeps at most one
pending job per pipeline, study and series.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import Connection

from pacsnode.analysis.routing import is_ready, select_series
from pacsnode.analysis.settings import AnalysisSettings, Rule
from pacsnode.node.config import Settings
from pacsnode.storage import Archive
from pacsnode.storage.activity import (
    SeriesFacts,
    UnitFacts,
    mark_scheduled,
    unscheduled_series,
    unscheduled_studies,
)
from pacsnode.storage.queue import JobQueue, utcnow

__all__ = ["ImageSizes", "Scheduler", "enqueue_rule_jobs"]

logger = logging.getLogger(__name__)


class ImageSizes:
    """Rows and Columns of a series' images, read from one header and cached.

    The image-size reader that :func:`pacsnode.analysis.routing.select_series`
    takes. ``unreadable`` is set when a header could not be read (not cached,
    so a later call tries again).
    """

    def __init__(self, archive: Archive, *, limit: int = 10_000) -> None:
        self.archive = archive
        self.unreadable = False
        self._limit = limit
        self._sizes: dict[str, tuple[int, int]] = {}

    def __call__(self, facts: SeriesFacts) -> tuple[int, int] | None:
        cached = self._sizes.get(facts.series_instance_uid)
        if cached is not None:
            return cached
        path: Path = self.archive.instance_path(facts.sample_file)
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            size = (int(ds.Rows), int(ds.Columns))
        except Exception as exc:  # not cached: tried again on the next call
            self.unreadable = True
            logger.warning("series %s: cannot read the image size from %s: %s", facts.series_instance_uid, path, exc)
            return None
        if len(self._sizes) >= self._limit:
            self._sizes.clear()
        self._sizes[facts.series_instance_uid] = size
        return size


def enqueue_rule_jobs(
    jobs: JobQueue,
    rule: Rule,
    analysis: AnalysisSettings,
    *,
    study_instance_uid: str,
    chosen: Sequence[SeriesFacts],
    conn: Connection | None = None,
) -> list[tuple[int, bool]]:
    """Queue the jobs of ``rule`` for the series it selected; ``(job id, created)`` each.

    A study-scope rule gets one job for the study (the worker selects the
    same series again when it runs, with the instances received by then); a
    series-scope rule gets one job per chosen series.
    """
    targets = [""] if rule.scope == "study" else [s.series_instance_uid for s in chosen]
    return [
        jobs.enqueue(
            rule=rule.name,
            pipeline=rule.pipeline,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_uid,
            params=rule.params,
            destinations=rule.destinations,
            max_attempts=analysis.max_attempts,
            timeout_s=rule.timeout_seconds or analysis.job_timeout_seconds,
            conn=conn,
        )
        for series_uid in targets
    ]


class Scheduler:
    """Turns quiet units into jobs.

    Parameters
    ----------
    settings
        The node's settings (``analysis`` section: rules, quiet time, job policy).
    archive
        The archive whose index holds the units and the job queue.
    on_queued
        Called after a pass that queued jobs (wakes this process's job loop).
    """

    def __init__(self, settings: Settings, archive: Archive, *, on_queued: Callable[[], object] | None = None) -> None:
        self.settings = settings
        self._on_queued = on_queued
        self.archive = archive
        self.jobs = JobQueue(archive.engine)
        self.rules = [rule for rule in settings.analysis.rules if rule.enabled]
        self.image_sizes = ImageSizes(archive)

    def run(self, stop: threading.Event) -> None:
        """Scan every ``scan_interval_seconds`` until ``stop`` is set."""
        interval = self.settings.analysis.scan_interval_seconds
        while not stop.is_set():
            try:
                self.scan_once()
            except Exception:
                logger.exception("scheduler pass failed; trying again in %.0f s", interval)
            stop.wait(interval)

    def scan_once(self, now: datetime | None = None) -> list[int]:
        """One pass; returns the ids of the jobs queued."""
        if not self.rules:
            return []
        now = now or utcnow()
        queued: list[int] = []
        scopes = {rule.scope for rule in self.rules}
        with self.jobs.transaction() as conn:  # one transaction: jobs and marks together
            units: list[UnitFacts] = []
            if "series" in scopes:
                units += unscheduled_series(conn)
            if "study" in scopes:
                units += unscheduled_studies(conn)
            for unit in units:
                queued += self._schedule(conn, unit, now)
        if queued and self._on_queued is not None:
            self._on_queued()  # after the commit: the jobs are visible to the workers
        return queued

    def _schedule(self, conn: Connection, unit: UnitFacts, now: datetime) -> list[int]:
        scope = "series" if unit.series_instance_uid else "study"
        self.image_sizes.unreadable = False
        applicable: list[tuple[Rule, list[SeriesFacts]]] = []
        for rule in self.rules:
            if rule.scope != scope:
                continue
            chosen = select_series(rule, unit.series, self.image_sizes)
            if chosen:
                applicable.append((rule, chosen))
        if self.image_sizes.unreadable:
            return []  # an image size could not be read: decide on a later pass, do not mark
        if not all(is_ready(rule, unit, self.settings.analysis, now) for rule, _ in applicable):
            return []  # wait for the slowest rule's quiet time
        # Claim the unit first: a second scheduler (another worker process) that read it too gets 0 rows.
        if not mark_scheduled(conn, unit):
            return []
        queued: list[int] = []
        analysis = self.settings.analysis
        for rule, chosen in applicable:
            if not rule.reanalyze and self.jobs.ran_before(
                conn,
                rule=rule.name,
                study_instance_uid=unit.study_instance_uid,
                series_instance_uid=unit.series_instance_uid,
            ):
                logger.info(
                    "rule %s: %s %s changed after its analysis; not analysed again (reanalyze: false)",
                    rule.name,
                    scope,
                    unit.series_instance_uid or unit.study_instance_uid,
                )
                continue
            for job_id, created in enqueue_rule_jobs(
                self.jobs, rule, analysis, study_instance_uid=unit.study_instance_uid, chosen=chosen, conn=conn
            ):
                if created:
                    queued.append(job_id)
        return queued
