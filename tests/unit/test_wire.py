"""storage.wire: the structural check of a received dataset before C-STORE Success.

Valid datasets are encoded with pydicom (or taken from pydicom's example files) and must pass
in every transfer syntax; each malformed form is then made from a valid one and must be
refused with the right error class and a message that names the element.
"""

from __future__ import annotations

import functools
import gc
import io
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from pacsnode.storage.errors import UnreadableInstanceError
from pacsnode.storage.wire import (
    MAX_DEPTH,
    InflationLimitError,
    MalformedDatasetError,
    MetaInDatasetError,
    TransferSyntaxMismatchError,
    UnsupportedTransferSyntaxError,
    WireSummary,
    check_dataset,
)
from tests.support.helpers import PYDICOM_FILES, pydicom_data_files

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE = "1.2.840.10008.1.2.5"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
NATIVE_SYNTAXES = [IMPLICIT, EXPLICIT, BIG_ENDIAN, DEFLATED]

CAP = 64 << 20
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
SEQ_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def check(data: bytes | bytearray | memoryview, ts: str = EXPLICIT) -> WireSummary:
    return check_dataset(data, ts, max_inflated_bytes=CAP)


# --- building datasets ------------------------------------------------------------------


def code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def ct_slice(rows: int = 512, columns: int = 512, *, undefined: bool = False) -> Dataset:
    """A CT slice with 16-bit pixels, an empty sequence and sequences nested three deep."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.101"
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.Manufacturer = "PACSNODE"
    inner = code_item("113691", "Image Set")
    inner.ConceptCodeSequence = Sequence([code_item("121311", "Localizer")])
    middle = code_item("CTCHEST", "CT Chest")
    middle.EquivalentCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([middle, code_item("CTABD", "CT Abdomen")])
    ds.ReferencedImageSequence = Sequence([])
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-1"
    ds.SliceThickness = "1.25"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.102"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.103"
    ds.InstanceNumber = "7"
    ds.ImagePositionPatient = ["-250", "-250", "-100.5"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    pixels = np.random.default_rng(7).integers(0, 4096, (rows, columns), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    if undefined:
        for element in ds.iterall():
            if element.VR == "SQ":
                element.is_undefined_length = True
                for item in element.value:
                    item.is_undefined_length_sequence_item = True
    return ds


def count_elements(ds: Dataset) -> int:
    return sum(1 for _ in ds.iterall())


def deflate(raw: bytes, *, pad: bool = True) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    out = compressor.compress(raw) + compressor.flush()
    return out + b"\x00" if pad and len(out) % 2 else out


def encode(ds: Dataset, ts: str) -> bytes:
    """The dataset as a C-STORE peer sends it: encoded in ``ts``, no preamble, no File Meta."""
    uid = UID(ts)
    fp = DicomBytesIO()
    fp.is_implicit_VR = uid.is_implicit_VR
    fp.is_little_endian = uid.is_little_endian
    write_dataset(fp, ds)
    raw = fp.getvalue()
    return deflate(raw) if uid.is_deflated else raw


def el(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element."""
    tag = struct.pack("<HH", group, element)
    if vr in LONG_VRS:
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def iel(group: int, element: int, value: bytes) -> bytes:
    """One implicit VR little endian element."""
    return struct.pack("<HHI", group, element, len(value)) + value


def undefined(group: int, element: int, vr: bytes = b"SQ") -> bytes:
    """The header of an explicit VR little endian element of undefined length."""
    return struct.pack("<HH", group, element) + vr + b"\x00\x00\xff\xff\xff\xff"


def item(body: bytes, *, defined: bool = True) -> bytes:
    if defined:
        return b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body
    return b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + ITEM_END


def encapsulated_image(frames: list[bytes], *, ts: str = RLE, **options: bool | int) -> bytes:
    ds = ct_slice(4, 4)
    ds.NumberOfFrames = str(len(frames))
    ds.PixelData = encapsulate(frames, **options)  # type: ignore[arg-type]
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return encode(ds, ts)


def file_dataset(path: Path) -> tuple[bytes, str]:
    """A Part 10 file's dataset bytes (after the File Meta group) and its transfer syntax."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", path
    pos, ts = 132, ""
    while data[pos : pos + 2] == b"\x02\x00":
        element = struct.unpack_from("<H", data, pos + 2)[0]
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if element == 0x0010:
            ts = data[pos + header : pos + header + length].decode("ascii").strip("\x00 ")
        pos += header + length
    return data[pos:], ts


def example_file(name: str) -> Path:
    """One of pydicom's example files, from pydicom itself or the pydicom-data package."""
    path = PYDICOM_FILES / name
    if path.exists():
        return path
    try:
        path = pydicom_data_files() / name
    except ImportError:
        pytest.skip("pydicom-data is not installed")
    if not path.exists():
        pytest.skip(f"{name} is not among the installed example files")
    return path


