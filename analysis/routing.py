"""Routing rules: does a rule apply to a series, and is the series or study ready for it."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta

from analysis.settings import AnalysisSettings, Rule
from storage.activity import SeriesFacts, UnitFacts

__all__ = ["series_matches", "selected_series", "is_ready"]

ImageSize = Callable[[SeriesFacts], "tuple[int, int] | None"]


def series_matches(rule: Rule, facts: SeriesFacts, image_size: ImageSize | None = None) -> bool:
    """True when every condition of ``rule.match`` holds for the series."""
    m = rule.match
    if m.modality and (facts.modality or "").upper() not in {v.upper() for v in m.modality}:
        return False
    if m.body_part and (facts.body_part_examined or "").upper() not in {v.upper() for v in m.body_part}:
        return False
    if m.sop_class and not facts.sop_class_uids & set(m.sop_class):
        return False
    if m.series_description is not None and not re.search(
        m.series_description, facts.series_description or "", re.IGNORECASE
    ):
        return False
    if m.calling_ae and not facts.calling_ae_titles & set(m.calling_ae):
        return False
    if facts.num_instances < m.min_instances:
        return False
    if m.max_instances is not None and facts.num_instances > m.max_instances:
        return False
    if m.needs_image_size:
        size = image_size(facts) if image_size is not None else None
        if size is None:
            return False
        rows, columns = size
        if (m.min_rows and rows < m.min_rows) or (m.max_rows and rows > m.max_rows):
            return False
        if (m.min_columns and columns < m.min_columns) or (m.max_columns and columns > m.max_columns):
            return False
    return True


def selected_series(rule: Rule, unit: UnitFacts, image_size: ImageSize | None = None) -> list[SeriesFacts]:
    """The series of the unit that the rule analyses (empty: the rule does not apply)."""
    return [facts for facts in unit.series if series_matches(rule, facts, image_size)]


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
