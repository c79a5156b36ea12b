"""The PDU guard, fed byte streams directly: what passes, and what aborts and why."""

from __future__ import annotations

import random
import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, MRImageStorage

from pacsnode.node.dicom.guard import (
    REASON_UNEXPECTED_PDU,
    REASON_UNRECOGNISED_PDU,
    GuardLimits,
    GuardViolation,
    PduGuard,
)

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
LIMITS = GuardLimits(artim_s=5, network_timeout_s=60, max_pdu=16384, max_instance_bytes=100_000)
CONTEXTS = {1: VERIFICATION, 3: CTImageStorage, 5: MRImageStorage}


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq() -> bytes:
    contexts = b"".join(
        _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, uid.encode()) + _item(0x40, EXPLICIT_LE.encode()))
        for cid, uid in CONTEXTS.items()
    )
    body = (
        struct.pack(">HH", 1, 0)
        + b"PACSNODE".ljust(16)
        + b"TESTSCU".ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + contexts
        + _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def command(field: int, sop_class: str, *, data_set: bool) -> bytes:
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = field
    ds.MessageID = 1
    ds.CommandDataSetType = 0x0000 if data_set else 0x0101
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, value) PDV items."""
    body = b"".join(struct.pack(">IBB", len(value) + 2, cid, control) + value for cid, control, value in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


def store(cid: int, sop_class: str, dataset: bytes, *, fragment: int = 8000) -> bytes:
    out = p_data((cid, 0x03, command(0x0001, sop_class, data_set=True)))
    pieces = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
    for i, piece in enumerate(pieces):
        out += p_data((cid, 0x02 if i == len(pieces) - 1 else 0x00, piece))
    return out


def feed(stream: bytes, *, seed: int = 0) -> PduGuard:
    """Feed ``stream`` in random chunk sizes, as a socket would deliver it."""
    guard = PduGuard(LIMITS, lambda: CONTEXTS)
    rng = random.Random(seed)
    offset = 0
    while offset < len(stream):
        size = rng.choice([1, 2, 5, 6, 7, 100, 4096, 65536])
        guard.feed(stream[offset : offset + size])
        offset += size
    return guard


RELEASE = struct.pack(">BBIxxxx", 0x05, 0, 4)


@pytest.mark.parametrize("seed", range(5))
def test_a_whole_association_passes_in_any_chunking(seed: int) -> None:
    stream = (
        associate_rq()
        + p_data((1, 0x03, command(0x0030, VERIFICATION, data_set=False)))
        + store(3, CTImageStorage, bytes(50_000))
        + store(5, MRImageStorage, bytes(99_000), fragment=16378)
        + RELEASE
    )
    guard = feed(stream, seed=seed)
    assert guard.associate_received


@pytest.mark.parametrize(
    ("stream", "message", "reason"),
    [
        (lambda: b"\x09\x00" + struct.pack(">I", 4) + bytes(4), "unknown PDU type 0x09", REASON_UNRECOGNISED_PDU),
        (lambda: RELEASE, "before an A-ASSOCIATE-RQ", REASON_UNEXPECTED_PDU),
        (lambda: b"\x01\x00\xff\xff\xff\xff", "A-ASSOCIATE-RQ of 4294967295 bytes", None),
        (lambda: associate_rq()[:-8] + b"\x51\x00\x00\x40" + bytes(4), "runs past its parent", None),
        (lambda: associate_rq() + b"\x04\x00" + struct.pack(">I", 1 << 31), "P-DATA-TF of 2147483648 bytes", None),
        (lambda: associate_rq() + associate_rq(), "a second A-ASSOCIATE-RQ", REASON_UNEXPECTED_PDU),
        (lambda: associate_rq() + p_data((99, 0x03, b"x")), "context 99, which was not accepted", None),
        (
            lambda: (
                associate_rq()
                + p_data((3, 0x03, command(0x0001, CTImageStorage, data_set=True)))
                + p_data((5, 0x02, bytes(10)))
            ),
            "one message on two presentation contexts (3 and 5)",
            None,
        ),
        (
            lambda: associate_rq() + store(1, CTImageStorage, bytes(10)),
            "on the presentation context of 1.2.840.10008.1.1",
            None,
        ),
        (
            lambda: associate_rq() + p_data((3, 0x02, bytes(10))),
            "a dataset fragment without a command",
            REASON_UNEXPECTED_PDU,
        ),
        (lambda: associate_rq() + p_data((3, 0x03, b"\xff" * 20)), "malformed command set", None),
        (lambda: associate_rq() + store(3, CTImageStorage, bytes(200_000)), "a dataset over", None),
        (
            lambda: associate_rq() + struct.pack(">BBI", 0x04, 0, 12) + struct.pack(">IBB", 400, 3, 3) + bytes(6),
            "does not fit its P-DATA-TF PDU",
            None,
        ),
    ],
    ids=[
        "unknown PDU type",
        "release first",
        "associate of 4 GiB",
        "inconsistent associate items",
        "P-DATA of 2 GiB",
        "second associate",
        "unaccepted context",
        "message on two contexts",
        "CT on the Verification context",
        "dataset without command",
        "garbage command set",
        "dataset stream past the limit",
        "PDV longer than its PDU",
    ],
)
def test_a_violation_is_named(stream, message: str, reason: int | None) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GuardViolation, match=".*") as caught:
        feed(stream())
    assert message in str(caught.value)
    if reason is not None:
        assert caught.value.reason == reason


def test_an_instance_a_little_over_the_limit_still_arrives_whole() -> None:
    # One PDU of slack: the handler answers 0xA700 instead of an abort.
    feed(associate_rq() + store(3, CTImageStorage, bytes(LIMITS.max_instance_bytes + 8000)))