def set_u32(data: bytes, offset: int, value: int, *, big: bool = False) -> bytes:
    return data[:offset] + struct.pack(">I" if big else "<I", value) + data[offset + 4 :]


@functools.cache
def ct_bytes(ts: str) -> bytes:
    return encode(ct_slice(), ts)


# --- valid datasets ---------------------------------------------------------------------


@pytest.mark.parametrize("ts", NATIVE_SYNTAXES)
@pytest.mark.parametrize("undefined_lengths", [False, True], ids=["defined", "undefined"])
def test_ct_slice_passes_in_every_native_syntax(ts: str, undefined_lengths: bool) -> None:
    ds = ct_slice(undefined=undefined_lengths)
    data = encode(ds, ts)
    summary = check(data, ts)
    assert summary.elements == count_elements(ds)
    assert summary.top_level_elements == len(ds)
    assert summary.max_depth == 3
    assert summary.items == 4
    assert summary.pixel_data == "native"
    assert summary.pixel_data_length == 512 * 512 * 2
    assert summary.frames == 1
    assert summary.fragments == 0
    walked = zlib.decompress(data, -zlib.MAX_WBITS) if ts == DEFLATED else data
    assert summary.inflated_length == len(walked)
    assert summary.encoded_length == len(data)
    assert summary.pixel_data_offset is not None
    tag = b"\x7f\xe0\x00\x10" if ts == BIG_ENDIAN else b"\xe0\x7f\x10\x00"
    assert walked[summary.pixel_data_offset : summary.pixel_data_offset + 4] == tag
    assert summary.pixel_data_offset + summary.pixel_data_length + (8 if ts == IMPLICIT else 12) == len(walked)


def test_each_element_is_visited_once() -> None:
    """The walk visits every element exactly once: its count matches pydicom's own, nested ones included."""
    ds = ct_slice()
    summary = check(ct_bytes(EXPLICIT))
    assert summary.elements == count_elements(ds) == len(ds) + 14
    assert summary.top_level_elements == len(ds)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_bytes_bytearray_and_memoryview(kind: type) -> None:
    data = ct_bytes(EXPLICIT)
    assert check(kind(data)).pixel_data == "native"


def test_dataset_without_pixel_data() -> None:
    ds = ct_slice(2, 2)
    del ds.PixelData
    summary = check(encode(ds, EXPLICIT))
    assert summary.pixel_data == "none"
    assert summary.pixel_data_offset is None
    assert summary.frames == 0


@pytest.mark.parametrize("ts", NATIVE_SYNTAXES)
def test_one_bit_pixels_are_counted_in_bits(ts: str) -> None:
    ds = ct_slice(7, 7)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.NumberOfFrames = "3"
    ds.PixelData = bytes(20)  # 7 x 7 x 3 = 147 bits: 19 bytes, padded to 20
    ds["PixelData"].VR = "OB"
    summary = check(encode(ds, ts), ts)
    assert (summary.frames, summary.pixel_data_length) == (3, 20)
    ds.PixelData = bytes(22)
    with pytest.raises(MalformedDatasetError, match=r"\(7FE0,0010\).*22 bytes.*need 19"):
        check(encode(ds, ts), ts)


@pytest.mark.parametrize("frames", [1, 3])
@pytest.mark.parametrize("has_bot", [True, False])
@pytest.mark.parametrize("fragments_per_frame", [1, 2])
def test_encapsulated_pixel_data(frames: int, has_bot: bool, fragments_per_frame: int) -> None:
    data = encapsulated_image(
        [bytes([n]) * 100 for n in range(frames)], has_bot=has_bot, fragments_per_frame=fragments_per_frame
    )
    summary = check(data, RLE)
    assert summary.pixel_data == "encapsulated"
    assert summary.pixel_data_length is None
    assert summary.frames == frames
    assert summary.fragments == frames * fragments_per_frame
    assert summary.pixel_data_offset is not None
    assert data[summary.pixel_data_offset : summary.pixel_data_offset + 6] == b"\xe0\x7f\x10\x00OB"


