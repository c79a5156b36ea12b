"""What the dashboard's pages show, read from the index: plain data, no HTTP and no templates.

Each function takes a connection from :func:`pacsnode.storage.db.read_connection` (one
consistent snapshot per page) and returns frozen dataclasses the templates read.
The study search is a display filter (a case-insensitive substring over a few
columns), not DICOM matching: that is C-FIND's and QIDO-RS's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, or_, select
from sqlalchemy.orm import Session

from pacsnode.storage.models import Export, ExportState, Instance, Job, JobState, Patient, Series, Study

__all__ = [
    "ExportRow",
    "JobRow",
    "ResultObject",
    "SeriesRow",
    "StudyPage",
    "StudyRow",
    "export_counts",
    "export_rows",
    "job_rows",
    "list_studies",
    "study_page",
    "SEG_CLASS",
    "SR_CLASSES",
    "SC_CLASSES",
]

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    }
)
SC_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
    }
)
_NOT_IMAGES = SR_CLASSES | {SEG_CLASS}


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its own wildcards taken literally (escape ``\\``)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def person_name(value: str | None) -> str:
    """A DICOM PN as people read it: ``DOE^JOHN`` -> ``DOE, JOHN`` (alphabetic group only)."""
    if not value:
        return ""
    alphabetic = value.split("=", 1)[0]
    parts = [p for p in alphabetic.split("^") if p]
    if len(parts) >= 2:
        return f"{parts[0]}, {' '.join(parts[1:])}"
    return " ".join(parts)


def dicom_date(value: str | None) -> str:
    """``20240131`` -> ``2024-01-31``; anything else as it is."""
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or ""


@dataclass(frozen=True, kw_only=True)
class StudyRow:
    study_instance_uid: str
    patient_name: str
    patient_id: str
    study_date: str
    study_description: str
    accession_number: str
    modalities: str
    num_series: int
    num_instances: int
    last_received_at: datetime
    jobs: dict[str, int] = field(default_factory=dict)  # state -> count


def list_studies(
    conn: Connection, *, search: str = "", limit: int = 50, offset: int = 0
) -> tuple[list[StudyRow], bool]:
    """Studies, most recently received first; ``search`` filters on patient, accession, description or UID.

    Returns the page and whether more studies follow it.
    """
    stmt = (
        select(
            Study.study_instance_uid,
            Patient.patient_name,
            Patient.patient_id,
            Study.study_date,
            Study.study_description,
            Study.accession_number,
            Study.modalities_in_study,
            Study.num_series,
            Study.num_instances,
            Study.last_received_at,
        )
        .join(Patient, Patient.id == Study.patient_fk)
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit + 1)
        .offset(offset)
    )
    search = search.strip()
    if search:
        pattern = _like(search)
        stmt = stmt.where(
            or_(
                Patient.patient_name.ilike(pattern, escape="\\"),
                Patient.patient_id.ilike(pattern, escape="\\"),
                Study.accession_number.ilike(pattern, escape="\\"),
                Study.study_description.ilike(pattern, escape="\\"),
                Study.study_instance_uid == search,
            )
        )
    rows = conn.execute(stmt).all()
    more = len(rows) > limit
    rows = rows[:limit]
    uids = [r.study_instance_uid for r in rows]
    jobs: dict[str, dict[str, int]] = {}
    if uids:
        for uid, state, count in conn.execute(
            select(Job.study_instance_uid, Job.state, func.count())
            .where(Job.study_instance_uid.in_(uids))
            .group_by(Job.study_instance_uid, Job.state)
        ):
            jobs.setdefault(uid, {})[state] = int(count)
    return [
        StudyRow(
            study_instance_uid=r.study_instance_uid,
            patient_name=person_name(r.patient_name),
            patient_id=r.patient_id,
            study_date=dicom_date(r.study_date),
            study_description=r.study_description or "",
            accession_number=r.accession_number or "",
            modalities=(r.modalities_in_study or "").replace("\\", ", "),
            num_series=r.num_series,
            num_instances=r.num_instances,
            last_received_at=r.last_received_at,
            jobs=jobs.get(r.study_instance_uid, {}),
        )
        for r in rows
    ], more


@dataclass(frozen=True, kw_only=True)
class SeriesRow:
    series_instance_uid: str
    series_number: int | None
    modality: str
    series_description: str
    num_instances: int
    is_result: bool
    shows_image: bool  # has an image a thumbnail can be rendered from (not SR or SEG)


@dataclass(frozen=True, kw_only=True)
class ResultObject:
    """One instance of a result series (a SEG, an SR, a key image)."""

    series_instance_uid: str
    series_description: str
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    file_path: str

    @property
    def kind(self) -> str:
        if self.sop_class_uid == SEG_CLASS:
            return "seg"
        if self.sop_class_uid in SR_CLASSES:
            return "sr"
        if self.sop_class_uid in SC_CLASSES:
            return "sc"
        return "other"


@dataclass(frozen=True, kw_only=True)
class JobRow:
    id: int
    rule: str
    pipeline: str
    study_instance_uid: str
    series_instance_uid: str
    state: str
    attempts: int
    max_attempts: int
    last_error: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    not_before: datetime
    lease_owner: str
    timings: dict[str, float]
    result_count: int

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def retryable(self) -> bool:
        return self.state != JobState.RUNNING.value


@dataclass(frozen=True, kw_only=True)
class ExportRow:
    id: int
    sop_instance_uid: str
    destination: str
    job_id: int | None
    state: str
    attempts: int
    max_attempts: int
    last_error: str
    updated_at: datetime
    not_before: datetime
    sent_at: datetime | None
    study_instance_uid: str = ""  # empty when the instance is no longer stored
    what: str = ""  # the instance's series description


@dataclass(frozen=True, kw_only=True)
class StudyPage:
    study: StudyRow
    series: list[SeriesRow]
    results: list[ResultObject]
    jobs: list[JobRow]
    exports: list[ExportRow]
    referring_physician: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""


def _job_row(row: Any) -> JobRow:
    result: dict[str, Any] = {}
    if row.result:
        try:
            loaded = json.loads(row.result)
            result = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            result = {}
    timings = result.get("timings") if isinstance(result.get("timings"), dict) else {}
    return JobRow(
        id=row.id,
        rule=row.rule,
        pipeline=row.pipeline,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        state=row.state,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        last_error=row.last_error or "",
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        not_before=row.not_before,
        lease_owner=row.lease_owner or "",
        timings={str(k): float(v) for k, v in (timings or {}).items() if isinstance(v, int | float)},
        result_count=len(result.get("results") or []),
    )


def job_rows(
    conn: Connection, *, study_instance_uid: str | None = None, state: str | None = None, limit: int = 200
) -> list[JobRow]:
    """Jobs, newest first, of one study and/or in one state."""
    stmt = select(Job.__table__).order_by(Job.id.desc()).limit(limit)
    if study_instance_uid is not None:
        stmt = stmt.where(Job.study_instance_uid == study_instance_uid)
    if state:
        stmt = stmt.where(Job.state == JobState(state).value)
    return [_job_row(r) for r in conn.execute(stmt)]


def _export_row(row: Any) -> ExportRow:
    return ExportRow(
        id=row.id,
        sop_instance_uid=row.sop_instance_uid,
        destination=row.destination,
        job_id=row.job_id,
        state=row.state,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        last_error=row.last_error or "",
        updated_at=row.updated_at,
        not_before=row.not_before,
        sent_at=row.sent_at,
        study_instance_uid=row.study_instance_uid or "",
        what=row.series_description or "",
    )


def export_rows(
    conn: Connection,
    *,
    state: str | None = None,
    destination: str | None = None,
    sop_instance_uids: list[str] | None = None,
    limit: int = 200,
) -> list[ExportRow]:
    """Exports, most recently changed first."""
    stmt = (
        select(Export.__table__, Study.study_instance_uid, Series.series_description)
        .outerjoin(Instance, Instance.sop_instance_uid == Export.sop_instance_uid)
        .outerjoin(Series, Series.id == Instance.series_fk)
        .outerjoin(Study, Study.id == Series.study_fk)
        .order_by(Export.updated_at.desc(), Export.id.desc())
        .limit(limit)
    )
    if state:
        stmt = stmt.where(Export.state == ExportState(state).value)
    if destination:
        stmt = stmt.where(Export.destination == destination)
    if sop_instance_uids is not None:
        if not sop_instance_uids:
            return []
        stmt = stmt.where(Export.sop_instance_uid.in_(sop_instance_uids))
    return [_export_row(r) for r in conn.execute(stmt)]


def export_counts(conn: Connection) -> dict[str, dict[str, int]]:
    """destination -> state -> count, every state present (0 when none)."""
    out: dict[str, dict[str, int]] = {}
    for destination, state, count in conn.execute(
        select(Export.destination, Export.state, func.count()).group_by(Export.destination, Export.state)
    ):
        out.setdefault(destination, {s.value: 0 for s in ExportState})[state] = int(count)
    return dict(sorted(out.items()))


def study_page(conn: Connection, study_instance_uid: str) -> StudyPage | None:
    """Everything the study page shows, or None when the study is not indexed."""
    with Session(bind=conn) as session:
        return _study_page(conn, session, study_instance_uid)


def _study_page(conn: Connection, session: Session, study_instance_uid: str) -> StudyPage | None:
    row = session.execute(
        select(Study, Patient)
        .join(Patient, Patient.id == Study.patient_fk)
        .where(Study.study_instance_uid == study_instance_uid)
    ).first()
    if row is None:
        return None
    study: Study = row[0]
    patient: Patient = row[1]
    series_rows = session.execute(
        select(Series).where(Series.study_fk == study.id).order_by(Series.is_result, Series.series_number, Series.id)
    ).scalars()
    series: list[SeriesRow] = []
    result_series: dict[int, Series] = {}
    for s in series_rows:
        first_class = conn.execute(
            select(Instance.sop_class_uid).where(Instance.series_fk == s.id).limit(1)
        ).scalar_one_or_none()
        series.append(
            SeriesRow(
                series_instance_uid=s.series_instance_uid,
                series_number=s.series_number,
                modality=s.modality or "",
                series_description=s.series_description or "",
                num_instances=s.num_instances,
                is_result=bool(s.is_result),
                shows_image=first_class is not None and first_class not in _NOT_IMAGES,
            )
        )
        if s.is_result:
            result_series[s.id] = s
    results: list[ResultObject] = []
    if result_series:
        for inst in session.execute(
            select(Instance)
            .where(Instance.series_fk.in_(list(result_series)))
            .order_by(Instance.series_fk, Instance.instance_number, Instance.id)
        ).scalars():
            owner = result_series[inst.series_fk]
            results.append(
                ResultObject(
                    series_instance_uid=owner.series_instance_uid,
                    series_description=owner.series_description or "",
                    sop_instance_uid=inst.sop_instance_uid,
                    sop_class_uid=inst.sop_class_uid,
                    instance_number=inst.instance_number,
                    file_path=inst.file_path,
                )
            )
    jobs = job_rows(conn, study_instance_uid=study_instance_uid, limit=100)
    exports = export_rows(conn, sop_instance_uids=[r.sop_instance_uid for r in results], limit=500)
    summary = StudyRow(
        study_instance_uid=study.study_instance_uid,
        patient_name=person_name(patient.patient_name),
        patient_id=patient.patient_id,
        study_date=dicom_date(study.study_date),
        study_description=study.study_description or "",
        accession_number=study.accession_number or "",
        modalities=(study.modalities_in_study or "").replace("\\", ", "),
        num_series=study.num_series,
        num_instances=study.num_instances,
        last_received_at=study.last_received_at,
    )
    return StudyPage(
        study=summary,
        series=series,
        results=results,
        jobs=jobs,
        exports=exports,
        referring_physician=person_name(study.referring_physician_name),
        patient_birth_date=dicom_date(patient.patient_birth_date),
        patient_sex=patient.patient_sex or "",
    )


def instance_file(conn: Connection, sop_instance_uid: str) -> tuple[str, str, str, str] | None:
    """(file path, SOP class, series UID, study UID) of an indexed instance."""
    row = conn.execute(
        select(Instance.file_path, Instance.sop_class_uid, Series.series_instance_uid, Study.study_instance_uid)
        .join(Series, Series.id == Instance.series_fk)
        .join(Study, Study.id == Series.study_fk)
        .where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()
    return None if row is None else (row[0], row[1], row[2], row[3])


def source_slice(conn: Connection, sop_instance_uids: list[str]) -> str | None:
    """Of the instances named, the one in the middle of their series by Instance Number (a SEG's source)."""
    if not sop_instance_uids:
        return None
    rows = conn.execute(
        select(Instance.sop_instance_uid)
        .where(Instance.sop_instance_uid.in_(sop_instance_uids))
        .order_by(Instance.instance_number, Instance.id)
    ).scalars()
    ordered = list(rows)
    return ordered[len(ordered) // 2] if ordered else None


def age(moment: datetime | None, now: datetime | None = None) -> str:
    """``3 s``, ``5 min``, ``2 h``, ``4 d`` ago (index times are naive UTC)."""
    if moment is None:
        return ""
    now = now or datetime.now(UTC).replace(tzinfo=None)
    seconds = max(0.0, (now - moment).total_seconds())
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"
