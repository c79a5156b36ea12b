"""An instance that contradicts the index (storage.patient_mismatch) against a real pynetdicom SCU.

Its study indexed under another PatientID, or its series under another study: refused with
0xA900 (reject, the default), indexed where the index has it (accept), or acknowledged and
kept apart under quarantine/, never indexed (quarantine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from pacsnode.node.cli import main
from pacsnode.node.dicom import status
from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.storage import Archive, MisfiledInstanceError, PatientMismatchPolicy, StorageSettings
from pacsnode.storage.index import count_rows
from pacsnode.storage.models import Instance, Patient, Quarantined, Study
from pacsnode.storage.query import Model, parse_find
from tests.support.find import send_find
from tests.support.helpers import make_settings, sha256_file, store_datasets
from tests.support.node import RunningNode

FIRST_ID, SECOND_ID = "PAT-FIRST-0001", "PAT-SECOND-0002"
FIRST_NAME, SECOND_NAME = "First^Patient", "Second^Patient"


def _store(port: int, ds: Dataset, *, calling: str) -> tuple[int, str]:
    """One association, one C-STORE: (status, Error Comment)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def _two_patients_one_study() -> tuple[Dataset, Dataset]:
    """The first patient's instance, and another patient's instance (a series of its own) in the same study."""
    study = generate_uid(UID_PREFIX)
    first = make_dataset(rows=8, columns=8, study_uid=study, patient_id=FIRST_ID, patient_name=FIRST_NAME)
    second = make_dataset(rows=8, columns=8, study_uid=study, patient_id=SECOND_ID, patient_name=SECOND_NAME, seed=1)
    return first, second


def _start(start_node, tmp_path: Path, mode: str) -> RunningNode:  # type: ignore[no-untyped-def]
    node: RunningNode = start_node(make_settings(tmp_path, storage={"patient_mismatch": mode}))
    return node


def _files(node: RunningNode, folder: str) -> list[Path]:
    return sorted((node.archive.store.root / folder).rglob("*.dcm"))


def _quarantined(node: RunningNode) -> list[Any]:
    with node.archive.engine.connect() as conn:
        return list(conn.execute(select(Quarantined).order_by(Quarantined.id)).all())


def _pacsnode_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("pacsnode")]


