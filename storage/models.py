"""ORM models of the index: one table per Query/Retrieve level, and the job and export queues.

Attribute names are the snake_case form of the DICOM keywords; the mapping from
keywords lives in :mod:`pacsnode.storage.index` only. Each level also keeps, in
``dicom_json``, the non-bulk attributes of its first instance (an instance: its
own), from which C-FIND return keys without a column of their own are answered.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "Patient",
    "Study",
    "Series",
    "Instance",
    "Quarantined",
    "DeidStudy",
    "DeidUid",
    "Job",
    "Export",
    "JobState",
    "ExportState",
]

# Lengths follow the VR maxima (PS3.5 6.2): UI 64, LO 64, SH 16, PN 64 per group x 3 groups.
_UI = 64
_LO = 64
_SH = 16
_PN = 324
_CS = 16


def _dicom_json() -> Mapped[dict[str, Any] | None]:
    """The level's first header in the DICOM JSON model (PS3.18 F.2), bulk data left out.

    NULL for rows indexed before revision 0004 (see :func:`pacsnode.storage.index.header_json`).
    """
    return mapped_column(JSON(none_as_null=True))


class JobState(enum.StrEnum):
    """``jobs.state``."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # the images are not what the rule asks for (``match.anatomy``): no results, no failure


class ExportState(enum.StrEnum):
    """``exports.state``."""

    PENDING = "pending"
    SENDING = "sending"
    DONE = "done"
    DEAD = "dead"


class Base(DeclarativeBase):
    """Declarative base of every pacsnode table."""

    if TYPE_CHECKING:
        # Every pacsnode model maps a Table (declared as any FromClause by SQLAlchemy), so
        # Model.__table__ can be given to insert(), update() and delete().
        __table__: ClassVar[Table]


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(_LO), unique=True)
    patient_name: Mapped[str | None] = mapped_column(String(_PN))
    # Folded form for case-insensitive Person Name matching (pacsnode.storage.query.pn_search_key).
    patient_name_key: Mapped[str | None] = mapped_column(String(_PN))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(_CS))
    specific_character_set: Mapped[str | None] = mapped_column(String(160))
    num_studies: Mapped[int] = mapped_column(Integer, default=0)
    dicom_json: Mapped[dict[str, Any] | None] = _dicom_json()

    studies: Mapped[list[Study]] = relationship(back_populates="patient")

    __table_args__ = (
        Index("ix_patients_patient_name", "patient_name"),
        Index("ix_patients_patient_name_key", "patient_name_key"),
    )


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(_UI), unique=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(_SH))
    study_id: Mapped[str | None] = mapped_column(String(_SH))
    study_description: Mapped[str | None] = mapped_column(String(_LO))
    referring_physician_name: Mapped[str | None] = mapped_column(String(_PN))
    referring_physician_name_key: Mapped[str | None] = mapped_column(String(_PN))
    specific_character_set: Mapped[str | None] = mapped_column(String(160))
    modalities_in_study: Mapped[str | None] = mapped_column(String(160))
    num_series: Mapped[int] = mapped_column(Integer, default=0)
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # Received instances only (results do not count): the quiet-time clock of the study.
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    # The last_received_at that the scheduler last turned into jobs; behind it = new instances since.
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime)
    dicom_json: Mapped[dict[str, Any] | None] = _dicom_json()

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (
        Index("ix_studies_study_date", "study_date"),
        Index("ix_studies_accession_number", "accession_number"),
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(_UI), unique=True)
    modality: Mapped[str | None] = mapped_column(String(_CS))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(_LO))
    body_part_examined: Mapped[str | None] = mapped_column(String(_CS))
    num_instances: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime)
    # True for series that pacsnode's pipelines wrote: never analysed, never a quiet-time trigger.
    is_result: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    dicom_json: Mapped[dict[str, Any] | None] = _dicom_json()

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(_UI), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(_UI))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    specific_character_set: Mapped[str | None] = mapped_column(String(160))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(_UI))
    file_path: Mapped[str] = mapped_column(String(255))
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime)
    # The instance's own header.
    dicom_json: Mapped[dict[str, Any] | None] = _dicom_json()

    series: Mapped[Series] = relationship(back_populates="instances")


