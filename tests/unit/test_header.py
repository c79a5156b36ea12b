from __future__ import annotations

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from pacsnode.node.dicom.handlers import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    encode_file_header,
)
from pacsnode.storage.index import is_valid_uid


@pytest.mark.parametrize(
    ("sop_class", "sop_inst", "ts"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2.4.90"),
        ("1.2.840.10008.5.1.4.1.1.7", "1." + "9" * 62, "1.2.840.10008.1.2"),
    ],
)
def test_file_meta_matches_pydicom_encoding(sop_class: str, sop_inst: str, ts: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_inst
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    fp = DicomBytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)
    header = encode_file_header(sop_class, sop_inst, ts)
    assert header[:132] == b"\x00" * 128 + b"DICM"
    assert header[132:] == fp.getvalue()


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "1.02.3", "9" * 64])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.2.a", "../etc", "1..2", "9" * 65, "1.2 3", "1.2/3"])
def test_invalid_uids(uid: str) -> None:
    assert not is_valid_uid(uid)
