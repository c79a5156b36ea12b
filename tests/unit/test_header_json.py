"""header_json's shortcut for plain text values gives exactly what pydicom's conversion gives."""

from __future__ import annotations

import random
import struct
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacsnode.node.dicom.handlers import encode_file_header
from pacsnode.node.testing.corpus import make_dataset
from pacsnode.storage import index
from pacsnode.storage.wire import MalformedDatasetError, check_dataset
from tests.support.helpers import REAL_CHEST_CT_SERIES, find_real_chest_ct, pydicom_data_files


def _both_ways(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dict[str, Any]]:
    def read() -> Dataset:
        return dcmread(BytesIO(raw), stop_before_pixels=True, defer_size=index._JSON_VALUE_LIMIT)

    fast = index.header_json(read())
    with monkeypatch.context() as patched:
        patched.setattr(index, "_short_value_json", lambda raw, plain_charset: None)
        slow = index.header_json(read())
    return fast, slow


def _encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# Values as stored, some plain, some that the shortcut must hand to pydicom.
ODD_VALUES: list[tuple[int, str, str]] = [
    (0x00080008, "CS", "ORIGINAL\\PRIMARY\\\\AXIAL"),
    (0x00080060, "CS", " CT "),
    (0x00180050, "DS", " 1.50"),
    (0x00280030, "DS", "0.703125\\+7.0e-1 "),
    (0x00281050, "DS", "40\\-400"),
    (0x00281051, "DS", "abc"),
    (0x00200011, "IS", "012 "),
    (0x00200012, "IS", "1\\"),
    (0x00201041, "DS", ".5"),
    (0x00080020, "DA", ""),
    (0x00080030, "TM", "120000.5 "),
    (0x00080054, "AE", " STORE \\ SCP"),
    (0x00181020, "LO", "v1\\v2"),
    (0x00080070, "LO", "Acme"),
    (0x00081010, "SH", "R\u00e9ntgen"),
    (0x00102160, "SH", ""),
    (0x00180015, "CS", "CHEST\x01"),
    (0x0020000E, "UI", "1.2.3"),
    (0x00081150, "UI", "1.2.840.10008.5.1.4.1.1.2\\1.2.3"),
    (0x00101010, "AS", "042Y"),
    (0x00081155, "UI", "  1.2.3\\ 1.2.4 "),
    (0x00080090, "PN", "Doe^John^Dr "),
    (0x00081048, "PN", "Doe^John=Ideo=Phon "),
    (0x00081050, "PN", "Smith^Ann \\Jones^Bob\\\\=Only^Ideographic"),
    (0x00081060, "PN", "A=B="),
    (0x00081070, "PN", ""),
    (0x00101001, "PN", "a=b=c=d"),
    (0x0040A075, "PN", "Tab\tName"),
]


_LONG_LENGTH_VRS = {"OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR"}


def _part10(values: list[tuple[int, str, bytes]], *, explicit: bool) -> bytes:
    """A file whose elements carry exactly these bytes (pydicom's writer would tidy them)."""
    body = b""
    for tag, vr, value in sorted(values):
        value += (b"\x00" if vr == "UI" else b" ") * (len(value) % 2)
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        if not explicit:
            body += head + struct.pack("<I", len(value)) + value
        elif vr in _LONG_LENGTH_VRS:
            body += head + vr.encode() + b"\x00\x00" + struct.pack("<I", len(value)) + value
        else:
            body += head + vr.encode() + struct.pack("<H", len(value)) + value
    syntax = ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    return encode_file_header(str(CTImageStorage), "1.2.3.4", str(syntax)) + body


