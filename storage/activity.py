"""Study stability: which series and studies have gone quiet since they were last scheduled.

Every received instance moves its series' and study's ``last_received_at``
(results written by pacsnode do not). The scheduler asks for the units whose
clock is older than the quiet time and newer than ``scheduled_at`` -- the
``last_received_at`` it last turned into jobs -- and marks them with that same
value once its jobs are queued. An instance that arrives in between moves the
clock past the mark, so the unit comes back after another quiet period: nothing
is judged complete early and nothing is forgotten across a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, Select, or_, select, update

from pacsnode.storage.models import Instance, Patient, Series, Study

# ProtocolName (0018,1030) has no column: it is read from the series' first header (``dicom_json``).
_PROTOCOL_NAME = "00181030"

__all__ = ["SeriesFacts", "UnitFacts", "unscheduled_series", "unscheduled_studies", "mark_scheduled", "series_of_study"]

_series = Series.__table__
_studies = Study.__table__
_instances = Instance.__table__
_patients = Patient.__table__


@dataclass(frozen=True, kw_only=True)
class SeriesFacts:
    """What routing rules can match on, for one received series."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    num_instances: int
    study_description: str | None = None  # the study's StudyDescription (its first instance's)
    protocol_name: str | None = None  # ProtocolName of the series' first instance; None before revision 0004
    sop_class_uids: frozenset[str]
    calling_ae_titles: frozenset[str]
    last_received_at: datetime
    sample_file: str  # relative path of one instance, for rules that look at the image size
    files: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class UnitFacts:
    """A study or series waiting to be scheduled: the clock value to mark it with, and its series."""

    study_instance_uid: str
    series_instance_uid: str  # "" for a study
    last_received_at: datetime
    series: tuple[SeriesFacts, ...]


def _facts(conn: Connection, series_rows: Sequence[Row[Any]], with_files: bool = False) -> list[SeriesFacts]:
    """Facts per series from the series row and two small queries (distinct values, one sample file).

    The scheduler calls this for every unscheduled unit on every pass, while
    series are still arriving, so it never reads all instance rows unless the
    files are asked for (a job about to run).
    """
    out: list[SeriesFacts] = []
    for row in series_rows:
        of_series = _instances.c.series_fk == row.id
        order = (_instances.c.instance_number, _instances.c.id)
        kinds = conn.execute(
            select(_instances.c.sop_class_uid, _instances.c.calling_ae_title).where(of_series).distinct()
        ).all()
        if not kinds:
            continue
        if with_files:
            files = tuple(conn.execute(select(_instances.c.file_path).where(of_series).order_by(*order)).scalars())
            sample = files[len(files) // 2]
        else:
            files = ()
            sample = (
                conn.execute(
                    select(_instances.c.file_path)
                    .where(of_series)
                    .order_by(*order)
                    .offset(row.num_instances // 2)
                    .limit(1)
                ).scalar()
                or ""
            )
        out.append(
            SeriesFacts(
                study_instance_uid=row.study_instance_uid,
                series_instance_uid=row.series_instance_uid,
                patient_id=row.patient_id,
                modality=row.modality,
                body_part_examined=row.body_part_examined,
                series_description=row.series_description,
                num_instances=row.num_instances,
                study_description=row.study_description,
                protocol_name=_text_value(row.protocol_name),
                sop_class_uids=frozenset(k.sop_class_uid for k in kinds),
                calling_ae_titles=frozenset(k.calling_ae_title for k in kinds if k.calling_ae_title),
                last_received_at=row.last_received_at,
                sample_file=sample,
                files=files,
            )
        )
    return out


def _text_value(element: Any) -> str | None:
    """The first value of a text element in the DICOM JSON model (``{"vr": "LO", "Value": [...]}``), if any."""
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values or not isinstance(values[0], str):
        return None
    return values[0].strip() or None


def _series_query() -> Select[Any]:
    return (
        select(
            _series.c.id,
            _series.c.series_instance_uid,
            _series.c.modality,
            _series.c.body_part_examined,
            _series.c.series_description,
            _series.c.dicom_json[_PROTOCOL_NAME].label("protocol_name"),
            _series.c.num_instances,
            _series.c.last_received_at,
            _series.c.scheduled_at,
            _studies.c.study_instance_uid,
            _studies.c.study_description,
            _patients.c.patient_id,
        )
        .join(_studies, _studies.c.id == _series.c.study_fk)
        .join(_patients, _patients.c.id == _studies.c.patient_fk)
        .where(_series.c.is_result.is_(False))
    )


def unscheduled_series(conn: Connection, *, limit: int = 200) -> list[UnitFacts]:
    """Received series with instances newer than their scheduling mark (oldest first)."""
    stmt = (
        _series_query()
        .where(or_(_series.c.scheduled_at.is_(None), _series.c.scheduled_at < _series.c.last_received_at))
        .order_by(_series.c.last_received_at)
        .limit(limit)
    )
    units = []
    for facts in _facts(conn, list(conn.execute(stmt))):
        units.append(
            UnitFacts(
                study_instance_uid=facts.study_instance_uid,
                series_instance_uid=facts.series_instance_uid,
                last_received_at=facts.last_received_at,
                series=(facts,),
            )
        )
    return units


def unscheduled_studies(conn: Connection, *, limit: int = 200) -> list[UnitFacts]:
    """Studies with received instances newer than their scheduling mark (oldest first)."""
    rows = conn.execute(
        select(_studies.c.id, _studies.c.study_instance_uid, _studies.c.last_received_at)
        .where(or_(_studies.c.scheduled_at.is_(None), _studies.c.scheduled_at < _studies.c.last_received_at))
        .order_by(_studies.c.last_received_at)
        .limit(limit)
    ).all()
    units = []
    for study in rows:
        series_rows = list(conn.execute(_series_query().where(_series.c.study_fk == study.id)))
        # A study of results only has no facts; it is returned all the same, so that it gets
        # marked and does not stay at the front of the queue.
        units.append(
            UnitFacts(
                study_instance_uid=study.study_instance_uid,
                series_instance_uid="",
                last_received_at=study.last_received_at,
                series=tuple(_facts(conn, series_rows)),
            )
        )
    return units


def mark_scheduled(conn: Connection, unit: UnitFacts) -> bool:
    """Mark a unit scheduled up to the clock value it was read with.

    False when another scheduler marked it first or an instance moved its clock
    meanwhile: the caller must then not queue jobs for it. On PostgreSQL the
    row lock makes a second scheduler wait for the first and then see 0 rows.
    """
    if unit.series_instance_uid:
        stmt = update(_series).where(
            _series.c.series_instance_uid == unit.series_instance_uid,
            _series.c.last_received_at == unit.last_received_at,
        )
    else:
        stmt = update(_studies).where(
            _studies.c.study_instance_uid == unit.study_instance_uid,
            _studies.c.last_received_at == unit.last_received_at,
        )
    table = _series if unit.series_instance_uid else _studies
    stmt = stmt.where(or_(table.c.scheduled_at.is_(None), table.c.scheduled_at < unit.last_received_at))
    return conn.execute(stmt.values(scheduled_at=unit.last_received_at)).rowcount == 1


def series_of_study(conn: Connection, study_instance_uid: str, series_instance_uid: str = "") -> list[SeriesFacts]:
    """The received series of a study (or the one named), with their instance files, for a job to read."""
    stmt = _series_query().where(_studies.c.study_instance_uid == study_instance_uid)
    if series_instance_uid:
        stmt = stmt.where(_series.c.series_instance_uid == series_instance_uid)
    return _facts(conn, list(conn.execute(stmt)), with_files=True)
