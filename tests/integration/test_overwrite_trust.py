"""storage.duplicate_policy: overwrite replaces stored instances only for peers marked overwrite: true
in policy.allowed_peers (AE title, and host where the entry names one); a real pynetdicom SCU per peer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from pacsnode.node.dicom import status
from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage import AddOutcome
from pacsnode.storage.models import Instance
from tests.support.helpers import make_settings, sha256_file
from tests.support.node import RunningNode

PEERS = [
    {"ae_title": "PACS", "host": "127.0.0.1", "overwrite": True},
    {"ae_title": "MODALITY"},
    {"ae_title": "ELSEWHERE"},  # may associate from anywhere ...
    {"ae_title": "ELSEWHERE", "host": "10.9.9.9", "overwrite": True},  # ... but overwrite only from 10.9.9.9
]


def _store(port: int, ds: Dataset, *, calling: str) -> tuple[int, str]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def _version(original: Dataset, seed: int) -> Dataset:
    """Other content under the same SOP Instance UID (same study and series)."""
    ds = make_dataset(rows=8, columns=8, seed=seed, study_uid=original.StudyInstanceUID)
    ds.SeriesInstanceUID = original.SeriesInstanceUID
    ds.SOPInstanceUID = original.SOPInstanceUID
    ds.file_meta.MediaStorageSOPInstanceUID = original.SOPInstanceUID
    return ds


def _row(node: RunningNode) -> Any:
    with node.archive.engine.connect() as conn:
        return conn.execute(select(Instance)).one()


def _objects(node: RunningNode) -> list[Path]:
    return sorted(node.archive.store.objects_dir.rglob("*.dcm"))


@pytest.fixture
def overwrite_node(start_node, tmp_path: Path) -> RunningNode:  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, storage={"duplicate_policy": "overwrite"}, policy={"allowed_peers": PEERS})
    node: RunningNode = start_node(settings)
    return node


@pytest.mark.parametrize("calling", ["MODALITY", "ELSEWHERE"], ids=["unmarked", "marked-for-another-host"])
def test_an_untrusted_peer_cannot_overwrite(
    overwrite_node: RunningNode, calling: str, caplog: pytest.LogCaptureFixture
) -> None:
    node = overwrite_node
    original = make_dataset(rows=8, columns=8, seed=1)
    assert _store(node.port, original, calling="MODALITY") == (status.SUCCESS, "")
    stored = _row(node)
    caplog.set_level(logging.WARNING, logger="pacsnode")

    code, comment = _store(node.port, _version(original, 2), calling=calling)

    assert code == status.DUPLICATE_SOP_INSTANCE
    assert "not trusted to overwrite" in comment
    row = _row(node)
    assert (row.sha256, row.file_path, row.calling_ae_title) == (stored.sha256, stored.file_path, "MODALITY")
    assert _objects(node) == [node.archive.instance_path(stored.file_path)]
    assert sha256_file(_objects(node)[0]) == stored.sha256
    assert list(node.archive.store.tmp_dir.iterdir()) == []
    [line] = [r for r in caplog.records if getattr(r, "action", None) == "overwrite-refused"]
    assert getattr(line, "calling_ae_title", None) == calling
    assert str(original.SOPInstanceUID) in line.getMessage()


def test_the_trusted_peer_overwrites_and_results_still_replace(overwrite_node: RunningNode) -> None:
    node = overwrite_node
    original = make_dataset(rows=8, columns=8, seed=1)
    assert _store(node.port, original, calling="MODALITY")[0] == status.SUCCESS

    replacement = _version(original, 2)
    assert _store(node.port, replacement, calling="PACS") == (status.SUCCESS, "")
    row = _row(node)
    assert row.calling_ae_title == "PACS"
    assert _objects(node) == [node.archive.instance_path(row.file_path)]
    assert sha256_file(_objects(node)[0]) == row.sha256

    # pacsnode's own results (Archive.add_dataset) replace their earlier run whatever the peers
    result = _version(original, 3)
    outcome = node.archive.add_dataset(result, calling_ae_title="PACSNODE")
    assert outcome.outcome is AddOutcome.OVERWRITTEN
    row_after = _row(node)
    assert row_after.sha256 != row.sha256 and row_after.file_path == outcome.file_path
    assert _objects(node) == [node.archive.instance_path(outcome.file_path)]


def test_identical_resend_and_new_instances_need_no_trust(overwrite_node: RunningNode) -> None:
    node = overwrite_node
    original = make_dataset(rows=8, columns=8, seed=1)
    assert _store(node.port, original, calling="MODALITY")[0] == status.SUCCESS
    assert _store(node.port, original, calling="ELSEWHERE")[0] == status.SUCCESS  # same bytes: not an overwrite
    assert _store(node.port, make_dataset(rows=8, columns=8, seed=4), calling="ELSEWHERE")[0] == status.SUCCESS
    assert len(_objects(node)) == 2


@pytest.mark.parametrize(
    ("peers", "warned"),
    [([{"ae_title": "MODALITY"}], True), (PEERS, False)],
    ids=["no-peer-marked", "a-peer-marked"],
)
def test_overwrite_without_a_trusted_peer_loads_and_warns_at_start(  # type: ignore[no-untyped-def]
    start_node, tmp_path: Path, caplog: pytest.LogCaptureFixture, peers: list[dict[str, Any]], warned: bool
) -> None:
    caplog.set_level(logging.WARNING, logger="pacsnode")
    settings = make_settings(tmp_path, storage={"duplicate_policy": "overwrite"}, policy={"allowed_peers": peers})
    start_node(settings)
    lines = [r.getMessage() for r in caplog.records if "no policy.allowed_peers entry has overwrite" in r.getMessage()]
    assert bool(lines) is warned
