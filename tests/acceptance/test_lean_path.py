"""The lean data path (``node.data_path: lean``) against real peers and hostile input.

Storage associations are negotiated by pynetdicom and then served by
``node/dicom/lean.py``; each test checks from the node's own debug line that the
lean loop served the association, so a silent fall-back to pynetdicom's path
cannot pass for it. The peers: DCMTK storescu in every transfer syntax it sends
and at the smallest and largest PDU lengths on both sides, pynetdicom's SCU,
Orthanc pushing and answering a C-MOVE into the node, raw PDU streams that
release or abort in the middle of a dataset, and ``kill -9`` of ``pacsnode serve``
while four senders push (nothing acknowledged may be lost). The seeded fuzz of
malformed PDU streams lives in test_hostile_peers.py, run against both paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import create_engine, event, select

from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset, write_series
from pacsnode.storage.index import find_instance
from pacsnode.storage.models import Instance
from tests.support.dimse import encode
from tests.support.helpers import PYDICOM_FILES, make_settings, pydicom_data_files, store_datasets, wait_until
from tests.support.node import RunningNode
from tests.support.pdus import (
    A_ABORT,
    A_RELEASE_RP,
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    VERIFICATION,
    RawPeer,
    abort,
    c_echo_rq,
    c_store_rq,
    dimse_statuses,
    p_data,
    pdv,
    release_rq,
)
from tests.support.peers import OrthancPeer, require
from tests.support.served import Served

pytestmark = pytest.mark.dcmtk

LEAN_LINE = "lean data path serving the association"


@pytest.fixture
def lean_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="pacsnode.node.dicom.lean")
    return caplog


def _lean_served(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.name == "pacsnode.node.dicom.lean" and LEAN_LINE in r.getMessage())


def _dataset_bytes(raw: bytes) -> bytes:
    """The bytes after the File Meta Information."""
    ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
    return raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]


def _stored(node: RunningNode, sop_instance_uid: str) -> Path:
    with node.archive.engine.connect() as conn:
        row = find_instance(conn, sop_instance_uid)
    assert row is not None, f"{sop_instance_uid} is not indexed"
    return node.archive.instance_path(row.file_path)


def _tmp_files(node: RunningNode) -> list[Path]:
    return [p for p in node.archive.store.tmp_dir.iterdir() if p.is_file()]


def _storescu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require("storescu"),
            *("-to", "20", "-ta", "20", "-td", "20", "-aec", "PACSNODE"),
            "127.0.0.1",
            str(port),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- DCMTK storescu -------------------------------------------------------------------------------

# (file, the storescu option proposing its transfer syntax, that syntax)
_AS_SENT = [
    (PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"),
    (PYDICOM_FILES / "JPGExtended.dcm", "-xx", "1.2.840.10008.1.2.4.51"),
    (pydicom_data_files() / "JPEG-LL.dcm", "-xs", "1.2.840.10008.1.2.4.70"),
    (PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),
    (PYDICOM_FILES / "MR_small_jp2klossless.dcm", "-xv", "1.2.840.10008.1.2.4.90"),
    (PYDICOM_FILES / "JPEG2000.dcm", "-xw", "1.2.840.10008.1.2.4.91"),
    (PYDICOM_FILES / "MR_small_RLE.dcm", "-xr", "1.2.840.10008.1.2.5"),
]
# storescu proposes every uncompressed syntax in one context, and the node picks explicit little
# endian before big endian: Explicit VR Big Endian is sent by pynetdicom in test_store_scp.py.
_CONVERTED = [
    ("-xe", "1.2.840.10008.1.2.1"),
    ("-xi", "1.2.840.10008.1.2"),
    ("-xd", "1.2.840.10008.1.2.1.99"),
]


def test_storescu_sends_every_transfer_syntax(
    start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    node = start_node(make_settings(tmp_path))
    # Compressed files travel in their own syntax: the node stores the compressed pixel data as sent.
    for n, (original, option, syntax) in enumerate(_AS_SENT):
        ds = pydicom.dcmread(original)  # several samples share a SOP Instance UID: each gets its own
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_PREFIX}87.{n}"
        path = tmp_path / original.name
        ds.save_as(path)
        done = _storescu(node.port, option, str(path))
        assert done.returncode == 0, f"{path.name}: {done.stderr[-1500:]}"
        stored = pydicom.dcmread(_stored(node, str(ds.SOPInstanceUID)))
        assert str(stored.file_meta.TransferSyntaxUID) == syntax, path.name
        # storescu re-encodes the header (lengths, padding), never the compressed pixel data
        assert stored.PixelData == ds.PixelData, path.name
    # An uncompressed file storescu converts to each uncompressed syntax it can propose.
    source = make_dataset(rows=64, columns=64)
    for n, (option, syntax) in enumerate(_CONVERTED):
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = f"{UID_PREFIX}88.{n}"
        path = tmp_path / f"ct{option}.dcm"
        source.save_as(path, enforce_file_format=True)
        done = _storescu(node.port, option, str(path))
        assert done.returncode == 0, f"{option}: {done.stderr[-1500:]}"
        stored = pydicom.dcmread(_stored(node, str(source.SOPInstanceUID)))
        assert str(stored.file_meta.TransferSyntaxUID) == syntax, option
        assert stored.pixel_array.tobytes() == source.pixel_array.tobytes(), option
        assert stored.PatientID == source.PatientID
    node.wait_idle()
    assert _lean_served(lean_log) == len(_AS_SENT) + len(_CONVERTED)
    assert not _tmp_files(node)


@pytest.mark.parametrize("node_pdu", [4096, 4 << 20])
def test_pdu_lengths_from_4_kib_to_4_mib_on_both_sides(
    node_pdu: int, start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    """The node receives within its own maximum and answers within the peer's, whichever is smaller."""
    node = start_node(make_settings(tmp_path, node={"max_pdu": node_pdu}))
    paths = write_series(tmp_path / "series", 2, rows=256, columns=256)  # 128 KiB of pixels: many PDUs
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    # DCMTK: its smallest and largest receive PDU (the node's responses must fit them).
    for peer_pdu in ("4096", "131072"):
        for path in paths:
            done = _storescu(node.port, "-pdu", peer_pdu, "--max-send-pdu", peer_pdu, str(path))
            assert done.returncode == 0, f"storescu -pdu {peer_pdu}: {done.stderr[-1500:]}"
    # pynetdicom: 4 KiB and 4 MiB.
    for peer_pdu in (4096, 4 << 20):
        ae = AE(ae_title="PYSCU")
        ae.maximum_pdu_size = peer_pdu
        ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
        assert assoc.is_established
        try:
            for path in paths:
                assert int(assoc.send_c_store(path).Status) == 0
        finally:
            assoc.release()
    node.wait_idle()
    for uid, path in sent.items():
        stored = _stored(node, uid)
        assert _dataset_bytes(stored.read_bytes()) == _dataset_bytes(path.read_bytes())
    assert _lean_served(lean_log) == 2 * 2 + 2
    assert not _tmp_files(node)