def test_extended_offset_table() -> None:
    ds = ct_slice(4, 4)
    ds.NumberOfFrames = "3"
    pixel_data, offsets, lengths = encapsulate_extended([b"a" * 10, b"b" * 20, b"c" * 30])
    ds.ExtendedOffsetTable = offsets
    ds.ExtendedOffsetTableLengths = lengths
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    summary = check(encode(ds, RLE), RLE)
    assert (summary.pixel_data, summary.frames, summary.fragments) == ("encapsulated", 3, 3)
    ds.ExtendedOffsetTableLengths = struct.pack("<2Q", 10, 20)
    with pytest.raises(
        MalformedDatasetError, match=r"\(7FE0,0002\).* Lengths has 2 entries, the Extended Offset Table 3"
    ):
        check(encode(ds, RLE), RLE)
    ds.ExtendedOffsetTableLengths = lengths
    ds.ExtendedOffsetTable = struct.pack("<3Q", 0, 18, 40)  # 40 is inside the third fragment
    with pytest.raises(MalformedDatasetError, match=r"\(7FE0,0010\).*Extended Offset Table entry 3 \(40\)"):
        check(encode(ds, RLE), RLE)


VALID_FILES = [
    # name, pixel data, frames
    ("CT_small.dcm", "native", 1),
    ("MR_small_implicit.dcm", "native", 1),
    ("MR_small_bigendian.dcm", "native", 1),
    ("MR_small_RLE.dcm", "encapsulated", 1),
    ("MR_small_jp2klossless.dcm", "encapsulated", 1),
    ("MR_small_jpeg_ls_lossless.dcm", "encapsulated", 1),
    ("JPEG-lossy.dcm", "encapsulated", 1),
    ("JPEG2000.dcm", "encapsulated", 1),
    ("JPEG2000-embedded-sequence-delimiter.dcm", "encapsulated", 1),
    ("SC_rgb_rle_2frame.dcm", "encapsulated", 2),
    ("SC_rgb_small_odd.dcm", "native", 1),
    ("SC_ybr_full_422_uncompressed.dcm", "native", 1),
    ("image_dfl.dcm", "native", 1),
    ("rtdose.dcm", "native", 15),
    ("rtdose_rle.dcm", "encapsulated", 15),
    ("rtplan.dcm", "none", 0),
    ("test-SR.dcm", "none", 0),
    ("waveform_ecg.dcm", "none", 0),
    ("UN_sequence.dcm", "none", 0),
    ("priv_SQ.dcm", "none", 0),
    ("examples_jpeg2k.dcm", "encapsulated", 1),
    ("examples_ybr_color.dcm", "encapsulated", 30),
    # from pydicom-data
    ("color3d_jpeg_baseline.dcm", "encapsulated", 120),
    ("emri_small_RLE.dcm", "encapsulated", 10),
    ("explicit_VR-UN.dcm", "encapsulated", 1),
    ("liver_expb.dcm", "native", 3),
    ("gdcm-US-ALOKA-16.dcm", "native", 1),
    ("JPEG-LL.dcm", "encapsulated", 1),
]


@pytest.mark.parametrize(("name", "kind", "frames"), VALID_FILES)
def test_example_files_pass(name: str, kind: str, frames: int) -> None:
    data, ts = file_dataset(example_file(name))
    summary = check(data, ts)
    assert (summary.pixel_data, summary.frames) == (kind, frames)
    assert summary.elements >= summary.top_level_elements > 0


@pytest.mark.parametrize(("name", "ts"), [("ExplVR_BigEndNoMeta.dcm", BIG_ENDIAN), ("OT-PAL-8-face.dcm", IMPLICIT)])
def test_example_files_without_file_meta_pass(name: str, ts: str) -> None:
    summary = check(example_file(name).read_bytes(), ts)
    assert summary.top_level_elements > 0


def test_un_of_undefined_length_is_walked_as_implicit_vr() -> None:
    nested = iel(0x0008, 0x1150, b"1.2.840.10008.5.1.4.1.1.2\x00") + iel(0x0008, 0x1155, b"1.2.3.4\x00")
    inner_sequence = struct.pack("<HHI", 0x0008, 0x1115, 0xFFFFFFFF) + item(nested) + SEQ_END
    contents = item(iel(0x0008, 0x0100, b"T1") + inner_sequence, defined=False) + item(iel(0x0008, 0x0100, b"T2"))
    data = (
        el(0x0008, 0x0060, b"CS", b"OT")
        + el(0x0009, 0x0010, b"LO", b"PACSNODE TEST ")
        + undefined(0x0009, 0x1001, b"UN")
        + contents
        + SEQ_END
        + el(0x0010, 0x0010, b"PN", b"Doe^Jane")
    )
    summary = check(data)
    assert summary.elements == 9
    assert summary.top_level_elements == 4
    assert summary.max_depth == 2
    # The same contents in explicit VR are not what PS3.5 6.2.2 allows in UN.
    explicit = item(el(0x0008, 0x0100, b"SH", b"T1"), defined=False)
    bad = el(0x0008, 0x0060, b"CS", b"OT") + undefined(0x0009, 0x1001, b"UN") + explicit + SEQ_END
    with pytest.raises(MalformedDatasetError, match=r"\(0009,1001\)"):
        check(bad)