def _odd_instance(charset: bytes) -> list[tuple[int, str, bytes]]:
    """``ODD_VALUES`` in ``charset``, with the UIDs every instance needs."""
    values = [(tag, vr, value.encode("latin-1")) for tag, vr, value in ODD_VALUES]
    return values + [
        (0x00080005, "CS", charset),
        (0x00080016, "UI", str(CTImageStorage).encode()),
        (0x00080018, "UI", b"1.2.3.4"),
        (0x0020000D, "UI", b"1.2.3.5"),
    ]


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("charset", [b"ISO_IR 100", b"", b"ISO_IR 13", b"ISO 2022 IR 87"])
def test_shortcut_matches_pydicom_on_odd_values(
    explicit: bool, charset: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = _odd_instance(charset)
    values += [
        (0x00280010, "US", struct.pack("<H", 512)),
        (0x00280011, "US", b""),
        (0x00280106, "SS", struct.pack("<h", -1024)),
        (0x00181151, "IS", b"-5"),
        (0x00080201, "SH", b"+0100"),
        (0x00081030, "LO", b" Chest\\CT  "),
        (0x00204000, "LT", b"line one\r\nline two  "),
        (0x00324000, "LT", b"a comment\\with a backslash "),
    ]
    fast, slow = _both_ways(_part10(values, explicit=explicit), monkeypatch)
    assert fast == slow
    assert fast["00280030"] == {"vr": "DS", "Value": ["0.703125", "+7.0e-1"]}
    assert fast["00080054"] == {"vr": "AE", "Value": ["STORE", "SCP"]}
    assert fast["00180050"] == {"vr": "DS", "Value": ["1.50"]}
    assert fast["00080020"] == {"vr": "DA"}
    assert fast["00280010"] == {"vr": "US", "Value": [512]}


def test_shortcut_matches_pydicom_on_the_synthetic_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    for modality in ("CT", "MR"):
        fast, slow = _both_ways(_encoded(make_dataset(rows=16, columns=16, modality=modality)), monkeypatch)
        assert fast == slow
        assert fast


@pytest.mark.skipif(find_real_chest_ct() is None, reason="real chest CT not available (PACSNODE_TEST_DATA)")
def test_shortcut_matches_pydicom_on_real_ct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0)."""
    root = find_real_chest_ct()
    assert root is not None
    for name in REAL_CHEST_CT_SERIES:
        for path in sorted(Path(root, name).glob("*.dcm"))[:3]:
            fast, slow = _both_ways(path.read_bytes(), monkeypatch)
            assert fast == slow
            assert len(fast) > 50


def _read_both(raw: bytes, tmp_path: Path) -> tuple[index.InstanceMeta, index.InstanceMeta]:
    """read_header on a Part 10 file, and read_received_header on its dataset bytes as walked."""
    path = tmp_path / "instance.dcm"
    path.write_bytes(raw)
    meta = dcmread(BytesIO(raw), stop_before_pixels=True).file_meta
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    syntax = str(meta.TransferSyntaxUID)
    expected = {
        "expected_sop_class_uid": str(meta.MediaStorageSOPClassUID),
        "expected_sop_instance_uid": str(meta.MediaStorageSOPInstanceUID),
        "transfer_syntax_uid": syntax,
    }
    walked = check_dataset(raw[start:], syntax, max_inflated_bytes=1 << 30)
    whole = index.read_received_header(
        memoryview(raw)[start:], pixel_data_offset=walked.pixel_data_offset, path=path, **expected
    )
    received = index.read_received_header(
        memoryview(raw)[start:],
        pixel_data_offset=walked.pixel_data_offset,
        path=path,
        top_level_headers=walked.top_level_headers,
        **expected,
    )
    _assert_same(whole, received)  # from the walk's offsets as from pydicom's parse of the whole
    return index.read_header(path, **expected), received


def _assert_same(from_file: index.InstanceMeta, received: index.InstanceMeta) -> None:
    assert received == from_file
    assert received.dicom_json == from_file.dicom_json  # not part of ==


@pytest.mark.parametrize("explicit", [True, False])
@pytest.mark.parametrize("charset", [b"ISO_IR 100", b"", b"ISO_IR 13", b"ISO 2022 IR 87"])
def test_the_received_header_reads_as_the_stored_file_on_odd_values(
    explicit: bool, charset: bytes, tmp_path: Path
) -> None:
    values = _odd_instance(charset)
    values += [
        (0x00100010, "PN", "M\u00fcller^J\u00fcrgen".encode("latin-1")),
        (0x00100020, "LO", b" ID 7 "),
        (0x00081030, "LO", b" Chest\\CT  "),
        (0x00200013, "IS", b" 0012"),
    ]
    from_file, received = _read_both(_part10(values, explicit=explicit), tmp_path)
    _assert_same(from_file, received)
    assert received.instance_number == 12


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_the_received_header_reads_as_the_stored_file_on_the_synthetic_corpus(syntax: str, tmp_path: Path) -> None:
    for modality in ("CT", "MR"):
        ds = make_dataset(rows=16, columns=16, modality=modality)
        ds.file_meta.TransferSyntaxUID = syntax
        from_file, received = _read_both(_encoded(ds), tmp_path)
        _assert_same(from_file, received)
        assert received.dicom_json


def test_a_received_header_with_a_long_indexed_value_is_read_from_the_file(tmp_path: Path) -> None:
    """A value over the JSON limit is left unread in memory; the file gives it, as read_header does."""
    ds = make_dataset(rows=16, columns=16)
    ds.StudyDescription = "x" * 5000
    from_file, received = _read_both(_encoded(ds), tmp_path)
    _assert_same(from_file, received)
    assert received.study_description == "x" * 64


@pytest.mark.skipif(find_real_chest_ct() is None, reason="real chest CT not available (PACSNODE_TEST_DATA)")
def test_the_received_header_reads_as_the_stored_file_on_real_ct(tmp_path: Path) -> None:
    """Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0)."""
    root = find_real_chest_ct()
    assert root is not None
    for name in REAL_CHEST_CT_SERIES:
        for path in sorted(Path(root, name).glob("*.dcm"))[:3]:
            from_file, received = _read_both(path.read_bytes(), tmp_path)
            _assert_same(from_file, received)


def _walk_used(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each header read, whether it came from the walk (True) or the whole parse."""
    used: list[bool] = []
    walk = index._header_from_walk

    def spy(*args: Any, **kwargs: Any) -> index.InstanceMeta | None:
        meta = walk(*args, **kwargs)
        used.append(meta is not None)
        return meta

    monkeypatch.setattr(index, "_header_from_walk", spy)
    return used