def test_a_dataset_over_the_in_memory_limit_is_checked_from_its_staged_file(
    start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    """Up to lean._IN_MEMORY_BYTES the handler reads the bytes kept in memory; a larger dataset is
    mapped back from the staged file: both are stored as received and indexed."""
    from pacsnode.node.dicom import lean

    node = start_node(make_settings(tmp_path))
    small = write_series(tmp_path / "small", 1, rows=64, columns=64)
    large = write_series(tmp_path / "large", 1, rows=1100, columns=1100)
    assert large[0].stat().st_size > lean._IN_MEMORY_BYTES > small[0].stat().st_size
    for path in small + large:
        done = _storescu(node.port, str(path))
        assert done.returncode == 0, done.stderr[-1500:]
    node.wait_idle()
    for path in small + large:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(_stored(node, uid).read_bytes()) == _dataset_bytes(path.read_bytes())
    assert _lean_served(lean_log) == 2
    assert not _tmp_files(node)


def test_pynetdicom_scu_echo_and_store(start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture) -> None:
    node = start_node(make_settings(tmp_path))
    datasets = [make_dataset(rows=32, columns=32) for _ in range(3)]
    for i, ds in enumerate(datasets):
        ds.SOPInstanceUID = f"{UID_PREFIX}89.{i}"
    assert store_datasets(node.port, list(datasets)) == [0, 0, 0]
    # the same again: identical duplicates are Success, and nothing is stored twice
    assert store_datasets(node.port, list(datasets)) == [0, 0, 0]
    node.wait_idle()
    with node.archive.engine.connect() as conn:
        assert len(conn.execute(select(Instance)).all()) == 3
    assert _lean_served(lean_log) == 2


# -- raw streams: release and abort in the middle of a dataset ---------------------------------------


def _store_halfway(peer: RawPeer, uid: str) -> None:
    ds = make_dataset(rows=64, columns=64)
    ds.SOPInstanceUID = uid
    data = encode(ds)
    ac = peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE]), (3, CT_IMAGE_STORAGE, [EXPLICIT_VR_LE])])
    assert ac.accepted == {1: IMPLICIT_VR_LE, 3: EXPLICIT_VR_LE}
    # several PDVs in one PDU, then a dataset cut in the middle
    peer.send(
        p_data(
            pdv(3, c_store_rq(7, CT_IMAGE_STORAGE, uid), command=True, last=True),
            pdv(3, data[:1000], command=False, last=False),
        )
        + p_data(pdv(3, data[1000 : len(data) // 2], command=False, last=False))
    )


def test_release_in_the_middle_of_a_dataset_keeps_nothing(
    start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    node = start_node(make_settings(tmp_path))
    uid = f"{UID_PREFIX}90.1"
    with RawPeer(node.port) as peer:
        _store_halfway(peer, uid)
        peer.send(release_rq())
        answer = peer.read_pdu(20)
        assert answer is not None and answer[0] == A_RELEASE_RP, answer
    node.wait_idle()
    with node.archive.engine.connect() as conn:
        assert find_instance(conn, uid) is None
    assert not _tmp_files(node)
    assert _lean_served(lean_log) == 1


@pytest.mark.parametrize("how", ["peer-abort", "connection-closed"])
def test_abort_in_the_middle_of_a_dataset_keeps_nothing(
    how: str, start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    node = start_node(make_settings(tmp_path))
    uid = f"{UID_PREFIX}90.2"
    with RawPeer(node.port) as peer:
        _store_halfway(peer, uid)
        wait_until(lambda: _tmp_files(node), 20, "the dataset to be arriving in store/tmp")
        if how == "peer-abort":
            peer.send(abort())
    node.wait_idle()
    with node.archive.engine.connect() as conn:
        assert find_instance(conn, uid) is None
    assert not _tmp_files(node)
    # and the node answers the next peer
    with RawPeer(node.port) as peer:
        peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        peer.send(p_data(pdv(1, c_echo_rq(1), command=True, last=True)))
        answer = peer.read_pdu(20)
        assert answer is not None and dimse_statuses([answer]) == [0]
        peer.send(release_rq())
        assert peer.read_pdu(20) == (A_RELEASE_RP, b"\x00\x00\x00\x00")
    assert _lean_served(lean_log) == 2


def test_a_dataset_on_an_unaccepted_context_is_aborted(
    start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    node = start_node(make_settings(tmp_path))
    with RawPeer(node.port) as peer:
        peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        peer.send(p_data(pdv(5, b"\x00" * 16, command=True, last=True)))
        outcome = peer.outcome(20)
        assert outcome.kind == "abort" and any(t == A_ABORT for t, _ in outcome.pdus), outcome
    node.wait_idle()
    assert _lean_served(lean_log) == 1


# -- Orthanc -------------------------------------------------------------------------------------------


def test_orthanc_pushes_and_moves_into_the_node(
    start_node: Any, orthanc_factory: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path)
    port = settings.node.port
    orthanc: OrthancPeer = orthanc_factory(ae_title="ORTHANC", modalities={"pacsnode": ("PACSNODE", "127.0.0.1", port)})
    pushed = write_series(tmp_path / "pushed", 3, rows=64, columns=64)
    moved = write_series(tmp_path / "moved", 3, rows=64, columns=64)
    ids = orthanc.upload([*pushed, *moved])
    assert len(ids) == 6
    node = start_node(
        make_settings(
            tmp_path,
            node={"port": port},
            remote_nodes={"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
        )
    )
    uids = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*pushed, *moved]}
    pushed_ids = [
        i
        for i in ids
        if orthanc.rest("GET", f"/instances/{i}/simplified-tags")["SOPInstanceUID"] in {uids[p] for p in pushed}
    ]
    orthanc.rest("POST", "/modalities/pacsnode/store", {"Resources": pushed_ids, "Synchronous": True})
    study = str(pydicom.dcmread(moved[0], stop_before_pixels=True).StudyInstanceUID)
    ae = AE(ae_title="PACSNODE")
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="ORTHANC")
    assert assoc.is_established
    identifier = pydicom.Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    try:
        responses = list(assoc.send_c_move(identifier, "PACSNODE", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    assert int(responses[-1][0].Status) == 0, responses[-1][0]
    node.wait_idle()
    for path, uid in uids.items():
        assert _dataset_bytes(_stored(node, uid).read_bytes()) == _dataset_bytes(path.read_bytes()), path.name
    assert _lean_served(lean_log) >= 2


# -- kill -9 while four senders push -----------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out.extend(_tree(int(child)))
    return out


@pytest.mark.slow
def test_kill_9_during_a_four_sender_push_loses_nothing_acknowledged(tmp_path: Path) -> None:
    served = Served(tmp_path, processes=2, timeouts={"shutdown_grace": 1})
    served.start()
    acknowledged: dict[str, str] = {}  # SOP Instance UID -> sha256 of the dataset sent
    lock = threading.Lock()
    stop = threading.Event()

    def sender(n: int) -> None:
        ae = AE(ae_title=f"SENDER{n}")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CT_IMAGE_STORAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", served.port, ae_title="PACSNODE")
        if not assoc.is_established:
            return
        try:
            for i in range(10_000):
                if stop.is_set() or not assoc.is_established:
                    return
                ds = make_dataset(rows=64, columns=64, seed=n * 100_000 + i)
                ds.SOPInstanceUID = f"{UID_PREFIX}91.{n}.{i}"
                digest = hashlib.sha256(encode(ds)).hexdigest()
                rsp = assoc.send_c_store(ds)
                if "Status" in rsp and int(rsp.Status) == 0:
                    with lock:
                        acknowledged[str(ds.SOPInstanceUID)] = digest
        finally:
            if assoc.is_established:
                assoc.abort()

    threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(acknowledged) >= 40, 120, "40 acknowledged instances", details=served.log_tail)
    assert served.proc is not None
    for pid in reversed(_tree(served.proc.pid)):  # children first, so none is restarted
        os.kill(pid, signal.SIGKILL)
    served.proc.wait(timeout=10)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    with lock:
        acked = dict(acknowledged)
    served.proc = None
    served.start()  # a restart sweeps store/tmp
    try:
        engine = create_engine(f"sqlite:///{served.db}")
        try:
            with engine.connect() as conn:
                rows = {r.sop_instance_uid: r for r in conn.execute(select(Instance)).all()}
        finally:
            engine.dispose()
        lost = set(acked) - set(rows)
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged instances lost: {sorted(lost)[:5]}"
        for uid, digest in acked.items():
            raw = (served.root / rows[uid].file_path).read_bytes()
            assert hashlib.sha256(raw).hexdigest() == rows[uid].sha256, uid
            assert hashlib.sha256(_dataset_bytes(raw)).hexdigest() == digest, uid
        assert not [p for p in (served.root / "tmp").iterdir() if p.is_file()]
    finally:
        served.stop()


def test_stopping_the_node_aborts_a_lean_association_still_open(
    start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    node = start_node(make_settings(tmp_path))
    with RawPeer(node.port) as peer:
        peer.associate([(1, VERIFICATION, [IMPLICIT_VR_LE])])
        wait_until(lambda: _lean_served(lean_log), 20, "the lean loop to take the association")
        node.node.stop(grace=0.2)
        outcome = peer.outcome(20)
        assert outcome.abort == (0, 0), outcome  # A-ABORT, source service-user


def test_concurrent_associations_share_index_transactions(
    start_node: Any, tmp_path: Path, lean_log: pytest.LogCaptureFixture
) -> None:
    """Four associations store while the index is held: the first instance leads a transaction, the
    other three queue while it waits for the index and join it; every Success follows the commit."""
    node = start_node(make_settings(tmp_path))
    archive = node.archive
    group = archive._group
    assert group is not None
    commits: list[int] = []
    event.listen(archive.engine, "commit", lambda conn: commits.append(1))
    datasets = [make_dataset(rows=16, columns=16) for _ in range(4)]
    statuses: list[list[int | None]] = [[] for _ in datasets]

    def send(i: int) -> None:
        statuses[i] = store_datasets(node.port, [datasets[i]])

    def taken_and_queued() -> tuple[int, int]:
        with group._cond:
            return group.batches, len(group._queue)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    with archive._write_gate():  # another writer holds the index
        threads[0].start()
        wait_until(lambda: taken_and_queued() == (1, 0), 60, "the first instance's transaction begun")
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: taken_and_queued() == (1, 3), 60, "three instances queued behind it")
        assert statuses == [[], [], [], []]  # nobody acknowledged before the commit
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [[0]] * 4
    assert len(commits) == 1
    with archive.engine.connect() as conn:
        for ds in datasets:
            assert find_instance(conn, str(ds.SOPInstanceUID)) is not None
    assert _lean_served(lean_log) == 4