def test_implicit_vr_private_sequences() -> None:
    body = iel(0x0009, 0x0010, b"PACSNODE TEST ")
    contents = item(iel(0x0009, 0x1002, b"AB"), defined=False)
    undefined_sequence = body + struct.pack("<HHI", 0x0009, 0x1001, 0xFFFFFFFF) + contents + SEQ_END
    assert check(undefined_sequence, IMPLICIT).elements == 3
    # With a defined length the dictionary cannot tell a private sequence: its value is skipped whole.
    defined_sequence = body + iel(0x0009, 0x1001, item(iel(0x0009, 0x1002, b"AB")))
    assert check(defined_sequence, IMPLICIT).elements == 2


def test_nesting_to_the_depth_cap_passes_and_beyond_it_is_refused() -> None:
    def nest(depth: int) -> bytes:
        body = el(0x0008, 0x0100, b"SH", b"X ")
        for _ in range(depth):
            body = undefined(0x0008, 0x1115) + item(body, defined=False) + SEQ_END
        return body

    assert check(nest(MAX_DEPTH)).max_depth == MAX_DEPTH
    with pytest.raises(MalformedDatasetError, match=rf"\(0008,1115\).*deeper than {MAX_DEPTH}"):
        check(nest(MAX_DEPTH + 1))


# --- malformed datasets -----------------------------------------------------------------


@pytest.mark.parametrize("ts", [IMPLICIT, EXPLICIT, BIG_ENDIAN])
def test_truncated_by_4000_bytes(ts: str) -> None:
    data = ct_bytes(ts)
    with pytest.raises(MalformedDatasetError) as caught:
        check(data[:-4000], ts)
    assert type(caught.value) is MalformedDatasetError
    assert "(7FE0,0010) Pixel Data" in str(caught.value)
    assert "runs past the end of the data (520288 bytes left)" in str(caught.value)
    assert caught.value.tag == 0x7FE00010


def test_truncated_deflated_stream() -> None:
    with pytest.raises(MalformedDatasetError, match="deflate stream does not end"):
        check(ct_bytes(DEFLATED)[:-4000], DEFLATED)


@pytest.mark.parametrize("ts", [IMPLICIT, EXPLICIT, BIG_ENDIAN])
def test_pixel_data_declaring_1_gib(ts: str) -> None:
    data = ct_bytes(ts)
    offset = check(data, ts).pixel_data_offset
    assert offset is not None
    patched = set_u32(data, offset + (4 if ts == IMPLICIT else 8), 1 << 30, big=ts == BIG_ENDIAN)
    with pytest.raises(
        MalformedDatasetError, match=rf"\(7FE0,0010\) Pixel Data at byte {offset}: value length 1073741824 runs past"
    ):
        check(patched, ts)


def test_pixel_data_declaring_1_gib_with_1_kib_present() -> None:
    data = el(0x0008, 0x0060, b"CS", b"CT") + el(0x7FE0, 0x0010, b"OW", bytes(1024))
    with pytest.raises(MalformedDatasetError, match=r"\(7FE0,0010\).*1073741824.*\(1024 bytes left\)"):
        check(set_u32(data, 18, 1 << 30))


@pytest.mark.parametrize("ts", [IMPLICIT, EXPLICIT])
def test_private_element_declaring_1_gib(ts: str) -> None:
    ds = ct_slice(8, 8)
    ds.private_block(0x0009, "PACSNODE TEST", create=True).add_new(0x10, "OB", b"\x01\x02" * 16)
    data = encode(ds, ts)
    header = b"\x09\x00\x10\x10" + (b"" if ts == IMPLICIT else b"OB\x00\x00")
    at = data.index(header)
    patched = set_u32(data, at + len(header), 1 << 30)
    with pytest.raises(MalformedDatasetError) as caught:
        check(patched, ts)
    assert type(caught.value) is MalformedDatasetError
    assert f"(0009,1010) (private) at byte {at}: value length 1073741824 runs past the end" in str(caught.value)


