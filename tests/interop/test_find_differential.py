"""C-FIND differential: the same queries to pacsnode and to Orthanc 1.10 must find the same.

One corpus (tests/corpus_qr.py) is loaded into one Orthanc (REST upload) and into one
in-process pacsnode (C-STORE) per module; each query of tests/data/find_queries.yaml is
then sent by a pynetdicom SCU to both. They must answer Success with the same matching
entities (by the level's unique key), as many as the query file says, and the same value
for every requested key, after decoding with each answer's SpecificCharacterSet.

Orthanc only runs in a private network namespace: run through ``bash .ci/test``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from pacsnode.node.dicom.handlers import set_nodelay
from tests.conftest import RunningNode
from tests.corpus_qr import PATIENTS, Patient, resolve, write_corpus
from tests.helpers import make_settings, store_datasets
from tests.peers import OrthancPeer, require_private_netns

QUERY_FILE = Path(__file__).resolve().parent.parent / "data" / "find_queries.yaml"

_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
}
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Multi-valued return keys whose order the standard leaves open.
_UNORDERED = {"ModalitiesInStudy", "SOPClassesInStudy"}
_SUCCESS = 0x0000
_PENDING = (0xFF00, 0xFF01)
_ABSENT = "<absent>"
CALLING_AE_TITLE = "FINDSCU"


@dataclass(frozen=True, kw_only=True)
class FindQuery:
    name: str
    model: str
    level: str
    keys: dict[str, str]
    count: int
    charset: str | None = None
    skip_compare_keys: tuple[str, ...] = field(default=())
    orthanc_count: int | None = None

    @property
    def unique_key(self) -> str:
        return UNIQUE_KEYS[self.level]

    def identifier(self) -> Dataset:
        """The request identifier: level, charset, every key (placeholders resolved)."""
        ds = Dataset()
        if self.charset:
            ds.SpecificCharacterSet = self.charset
        ds.QueryRetrieveLevel = self.level
        for keyword, value in self.keys.items():
            setattr(ds, keyword, resolve(value))
        if self.unique_key not in ds:
            setattr(ds, self.unique_key, "")
        return ds

    def compared_keys(self) -> list[str]:
        keys = dict.fromkeys([*self.keys, self.unique_key])
        return [k for k in keys if k not in self.skip_compare_keys]


def load_queries(path: Path = QUERY_FILE) -> list[FindQuery]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    queries = []
    for item in data["queries"]:
        query = FindQuery(
            name=item["name"],
            model=item["model"],
            level=item["level"],
            keys={str(k): str(v) for k, v in item["keys"].items()},
            count=int(item["count"]),
            charset=item.get("charset"),
            skip_compare_keys=tuple(item.get("skip_compare_keys", ())),
            orthanc_count=item.get("orthanc_count"),
        )
        if query.model not in _MODELS or query.level not in UNIQUE_KEYS:
            raise ValueError(f"{path}: {query.name}: unknown model {query.model!r} or level {query.level!r}")
        queries.append(query)
    names = [q.name for q in queries]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: query names are not unique")
    return queries


QUERIES = load_queries()


@dataclass(frozen=True)
class FindResult:
    statuses: list[int]
    identifiers: list[Dataset]

    @property
    def final_status(self) -> int | None:
        return self.statuses[-1] if self.statuses else None


def send_find(port: int, called_ae_title: str, model: str, identifier: Dataset) -> FindResult:
    """One association, one C-FIND; every response status and pending identifier."""
    sop_class = _MODELS[model]
    ae = AE(ae_title=CALLING_AE_TITLE)
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established, f"no association with {called_ae_title} on port {port}"
    statuses: list[int] = []
    identifiers: list[Dataset] = []
    try:
        for status, answer in assoc.send_c_find(identifier, sop_class):
            if "Status" not in status:
                statuses.append(-1)  # no response: timeout or abort
                break
            statuses.append(int(status.Status))
            if int(status.Status) in _PENDING and answer is not None:
                identifiers.append(answer)
    finally:
        assoc.release()
    return FindResult(statuses, identifiers)


def normalise(ds: Dataset, keyword: str) -> Any:
    """A comparable form of one returned attribute: decoded, stripped strings."""
    if keyword not in ds:
        return _ABSENT
    value = ds[keyword].value
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        items = [str(v).strip() for v in value]
        return tuple(sorted(items)) if keyword in _UNORDERED else tuple(items)
    if isinstance(value, PersonName):
        return str(value).strip()
    if isinstance(value, bytes):
        return value.hex()
    text = str(value).strip()
    if keyword in _UNORDERED:
        return (text,) if text else ()
    return text


def by_unique_key(result: FindResult, query: FindQuery) -> dict[str, dict[str, Any]]:
    """Answers keyed by the level's unique key; fails on a duplicate entity."""
    out: dict[str, dict[str, Any]] = {}
    for ds in result.identifiers:
        uid = normalise(ds, query.unique_key)
        assert uid not in out, f"{query.name}: {query.unique_key}={uid} answered twice"
        out[uid] = {k: normalise(ds, k) for k in query.compared_keys()}
    return out


@dataclass(frozen=True)
class Peer:
    name: str
    port: int
    ae_title: str

    def find(self, query: FindQuery) -> FindResult:
        return send_find(self.port, self.ae_title, query.model, query.identifier())


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
        assert statuses == [_SUCCESS] * len(corpus), f"pacsnode did not store the corpus: {statuses}"
        yield Peer("pacsnode", running.port, settings.node.ae_title)
    finally:
        running.stop()


def _describe(answers: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"    {uid}: {values}" for uid, values in sorted(answers.items())) or "    (none)"


@pytest.mark.parametrize("query", QUERIES, ids=[q.name for q in QUERIES])
def test_find_same_as_orthanc(query: FindQuery, pacsnode_peer: Peer, orthanc_peer: Peer) -> None:
    ours = pacsnode_peer.find(query)
    theirs = orthanc_peer.find(query)
    assert theirs.final_status == _SUCCESS, f"Orthanc answered {theirs.statuses}"
    assert ours.final_status == _SUCCESS, f"pacsnode answered statuses {[hex(s) for s in ours.statuses]}"

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
    assert result.final_status == _SUCCESS
    assert result.identifiers, f"no answer for {patient.patient_id}"
    assert {str(ds.PatientName) for ds in result.identifiers} == {patient.name}

    by_name = Dataset()
    by_name.SpecificCharacterSet = patient.charset
    by_name.QueryRetrieveLevel = level
    by_name.PatientName = patient.name
    by_name.PatientID = ""
    result = send_find(pacsnode_peer.port, pacsnode_peer.ae_title, model, by_name)
    assert result.final_status == _SUCCESS
    assert {ds.PatientID for ds in result.identifiers} == {patient.patient_id}
    assert {str(ds.PatientName) for ds in result.identifiers} == {patient.name}
