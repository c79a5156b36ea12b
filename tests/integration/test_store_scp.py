"""The C-ECHO/C-STORE SCP against real pynetdicom peers on loopback."""

from __future__ import annotations

import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from pacsnode.node.dicom import status
from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.storage.index import count_rows
from pacsnode.storage.models import Instance
from tests.support.helpers import (
    PYDICOM_FILES,
    echo_status,
    make_settings,
    pydicom_data_files,
    sha256_file,
    store_datasets,
    wait_until,
)
from tests.support.node import RunningNode

SAMPLES = [
    PYDICOM_FILES / "CT_small.dcm",  # explicit VR LE
    PYDICOM_FILES / "MR_small_implicit.dcm",  # implicit VR LE
    PYDICOM_FILES / "MR_small_bigendian.dcm",  # explicit VR BE
    PYDICOM_FILES / "image_dfl.dcm",  # deflated
    PYDICOM_FILES / "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    PYDICOM_FILES / "JPGExtended.dcm",  # JPEG extended
    pydicom_data_files() / "JPEG-LL.dcm",  # JPEG lossless SV1
    PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    PYDICOM_FILES / "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    PYDICOM_FILES / "JPEG2000.dcm",  # JPEG 2000
    PYDICOM_FILES / "MR_small_RLE.dcm",  # RLE
    pydicom_data_files() / "OBXXXX1A_rle_2frame.dcm",  # US multi-frame
    pydicom_data_files() / "RG3_J2KR.dcm",  # CR
    PYDICOM_FILES / "liver_1frame.dcm",  # SEG
    PYDICOM_FILES / "test-SR.dcm",  # Comprehensive SR
    PYDICOM_FILES / "waveform_ecg.dcm",  # waveform
]


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information: what travels over the network."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(BytesIO(raw), stop_before_pixels=True)
    return raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]


def _rows(node: RunningNode) -> dict[str, Instance]:
    with node.archive.engine.connect() as conn:
        return {r.sop_instance_uid: r for r in conn.execute(select(Instance)).all()}


def test_echo(node: RunningNode) -> None:
    assert echo_status(node.port) == status.SUCCESS


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_store_keeps_the_received_bytes_and_transfer_syntax(node: RunningNode, path: Path) -> None:
    # pynetdicom sends files as stored (chunked send): the node must keep them byte for byte
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(path).Status)]
    assoc.release()
    assert statuses == [status.SUCCESS]

    rows = _rows(node)
    original = pydicom.dcmread(path, stop_before_pixels=True)
    row = rows[str(original.SOPInstanceUID)]
    stored = node.archive.instance_path(row.file_path)
    assert row.transfer_syntax_uid == str(original.file_meta.TransferSyntaxUID), path.name
    assert _dataset_bytes(stored) == _dataset_bytes(path), path.name
    assert sha256_file(stored) == row.sha256
    assert row.file_size == stored.stat().st_size
    assert row.calling_ae_title == "TESTSCU"
    reread = pydicom.dcmread(stored)
    assert reread.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID


def _store_one(port: int, ds: Dataset, **kw: str) -> tuple[int, str]:
    ae = AE(ae_title=kw.get("calling", "TESTSCU"))
    ae.add_requested_context(ds.SOPClassUID if "SOPClassUID" in ds else CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def _ct(**kw: object) -> Dataset:
    ds = make_dataset(rows=8, columns=8)
    for k, v in kw.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("change", "expected", "comment"),
    [
        ({"StudyInstanceUID": None}, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "StudyInstanceUID missing"),
        ({"SeriesInstanceUID": ""}, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "SeriesInstanceUID missing"),
        ({"StudyInstanceUID": "../../../../etc/cron.d/x"}, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "not a valid UID"),
        ({"SeriesInstanceUID": "1.2.x" + "9" * 100}, status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "not a valid UID"),
    ],
)
def test_bad_identifiers_are_refused_with_a_precise_status(
    node: RunningNode, change: dict[str, object], expected: int, comment: str
) -> None:
    code, text = _store_one(node.port, _ct(**change))
    assert code == expected
    assert comment in text
    assert _rows(node) == {}
    assert list(node.archive.store.tmp_dir.iterdir()) == []
    assert echo_status(node.port) == status.SUCCESS


def _send_raw(assoc, req):  # type: ignore[no-untyped-def]
    """Send a hand-built request and wait for its response, with the reactor paused
    (as pynetdicom's own send_* methods do) so it cannot take the response first."""
    assoc._reactor_checkpoint.clear()
    wait_until(lambda: assoc._is_paused, 10, "the association's reactor to pause", interval=0.0001)
    try:
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return rsp


def test_sop_class_mismatch_is_refused(node: RunningNode) -> None:
    ds = _ct()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR in the dataset, CT in the command
    # pynetdicom takes the command's SOP class from the dataset: build the request by hand
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    from pydicom.filebase import DicomBytesIO

    enc = DicomBytesIO()
    enc.is_little_endian, enc.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(enc, ds)
    req.DataSet = BytesIO(enc.getvalue())
    rsp = _send_raw(assoc, req)
    assoc.release()
    assert rsp.Status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert "SOPClassUID differs from the request" in rsp.ErrorComment
    assert _rows(node) == {}