def test_unclosed_sequence() -> None:
    ds = ct_slice(2, 2, undefined=True)
    del ds.PixelData
    ds.ContentSequence = Sequence([code_item("1", "one")])
    ds["ContentSequence"].is_undefined_length = True
    data = encode(ds, EXPLICIT)
    assert data.endswith(SEQ_END)
    with pytest.raises(MalformedDatasetError, match=r"\(0040,A730\).*no Sequence Delimiter closes it"):
        check(data[:-8])


def test_unclosed_item() -> None:
    data = el(0x0008, 0x0060, b"CS", b"CT") + undefined(0x0008, 0x1115)
    data += b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + el(0x0008, 0x1150, b"UI", b"1.2\x00") + SEQ_END
    with pytest.raises(MalformedDatasetError, match=r"\(0008,1115\) item 1: the undefined-length item .* not closed"):
        check(data)


def test_data_ending_inside_an_undefined_length_item() -> None:
    data = el(0x0008, 0x0060, b"CS", b"CT") + undefined(0x0008, 0x1115)
    data += b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + el(0x0008, 0x1150, b"UI", b"1.2\x00")
    with pytest.raises(MalformedDatasetError, match=r"undefined-length item opened at byte 22: no Item Delimitation"):
        check(data)


def test_defined_length_item_must_end_where_declared() -> None:
    contents = el(0x0008, 0x1150, b"UI", b"1.2\x00")
    good = el(0x0008, 0x0060, b"CS", b"CT") + el(0x0008, 0x1115, b"SQ", item(contents)) + el(0x0010, 0x0010, b"PN", b"")
    assert check(good).max_depth == 1
    item_length_at = 10 + 12 + 4
    with pytest.raises(MalformedDatasetError, match=r"\(0008,1115\)"):
        check(set_u32(good, item_length_at, len(contents) + 4))
    with pytest.raises(MalformedDatasetError, match=r"\(0008,1150\).*past the end of the enclosing item"):
        check(set_u32(good, item_length_at, len(contents) - 2))


def test_only_items_inside_a_sequence() -> None:
    data = (
        el(0x0008, 0x0060, b"CS", b"CT") + undefined(0x0008, 0x1115) + el(0x0008, 0x1150, b"UI", b"1.2\x00") + SEQ_END
    )
    with pytest.raises(MalformedDatasetError, match=r"\(0008,1150\).*inside sequence \(0008,1115\), where only items"):
        check(data)


@pytest.mark.parametrize(
    ("stray", "message"),
    [
        (SEQ_END, r"\(FFFE,E0DD\) Sequence Delimiter at byte 10: .*no undefined-length sequence is open"),
        (ITEM_END, r"\(FFFE,E00D\) Item Delimitation Item at byte 10: .*no undefined-length item is open"),
        (b"\xfe\xff\x00\xe0\x00\x00\x00\x00", r"\(FFFE,E000\) Item at byte 10: an item outside any sequence"),
    ],
)
def test_delimiter_where_none_is_open(stray: bytes, message: str) -> None:
    data = el(0x0008, 0x0060, b"CS", b"CT") + stray + el(0x0010, 0x0010, b"PN", b"")
    with pytest.raises(MalformedDatasetError, match=message):
        check(data)


def test_undefined_length_on_a_plain_vr() -> None:
    data = el(0x0008, 0x0060, b"CS", b"CT") + undefined(0x0010, 0x4000, b"UT") + SEQ_END
    with pytest.raises(
        MalformedDatasetError, match=r"\(0010,4000\) Patient Comments at byte 10: undefined length on VR UT"
    ):
        check(data)
    implicit = iel(0x0008, 0x0060, b"CT") + struct.pack("<HHI", 0x0010, 0x0010, 0xFFFFFFFF) + SEQ_END
    with pytest.raises(MalformedDatasetError, match=r"\(0010,0010\).*undefined length on an element whose VR is PN"):
        check(implicit, IMPLICIT)


def test_encapsulated_pixel_data_without_sequence_delimiter() -> None:
    data = encapsulated_image([b"x" * 100])
    assert data.endswith(SEQ_END)
    with pytest.raises(
        MalformedDatasetError, match=r"\(7FE0,0010\).*not closed.*1 fragments without a Sequence Delimiter"
    ):
        check(data[:-8], RLE)


def test_encapsulated_fragment_of_odd_length() -> None:
    data = encapsulated_image([b"x" * 100])
    fragment_length_at = data.rindex(b"\xfe\xff\x00\xe0") + 4
    with pytest.raises(MalformedDatasetError, match=r"\(FFFE,E000\) Item at byte \d+: fragment 1 .* odd length 99"):
        check(set_u32(data, fragment_length_at, 99), RLE)


