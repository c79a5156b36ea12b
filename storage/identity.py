"""Which studies and patients a set of instances belongs to: the participant objects of audit events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from pacsnode.storage.models import Instance, Patient, Series, Study

__all__ = ["StudyIdentity", "studies_of_instances", "study_identity"]

_patients = Patient.__table__
_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__
_CHUNK = 500


@dataclass(frozen=True, kw_only=True)
class StudyIdentity:
    """A study and its patient as indexed; ``instances``: how many of the instances asked about it holds."""

    study_instance_uid: str
    patient_id: str
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None = None
    instances: int = 0


def studies_of_instances(conn: Connection, sop_instance_uids: Iterable[str]) -> list[StudyIdentity]:
    """The studies (with their patients) holding the given instances, each with its count; unknown UIDs are skipped."""
    uids = list(dict.fromkeys(sop_instance_uids))
    counts: dict[str, StudyIdentity] = {}
    for start in range(0, len(uids), _CHUNK):
        chunk = uids[start : start + _CHUNK]
        rows = conn.execute(
            select(
                _studies.c.study_instance_uid,
                _patients.c.patient_id,
                _patients.c.patient_name,
                _patients.c.patient_birth_date,
                _patients.c.patient_sex,
                func.count(_instances.c.id).label("n"),
            )
            .select_from(_instances)
            .join(_series, _series.c.id == _instances.c.series_fk)
            .join(_studies, _studies.c.id == _series.c.study_fk)
            .join(_patients, _patients.c.id == _studies.c.patient_fk)
            .where(_instances.c.sop_instance_uid.in_(chunk))
            .group_by(
                _studies.c.study_instance_uid,
                _patients.c.patient_id,
                _patients.c.patient_name,
                _patients.c.patient_birth_date,
                _patients.c.patient_sex,
            )
        ).all()
        for row in rows:
            known = counts.get(row.study_instance_uid)
            counts[row.study_instance_uid] = StudyIdentity(
                study_instance_uid=row.study_instance_uid,
                patient_id=row.patient_id,
                patient_name=row.patient_name,
                patient_birth_date=row.patient_birth_date,
                patient_sex=row.patient_sex,
                instances=row.n + (known.instances if known else 0),
            )
    return list(counts.values())


def study_identity(conn: Connection, study_instance_uid: str) -> StudyIdentity | None:
    """A study and its patient as indexed, or ``None``."""
    row = conn.execute(
        select(
            _studies.c.study_instance_uid,
            _patients.c.patient_id,
            _patients.c.patient_name,
            _patients.c.patient_birth_date,
            _patients.c.patient_sex,
            _studies.c.num_instances,
        )
        .join(_patients, _patients.c.id == _studies.c.patient_fk)
        .where(_studies.c.study_instance_uid == study_instance_uid)
    ).first()
    if row is None:
        return None
    return StudyIdentity(
        study_instance_uid=row.study_instance_uid,
        patient_id=row.patient_id,
        patient_name=row.patient_name,
        patient_birth_date=row.patient_birth_date,
        patient_sex=row.patient_sex,
        instances=row.num_instances,
    )
