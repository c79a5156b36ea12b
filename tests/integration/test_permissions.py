"""Permissions per peer and service (policy.allowed_peers: services, move_destinations).

Real peers: DCMTK storescu/findscu/movescu/getscu and pynetdicom SCUs against an in-process node,
storescp as the C-MOVE destinations. A refused service gets 0x0124 (Refused: Not Authorized) and
does nothing; a peer that may do nothing gets A-ASSOCIATE-RJ; each refusal is one security-alert record.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from sqlalchemy import func, select

from pacsnode.node.dicom import status
from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage.models import Instance
from tests.support.helpers import echo_status, make_settings, store_datasets
from tests.support.node import RunningNode
from tests.support.peers import StorescpPeer, require, require_private_netns

PEERS = [
    {"ae_title": "MODALITY", "host": "127.0.0.1", "services": ["echo", "store"]},
    {"ae_title": "VIEWER", "host": "127.0.0.1", "services": ["find", "move", "get"], "move_destinations": ["DEST_OK"]},
    {"ae_title": "FINDER", "services": ["find"]},
    {"ae_title": "ELSEWHERE", "host": "10.9.9.9"},  # everything, but only from 10.9.9.9
    {"ae_title": "MUTED", "services": []},  # listed, may do nothing
]


World = tuple[RunningNode, StorescpPeer, StorescpPeer, Dataset]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_private_netns()
    tmp = tmp_path_factory.mktemp("permissions")
    with (
        StorescpPeer(tmp / "ok", ae_title="DEST_OK") as ok,
        StorescpPeer(tmp / "other", ae_title="DEST_OTHER") as other,
    ):
        settings = make_settings(
            tmp,
            policy={"allowed_peers": PEERS},
            remote_nodes={
                "ok": {"ae_title": "DEST_OK", "host": "127.0.0.1", "port": ok.port},
                "other": {"ae_title": "DEST_OTHER", "host": "127.0.0.1", "port": other.port},
            },
        )
        node = RunningNode(settings)
        try:
            ds = make_dataset(rows=8, columns=8, seed=1)
            assert store_datasets(node.port, [ds], calling="MODALITY") == [status.SUCCESS]
            yield node, ok, other, ds
        finally:
            node.stop()


def _study_identifier(ds: Dataset) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ds.StudyInstanceUID
    return identifier


def _not_authorized(done: subprocess.CompletedProcess[str]) -> bool:
    """DCMTK reported status 0x0124 (it prints "0x124")."""
    return re.search(r"\b0x0?124\b", done.stdout + done.stderr) is not None


def _alerts(caplog: pytest.LogCaptureFixture, service: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "event", None) == "security-alert" and getattr(r, "service", None) == service
    ]


def test_refused_services_get_not_authorized_and_do_nothing(world: World, caplog: pytest.LogCaptureFixture) -> None:
    node, ok, other, ds = world
    caplog.set_level(logging.WARNING)
    # FINDER may query, not store, retrieve or move
    ae = AE(ae_title="FINDER")
    other_ds = make_dataset(rows=8, columns=8, seed=2)
    ae.add_requested_context(other_ds.SOPClassUID, ExplicitVRLittleEndian)
    for model in (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
        Verification,
    ):
        ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(other_ds)
        assert int(rsp.Status) == status.NOT_AUTHORIZED
        assert "not authorized" in str(rsp.ErrorComment)
        finds = [
            (int(s.Status), i)
            for s, i in assoc.send_c_find(_study_identifier(ds), StudyRootQueryRetrieveInformationModelFind)
        ]
        assert finds[0][0] == status.PENDING and finds[-1][0] == status.SUCCESS
        gets = [
            int(s.Status) for s, _ in assoc.send_c_get(_study_identifier(ds), StudyRootQueryRetrieveInformationModelGet)
        ]
        assert gets == [status.NOT_AUTHORIZED]
        moves = [
            int(s.Status)
            for s, _ in assoc.send_c_move(_study_identifier(ds), "DEST_OK", StudyRootQueryRetrieveInformationModelMove)
        ]
        assert moves == [status.NOT_AUTHORIZED]
        assert int(assoc.send_c_echo().Status) == status.NOT_AUTHORIZED
    finally:
        assoc.release()
    node.wait_idle()
    with node.archive.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(Instance)).scalar_one() == 1  # the refused one is not
    assert ok.store_requests() == 0  # the refused move never reached the destination
    assert not list(node.archive.store.tmp_dir.iterdir()), "the refused dataset's temporary file was left behind"
    for service in ("store", "get", "move", "echo"):
        (record,) = _alerts(caplog, service)
        assert record.calling_ae_title == "FINDER" and record.peer == "127.0.0.1"  # type: ignore[attr-defined]
        assert record.status == status.NOT_AUTHORIZED  # type: ignore[attr-defined]


def test_move_only_to_listed_destinations(world: World, caplog: pytest.LogCaptureFixture) -> None:
    node, ok, other, ds = world
    caplog.set_level(logging.WARNING)
    movescu = require("movescu")
    base = [movescu, "-aet", "VIEWER", "-aec", "PACSNODE", "-S", "-k", "QueryRetrieveLevel=STUDY"]
    key = ["-k", f"StudyInstanceUID={ds.StudyInstanceUID}"]
    refused = subprocess.run(
        [*base, "-aem", "DEST_OTHER", *key, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60
    )
    assert other.store_requests() == 0
    (record,) = _alerts(caplog, "move")
    assert record.move_destination == "DEST_OTHER"  # type: ignore[attr-defined]
    assert _not_authorized(refused)
    done = subprocess.run(
        [*base, "-aem", "DEST_OK", *key, "127.0.0.1", str(node.port)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert ok.store_requests() == 1


def test_dcmtk_store_and_find_follow_the_grants(world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    node, _ok, _other, ds = world
    caplog.set_level(logging.WARNING)
    path = tmp_path / "one.dcm"
    make_dataset(rows=8, columns=8, seed=3).save_as(path, enforce_file_format=True)
    storescu, findscu = require("storescu"), require("findscu")
    stored = subprocess.run(
        [storescu, "-v", "-aet", "VIEWER", "-aec", "PACSNODE", "127.0.0.1", str(node.port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert _not_authorized(stored), stored.stderr
    assert len(_alerts(caplog, "store")) == 1
    found = subprocess.run(
        [findscu, "-v", "-aet", "MODALITY", "-aec", "PACSNODE", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
         "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert _not_authorized(found), found.stderr
    assert len(_alerts(caplog, "find")) == 1
    getscu = require("getscu")
    got = subprocess.run(
        [getscu, "-aet", "VIEWER", "-aec", "PACSNODE", "-S", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "-od", str(tmp_path), "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    (received,) = [p for p in tmp_path.iterdir() if p != path]
    assert dcmread(received).SOPInstanceUID == ds.SOPInstanceUID


def test_peers_that_may_do_nothing_are_rejected(world: World, caplog: pytest.LogCaptureFixture) -> None:
    node, *_ = world
    caplog.set_level(logging.WARNING)
    assert echo_status(node.port, calling="MUTED") == "rejected"
    assert echo_status(node.port, calling="ELSEWHERE") == "rejected"  # its entry names another host
    assert echo_status(node.port, calling="STRANGER") == "rejected"
    assert echo_status(node.port, calling="MODALITY") == status.SUCCESS
    rejected = [r for r in caplog.records if getattr(r, "action", None) == "association-rejected"]
    assert [r.calling_ae_title for r in rejected] == ["MUTED", "ELSEWHERE", "STRANGER"]  # type: ignore[attr-defined]
    assert all(getattr(r, "event", None) == "security-alert" for r in rejected)


def test_patient_root_find_is_the_same_service(world: World) -> None:
    node, *_ = world
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "PATIENT"
        identifier.PatientID = ""
        codes = [int(s.Status) for s, _ in assoc.send_c_find(identifier, PatientRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()
    assert codes == [status.NOT_AUTHORIZED]
