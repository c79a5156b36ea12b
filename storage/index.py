"""The index: from a header-only read of each stored file to rows per Q/R level.

:func:`read_header` turns a stored file into an :class:`InstanceMeta`, the one
place where DICOM keywords map to our snake_case names (``_TRANSLATION``).
:func:`add_instance` writes the rows of one instance in the caller's
transaction and keeps the derived counts correct. The hot path uses SQLAlchemy
Core statements: one C-STORE costs a handful of indexed lookups and inserts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from sqlalchemy import Connection, Row, func, select, update

from pacsnode.storage.errors import InvalidInstanceError, UnreadableInstanceError
from pacsnode.storage.models import Instance, Patient, Series, Study
from pacsnode.storage.query import pn_search_key

__all__ = [
    "InstanceMeta",
    "StudySummary",
    "read_header",
    "add_instance",
    "remove_instance",
    "find_instance",
    "list_studies",
    "is_valid_uid",
    "utcnow",
]

logger = logging.getLogger(__name__)

_patients = Patient.__table__
_studies = Study.__table__
_series = Series.__table__
_instances = Instance.__table__

# DICOM keyword -> (InstanceMeta field, maximum stored length or None for integers)
_TRANSLATION: dict[str, tuple[str, int | None]] = {
    "SpecificCharacterSet": ("specific_character_set", 160),
    "SOPClassUID": ("sop_class_uid", 64),
    "SOPInstanceUID": ("sop_instance_uid", 64),
    "StudyInstanceUID": ("study_instance_uid", 64),
    "SeriesInstanceUID": ("series_instance_uid", 64),
    "PatientID": ("patient_id", 64),
    "PatientName": ("patient_name", 324),
    "PatientBirthDate": ("patient_birth_date", 8),
    "PatientSex": ("patient_sex", 16),
    "StudyDate": ("study_date", 8),
    "StudyTime": ("study_time", 16),
    "AccessionNumber": ("accession_number", 16),
    "StudyID": ("study_id", 16),
    "StudyDescription": ("study_description", 64),
    "ReferringPhysicianName": ("referring_physician_name", 324),
    "Modality": ("modality", 16),
    "SeriesNumber": ("series_number", None),
    "SeriesDescription": ("series_description", 64),
    "BodyPartExamined": ("body_part_examined", 16),
    "InstanceNumber": ("instance_number", None),
}
_TAGS = [Tag(keyword) for keyword in _TRANSLATION]
_UID_CHARS = frozenset("0123456789.")


@dataclass(frozen=True, kw_only=True)
class InstanceMeta:
    """What the index keeps of one instance, read from its header."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    specific_character_set: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    instance_number: int | None = None


@dataclass(frozen=True, kw_only=True)
class StudySummary:
    """One line of ``pacsnode studies``."""

    study_instance_uid: str
    patient_id: str
    patient_name: str | None
    study_date: str | None
    study_description: str | None
    accession_number: str | None
    modalities_in_study: str | None
    num_series: int
    num_instances: int


def is_valid_uid(value: str) -> bool:
    """A UID we accept: 1-64 characters of digits and dots (PS3.5 9.1).

    Leading zeros in a component are tolerated: real devices send them and
    refusing their studies would lose data.
    """
    return 0 < len(value) <= 64 and _UID_CHARS.issuperset(value) and ".." not in value


def _text(value: Any, limit: int | None) -> str | int | None:
    if value is None:
        return None
    if limit is None:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text[:limit] if text else None