def test_garbage_dataset_is_cannot_understand(node: RunningNode) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = generate_uid(UID_PREFIX)
    req.Priority = 2
    req.DataSet = BytesIO(b"\xff" * 300)
    rsp = _send_raw(assoc, req)
    assoc.release()
    assert (rsp.Status & 0xF000) == status.CANNOT_UNDERSTAND
    assert _rows(node) == {}
    assert list(node.archive.store.tmp_dir.iterdir()) == []
    assert echo_status(node.port) == status.SUCCESS


def test_oversized_instance_is_out_of_resources(start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_settings(tmp_path, node={"max_instance_bytes": 4096}))
    code, text = _store_one(node.port, make_dataset(rows=64, columns=64))
    assert code == status.OUT_OF_RESOURCES
    assert "exceeds the limit" in text
    assert _store_one(node.port, make_dataset(rows=8, columns=8))[0] == status.SUCCESS


def test_free_space_floor_refuses_before_writing(start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_settings(tmp_path, storage={"min_free_bytes": 1 << 60}))
    code, text = _store_one(node.port, _ct())
    assert code == status.OUT_OF_RESOURCES
    assert "floor" in text
    assert list(node.archive.store.tmp_dir.iterdir()) == []
    assert _rows(node) == {}


def test_duplicate_reject_policy_gives_duplicate_status(start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_settings(tmp_path, storage={"duplicate_policy": "reject"}))
    ds = make_dataset(rows=8, columns=8, seed=1)
    assert _store_one(node.port, ds)[0] == status.SUCCESS
    assert _store_one(node.port, ds)[0] == status.SUCCESS  # identical bytes: success, no copy
    ds.PatientName = "Changed^Name"
    code, text = _store_one(node.port, ds)
    assert code == status.DUPLICATE_SOP_INSTANCE
    assert "already stored" in text


def test_unsupported_sop_class_context_is_rejected(node: RunningNode) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.3.4.5.6.7.8.9", ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    rejected = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == "1.2.3.4.5.6.7.8.9"]
    assoc.release()
    assert rejected and rejected[0].result == 0x03  # abstract syntax not supported


def test_called_ae_title_is_checked(node: RunningNode) -> None:
    assert echo_status(node.port, called="SOMEONE_ELSE") == "rejected"
    assert echo_status(node.port) == status.SUCCESS


def test_calling_ae_allow_list_with_hosts(start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(
        make_settings(
            tmp_path,
            policy={"allowed_peers": [{"ae_title": "GOOD"}, {"ae_title": "HOSTBOUND", "host": "10.9.9.9"}]},
        )
    )
    rejections: list[tuple[int, int, int]] = []
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_rejected
    rsp = assoc.acceptor.primitive
    rejections.append((rsp.result, rsp.result_source, rsp.diagnostic))
    assert rejections == [(0x01, 0x01, 0x03)]  # permanent, service user, calling AE not recognised
    assert echo_status(node.port, calling="HOSTBOUND") == "rejected"  # right title, wrong host
    assert echo_status(node.port, calling="GOOD") == status.SUCCESS


def test_association_limit(start_node, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    node = start_node(make_settings(tmp_path, node={"max_associations": 1}))
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert held.is_established
    try:
        assert echo_status(node.port) == "rejected"
    finally:
        held.release()
    node.wait_idle()  # the node counts an association until its thread has ended
    assert echo_status(node.port) == status.SUCCESS


def test_abort_mid_transfer_leaves_nothing(node: RunningNode) -> None:
    ds = make_dataset(rows=512, columns=512)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE", max_pdu=16384)
    assert assoc.is_established
    from pydicom.filebase import DicomBytesIO

    enc = DicomBytesIO()
    enc.is_little_endian, enc.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(enc, ds)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(enc.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    fragments = list(msg.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    for primitive in fragments[: len(fragments) // 2]:  # the command and half the dataset
        assoc.dul.send_pdu(primitive)
    # Spacing, not synchronisation: the node most likely reads the half message before the A-ABORT
    # (TCP keeps them in order either way); what is asserted below holds however fast the machine is.
    time.sleep(0.3)
    assoc.abort()
    node.wait_idle()  # the node has handled the abort and cleaned up
    assert _rows(node) == {}
    assert list(node.archive.store.tmp_dir.iterdir()) == []
    assert list(node.archive.store.objects_dir.rglob("*.dcm")) == []
    assert echo_status(node.port) == status.SUCCESS


def test_concurrent_associations_index_one_study_consistently(node: RunningNode) -> None:
    study, series = generate_uid(UID_PREFIX), generate_uid(UID_PREFIX)
    batches = [
        [make_dataset(rows=16, columns=16, study_uid=study, series_uid=series, instance_number=i) for i in range(15)]
        for _ in range(4)
    ]
    results: list[list[int | None]] = []
    threads = [threading.Thread(target=lambda b=b: results.append(store_datasets(node.port, b))) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s == status.SUCCESS for r in results for s in r) and len(results) == 4
    with node.archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 1, "studies": 1, "series": 1, "instances": 60}
    [summary] = node.archive.studies()
    assert (summary.num_series, summary.num_instances) == (1, 60)


def test_implicit_and_explicit_transfer_syntax_negotiated(node: RunningNode) -> None:
    ds = make_dataset(rows=8, columns=8)
    assert store_datasets(node.port, [ds], transfer_syntaxes=[ImplicitVRLittleEndian]) == [status.SUCCESS]
    row = _rows(node)[str(ds.SOPInstanceUID)]
    assert row.transfer_syntax_uid == ImplicitVRLittleEndian
