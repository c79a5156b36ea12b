"""The archive's memory of committed series: fewer statements, never a wrong row."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event, select

from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.storage import DuplicatePolicy, MisfiledInstanceError, PatientMismatchPolicy, StorageSettings
from pacsnode.storage.archive import Archive
from pacsnode.storage.index import count_rows, remove_instance
from pacsnode.storage.models import Instance, Patient, Series, Study
from tests.integration.test_archive import _add


def _open(tmp_path: Path) -> Archive:
    return Archive.open(
        StorageSettings(
            root=tmp_path / "store",
            database_url=f"sqlite:///{tmp_path / 'index.db'}",
            duplicate_policy=DuplicatePolicy.KEEP_FIRST,
            patient_mismatch=PatientMismatchPolicy.REJECT,
            min_free_bytes=0,
        )
    )


def _statements(archive: Archive, ds: Any) -> int:
    """The SQL statements adding ``ds`` took, as SQLite ran them (the hot path skips SQLAlchemy's events)."""
    seen: list[str] = []
    traced: list[Any] = []

    def trace(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        dbapi_conn.set_trace_callback(seen.append)
        traced.append(dbapi_conn)

    event.listen(archive.engine, "checkout", trace)
    try:
        _add(archive, ds)
    finally:
        event.remove(archive.engine, "checkout", trace)
        for dbapi_conn in traced:
            dbapi_conn.set_trace_callback(None)
    return len(seen)


def test_a_known_series_is_indexed_in_fewer_statements_with_the_same_rows(tmp_path: Path) -> None:
    archive = _open(tmp_path)
    study, series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    first = _statements(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series))
    second = _statements(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series))
    third = _statements(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series))
    # The first instance made the rows; once committed, its series is known to the process.
    assert second == third < first
    [summary] = archive.studies()
    assert (summary.num_series, summary.num_instances) == (1, 3)
    with archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 1, "studies": 1, "series": 1, "instances": 3}
        assert conn.execute(select(Series.num_instances)).scalar_one() == 3


def test_a_series_deleted_elsewhere_and_its_ids_reused_is_not_trusted(tmp_path: Path) -> None:
    archive = _open(tmp_path)
    other = Archive(archive.settings)  # another acceptor process on the same index
    study, series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    for _ in range(2):
        _add(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series, patient_id="P1"))
    with other.engine.begin() as conn:  # the other process removes the whole study ...
        for row in conn.execute(select(Instance)).all():
            remove_instance(conn, row)
        assert count_rows(conn) == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    # ... and indexes another patient's study, whose rows get the ids just freed.
    other_study, other_series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    _add(other, make_dataset(rows=8, columns=8, study_uid=other_study, series_uid=other_series, patient_id="P2"))
    _add(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series, patient_id="P1"))
    with archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 2, "studies": 2, "series": 2, "instances": 2}
        rows = conn.execute(
            select(Series.series_instance_uid, Series.num_instances, Study.study_instance_uid, Patient.patient_id)
            .join(Study, Study.id == Series.study_fk)
            .join(Patient, Patient.id == Study.patient_fk)
            .order_by(Patient.patient_id)
        ).all()
    assert [tuple(row) for row in rows] == [(series, 1, study, "P1"), (other_series, 1, other_study, "P2")]
    for summary in archive.studies():
        assert (summary.num_series, summary.num_instances) == (1, 1)
    other.close()


def test_an_instance_contradicting_a_known_series_is_still_refused(tmp_path: Path) -> None:
    archive = _open(tmp_path)
    study, series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    for _ in range(2):
        _add(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series, patient_id="P1"))
    with pytest.raises(MisfiledInstanceError):
        _add(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series, patient_id="P2"))
    with pytest.raises(MisfiledInstanceError):
        _add(archive, make_dataset(rows=8, columns=8, study_uid=generate_uid(UID_PREFIX), series_uid=series))
    with archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 1, "studies": 1, "series": 1, "instances": 2}


def test_conflicts_with_a_known_series_are_still_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = _open(tmp_path)
    study, series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    for _ in range(2):
        _add(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series, patient_name="Doe^Jane"))
    caplog.set_level(logging.WARNING)
    _add(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=series, patient_name="Doe^John"))
    assert f"patient of study {study}: patient_name differs from the indexed value" in caplog.text
    with archive.engine.connect() as conn:
        assert conn.execute(select(Patient.patient_name)).scalar_one() == "Doe^Jane"
        assert conn.execute(select(Study.num_instances)).scalar_one() == 3
