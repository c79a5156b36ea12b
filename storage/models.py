"""ORM models of the index: one table per Query/Retrieve level.

Attribute names are the snake_case form of the DICOM keywords; the mapping from
keywords lives in :mod:`storage.index` only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Base", "Patient", "Study", "Series", "Instance"]

# Lengths follow the VR maxima (PS3.5 6.2): UI 64, LO 64, SH 16, PN 64 per group x 3 groups.
_UI = 64
_LO = 64
_SH = 16
_PN = 324
_CS = 16


class Base(DeclarativeBase):
    """Declarative base of every pacsnode table."""


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(_LO), unique=True)
    patient_name: Mapped[str | None] = mapped_column(String(_PN))
    # Folded form for case-insensitive Person Name matching (storage.query.pn_search_key).
    patient_name_key: Mapped[str | None] = mapped_column(String(_PN))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(_CS))
    specific_character_set: Mapped[str | None] = mapped_column(String(160))
    num_studies: Mapped[int] = mapped_column(Integer, default=0)

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
    last_received_at: Mapped[datetime] = mapped_column(DateTime, index=True)

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

    series: Mapped[Series] = relationship(back_populates="instances")