def test_encapsulated_pixel_data_without_fragments() -> None:
    data = encapsulated_image([b"x" * 100], has_bot=False)
    no_fragment = data[: data.rindex(b"\xfe\xff\x00\xe0")] + SEQ_END
    with pytest.raises(MalformedDatasetError, match=r"\(7FE0,0010\).*has no fragments"):
        check(no_fragment, RLE)


def test_encapsulated_pixel_data_must_begin_with_the_offset_table_item() -> None:
    data = encapsulated_image([b"x" * 100], has_bot=False)
    start = data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    with pytest.raises(MalformedDatasetError, match=r"\(FFFE,E0DD\).*must begin with its Basic Offset Table item"):
        check(data[:start] + SEQ_END, RLE)
    with pytest.raises(MalformedDatasetError, match=r"Basic Offset Table item has length 6"):
        check(data[:start] + item(b"abcdef") + data[start:], RLE)


def test_basic_offset_table_must_match_the_fragments() -> None:
    data = encapsulated_image([b"a" * 10, b"b" * 20])
    bot_at = data.index(b"\xfe\xff\x00\xe0\x08\x00\x00\x00") + 8
    assert struct.unpack_from("<2I", data, bot_at) == (0, 18)
    with pytest.raises(MalformedDatasetError, match=r"Basic Offset Table entry 2 \(20\) does not point at a fragment"):
        check(data[:bot_at] + struct.pack("<2I", 0, 20) + data[bot_at + 8 :], RLE)
    with pytest.raises(MalformedDatasetError, match=r"Basic Offset Table entry 2 \(400\) points past the last"):
        check(data[:bot_at] + struct.pack("<2I", 0, 400) + data[bot_at + 8 :], RLE)
    with pytest.raises(MalformedDatasetError, match=r"offsets do not start at 0 and ascend"):
        check(data[:bot_at] + struct.pack("<2I", 18, 0) + data[bot_at + 8 :], RLE)


def test_frames_must_fit_the_fragments() -> None:
    ds = ct_slice(4, 4)
    ds.NumberOfFrames = "3"
    ds.PixelData = encapsulate([b"a" * 10, b"b" * 20], has_bot=False)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(MalformedDatasetError, match=r"\(7FE0,0010\).*2 fragments cannot hold 3 frames"):
        check(encode(ds, RLE), RLE)
    ds.PixelData = encapsulate([b"a" * 10, b"b" * 20], has_bot=True)
    with pytest.raises(MalformedDatasetError, match=r"offset table lists 2 frames but Number of Frames is 3"):
        check(encode(ds, RLE), RLE)


