"""Hand-built C-STORE requests: dataset bytes exactly as a test wants them on the wire.

pynetdicom's ``send_c_store`` encodes a Dataset itself, so bytes a real peer
could send by mistake or on purpose (truncated, lying lengths, another
encoding) are sent here by building the request and pausing the association's
reactor, as pynetdicom's own ``send_*`` methods do.
"""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from tests.support.helpers import wait_until


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    """``ds`` encoded in (implicit or explicit) VR little endian, without File Meta Information."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def store_raw(
    port: int, data: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
) -> tuple[int, str]:
    """C-STORE ``data`` as the dataset on a context for ``transfer_syntax_uid``; (status, Error Comment)."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(sop_class_uid, transfer_syntax_uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class_uid
    req.AffectedSOPInstanceUID = sop_instance_uid
    req.Priority = 2
    req.DataSet = BytesIO(data)
    assoc._reactor_checkpoint.clear()
    try:
        wait_until(lambda: assoc._is_paused, 10, "the association's reactor to pause", interval=0.0001)
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assoc.release()
    assert rsp is not None, "no C-STORE response"
    return int(rsp.Status), str(getattr(rsp, "ErrorComment", None) or "")
