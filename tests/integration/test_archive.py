"""The archive against a real SQLite index and file store."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacsnode.node.dicom.handlers import encode_file_header
from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.storage import (
    AddOutcome,
    Archive,
    DuplicateInstanceError,
    DuplicatePolicy,
    StorageSettings,
    read_header,
)
from pacsnode.storage.index import count_rows
from pacsnode.storage.models import Instance, Patient, Study
from tests.support.helpers import sha256_file


def _archive(tmp_path: Path, policy: DuplicatePolicy = DuplicatePolicy.KEEP_FIRST) -> Archive:
    return Archive.open(
        StorageSettings(
            root=tmp_path / "store",
            database_url=f"sqlite:///{tmp_path / 'index.db'}",
            duplicate_policy=policy,
            min_free_bytes=0,
        )
    )


def _add(archive: Archive, ds, calling: str = "SCU"):  # type: ignore[no-untyped-def]
    from io import BytesIO

    from pydicom.filewriter import dcmwrite

    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getvalue()
    # dataset bytes only, as the network delivers them
    from pydicom import dcmread

    start = 132 + 12 + dcmread(BytesIO(raw)).file_meta.FileMetaInformationGroupLength
    header = encode_file_header(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    staged = archive.stage([header, raw[start:]])
    meta = read_header(
        staged.path,
        expected_sop_class_uid=str(ds.SOPClassUID),
        expected_sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
    )
    return archive.add(staged, meta, calling_ae_title=calling)


def test_counts_and_modalities_follow_the_instances(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    study = generate_uid(UID_PREFIX)
    ct_series, mr_series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    for i in range(3):
        _add(archive, make_dataset(rows=8, columns=8, study_uid=study, series_uid=ct_series, instance_number=i))
    for _ in range(2):
        _add(archive, make_dataset(rows=8, columns=8, modality="MR", study_uid=study, series_uid=mr_series))
    [summary] = archive.studies()
    assert summary.num_series == 2
    assert summary.num_instances == 5
    assert summary.modalities_in_study == "CT\\MR"
    with archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 1, "studies": 1, "series": 2, "instances": 5}
        for row in conn.execute(select(Instance.file_path, Instance.sha256)):
            assert sha256_file(archive.instance_path(row.file_path)) == row.sha256


def test_identical_duplicate_is_success_without_second_copy(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    ds = make_dataset(rows=8, columns=8)
    first = _add(archive, ds)
    second = _add(archive, ds)
    assert first.outcome is AddOutcome.STORED
    assert second.outcome is AddOutcome.IDENTICAL_DUPLICATE
    assert second.file_path == first.file_path
    files = [p for p in (archive.store.objects_dir).rglob("*.dcm")]
    assert len(files) == 1
    assert archive.studies()[0].num_instances == 1


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
def test_different_duplicate_follows_policy(
    tmp_path: Path, policy: DuplicatePolicy, caplog: pytest.LogCaptureFixture
) -> None:
    archive = _archive(tmp_path, policy)
    ds = make_dataset(rows=8, columns=8, seed=1)
    first = _add(archive, ds)
    changed = make_dataset(rows=8, columns=8, seed=2)
    changed.SOPInstanceUID = ds.SOPInstanceUID
    changed.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    changed.StudyInstanceUID, changed.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    caplog.set_level(logging.WARNING)
    if policy is DuplicatePolicy.REJECT:
        with pytest.raises(DuplicateInstanceError):
            _add(archive, changed)
        kept = first.file_path
    else:
        result = _add(archive, changed)
        expected = AddOutcome.KEPT_FIRST if policy is DuplicatePolicy.KEEP_FIRST else AddOutcome.OVERWRITTEN
        assert result.outcome is expected
        kept = first.file_path if policy is DuplicatePolicy.KEEP_FIRST else result.file_path
    assert policy.value in caplog.text
    files = list(archive.store.objects_dir.rglob("*.dcm"))
    assert [archive.store.root / kept] == [f for f in files]
    with archive.engine.connect() as conn:
        row = conn.execute(select(Instance)).one()
        assert row.file_path == kept
        assert sha256_file(archive.instance_path(kept)) == row.sha256
        assert count_rows(conn)["instances"] == 1
    assert archive.studies()[0].num_instances == 1


def test_overwrite_into_another_series_moves_the_counts(tmp_path: Path) -> None:
    archive = _archive(tmp_path, DuplicatePolicy.OVERWRITE)
    ds = make_dataset(rows=8, columns=8, seed=1)
    _add(archive, ds)
    moved = make_dataset(rows=8, columns=8, seed=2, patient_id="OTHER")
    moved.SOPInstanceUID = ds.SOPInstanceUID
    moved.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _add(archive, moved)
    [summary] = archive.studies()
    assert summary.study_instance_uid == moved.StudyInstanceUID
    assert summary.patient_id == "OTHER"
    with archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 1, "studies": 1, "series": 1, "instances": 1}


def test_patient_conflicts_are_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = _archive(tmp_path)
    study = generate_uid(UID_PREFIX)
    _add(archive, make_dataset(rows=8, columns=8, study_uid=study, patient_name="Doe^Jane"))
    caplog.set_level(logging.WARNING)
    _add(archive, make_dataset(rows=8, columns=8, study_uid=study, patient_name="Doe^John"))
    assert f"patient of study {study}: patient_name differs from the indexed value" in caplog.text
    assert "Doe^" not in caplog.text  # the log names the attribute, never a patient's name
    with archive.engine.connect() as conn:
        assert conn.execute(select(Patient.patient_name)).scalar_one() == "Doe^Jane"
        assert conn.execute(select(Study.num_instances)).scalar_one() == 2


def test_unicode_names_round_trip(tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    ds = make_dataset(rows=8, columns=8, patient_name="Müller^Jürgen")
    _add(archive, ds)
    ds2 = make_dataset(rows=8, columns=8, patient_id="U8", patient_name="山田^太郎")
    ds2.SpecificCharacterSet = "ISO_IR 192"
    _add(archive, ds2)
    names = {s.patient_name for s in archive.studies()}
    assert names == {"Müller^Jürgen", "山田^太郎"}
