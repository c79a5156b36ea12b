"""C-FIND battery shared by the differential and PostgreSQL tests: the queries of
tests/data/find_queries.yaml, a pynetdicom C-FIND SCU, and answers in a comparable form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from tests.support.corpus_qr import resolve
from tests.support.helpers import hold_reactor

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
SUCCESS = 0x0000
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
        hold_reactor(assoc)
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