class Quarantined(Base):
    """An instance received and kept, but not indexed: it contradicted the index (``storage.patient_mismatch``).

    Its file lies under ``quarantine/`` in the store; no Query/Retrieve level
    sees it. ``reason`` is ``patient-mismatch`` (its study is indexed under
    another PatientID) or ``series-mismatch`` (its series under another study).
    """

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(_UI), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(_UI))
    series_instance_uid: Mapped[str] = mapped_column(String(_UI))
    reason: Mapped[str] = mapped_column(String(32))
    file_path: Mapped[str] = mapped_column(String(255))  # relative to the store root
    file_size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class DeidStudy(Base):
    """A study exported de-identified to one destination: its pseudonymous identity there.

    ``deidentified_study_uid`` is how the destination knows the study; results it sends
    back under that UID are re-identified into ``original_study_uid``. ``day_offset``:
    the days every date was moved by (Retain Longitudinal Temporal Information with
    Modified Dates); ``pseudonym``: the PatientID and PatientName sent.
    """

    __tablename__ = "deid_studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    original_study_uid: Mapped[str] = mapped_column(String(_UI))
    deidentified_study_uid: Mapped[str] = mapped_column(String(_UI), unique=True)
    pseudonym: Mapped[str] = mapped_column(String(_LO))
    day_offset: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ux_deid_studies_destination_study", "destination", "original_study_uid", unique=True),)


class DeidUid(Base):
    """One UID replaced in a de-identified export (PS3.15 E.1 action U), per destination and study."""

    __tablename__ = "deid_uids"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deid_study_fk: Mapped[int] = mapped_column(ForeignKey("deid_studies.id"), index=True)
    original_uid: Mapped[str] = mapped_column(String(_UI))
    deidentified_uid: Mapped[str] = mapped_column(String(_UI), unique=True)

    __table_args__ = (Index("ux_deid_uids_study_original", "deid_study_fk", "original_uid", unique=True),)


class Job(Base):
    """One analysis run of a pipeline over a study or series: the durable job queue.

    ``state`` (:class:`JobState`) is pending -> running -> done | failed | skipped (pending again
    after a retryable failure, with ``not_before`` pushed back; skipped when the pipeline found the
    images are not what the rule asks for, the reason in ``last_error``). A running job holds a
    lease (``lease_owner`` until ``lease_expires_at``) that its worker renews;
    an expired lease makes the job claimable again. At most one pending job per
    (pipeline, study, series) -- ``series_instance_uid`` is ``""`` for study scope.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(200))
    study_instance_uid: Mapped[str] = mapped_column(String(_UI))
    series_instance_uid: Mapped[str] = mapped_column(String(_UI), default="")
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[float] = mapped_column(Float)
    params: Mapped[str] = mapped_column(Text, default="{}")  # JSON
    destinations: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of remote node names
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[str | None] = mapped_column(Text)  # JSON summary written by the pipeline
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    not_before: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ix_jobs_state_not_before", "state", "not_before"),
        Index("ix_jobs_study", "study_instance_uid"),
        Index(
            "ux_jobs_one_pending",
            "pipeline",
            "study_instance_uid",
            "series_instance_uid",
            unique=True,
            sqlite_where=text(f"state = '{JobState.PENDING.value}'"),
            postgresql_where=text(f"state = '{JobState.PENDING.value}'"),
        ),
    )


class Export(Base):
    """One instance to send to one remote node: the durable export queue.

    ``state`` (:class:`ExportState`) is pending -> sending -> done, or dead after ``max_attempts``
    failures (re-triable from the CLI). ``generation`` grows each time the row
    is queued again (a re-analysis replaced the instance), so a send that was
    in flight with the old content does not mark the new one done.
    """

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(_UI))
    destination: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    not_before: Mapped[datetime] = mapped_column(DateTime)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ux_exports_instance_destination", "sop_instance_uid", "destination", unique=True),
        Index("ix_exports_state_not_before", "state", "not_before"),
    )
