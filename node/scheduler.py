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
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import Connection

from analysis.routing import is_ready, selected_series
from analysis.settings import Rule
from node.config import Settings
from storage import Archive
from storage.activity import SeriesFacts, UnitFacts, mark_scheduled, unscheduled_series, unscheduled_studies
from storage.queue import JobQueue, utcnow

__all__ = ["Scheduler"]

logger = logging.getLogger(__name__)


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

    def __init__(
        self, settings: Settings, archive: Archive, *, on_queued: Callable[[], object] | None = None
    ) -> None:
        self.settings = settings
        self._on_queued = on_queued
        self.archive = archive
        self.jobs = JobQueue(archive.engine)
        self.rules = [rule for rule in settings.analysis.rules if rule.enabled]
        self._sizes: dict[str, tuple[int, int] | None] = {}
        self._unreadable = False

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
        self._unreadable = False
        applicable: list[tuple[Rule, list[SeriesFacts]]] = []
        for rule in self.rules:
            if rule.scope != scope:
                continue
            chosen = selected_series(rule, unit, self._image_size)
            if chosen:
                applicable.append((rule, chosen))
        if self._unreadable:
            return []  # an image size could not be read: decide on a later pass, do not mark
        if not all(is_ready(rule, unit, self.settings.analysis, now) for rule, _ in applicable):
            return []  # wait for the slowest rule's quiet time
        # Claim the unit first: a second scheduler (another worker process) that read it too gets 0 rows.
        if not mark_scheduled(conn, unit):
            return []
        queued: list[int] = []
        analysis = self.settings.analysis
        for rule, _chosen in applicable:
            if not rule.reanalyze and self.jobs.ran_before(
                conn,
                rule=rule.name,
                study_instance_uid=unit.study_instance_uid,
                series_instance_uid=unit.series_instance_uid,
            ):
                logger.info(
                    "rule %s: %s %s changed after its analysis; not analysed again (reanalyze: false)",
                    rule.name, scope, unit.series_instance_uid or unit.study_instance_uid,
                )
                continue
            job_id, created = self.jobs.enqueue(
                rule=rule.name,
                pipeline=rule.pipeline,
                study_instance_uid=unit.study_instance_uid,
                series_instance_uid=unit.series_instance_uid,
                params=rule.params,
                destinations=rule.destinations,
                max_attempts=analysis.max_attempts,
                timeout_s=rule.timeout_seconds or analysis.job_timeout_seconds,
                conn=conn,
            )
            if created:
                queued.append(job_id)
        return queued

    def _image_size(self, facts: SeriesFacts) -> tuple[int, int] | None:
        """Rows and Columns of one image of the series, read from its header (cached)."""
        if facts.series_instance_uid not in self._sizes:
            path: Path = self.archive.instance_path(facts.sample_file)
            try:
                ds = dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
                self._sizes[facts.series_instance_uid] = (int(ds.Rows), int(ds.Columns))
            except Exception as exc:  # not cached: tried again on the next pass
                self._unreadable = True
                logger.warning("series %s: cannot read the image size from %s: %s", facts.series_instance_uid, path, exc)
                return None
            if len(self._sizes) > 10_000:
                self._sizes.clear()
        return self._sizes[facts.series_instance_uid]
