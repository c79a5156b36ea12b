"""The index schema on SQLite: the Alembic migrations build exactly the models, and revision 0004
(each level's first header as DICOM JSON) upgrades an index that holds rows already.

tests/integration/test_postgres.py checks the same on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from pydicom.dataset import Dataset

import pacsnode.storage.db
from pacsnode.storage.db import make_engine, migrate
from pacsnode.storage.index import InstanceMeta, add_instance, header_json
from pacsnode.storage.models import Base
from pacsnode.storage.query import Model, find, parse_find


def _alembic(engine: sa.Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(pacsnode.storage.db.__file__).parent / "migrations"))
    cfg.attributes["engine"] = engine
    return cfg


def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        migrate(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def _study_query() -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.PatientAge = ""
    return identifier


def test_upgrade_to_0004_leaves_rows_indexed_before_without_a_header(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        command.upgrade(_alembic(engine), "0003")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO patients (id, patient_id, num_studies) VALUES (1, 'P1', 1)"))
            conn.execute(
                sa.text(
                    "INSERT INTO studies (id, patient_fk, study_instance_uid, num_series, num_instances, "
                    "created_at, last_received_at) VALUES (1, 1, '1.2.3', 0, 0, '2026-01-01', '2026-01-01')"
                )
            )
        migrate(engine)
        header = Dataset()
        header.PatientAge = "050Y"
        with engine.begin() as conn:
            add_instance(
                conn,
                InstanceMeta(
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    sop_instance_uid="1.2.4.1.1",
                    study_instance_uid="1.2.4",
                    series_instance_uid="1.2.4.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    patient_id="P2",
                    dicom_json=header_json(header),
                ),
                file_path="x/1",
                file_size=1,
                sha256="0" * 64,
                calling_ae_title="SCU",
            )
        with engine.connect() as conn:
            stored = dict(conn.execute(sa.text("SELECT study_instance_uid, dicom_json FROM studies")).all())
            rows = find(conn, parse_find(_study_query(), Model.STUDY_ROOT), limit=None)
    finally:
        engine.dispose()
    assert stored["1.2.3"] is None
    answers = {row["StudyInstanceUID"]: row["PatientAge"] for row in rows}
    assert answers["1.2.3"] is None  # indexed before 0004: answered empty
    age = answers["1.2.4"]
    assert age is not None and (age.VR, age.value) == ("AS", "050Y")
