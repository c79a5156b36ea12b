"""Routing rules: which series a rule analyses, and whether the series or study is ready for it.

:func:`select_series` is the one place that decides which series a rule
takes. The scheduler (when it queues), the worker (when it runs a study-scope
job) and ``pacsnode analyze`` all call it with the same image-size reader, so
a size condition can never be skipped by one of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from pacsnode.analysis.settings import AnalysisSettings, Rule
from pacsnode.storage.activity import SeriesFacts, UnitFacts

__all__ = ["ImageSize", "is_ready", "select_series", "series_matches"]

ImageSize = Callable[[SeriesFacts], "tuple[int, int] | None"]
"""Rows and Columns of a series' images, or None when they cannot be read."""


def series_matches(rule: Rule, facts: SeriesFacts, image_size: ImageSize) -> bool:
    """True when every header condition of ``rule.match`` holds for the series.

    ``match.anatomy`` is not a header condition: the pipeline decides it on the
    decoded images (:func:`pacsnode.analysis.lung.anatomy.check_anatomy`) and the
    job is skipped when they do not show it.
    """
    m = rule.match
    if m.modality and (facts.modality or "").upper() not in {v.upper() for v in m.modality}:
        return False
    if m.body_part and (facts.body_part_examined or "").upper() not in {v.upper() for v in m.body_part}:
        return False
    if m.sop_class and not facts.sop_class_uids & set(m.sop_class):
        return False
    for pattern, value in (
        (m.series_description, facts.series_description),
        (m.study_description, facts.study_description),
        (m.protocol_name, facts.protocol_name),
    ):
        if pattern is not None and not re.search(pattern, value or "", re.IGNORECASE):
            return False
    if m.calling_ae and not facts.calling_ae_titles & set(m.calling_ae):
        return False
    if facts.num_instances < m.min_instances:
        return False
    if m.max_instances is not None and facts.num_instances > m.max_instances:
        return False
    if m.needs_image_size:
        size = image_size(facts)
        if size is None:
            return False
        rows, columns = size
        if (m.min_rows and rows < m.min_rows) or (m.max_rows and rows > m.max_rows):
            return False
        if (m.min_columns and columns < m.min_columns) or (m.max_columns and columns > m.max_columns):
            return False
    return True


def select_series(rule: Rule, series: Sequence[SeriesFacts], image_size: ImageSize) -> list[SeriesFacts]:
    """The series among ``series`` that ``rule`` analyses; empty when the rule does not apply.

    Every condition of ``rule.match`` is applied, image sizes included. An
    empty answer is never widened to "all series": a caller that finds
    nothing must say so.
    """
    return [facts for facts in series if series_matches(rule, facts, image_size)]


def is_ready(rule: Rule, unit: UnitFacts, settings: AnalysisSettings, now: datetime) -> bool:
    """Quiet for the rule's quiet time, or one of its ``ready_when`` conditions holds."""
    quiet = rule.quiet_seconds if rule.quiet_seconds is not None else settings.quiet_seconds
    if unit.last_received_at <= now - timedelta(seconds=quiet):
        return True
    ready = rule.ready_when
    if ready.instances is not None and sum(s.num_instances for s in unit.series) >= ready.instances:
        return True
    if ready.series and all(
        any(re.search(pattern, s.series_description or "", re.IGNORECASE) for s in unit.series)
        for pattern in ready.series
    ):
        return True
    return False