def test_the_header_of_a_plain_instance_comes_from_the_walk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    used = _walk_used(monkeypatch)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds = make_dataset(rows=16, columns=16)
        ds.file_meta.TransferSyntaxUID = syntax
        from_file, received = _read_both(_encoded(ds), tmp_path)
        _assert_same(from_file, received)
    assert used == [True, True]


def _both_ways_received(
    data: memoryview,
    walked: Any,
    path: Path,
    errors: tuple[type[Exception], ...],
    expected: dict[str, str],
) -> list[Any]:
    """read_received_header by the whole parse, then from the walk's elements: (meta, JSON) or
    (error type, message) each; an error not in ``errors`` fails the test."""
    outcomes: list[Any] = []
    for elements in (None, walked.top_level_headers):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                meta = index.read_received_header(
                    data,
                    pixel_data_offset=walked.pixel_data_offset,
                    path=path,
                    top_level_headers=elements,
                    **expected,
                )
            outcomes.append((meta, meta.dicom_json))
        except errors as exc:
            outcomes.append((type(exc).__name__, str(exc)))
    return outcomes


def _testdata_files() -> list[Path]:
    """pydicom's own test files and pydicom-data's, from the installed packages (no download)."""
    folders = [Path(get_testdata_file("CT_small.dcm") or "").parent, pydicom_data_files()]
    return sorted(p for folder in folders for p in folder.glob("*.dcm"))


def test_the_header_from_the_walk_equals_the_whole_parse_on_pydicoms_test_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every Part 10 file of pydicom's test data that the walk accepts: the same meta, JSON or error."""
    used = _walk_used(monkeypatch)
    compared = 0
    for name in _testdata_files():
        raw = name.read_bytes()
        try:
            meta = dcmread(BytesIO(raw), stop_before_pixels=True).file_meta
            start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
            syntax = str(meta.TransferSyntaxUID)
            walked = check_dataset(raw[start:], syntax, max_inflated_bytes=1 << 30)
        except Exception:  # not a file the node would accept: nothing to compare
            continue
        expected = {
            "expected_sop_class_uid": str(meta.get("MediaStorageSOPClassUID", "")),
            "expected_sop_instance_uid": str(meta.get("MediaStorageSOPInstanceUID", "")),
            "transfer_syntax_uid": syntax,
        }
        outcomes = _both_ways_received(
            memoryview(raw)[start:], walked, name, (index.UnreadableInstanceError, index.InvalidInstanceError), expected
        )
        assert outcomes[0] == outcomes[1], name
        compared += 1
    assert compared > 50
    assert sum(used) > 40  # most of them through the walk, not handed back