def _no_patient_data_logged(caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(r.getMessage() + repr(vars(r)) for r in _pacsnode_records(caplog))
    for value in (FIRST_ID, SECOND_ID, FIRST_NAME, SECOND_NAME):
        assert value not in text


@pytest.mark.parametrize(
    ("mode", "code", "comment", "rows", "objects", "quarantined", "outcome"),
    [
        (
            "reject",
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "StudyInstanceUID belongs to another patient",
            {"patients": 1, "studies": 1, "series": 1, "instances": 1},
            1,
            0,
            "refused",
        ),
        (
            "accept",
            status.SUCCESS,
            "",
            # indexed under the study's patient: no row for the second patient
            {"patients": 1, "studies": 1, "series": 2, "instances": 2},
            2,
            0,
            "accepted",
        ),
        (
            "quarantine",
            status.SUCCESS,
            "",
            {"patients": 1, "studies": 1, "series": 1, "instances": 1},
            1,
            1,
            "quarantined",
        ),
    ],
)
def test_another_patients_instance_in_a_known_study_follows_the_policy(  # type: ignore[no-untyped-def]
    start_node,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    code: int,
    comment: str,
    rows: dict[str, int],
    objects: int,
    quarantined: int,
    outcome: str,
) -> None:
    node = _start(start_node, tmp_path, mode)
    first, second = _two_patients_one_study()
    assert _store(node.port, first, calling="MODALITY_A") == (status.SUCCESS, "")
    caplog.set_level(logging.INFO, logger="pacsnode")

    assert _store(node.port, second, calling="MODALITY_B") == (code, comment)

    with node.archive.engine.connect() as conn:
        assert count_rows(conn) == rows
        assert conn.execute(select(Patient.patient_id)).scalars().all() == [FIRST_ID]
        assert conn.execute(select(Study.num_instances)).scalar_one() == rows["instances"]
        indexed = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    assert (str(second.SOPInstanceUID) in indexed) is (mode == "accept")
    assert len(_files(node, "objects")) == objects
    assert len(_files(node, "quarantine")) == quarantined
    assert len(_quarantined(node)) == quarantined
    assert list(node.archive.store.tmp_dir.iterdir()) == []

    [line] = [r for r in _pacsnode_records(caplog) if getattr(r, "action", None) == "patient-mismatch"]
    assert line.levelno == logging.WARNING
    assert getattr(line, "outcome", None) == outcome
    assert getattr(line, "calling_ae_title", None) == "MODALITY_B"
    assert getattr(line, "study_instance_uid", None) == str(second.StudyInstanceUID)
    assert str(second.StudyInstanceUID) in line.getMessage() and "MODALITY_B" in line.getMessage()
    _no_patient_data_logged(caplog)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_quarantined_instance_is_listed_and_never_answered(  # type: ignore[no-untyped-def]
    start_node, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, backend: str
) -> None:
    storage: dict[str, Any] = {"patient_mismatch": "quarantine"}
    if backend == "postgresql":
        storage["database_url"] = request.getfixturevalue("postgres_url")
    node: RunningNode = start_node(make_settings(tmp_path, storage=storage))
    first, second = _two_patients_one_study()
    assert _store(node.port, first, calling="MODALITY_A")[0] == status.SUCCESS
    assert _store(node.port, second, calling="MODALITY_B")[0] == status.SUCCESS
    assert _store(node.port, second, calling="MODALITY_B")[0] == status.SUCCESS  # the same bytes again

    [row] = _quarantined(node)  # one row and one file for the same content
    [file] = _files(node, "quarantine")
    uid_hash = hashlib.sha256(str(second.SOPInstanceUID).encode()).hexdigest()
    assert row.file_path == f"quarantine/{uid_hash}-{row.sha256[:16]}.dcm"  # named by hashes, not by the UID
    assert node.archive.instance_path(row.file_path) == file
    assert sha256_file(file) == row.sha256 and file.stat().st_size == row.file_size
    assert (row.reason, row.calling_ae_title) == ("patient-mismatch", "MODALITY_B")
    assert (row.sop_instance_uid, row.study_instance_uid) == (str(second.SOPInstanceUID), str(second.StudyInstanceUID))

    config = tmp_path / "pacsnode.yaml"
    config.write_text(yaml.safe_dump({"storage": node.settings.storage.model_dump(mode="json")}))
    capsys.readouterr()
    assert main(["--config", str(config), "quarantine", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["sop_instance_uid"] == str(second.SOPInstanceUID)
    assert listed["reason"] == "patient-mismatch" and listed["file_path"] == row.file_path
    assert main(["--config", str(config), "quarantine"]) == 0
    table = capsys.readouterr().out
    assert str(second.SOPInstanceUID) in table and "1 quarantined instance(s)" in table

    study = Dataset()
    study.QueryRetrieveLevel = "STUDY"
    study.StudyInstanceUID = str(first.StudyInstanceUID)
    study.PatientID = ""
    study.NumberOfStudyRelatedInstances = ""
    study.NumberOfStudyRelatedSeries = ""
    found = send_find(node.port, "PACSNODE", "study", study)
    assert found.final_status == status.SUCCESS
    [answer] = found.identifiers
    assert answer.PatientID == FIRST_ID
    assert (int(answer.NumberOfStudyRelatedInstances), int(answer.NumberOfStudyRelatedSeries)) == (1, 1)

    image = Dataset()
    image.QueryRetrieveLevel = "IMAGE"
    image.StudyInstanceUID = str(first.StudyInstanceUID)
    image.SeriesInstanceUID = str(second.SeriesInstanceUID)
    image.SOPInstanceUID = str(second.SOPInstanceUID)
    found = send_find(node.port, "PACSNODE", "study", image)
    assert (found.final_status, found.identifiers) == (status.SUCCESS, [])

    # What a C-MOVE or C-GET of the study would send: the first patient's instance only.
    retrieve = Dataset()
    retrieve.QueryRetrieveLevel = "STUDY"
    retrieve.StudyInstanceUID = str(first.StudyInstanceUID)
    located = node.archive.locate(parse_find(retrieve, Model.STUDY_ROOT))
    assert [item.sop_instance_uid for item in located] == [str(first.SOPInstanceUID)]


@pytest.mark.parametrize(
    ("mode", "code", "comment", "rows"),
    [
        (
            "reject",
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SeriesInstanceUID belongs to another study",
            {"patients": 1, "studies": 1, "series": 1, "instances": 1},
        ),
        # indexed into the series as indexed, and so into its study: no row for the other study
        ("accept", status.SUCCESS, "", {"patients": 1, "studies": 1, "series": 1, "instances": 2}),
        ("quarantine", status.SUCCESS, "", {"patients": 1, "studies": 1, "series": 1, "instances": 1}),
    ],
)
def test_a_known_series_under_another_study_follows_the_policy(  # type: ignore[no-untyped-def]
    start_node,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    code: int,
    comment: str,
    rows: dict[str, int],
) -> None:
    node = _start(start_node, tmp_path, mode)
    first = make_dataset(rows=8, columns=8)
    moved = make_dataset(rows=8, columns=8, series_uid=str(first.SeriesInstanceUID), seed=1)  # another study
    assert _store(node.port, first, calling="MODALITY_A")[0] == status.SUCCESS
    caplog.set_level(logging.INFO, logger="pacsnode")

    assert _store(node.port, moved, calling="MODALITY_B") == (code, comment)

    with node.archive.engine.connect() as conn:
        assert count_rows(conn) == rows
        assert conn.execute(select(Study.study_instance_uid)).scalars().all() == [str(first.StudyInstanceUID)]
        assert conn.execute(select(Study.num_instances)).scalar_one() == rows["instances"]
    assert [r.reason for r in _quarantined(node)] == (["series-mismatch"] if mode == "quarantine" else [])
    assert len(_files(node, "objects")) == rows["instances"]
    assert [getattr(r, "outcome", None) for r in caplog.records if getattr(r, "action", None) == "series-mismatch"] == [
        {"reject": "refused", "accept": "accepted", "quarantine": "quarantined"}[mode]
    ]


def test_an_instance_without_patient_id_contradicts_a_study_indexed_under_one(  # type: ignore[no-untyped-def]
    start_node, tmp_path: Path
) -> None:
    node = _start(start_node, tmp_path, "reject")
    first, second = _two_patients_one_study()
    del second.PatientID
    assert _store(node.port, first, calling="MODALITY_A")[0] == status.SUCCESS
    assert _store(node.port, second, calling="MODALITY_B") == (
        status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "StudyInstanceUID belongs to another patient",
    )
    same = make_dataset(rows=8, columns=8, study_uid=str(first.StudyInstanceUID), patient_id=FIRST_ID, seed=2)
    assert _store(node.port, same, calling="MODALITY_B")[0] == status.SUCCESS  # the same patient: indexed
    with node.archive.engine.connect() as conn:
        assert count_rows(conn)["instances"] == 2


def _archive(tmp_path: Path, mode: PatientMismatchPolicy) -> Archive:
    return Archive.open(
        StorageSettings(
            root=tmp_path / "store",
            database_url=f"sqlite:///{tmp_path / 'index.db'}",
            min_free_bytes=0,
            patient_mismatch=mode,
        )
    )


def test_a_result_naming_another_patient_is_refused_not_quarantined(tmp_path: Path) -> None:
    archive = _archive(tmp_path, PatientMismatchPolicy.QUARANTINE)
    try:
        first, second = _two_patients_one_study()
        archive.add_dataset(first, calling_ae_title="PACSNODE")
        with pytest.raises(MisfiledInstanceError, match="StudyInstanceUID belongs to another patient"):
            archive.add_dataset(second, calling_ae_title="PACSNODE")
        assert archive.quarantined() == []
        assert sorted(archive.store.root.rglob("*.dcm")) == sorted(archive.store.objects_dir.rglob("*.dcm"))
        assert len(list(archive.store.objects_dir.rglob("*.dcm"))) == 1
        assert list(archive.store.tmp_dir.iterdir()) == []
    finally:
        archive.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_senders_of_two_patients_never_mix_a_new_study(  # type: ignore[no-untyped-def]
    start_node, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """On PostgreSQL no write gate serialises the writers: the loser of the race to make the study
    collides on its unique key, is retried, and then finds the study under the other patient."""
    storage: dict[str, Any] = {"fsync": False}
    if backend == "postgresql":
        storage["database_url"] = request.getfixturevalue("postgres_url")
    node: RunningNode = start_node(make_settings(tmp_path, storage=storage))
    study = generate_uid(UID_PREFIX)
    batches = {
        patient: [
            make_dataset(rows=8, columns=8, study_uid=study, patient_id=patient, instance_number=i, seed=i)
            for i in range(10)
        ]
        for patient in (FIRST_ID, SECOND_ID)
    }
    results: dict[str, list[int | None]] = {}

    def send(patient: str) -> None:
        results[patient] = store_datasets(node.port, list(batches[patient]), calling="MODALITY_A")

    barrier = threading.Barrier(len(batches))

    def send_together(patient: str) -> None:
        barrier.wait(timeout=30)
        send(patient)

    threads = [threading.Thread(target=send_together, args=(patient,)) for patient in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Whichever patient's instance made the study first owns it: all of that patient's instances are
    # indexed, every instance of the other is refused, whatever the interleaving.
    with node.archive.engine.connect() as conn:
        [owner] = conn.execute(select(Patient.patient_id)).scalars().all()
        assert count_rows(conn) == {"patients": 1, "studies": 1, "series": 10, "instances": 10}
    other = SECOND_ID if owner == FIRST_ID else FIRST_ID
    assert results[owner] == [status.SUCCESS] * 10
    assert results[other] == [status.DATASET_DOES_NOT_MATCH_SOP_CLASS] * 10
    assert len(list(node.archive.store.objects_dir.rglob("*.dcm"))) == 10
