"""C-FIND differential: the same queries to pacsnode and to Orthanc 1.10 must find the same.

One corpus (tests/support/corpus_qr.py) is loaded into one Orthanc (REST upload) and into one
in-process pacsnode (C-STORE) per module; each query of tests/data/find_queries.yaml is
then sent by a pynetdicom SCU to both. They must answer Success with the same matching
entities (by the level's unique key), as many as the query file says, and the same value
for every requested key, after decoding with each answer's SpecificCharacterSet.

Orthanc only runs in a private network namespace: run through ``bash .ci/test``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from tests.support.corpus_qr import PATIENTS, Patient, write_corpus
from tests.support.find import (
    QUERIES,
    SUCCESS,
    FindQuery,
    Peer,
    by_unique_key,
    send_find,
)
from tests.support.helpers import make_settings, store_datasets
from tests.support.node import RunningNode
from tests.support.peers import OrthancPeer, require_private_netns


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus-qr"))


@pytest.fixture(scope="module")
def orthanc_peer(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> Iterator[Peer]:
    require_private_netns()
    orthanc = OrthancPeer(tmp_path_factory.mktemp("orthanc"))
    with orthanc:
        orthanc.upload(corpus)
        assert len(orthanc.instances()) == len(corpus)
        yield Peer("orthanc", orthanc.dicom_port, orthanc.ae_title)


@pytest.fixture(scope="module")
def pacsnode_peer(tmp_path_factory: pytest.TempPathFactory, corpus: list[Path]) -> Iterator[Peer]:
    settings = make_settings(tmp_path_factory.mktemp("pacsnode"))
    running = RunningNode(settings)
    try:
        statuses = store_datasets(running.port, list(corpus), called=settings.node.ae_title)
        assert statuses == [SUCCESS] * len(corpus), f"pacsnode did not store the corpus: {statuses}"
        yield Peer("pacsnode", running.port, settings.node.ae_title)
    finally:
        running.stop()


def _describe(answers: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"    {uid}: {values}" for uid, values in sorted(answers.items())) or "    (none)"


@pytest.mark.parametrize("query", QUERIES, ids=[q.name for q in QUERIES])
def test_find_same_as_orthanc(query: FindQuery, pacsnode_peer: Peer, orthanc_peer: Peer) -> None:
    ours = pacsnode_peer.find(query)
    theirs = orthanc_peer.find(query)
    assert theirs.final_status == SUCCESS, f"Orthanc answered {theirs.statuses}"
    assert ours.final_status == SUCCESS, f"pacsnode answered statuses {[hex(s) for s in ours.statuses]}"

    ours_by_uid = by_unique_key(ours, query)
    theirs_by_uid = by_unique_key(theirs, query)
    if query.orthanc_count is None:
        assert len(theirs_by_uid) == query.count, (
            f"Orthanc found {len(theirs_by_uid)}, the query file expects {query.count}:\n{_describe(theirs_by_uid)}"
        )
        assert set(ours_by_uid) == set(theirs_by_uid), (
            f"different matches\n  pacsnode:\n{_describe(ours_by_uid)}\n  Orthanc:\n{_describe(theirs_by_uid)}"
        )
    else:
        # A documented Orthanc deviation: check that it still deviates, and pacsnode against the standard.
        assert len(theirs_by_uid) == query.orthanc_count, (
            f"Orthanc found {len(theirs_by_uid)}, not the {query.orthanc_count} the query file documents: "
            f"update orthanc_count\n{_describe(theirs_by_uid)}"
        )
        assert len(ours_by_uid) == query.count, (
            f"pacsnode found {len(ours_by_uid)}, the query file expects {query.count}:\n{_describe(ours_by_uid)}"
        )
    differences = [
        f"{uid} {key}: pacsnode {ours_by_uid[uid][key]!r}, Orthanc {theirs_by_uid[uid][key]!r}"
        for uid in sorted(set(theirs_by_uid) & set(ours_by_uid))
        for key in query.compared_keys()
        if ours_by_uid[uid][key] != theirs_by_uid[uid][key]
    ]
    assert not differences, "different values:\n" + "\n".join(differences)


_NON_ASCII = [p for p in PATIENTS if not p.name.isascii()]


@pytest.mark.parametrize("patient", _NON_ASCII, ids=[f"{p.patient_id}-{p.charset}" for p in _NON_ASCII])
@pytest.mark.parametrize("model", ["study", "patient"])
def test_non_ascii_patient_name_round_trips(model: str, patient: Patient, pacsnode_peer: Peer) -> None:
    """A UTF-8 or Latin-1 name comes back equal after decoding, by ID and by its own value."""
    level = "STUDY" if model == "study" else "PATIENT"
    by_id = Dataset()
    by_id.QueryRetrieveLevel = level
    by_id.PatientID = patient.patient_id
    by_id.PatientName = ""
    result = send_find(pacsnode_peer.port, pacsnode_peer.ae_title, model, by_id)
    assert result.final_status == SUCCESS
    assert result.identifiers, f"no answer for {patient.patient_id}"
    assert {str(ds.PatientName) for ds in result.identifiers} == {patient.name}

    by_name = Dataset()
    by_name.SpecificCharacterSet = patient.charset
    by_name.QueryRetrieveLevel = level
    by_name.PatientName = patient.name
    by_name.PatientID = ""
    result = send_find(pacsnode_peer.port, pacsnode_peer.ae_title, model, by_name)
    assert result.final_status == SUCCESS
    assert {ds.PatientID for ds in result.identifiers} == {patient.patient_id}
    assert {str(ds.PatientName) for ds in result.identifiers} == {patient.name}