def test_a_known_attribute_sent_as_un_reads_as_pydicom_reads_it(tmp_path: Path) -> None:
    """Explicit VR UN on a public tag: pydicom reads it with the dictionary's VR; so does the walk."""
    values = _odd_instance(b"ISO_IR 100") + [
        (0x00100010, "UN", b"Doe^Jane"),
        (0x00081030, "UN", b"Chest CT"),
        (0x00180015, "UN", b"CHEST"),
    ]
    values = [v for v in values if v[0] != 0x00180015 or v[1] == "UN"]
    from_file, received = _read_both(_part10(values, explicit=True), tmp_path)
    _assert_same(from_file, received)
    assert received.patient_name == "Doe^Jane"


def test_an_indexed_attribute_with_a_binary_vr_reads_as_pydicom_reads_it(tmp_path: Path) -> None:
    values = _odd_instance(b"ISO_IR 100") + [(0x00100020, "OB", b"ID42"), (0x00200013, "OW", b"\x01\x00")]
    from_file, received = _read_both(_part10(values, explicit=True), tmp_path)
    _assert_same(from_file, received)


_FUZZ_VRS = ["AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"]
_FUZZ_VRS += ["US", "SS", "UL", "SL", "FL", "FD", "OB", "OW", "UN", "AT"]
_FUZZ_PIECES = ["Doe", "^", "John", "=", "\\", " ", "1.2.3", "12", "-5", "+7.0e-1", ".5", "abc", "\x00", "\u00e9", ""]


def _fuzz_value(rng: random.Random, vr: str) -> bytes:
    if vr in ("US", "SS"):
        return b"".join(struct.pack("<H", rng.getrandbits(16)) for _ in range(rng.randint(0, 2)))
    if vr in ("UL", "SL", "FL", "AT"):
        return b"".join(struct.pack("<I", rng.getrandbits(32)) for _ in range(rng.randint(0, 2)))
    if vr == "FD":
        return b"".join(struct.pack("<d", rng.random()) for _ in range(rng.randint(0, 2)))
    if vr in ("OB", "OW", "UN"):
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 6)))
    return "".join(rng.choice(_FUZZ_PIECES) for _ in range(rng.randint(0, 5))).encode("latin-1")


def test_the_walk_and_the_whole_parse_agree_on_random_headers(tmp_path: Path) -> None:
    """A seeded differential: indexed and other public tags, their own VR or another, odd values, both
    VR encodings and several character sets; the same meta and JSON, or the same error, both ways."""
    from pydicom.datadict import DicomDictionary

    rng = random.Random(20261203)
    public = sorted(t for t in DicomDictionary if 0x0002 < (t >> 16) < 0x7000 and t & 0xFFFF)
    indexed = [int(tag) for _, tag in index._TRANSLATED_TAGS]
    identity = {0x00080016: str(CTImageStorage).encode(), 0x00080018: b"1.2.3.4", 0x0020000D: b"1.2.3.5"}
    compared = 0
    for _ in range(1500):
        values: dict[int, tuple[str, bytes]] = {tag: ("UI", uid) for tag, uid in identity.items()}
        values[0x0020000E] = ("UI", b"1.2.3.6")
        charset = rng.choice([b"", b"ISO_IR 100", b"ISO_IR 192", None])
        if charset is not None:
            values[0x00080005] = ("CS", charset)
        for _ in range(rng.randint(3, 15)):
            tag = rng.choice(indexed if rng.random() < 0.5 else public)
            if tag in identity:
                continue
            own = str(DicomDictionary[tag][0])
            vr = own if own in _FUZZ_VRS and rng.random() < 0.7 else rng.choice(_FUZZ_VRS)
            values[tag] = (vr, _fuzz_value(rng, vr))
        explicit = rng.random() < 0.6
        raw = _part10([(tag, vr, value) for tag, (vr, value) in values.items()], explicit=explicit)
        syntax = str(ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian)
        start = len(encode_file_header(str(CTImageStorage), "1.2.3.4", syntax))
        try:
            walked = check_dataset(raw[start:], syntax, max_inflated_bytes=1 << 30)
        except MalformedDatasetError:
            continue  # refused before any header is read
        path = tmp_path / "instance.dcm"
        path.write_bytes(raw)
        expected = {
            "expected_sop_class_uid": str(CTImageStorage),
            "expected_sop_instance_uid": "1.2.3.4",
            "transfer_syntax_uid": syntax,
        }
        # the same refusal both ways, whatever it is
        outcomes = _both_ways_received(memoryview(raw)[start:], walked, path, (Exception,), expected)
        assert outcomes[0] == outcomes[1], values
        compared += 1
    assert compared > 1000
