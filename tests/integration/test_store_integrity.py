"""Success only for a whole, consistent instance: datasets that are not whole get 0xC000 and leave nothing.

Each dataset is sent by a real pynetdicom SCU, with bytes built by hand where
pynetdicom would not encode them itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import func, select

from pacsnode.node.dicom import status
from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage.models import Instance
from tests.support.dimse import encode, store_raw
from tests.support.helpers import echo_status
from tests.support.node import RunningNode

GiB = 1 << 30


def _element(group: int, element: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` may lie about the value's size."""
    declared = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH", group, element) + vr + b"\0\0" + struct.pack("<I", declared) + value
    return struct.pack("<HH", group, element) + vr + struct.pack("<H", declared) + value


def _split_at_pixel_data(data: bytes) -> bytes:
    """The bytes of an explicit VR LE dataset before its (7FE0,0010) element."""
    index = data.rfind(b"\xe0\x7f\x10\x00OW")
    assert index > 0
    return data[:index]


def _truncated(ds: Dataset) -> bytes:
    return encode(ds)[:-4000]  # the last fragment arrives, 4,000 bytes short


def _pixel_data_lies(ds: Dataset) -> bytes:
    return _split_at_pixel_data(encode(ds)) + _element(0x7FE0, 0x0010, b"OW", b"\0" * 1024, length=GiB)


def _private_lies(ds: Dataset) -> bytes:
    head = encode(Dataset({tag: ds[tag] for tag in ds.keys() if tag.group <= 0x0008}))
    return (
        head
        + _element(0x0009, 0x0010, b"LO", b"PACSNODE TEST ")
        + _element(0x0009, 0x1010, b"OB", b"\0" * 1024, length=GiB)
    )


def _meta_inside(ds: Dataset) -> bytes:
    # A File Meta element ahead of the dataset: it must never become the stored file's meta.
    return _element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.4.50\0") + encode(ds)


CASES: dict[str, tuple[Callable[[Dataset], bytes], str, str]] = {
    "truncated by 4000 bytes": (_truncated, ExplicitVRLittleEndian, "runs past"),
    "PixelData declares 1 GiB": (_pixel_data_lies, ExplicitVRLittleEndian, "(7FE0,0010)"),
    "private element declares 1 GiB": (_private_lies, ExplicitVRLittleEndian, "(0009,1010)"),
    "group 0002 inside the dataset": (_meta_inside, ExplicitVRLittleEndian, "(0002,0010)"),
    "explicit VR on an implicit context": (encode, ImplicitVRLittleEndian, "Explicit VR Little Endian"),
}


def _instances(node: RunningNode) -> int:
    with node.archive.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Instance)).scalar_one())


@pytest.mark.parametrize("case", list(CASES))
def test_a_dataset_that_is_not_whole_gets_cannot_understand_and_leaves_nothing(node: RunningNode, case: str) -> None:
    build, transfer_syntax, reason = CASES[case]
    ds = make_dataset(rows=64, columns=64)
    code, comment = store_raw(
        node.port,
        build(ds),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=transfer_syntax,
    )
    assert code == status.CANNOT_UNDERSTAND, comment
    assert reason in comment
    assert _instances(node) == 0
    assert list(node.archive.store.tmp_dir.iterdir()) == []
    assert echo_status(node.port) == status.SUCCESS


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_same_dataset_whole_is_stored(node: RunningNode, transfer_syntax: str) -> None:
    ds = make_dataset(rows=64, columns=64)
    code, comment = store_raw(
        node.port,
        encode(ds, implicit=transfer_syntax == ImplicitVRLittleEndian),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=transfer_syntax,
    )
    assert (code, comment) == (status.SUCCESS, "")
    assert _instances(node) == 1


@pytest.mark.parametrize(
    "study_uid",
    [
        "1.2.826.0.1.3680043.10.1432." + "1" * 37,  # 65 characters: never cut to 64
        ".1.2.826.0.1.3680043.10.1432.5",
        "1.2.826.0.1.3680043.10.1432.5.",
    ],
    ids=["65 characters", "leading dot", "trailing dot"],
)
def test_a_uid_is_validated_as_received_never_repaired(node: RunningNode, study_uid: str) -> None:
    ds = make_dataset(rows=8, columns=8, study_uid=study_uid)
    code, comment = store_raw(
        node.port,
        encode(ds),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    assert code == status.DATASET_DOES_NOT_MATCH_SOP_CLASS, comment
    assert "StudyInstanceUID not a valid UID" in comment
    assert _instances(node) == 0


def test_a_deflated_dataset_inflating_past_the_cap_is_refused(start_node, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.support.helpers import make_settings

    node = start_node(make_settings(tmp_path, node={"max_inflated_bytes": 1 << 20}))
    ds = make_dataset(rows=1024, columns=1024)
    ds.PixelData = bytes(len(ds.PixelData))  # 2 MiB of zeros: deflates to a few KiB
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = squeezer.compress(encode(ds)) + squeezer.flush()
    assert len(deflated) < 64 << 10
    code, comment = store_raw(
        node.port,
        deflated,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax_uid=DeflatedExplicitVRLittleEndian,
    )
    assert code == status.CANNOT_UNDERSTAND, comment
    assert "inflates to more than" in comment
    assert _instances(node) == 0
    small = make_dataset(rows=64, columns=64)
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -15)
    code, comment = store_raw(
        node.port,
        squeezer.compress(encode(small)) + squeezer.flush(),
        sop_class_uid=str(small.SOPClassUID),
        sop_instance_uid=str(small.SOPInstanceUID),
        transfer_syntax_uid=DeflatedExplicitVRLittleEndian,
    )
    assert (code, comment) == (status.SUCCESS, "")