def read_header(
    path: Path,
    *,
    expected_sop_class_uid: str,
    expected_sop_instance_uid: str,
    transfer_syntax_uid: str,
) -> InstanceMeta:
    """Read the header of a stored file (no pixel data) and check its identity.

    Parameters
    ----------
    path
        The file, in the DICOM File Format.
    expected_sop_class_uid, expected_sop_instance_uid
        The Affected SOP Class/Instance UIDs of the C-STORE request: the dataset
        must carry the same values.
    transfer_syntax_uid
        The transfer syntax the dataset is encoded in.

    Raises
    ------
    UnreadableInstanceError
        The bytes do not parse as a DICOM dataset.
    InvalidInstanceError
        A required UID is missing, malformed or differs from the request's.
    """
    try:
        ds: Dataset = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        values = {name: _text(ds.get(keyword), limit) for keyword, (name, limit) in _TRANSLATION.items()}
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError) as exc:
        raise UnreadableInstanceError(f"cannot parse the dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises a wide range on hostile bytes
        raise UnreadableInstanceError(f"cannot parse the dataset: {type(exc).__name__}: {exc}") from exc

    identity = ("sop_class_uid", "sop_instance_uid", "study_instance_uid", "series_instance_uid")
    if not any(values[name] for name in identity):
        raise UnreadableInstanceError("no identifying attribute could be parsed: not a DICOM dataset")
    for name in identity:
        value = values[name]
        keyword = _keyword_of(name)
        if not value:
            raise InvalidInstanceError(f"{keyword} missing or empty")
        if not is_valid_uid(str(value)):
            raise InvalidInstanceError(f"{keyword} not a valid UID: {str(value)[:80]!r}")
    if values["sop_class_uid"] != expected_sop_class_uid:
        raise InvalidInstanceError(
            f"SOPClassUID differs from the request: dataset {values['sop_class_uid']}, "
            f"Affected SOP Class UID {expected_sop_class_uid}"
        )
    if values["sop_instance_uid"] != expected_sop_instance_uid:
        raise InvalidInstanceError(
            f"SOPInstanceUID differs from the request: dataset {values['sop_instance_uid']}, "
            f"Affected SOP Instance UID {expected_sop_instance_uid}"
        )
    return InstanceMeta(transfer_syntax_uid=transfer_syntax_uid, **values)  # type: ignore[arg-type]


def _keyword_of(name: str) -> str:
    for keyword, (field, _) in _TRANSLATION.items():
        if field == name:
            return keyword
    return name


def utcnow() -> datetime:
    """Naive UTC, as every timestamp in the index."""
    return datetime.now(UTC).replace(tzinfo=None)


def find_instance(conn: Connection, sop_instance_uid: str) -> Row[Any] | None:
    """Return the instance row for a SOP Instance UID, or ``None``."""
    return conn.execute(select(_instances).where(_instances.c.sop_instance_uid == sop_instance_uid)).first()


def _log_conflicts(level: str, uid: str, row: Row[Any], meta: InstanceMeta, names: tuple[str, ...]) -> None:
    for name in names:
        new = getattr(meta, name)
        old = getattr(row, name)
        if new is not None and old is not None and new != old:
            logger.warning(
                "%s %s: %s %r differs from the indexed %r (kept the indexed value)",
                level,
                uid,
                name,
                new,
                old,
            )


def add_instance(
    conn: Connection,
    meta: InstanceMeta,
    *,
    file_path: str,
    file_size: int,
    sha256: str,
    calling_ae_title: str | None,
    is_result: bool = False,
) -> None:
    """Insert one instance and its patient/study/series in the caller's transaction.

    The caller has checked that no row for this SOP Instance UID exists. Counts
    and ModalitiesInStudy are updated in the same transaction. Attribute
    conflicts with rows already indexed are logged and the indexed value kept.
    ``is_result`` marks pacsnode's own analysis results: their series is
    flagged and the study's quiet-time clock (``last_received_at``) is left alone.
    """
    now = utcnow()
    patient_key = meta.patient_id or ""

    patient = conn.execute(select(_patients).where(_patients.c.patient_id == patient_key)).first()
    if patient is None:
        patient_fk = conn.execute(
            _patients.insert().values(
                patient_id=patient_key,
                patient_name=meta.patient_name,
                patient_name_key=pn_search_key(meta.patient_name),
                patient_birth_date=meta.patient_birth_date,
                patient_sex=meta.patient_sex,
                specific_character_set=meta.specific_character_set,
                num_studies=0,
            )
        ).inserted_primary_key[0]
    else:
        patient_fk = patient.id
        _log_conflicts("patient", patient_key, patient, meta, ("patient_name", "patient_birth_date", "patient_sex"))

    # FOR UPDATE: another writer adding a series to this study waits, so ModalitiesInStudy and the
    # counts below see its series (PostgreSQL; SQLite writers are serialised already).
    study = conn.execute(
        select(_studies).where(_studies.c.study_instance_uid == meta.study_instance_uid).with_for_update()
    ).first()
    if study is None:
        study_fk = conn.execute(
            _studies.insert().values(
                patient_fk=patient_fk,
                study_instance_uid=meta.study_instance_uid,
                study_date=meta.study_date,
                study_time=meta.study_time,
                accession_number=meta.accession_number,
                study_id=meta.study_id,
                study_description=meta.study_description,
                referring_physician_name=meta.referring_physician_name,
                referring_physician_name_key=pn_search_key(meta.referring_physician_name),
                specific_character_set=meta.specific_character_set,
                num_series=0,
                num_instances=0,
                created_at=now,
                last_received_at=now,
            )
        ).inserted_primary_key[0]
        conn.execute(
            update(_patients).where(_patients.c.id == patient_fk).values(num_studies=_patients.c.num_studies + 1)
        )
    else:
        study_fk = study.id
        if study.patient_fk != patient_fk:
            logger.warning(
                "study %s: instance %s names PatientID %r but the study is indexed under another patient "
                "(kept the indexed patient)",
                meta.study_instance_uid,
                meta.sop_instance_uid,
                patient_key,
            )
        _log_conflicts(
            "study",
            meta.study_instance_uid,
            study,
            meta,
            ("study_date", "accession_number", "study_description"),
        )

    series = conn.execute(select(_series.c.id).where(_series.c.series_instance_uid == meta.series_instance_uid)).first()
    if series is None:
        series_fk = conn.execute(
            _series.insert().values(
                study_fk=study_fk,
                series_instance_uid=meta.series_instance_uid,
                modality=meta.modality,
                series_number=meta.series_number,
                series_description=meta.series_description,
                body_part_examined=meta.body_part_examined,
                num_instances=1,
                last_received_at=now,
                is_result=is_result,
            )
        ).inserted_primary_key[0]
        modalities = (
            conn.execute(
                select(_series.c.modality)
                .where(_series.c.study_fk == study_fk, _series.c.modality.is_not(None))
                .distinct()
                .order_by(_series.c.modality)
            )
            .scalars()
            .all()
        )
        study_values: dict[str, Any] = {
            "num_series": _studies.c.num_series + 1,
            "num_instances": _studies.c.num_instances + 1,
            "modalities_in_study": "\\".join(modalities) or None,
        }
        if not is_result:
            study_values["last_received_at"] = now
        conn.execute(update(_studies).where(_studies.c.id == study_fk).values(**study_values))
    else:
        series_fk = series.id
        conn.execute(
            update(_series)
            .where(_series.c.id == series_fk)
            .values(num_instances=_series.c.num_instances + 1, last_received_at=now)
        )
        more: dict[str, Any] = {"num_instances": _studies.c.num_instances + 1}
        if not is_result:
            more["last_received_at"] = now
        conn.execute(update(_studies).where(_studies.c.id == study_fk).values(**more))

    conn.execute(
        _instances.insert().values(
            series_fk=series_fk,
            sop_instance_uid=meta.sop_instance_uid,
            sop_class_uid=meta.sop_class_uid,
            instance_number=meta.instance_number,
            specific_character_set=meta.specific_character_set,
            transfer_syntax_uid=meta.transfer_syntax_uid,
            file_path=file_path,
            file_size=file_size,
            sha256=sha256,
            calling_ae_title=calling_ae_title,
            received_at=now,
        )
    )


def remove_instance(conn: Connection, row: Row[Any]) -> None:
    """Delete an instance row and undo its share of the derived counts.

    A series, study or patient left empty is deleted too.
    """
    conn.execute(_instances.delete().where(_instances.c.id == row.id))
    series = conn.execute(select(_series).where(_series.c.id == row.series_fk)).one()
    conn.execute(select(_studies.c.id).where(_studies.c.id == series.study_fk).with_for_update())
    if series.num_instances <= 1:
        conn.execute(_series.delete().where(_series.c.id == series.id))
        modalities = (
            conn.execute(
                select(_series.c.modality)
                .where(_series.c.study_fk == series.study_fk, _series.c.modality.is_not(None))
                .distinct()
                .order_by(_series.c.modality)
            )
            .scalars()
            .all()
        )
        conn.execute(
            update(_studies)
            .where(_studies.c.id == series.study_fk)
            .values(
                num_series=_studies.c.num_series - 1,
                num_instances=_studies.c.num_instances - 1,
                modalities_in_study="\\".join(modalities) or None,
            )
        )
    else:
        conn.execute(update(_series).where(_series.c.id == series.id).values(num_instances=_series.c.num_instances - 1))
        conn.execute(
            update(_studies).where(_studies.c.id == series.study_fk).values(num_instances=_studies.c.num_instances - 1)
        )
    study = conn.execute(select(_studies).where(_studies.c.id == series.study_fk)).one()
    if study.num_series <= 0:
        conn.execute(_studies.delete().where(_studies.c.id == study.id))
        conn.execute(
            update(_patients).where(_patients.c.id == study.patient_fk).values(num_studies=_patients.c.num_studies - 1)
        )
        patient = conn.execute(select(_patients.c.num_studies).where(_patients.c.id == study.patient_fk)).one()
        if patient.num_studies <= 0:
            conn.execute(_patients.delete().where(_patients.c.id == study.patient_fk))


def list_studies(conn: Connection) -> list[StudySummary]:
    """Every indexed study with its patient, newest study date first."""
    rows = conn.execute(
        select(
            _studies.c.study_instance_uid,
            _patients.c.patient_id,
            _patients.c.patient_name,
            _studies.c.study_date,
            _studies.c.study_description,
            _studies.c.accession_number,
            _studies.c.modalities_in_study,
            _studies.c.num_series,
            _studies.c.num_instances,
        )
        .join(_patients, _patients.c.id == _studies.c.patient_fk)
        .order_by(_studies.c.study_date.desc(), _studies.c.id)
    ).all()
    return [StudySummary(**row._asdict()) for row in rows]


def count_rows(conn: Connection) -> dict[str, int]:
    """Row counts per table (for checks and tests)."""
    return {
        table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
        for table in (_patients, _studies, _series, _instances)
    }