@pytest.mark.parametrize("ts", [IMPLICIT, EXPLICIT])
def test_file_meta_in_the_dataset(ts: str) -> None:
    meta = el(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1\x00")
    with pytest.raises(MetaInDatasetError, match=r"\(0002,0010\) Transfer Syntax UID at byte 0: File Meta"):
        check(meta + ct_bytes(ts), ts)


def test_file_meta_in_the_middle_of_the_dataset() -> None:
    data = el(0x0008, 0x0060, b"CS", b"CT") + el(0x0002, 0x0001, b"OB", b"\x00\x01")
    with pytest.raises(MetaInDatasetError, match=r"\(0002,0001\).*at byte 10"):
        check(data)


def test_a_whole_file_is_not_a_dataset() -> None:
    with pytest.raises(MetaInDatasetError, match="preamble and 'DICM'"):
        check(example_file("CT_small.dcm").read_bytes())


def test_explicit_vr_on_an_implicit_context() -> None:
    with pytest.raises(TransferSyntaxMismatchError) as caught:
        check(ct_bytes(EXPLICIT), IMPLICIT)
    message = str(caught.value)
    assert "encoded in Explicit VR Little Endian, not in the negotiated transfer syntax 1.2.840.10008.1.2 " in message
    assert "(0008,0005) Specific Character Set at byte 0" in message


def test_truncated_explicit_vr_on_an_implicit_context_is_still_a_mismatch() -> None:
    with pytest.raises(TransferSyntaxMismatchError, match=r"reads as Explicit VR Little Endian .*\(7FE0,0010\)"):
        check(ct_bytes(EXPLICIT)[:-4000], IMPLICIT)


@pytest.mark.parametrize("ts", [EXPLICIT, BIG_ENDIAN, JPEG_BASELINE])
def test_implicit_vr_on_an_explicit_context(ts: str) -> None:
    with pytest.raises(TransferSyntaxMismatchError) as caught:
        check(ct_bytes(IMPLICIT), ts)
    message = str(caught.value)
    assert "encoded in Implicit VR Little Endian" in message
    # As negotiated, the first element header already fails (read big endian in Explicit VR Big Endian).
    first_tag = "(0800,0500)" if ts == BIG_ENDIAN else "(0008,0005) Specific Character Set"
    assert f"{first_tag} at byte 0: b'\\n\\x00' is not a VR code" in message


def test_bytes_in_no_encoding_name_the_bad_vr() -> None:
    data = b"\x08\x00\x05\x00\x10\x00\x00\x00ISO_IR"
    with pytest.raises(MalformedDatasetError) as caught:
        check(data)
    assert type(caught.value) is MalformedDatasetError
    assert r"(0008,0005) Specific Character Set at byte 0: b'\x10\x00' is not a VR code" in str(caught.value)


def test_encapsulated_pixel_data_on_a_native_context() -> None:
    with pytest.raises(TransferSyntaxMismatchError, match=r"\(7FE0,0010\).*undefined length \(encapsulated"):
        check(encapsulated_image([b"x" * 100], ts=EXPLICIT), EXPLICIT)


def test_native_pixel_data_on_an_encapsulated_context() -> None:
    with pytest.raises(TransferSyntaxMismatchError, match=r"\(7FE0,0010\).*defined length 524288 \(native"):
        check(ct_bytes(EXPLICIT), JPEG_BASELINE)


def test_dataset_that_was_not_deflated() -> None:
    with pytest.raises(TransferSyntaxMismatchError, match="encoded in Explicit VR Little Endian, not deflated, not in"):
        check(ct_bytes(EXPLICIT), DEFLATED)


@functools.cache
def deflate_bomb() -> bytes:
    """200 MB of zeros, deflated to about 200 KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    return b"".join([compressor.compress(zeros) for _ in range(200)] + [compressor.flush()])


def test_deflate_bomb_is_refused_at_the_cap() -> None:
    bomb = deflate_bomb()
    assert len(bomb) < 300_000
    cap = 50 << 20
    tracemalloc.start()
    try:
        with pytest.raises(InflationLimitError, match=f"inflates to more than {cap} bytes"):
            check_dataset(bomb, DEFLATED, max_inflated_bytes=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * cap


def test_deflated_dataset_within_the_cap_passes_and_beyond_is_refused() -> None:
    data = ct_bytes(DEFLATED)
    inflated = check(data, DEFLATED).inflated_length
    assert check_dataset(data, DEFLATED, max_inflated_bytes=inflated).inflated_length == inflated
    with pytest.raises(InflationLimitError):
        check_dataset(data, DEFLATED, max_inflated_bytes=inflated - 1)


def test_junk_after_the_deflate_stream() -> None:
    stream = deflate(encode(ct_slice(8, 8), EXPLICIT), pad=False)
    assert check(stream + b"\x00", DEFLATED).pixel_data == "native"  # one padding byte may follow
    with pytest.raises(MalformedDatasetError, match="10 bytes follow the end of the deflate stream"):
        check(stream + bytes(10), DEFLATED)
    with pytest.raises(MalformedDatasetError, match="1 bytes follow the end of the deflate stream"):
        check(stream + b"\x01", DEFLATED)


@pytest.mark.parametrize("ts", NATIVE_SYNTAXES)
def test_native_pixel_length_mismatch(ts: str) -> None:
    ds = ct_slice()
    ds.Rows = 511
    with pytest.raises(
        MalformedDatasetError,
        match=r"\(7FE0,0010\) Pixel Data at byte \d+: native pixel data of 524288 bytes, but 511 rows x 512 columns .* need 523264",
    ):
        check(encode(ds, ts), ts)


@pytest.mark.parametrize("frames", ["1_0", "-1", "x"])
def test_number_of_frames_must_be_a_count(frames: str) -> None:
    ds = ct_slice(2, 2)
    ds.NumberOfFrames = "1234"
    data = encode(ds, EXPLICIT)
    patched = data.replace(b"IS\x04\x001234", b"IS\x04\x00" + frames.ljust(4).encode())
    assert patched != data
    with pytest.raises(
        MalformedDatasetError, match=rf"\(0028,0008\) Number of Frames at byte \d+: .* '{frames}' is not"
    ):
        check(patched)


def test_native_pixel_data_needs_its_image_attributes() -> None:
    ds = ct_slice(2, 2)
    del ds.BitsAllocated
    with pytest.raises(MalformedDatasetError, match=r"\(7FE0,0010\).*without \(0028,0100\) Bits Allocated"):
        check(encode(ds, EXPLICIT))


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (el(0x0008, 0x0020, b"DA", b"20240101"), r"\(0008,0020\) Study Date at byte 8: comes after \(0010,0010\)"),
        (el(0x0010, 0x0010, b"PN", b"Doe^John"), r"\(0010,0010\) Patient's Name at byte 8: repeats \(0010,0010\)"),
    ],
)
def test_elements_out_of_order(second: bytes, message: str) -> None:
    data = el(0x0010, 0x0010, b"PN", b"") + second
    with pytest.raises(MalformedDatasetError, match=message):
        check(data)


def test_elements_out_of_order_inside_an_item() -> None:
    contents = el(0x0008, 0x1155, b"UI", b"1.2\x00") + el(0x0008, 0x1150, b"UI", b"1.2\x00")
    data = el(0x0008, 0x1115, b"SQ", item(contents))
    with pytest.raises(
        MalformedDatasetError, match=r"\(0008,1150\).* in \(0008,1115\) item 1: comes after \(0008,1155\)"
    ):
        check(data)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00\x00", b"\xe0\x7f\x10\x00OB\x00"])
def test_trailing_bytes(extra: bytes) -> None:
    data = ct_bytes(EXPLICIT)
    with pytest.raises(MalformedDatasetError, match=rf"byte {len(data)}: {len(extra)} trailing bytes do not form"):
        check(data + extra)


@pytest.mark.parametrize(
    ("make", "ts"),
    [
        (lambda: ct_bytes(EXPLICIT)[:-4000], EXPLICIT),
        (lambda: ct_bytes(EXPLICIT), IMPLICIT),
        (lambda: ct_bytes(EXPLICIT)[:-4000], IMPLICIT),
        (lambda: ct_bytes(EXPLICIT), DEFLATED),
        (lambda: ct_bytes(DEFLATED)[:-4000], DEFLATED),
        (lambda: deflate(ct_bytes(EXPLICIT)[:-4000]), DEFLATED),
        (lambda: el(0x0002, 0x0010, b"UI", b"1.2\x00"), EXPLICIT),
    ],
    ids=["truncated", "mismatch", "truncated-mismatch", "not-deflated", "cut-stream", "deflated-truncated", "meta"],
)
def test_a_refused_dataset_keeps_no_view_of_the_received_buffer(make: Callable[[], bytes], ts: str) -> None:
    """The SCP's receive buffer must be free again once the error is handled, without waiting for gc."""
    buffer = io.BytesIO(make())
    gc.disable()
    try:
        with buffer.getbuffer() as view:
            try:
                check(view, ts)
            except MalformedDatasetError as exc:
                assert str(exc)
            else:
                pytest.fail("the dataset was not refused")
        buffer.seek(0, io.SEEK_END)
        buffer.write(b"grows")  # a BytesIO cannot grow while a view of its buffer lives
    finally:
        gc.enable()


def test_empty_dataset() -> None:
    with pytest.raises(MalformedDatasetError, match="empty"):
        check(b"")


def test_unknown_transfer_syntax() -> None:
    with pytest.raises(UnsupportedTransferSyntaxError) as caught:
        check(ct_bytes(EXPLICIT), "1.2.3.4.5")
    assert isinstance(caught.value, UnreadableInstanceError)
    assert not isinstance(caught.value, MalformedDatasetError)


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("MR_truncated.dcm", MalformedDatasetError, r"\(7FE0,0010\).*runs past the end of the data"),
        ("rtplan_truncated.dcm", MalformedDatasetError, r"\(300A,00B0\) Beam Sequence.*runs past the end"),
        ("MR_small_padded.dcm", MalformedDatasetError, r"\(7FE0,0010\).*8320 bytes.*need 8192"),
        ("SC_rgb_jpeg.dcm", TransferSyntaxMismatchError, "encoded in Implicit VR Little Endian"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", MalformedDatasetError, r"\(7FE0,0010\).*not closed"),
    ],
)
def test_broken_example_files_are_refused(name: str, error: type[MalformedDatasetError], message: str) -> None:
    data, ts = file_dataset(example_file(name))
    with pytest.raises(error, match=message) as caught:
        check(data, ts)
    assert type(caught.value) is error


def test_examples_datasets_pass_in_every_native_syntax() -> None:
    for ds in (examples.ct, examples.mr, examples.rgb_color, examples.rt_plan):
        for ts in NATIVE_SYNTAXES:
            summary = check(encode(ds, ts), ts)
            assert summary.elements == count_elements(ds), (ds.SOPClassUID, ts)
