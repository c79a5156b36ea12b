"""Structural check of a received dataset, before pacsnode acknowledges a C-STORE.

The C-STORE SCP receives the dataset exactly as the peer encoded it in the negotiated
transfer syntax, without File Meta Information, and stores it behind its own header.
Only a whole, consistent instance may be acknowledged with Success, so before that the
SCP calls :func:`check_dataset`, which walks every element of the encoded dataset:

* every value length must fit in the bytes received (and in its enclosing item or sequence);
* sequences and items must be closed exactly: defined lengths end exactly where declared,
  undefined lengths end with their delimitation items, only items appear in a sequence;
* elements of one dataset or item must be in ascending tag order (PS3.5 7.1);
* group 0002 (File Meta Information) must not appear in the dataset;
* encapsulated Pixel Data must be a Basic Offset Table item, then at least one fragment
  of even length, then a sequence delimiter; native Pixel Data must have the length that
  Rows, Columns, Samples per Pixel, Bits Allocated and Number of Frames give;
* a Deflated dataset is inflated in steps, never past ``max_inflated_bytes``.

The walk reads element headers only: values are skipped by offset and never copied,
except the few small top-level values that size the pixel data. No pixel data is decoded.
A failure raises a :class:`MalformedDatasetError` (an ``UnreadableInstanceError``) whose
message names what is wrong, the element as ``(gggg,eeee)`` and the byte offset; when the
bytes read cleanly in another encoding than the negotiated one, the error is a
:class:`TransferSyntaxMismatchError` that says which.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from pydicom._dicom_dict import DicomDictionary, RepeatersDictionary
from pydicom.datadict import dictionary_description, dictionary_VR

from pacsnode.storage.errors import UnreadableInstanceError

__all__ = [
    "InflationLimitError",
    "MalformedDatasetError",
    "MetaInDatasetError",
    "PixelDataKind",
    "TransferSyntaxMismatchError",
    "UnsupportedTransferSyntaxError",
    "WireSummary",
    "check_dataset",
    "MAX_DEPTH",
]

#: Sequences nested deeper than this are refused (a recursion bomb costs nothing to send).
MAX_DEPTH: Final = 64

PixelDataKind = Literal["none", "native", "encapsulated"]


class MalformedDatasetError(UnreadableInstanceError):
    """The received bytes are not a whole, consistently encoded dataset.

    ``tag`` (an int such as ``0x7FE00010``) and ``offset`` (bytes from the start of the
    dataset as walked: the inflated bytes for a deflated syntax) locate the fault when known.
    """

    def __init__(self, message: str, *, tag: int | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.tag = tag
        self.offset = offset


class MetaInDatasetError(MalformedDatasetError):
    """The dataset holds File Meta Information (group 0002), which belongs to the file only."""


class TransferSyntaxMismatchError(MalformedDatasetError):
    """The bytes are not encoded in the negotiated transfer syntax (but may be in another)."""


class InflationLimitError(MalformedDatasetError):
    """A deflated dataset inflates to more than the allowed number of bytes."""


class UnsupportedTransferSyntaxError(UnreadableInstanceError):
    """The transfer syntax is not one whose encoding pacsnode knows, so it cannot be checked."""


@dataclass(frozen=True, slots=True)
class WireSummary:
    """What the walk of a well-formed dataset found.

    Offsets count from the first byte of the dataset as walked: for a deflated transfer
    syntax, the inflated bytes (``inflated_length`` of them).
    """

    #: The transfer syntax the dataset was checked against.
    transfer_syntax_uid: str
    #: Bytes received.
    encoded_length: int
    #: Bytes walked: ``encoded_length``, or the inflated length of a deflated dataset.
    inflated_length: int
    #: Data elements at every nesting level (items, delimiters and fragments not counted).
    elements: int
    #: Data elements of the dataset itself, outside any sequence.
    top_level_elements: int
    #: Sequence items at every nesting level.
    items: int
    #: Deepest nesting of sequences (0: none).
    max_depth: int
    #: Top-level Pixel Data (7FE0,0010), else Float or Double Float Pixel Data: absent,
    #: native or encapsulated.
    pixel_data: PixelDataKind
    #: Offset of the Pixel Data element's header (its tag), or None without Pixel Data; a
    #: reader that needs no pixels can stop there.
    pixel_data_offset: int | None
    #: Value length of native Pixel Data; None when encapsulated (undefined length) or absent.
    pixel_data_length: int | None
    #: Frames: Number of Frames (1 when absent) when Pixel Data is present, checked against
    #: the native length or against the fragments and offset tables; 0 without Pixel Data.
    frames: int
    #: Fragments of encapsulated Pixel Data (the Basic Offset Table item not counted).
    fragments: int
    #: The data elements of the dataset itself (outside any sequence), in order: (offset of the
    #: element's header, tag, offset of its value, value length (0xFFFFFFFF: undefined), explicit VR
    #: code, b"" under implicit VR). An element ends where the next begins.
    top_level_headers: list[tuple[int, int, int, int, bytes]] = field(default_factory=list)


# --- transfer syntaxes ------------------------------------------------------------------

_IMPLICIT_LE: Final = 0
_EXPLICIT_LE: Final = 1
_EXPLICIT_BE: Final = 2
_ENCODING_NAMES: Final = {
    _IMPLICIT_LE: "Implicit VR Little Endian",
    _EXPLICIT_LE: "Explicit VR Little Endian",
    _EXPLICIT_BE: "Explicit VR Big Endian",
}

# How Pixel Data (7FE0,0010) may be encoded: native (defined length), encapsulated
# (undefined length) or, when only the structure is of interest, either.
_NATIVE: Final = 0
_ENCAPSULATED: Final = 1
_EITHER: Final = 2

_IMPLICIT_VR_LE_UID: Final = "1.2.840.10008.1.2"
_EXPLICIT_VR_LE_UID: Final = "1.2.840.10008.1.2.1"
_EXPLICIT_VR_BE_UID: Final = "1.2.840.10008.1.2.2"
_DEFLATED_UIDS: Final = frozenset(
    {
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
        "1.2.840.10008.1.2.4.205",  # JPIP HTJ2K Referenced Deflate
    }
)
_STANDARD_TS_PREFIX: Final = "1.2.840.10008.1.2."


def _syntax(transfer_syntax_uid: str) -> tuple[int, int, bool]:
    """(encoding, pixel data encoding, deflated) of a transfer syntax."""
    if transfer_syntax_uid == _IMPLICIT_VR_LE_UID:
        return _IMPLICIT_LE, _NATIVE, False
    if transfer_syntax_uid == _EXPLICIT_VR_LE_UID:
        return _EXPLICIT_LE, _NATIVE, False
    if transfer_syntax_uid == _EXPLICIT_VR_BE_UID:
        return _EXPLICIT_BE, _NATIVE, False
    if transfer_syntax_uid == "1.2.840.10008.1.2.1.99":
        return _EXPLICIT_LE, _NATIVE, True
    if transfer_syntax_uid in _DEFLATED_UIDS:
        return _EXPLICIT_LE, _ENCAPSULATED, True
    if transfer_syntax_uid.startswith(_STANDARD_TS_PREFIX):
        # Every other standard transfer syntax (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE, MPEG,
        # HEVC, JPIP, SMPTE ST 2110, encapsulated uncompressed, deflated image frames) is
        # explicit VR little endian with encapsulated pixel data.
        return _EXPLICIT_LE, _ENCAPSULATED, False
    raise UnsupportedTransferSyntaxError(
        f"transfer syntax {transfer_syntax_uid[:64]!r} is not a standard one; its encoding cannot be checked"
    )


# --- encoding constants -----------------------------------------------------------------

# Explicit VR codes: True for those with a 2-byte reserved field and a 4-byte length.
_VR_LONG: Final[dict[bytes, bool]] = {
    **{vr: False for vr in (b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO")},
    **{vr: False for vr in (b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US")},
    **{vr: True for vr in (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR")},
    **{vr: True for vr in (b"UT", b"UV")},
}

_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_DELIMITER: Final = 0xFFFEE00D
_SEQUENCE_DELIMITER: Final = 0xFFFEE0DD

_SAMPLES_PER_PIXEL: Final = 0x00280002
_PHOTOMETRIC: Final = 0x00280004
_NUMBER_OF_FRAMES: Final = 0x00280008
_ROWS: Final = 0x00280010
_COLUMNS: Final = 0x00280011
_BITS_ALLOCATED: Final = 0x00280100
_EXTENDED_OFFSET_TABLE: Final = 0x7FE00001
_EXTENDED_OFFSET_TABLE_LENGTHS: Final = 0x7FE00002
_FLOAT_PIXEL_DATA: Final = 0x7FE00008
_DOUBLE_FLOAT_PIXEL_DATA: Final = 0x7FE00009
_PIXEL_DATA: Final = 0x7FE00010
_PIXEL_TAGS: Final = frozenset({_FLOAT_PIXEL_DATA, _DOUBLE_FLOAT_PIXEL_DATA, _PIXEL_DATA})

#: Top-level elements whose (small) values the pixel data checks decode.
_RECORDED: Final = frozenset(
    {
        _SAMPLES_PER_PIXEL,
        _PHOTOMETRIC,
        _NUMBER_OF_FRAMES,
        _ROWS,
        _COLUMNS,
        _BITS_ALLOCATED,
        _EXTENDED_OFFSET_TABLE,
        _EXTENDED_OFFSET_TABLE_LENGTHS,
    }
)

#: Public tags the data dictionary gives VR SQ: how implicit VR tells a defined-length sequence.
_SQ_TAGS: Final = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
#: Repeating-group tags (such as 50xx,2600) with VR SQ, as (mask, value): ``tag & mask == value``.
_SQ_REPEATERS: Final = tuple(
    (int("".join("0" if c == "x" else "F" for c in mask), 16), int(mask.replace("x", "0"), 16))
    for mask, entry in RepeatersDictionary.items()
    if entry[0] == "SQ"
)

_LE_HEADER: Final = struct.Struct("<HHI")
_BE_HEADER: Final = struct.Struct(">HHI")
_LE_EXPLICIT: Final = struct.Struct("<HH2sH")
_BE_EXPLICIT: Final = struct.Struct(">HH2sH")
_LE_U32: Final = struct.Struct("<I")
_BE_U32: Final = struct.Struct(">I")

_TOP: Final = 0
_ITEM_FRAME: Final = 1
_SEQUENCE: Final = 2

#: Compressed bytes handed to the inflater at a time, so that its unconsumed input stays small.
_INFLATE_INPUT_STEP: Final = 1 << 20
#: Inflated bytes taken from the inflater at a time, so that the output never far exceeds the cap.
_INFLATE_OUTPUT_STEP: Final = 4 << 20


def _implicit_sq(tag: int) -> bool:
    """Implicit VR, defined length: whether the data dictionary makes the element a sequence."""
    if tag in _SQ_TAGS:
        return True
    for mask, value in _SQ_REPEATERS:
        if tag & mask == value:
            return True
    return False


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _describe(tag: int) -> str:
    """``(gggg,eeee) Name`` for messages."""
    text = _tag_text(tag)
    if tag >> 16 == 0xFFFE:
        name = {_ITEM: "Item", _ITEM_DELIMITER: "Item Delimitation Item", _SEQUENCE_DELIMITER: "Sequence Delimiter"}
        return f"{text} {name[tag]}" if tag in name else text
    if (tag >> 16) & 1:
        return f"{text} (private)"
    try:
        return f"{text} {dictionary_description(tag)}"
    except KeyError:
        return text


# --- the walk ---------------------------------------------------------------------------


class _Frame:
    """An open container: the dataset itself, an item, or a sequence."""

    __slots__ = ("kind", "tag", "start", "end", "limit", "encoding", "last_tag", "items")

    def __init__(self, kind: int, tag: int, start: int, end: int, limit: int, encoding: int) -> None:
        self.kind = kind
        self.tag = tag  # the sequence's tag; for an item, its sequence's tag
        self.start = start  # offset of the container's header
        self.end = end  # first byte after a defined-length container; -1 when undefined
        self.limit = limit  # bytes the contents may use: the end, else the enclosing limit
        self.encoding = encoding
        self.last_tag = -1  # datasets and items: the previous element's tag
        self.items = 0  # sequences: items opened so far


class _Walker:
    def __init__(self, buf: memoryview | bytearray, encoding: int, pixels: int, transfer_syntax_uid: str) -> None:
        self.buf = buf
        self.n = len(buf)
        self.encoding = encoding
        self.pixels = pixels
        self.transfer_syntax_uid = transfer_syntax_uid
        self.stack = [_Frame(_TOP, 0, 0, self.n, self.n, encoding)]
        self.depth = 0
        self.max_depth = 0
        self.elements = 0
        self.top_level = 0
        self.top_headers: list[tuple[int, int, int, int, bytes]] = []
        self.items = 0
        self.recorded: dict[int, tuple[int, int]] = {}
        self.pixel_kind: PixelDataKind = "none"
        self.pixel_tag = 0
        self.pixel_offset: int | None = None
        self.pixel_length: int | None = None
        self.fragments = 0
        self.offset_table_entries = 0  # frames the Basic or Extended Offset Table lists

    # -- errors --

    def _where(self) -> str:
        parts = []
        stack = self.stack
        for index, frame in enumerate(stack):
            if frame.kind == _SEQUENCE:
                inside_item = index + 1 < len(stack)
                parts.append(f"{_tag_text(frame.tag)} item {frame.items}" if inside_item else _tag_text(frame.tag))
        return f" in {' > '.join(parts)}" if parts else ""

    def fail(
        self,
        what: str,
        offset: int,
        tag: int | None = None,
        cls: type[MalformedDatasetError] = MalformedDatasetError,
    ) -> MalformedDatasetError:
        """The error for a fault at ``offset``, in element ``tag`` if given, else in the open container."""
        subject = f"{_describe(tag)} at byte {offset}" if tag is not None else f"byte {offset}"
        if tag is None and len(self.stack) > 1:
            tag = self.stack[-1].tag
        return cls(f"{subject}{self._where()}: {what}", tag=tag, offset=offset)

    def _too_long(self, tag: int, offset: int, value_at: int, length: int, frame: _Frame) -> MalformedDatasetError:
        if frame.limit == self.n:
            return self.fail(
                f"value length {length} runs past the end of the data ({self.n - value_at} bytes left)",
                offset,
                tag,
            )
        return self.fail(
            f"value length {length} runs past the end of the enclosing item or sequence "
            f"({frame.limit - value_at} bytes left in it)",
            offset,
            tag,
        )

    def _short_header(self, pos: int, frame: _Frame) -> MalformedDatasetError:
        left = frame.limit - pos
        if frame.kind == _TOP:
            return self.fail(f"{left} trailing bytes do not form a whole element header", pos)
        if frame.end < 0 and frame.limit == self.n:
            closer = "Item Delimitation Item" if frame.kind == _ITEM_FRAME else "Sequence Delimiter"
            kind = "item" if frame.kind == _ITEM_FRAME else "sequence"
            return self.fail(
                f"the data ends inside the undefined-length {kind} opened at byte {frame.start}: no {closer} closes it",
                pos,
            )
        return self.fail(
            f"{left} bytes left before the end of the enclosing item or sequence do not form a whole header",
            pos,
        )

    # -- the walk --

    def run(self) -> None:
        buf = self.buf
        stack = self.stack
        frame = stack[-1]
        pos = 0
        if self.n == 0:
            raise self.fail("the dataset is empty", 0)
        while True:
            kind = frame.kind
            if kind == _SEQUENCE:
                if pos == frame.end:
                    stack.pop()
                    self.depth -= 1
                    frame = stack[-1]
                    continue
                if frame.limit - pos < 8:
                    raise self._short_header(pos, frame)
                header = _LE_HEADER if frame.encoding != _EXPLICIT_BE else _BE_HEADER
                group, element, length = header.unpack_from(buf, pos)
                tag = group << 16 | element
                if tag == _ITEM:
                    frame.items += 1
                    self.items += 1
                    if length == _UNDEFINED:
                        item = _Frame(_ITEM_FRAME, frame.tag, pos, -1, frame.limit, frame.encoding)
                    else:
                        if length > frame.limit - pos - 8:
                            raise self._too_long(tag, pos, pos + 8, length, frame)
                        end = pos + 8 + length
                        item = _Frame(_ITEM_FRAME, frame.tag, pos, end, end, frame.encoding)
                    stack.append(item)
                    frame = item
                    pos += 8
                elif tag == _SEQUENCE_DELIMITER:
                    if frame.end >= 0:
                        raise self.fail("a Sequence Delimiter inside a defined-length sequence", pos, tag)
                    if length:
                        raise self.fail(f"a Sequence Delimiter must have length 0, not {length}", pos, tag)
                    stack.pop()
                    self.depth -= 1
                    frame = stack[-1]
                    pos += 8
                elif tag == _ITEM_DELIMITER:
                    raise self.fail("an Item Delimitation Item where no item is open", pos, tag)
                else:
                    raise self.fail(
                        f"found inside sequence {_tag_text(frame.tag)}, where only items (FFFE,E000) may appear",
                        pos,
                        tag,
                    )
                continue

            # A dataset: the top level or an item's.
            if pos == frame.end:
                if kind == _TOP:
                    return
                stack.pop()
                frame = stack[-1]
                continue
            if frame.limit - pos < 8:
                raise self._short_header(pos, frame)
            encoding = frame.encoding
            vr = b""
            if encoding == _IMPLICIT_LE:
                group, element, length = _LE_HEADER.unpack_from(buf, pos)
                header_length = 8
            else:
                big = encoding == _EXPLICIT_BE
                group, element, vr, length = (_BE_EXPLICIT if big else _LE_EXPLICIT).unpack_from(buf, pos)
                header_length = 8
                if group == 0xFFFE:
                    (length,) = (_BE_U32 if big else _LE_U32).unpack_from(buf, pos + 4)
                else:
                    long = _VR_LONG.get(vr)
                    if long is None:
                        raise self.fail(
                            f"{bytes(vr)!r} is not a VR code; the bytes are not {_ENCODING_NAMES[encoding]}",
                            pos,
                            group << 16 | element,
                        )
                    if long:
                        if frame.limit - pos < 12:
                            raise self._short_header(pos, frame)
                        (length,) = (_BE_U32 if big else _LE_U32).unpack_from(buf, pos + 8)
                        header_length = 12
            tag = group << 16 | element

            if group == 0xFFFE:
                if tag == _ITEM_DELIMITER and kind == _ITEM_FRAME and frame.end < 0:
                    if length:
                        raise self.fail(f"an Item Delimitation Item must have length 0, not {length}", pos, tag)
                    stack.pop()
                    frame = stack[-1]
                    pos += 8
                    continue
                if tag == _SEQUENCE_DELIMITER and kind == _ITEM_FRAME and frame.end < 0:
                    raise self.fail(
                        f"the undefined-length item opened at byte {frame.start} is not closed: "
                        "a Sequence Delimiter comes before its Item Delimitation Item",
                        pos,
                        tag,
                    )
                if tag == _ITEM_DELIMITER:
                    where = "a defined-length item" if kind == _ITEM_FRAME else "the top level"
                    raise self.fail(
                        f"an Item Delimitation Item in {where}, where no undefined-length item is open", pos, tag
                    )
                if tag == _SEQUENCE_DELIMITER:
                    raise self.fail("a Sequence Delimiter where no undefined-length sequence is open", pos, tag)
                if tag == _ITEM:
                    raise self.fail("an item outside any sequence, where a data element is expected", pos, tag)
                raise self.fail("group FFFE holds only items and delimiters, not data elements", pos, tag)

            if group == 0x0002:
                raise self.fail(
                    "File Meta Information (group 0002) in the dataset; it belongs to the file header only",
                    pos,
                    tag,
                    MetaInDatasetError,
                )
            if tag <= frame.last_tag:
                order = "repeats" if tag == frame.last_tag else "comes after"
                raise self.fail(
                    f"{order} {_tag_text(frame.last_tag)}: elements must be in ascending tag order", pos, tag
                )
            frame.last_tag = tag
            self.elements += 1
            top = kind == _TOP
            value_at = pos + header_length
            if top:
                self.top_level += 1
                self.top_headers.append((pos, tag, value_at, length, vr))

            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and (encoding == _IMPLICIT_LE or vr == b"OB" or vr == b"OW"):
                    if self.pixels == _NATIVE:
                        raise self.fail(
                            "undefined length (encapsulated, compressed pixel data) on transfer syntax "
                            f"{self.transfer_syntax_uid}, which has native pixel data",
                            pos,
                            tag,
                            TransferSyntaxMismatchError,
                        )
                    end = self._fragments(value_at, frame, top)
                    if top:
                        self.pixel_kind = "encapsulated"
                        self.pixel_tag = tag
                        self.pixel_offset = pos
                    pos = end
                    continue
                if vr == b"SQ" or vr == b"UN" or (encoding == _IMPLICIT_LE and self._undefined_is_sequence(tag, pos)):
                    if self.depth == MAX_DEPTH:
                        raise self.fail(f"sequences nested deeper than {MAX_DEPTH} levels", pos, tag)
                    # PS3.5 6.2.2: the contents of a UN value of undefined length are implicit VR little endian.
                    inner = _IMPLICIT_LE if vr == b"UN" else encoding
                    sequence = _Frame(_SEQUENCE, tag, pos, -1, frame.limit, inner)
                    stack.append(sequence)
                    frame = sequence
                    self.depth += 1
                    if self.depth > self.max_depth:
                        self.max_depth = self.depth
                    pos = value_at
                    continue
                raise self.fail(
                    f"undefined length on VR {vr.decode('ascii')}; only SQ, UN and encapsulated Pixel Data may have it",
                    pos,
                    tag,
                )

            if length > frame.limit - value_at:
                raise self._too_long(tag, pos, value_at, length, frame)
            if top and (tag in _RECORDED or tag in _PIXEL_TAGS):
                if tag in _PIXEL_TAGS:
                    if tag == _PIXEL_DATA and self.pixels == _ENCAPSULATED:
                        raise self.fail(
                            f"defined length {length} (native pixel data) on transfer syntax "
                            f"{self.transfer_syntax_uid}, which encapsulates pixel data",
                            pos,
                            tag,
                            TransferSyntaxMismatchError,
                        )
                    if self.pixel_kind == "none" or tag == _PIXEL_DATA:
                        self.pixel_kind = "native"
                        self.pixel_tag = tag
                        self.pixel_offset = pos
                        self.pixel_length = length
                else:
                    self.recorded[tag] = (value_at, length)
            if vr == b"SQ" or (encoding == _IMPLICIT_LE and _implicit_sq(tag)):
                if self.depth == MAX_DEPTH:
                    raise self.fail(f"sequences nested deeper than {MAX_DEPTH} levels", pos, tag)
                end = value_at + length
                sequence = _Frame(_SEQUENCE, tag, pos, end, end, encoding)
                stack.append(sequence)
                frame = sequence
                self.depth += 1
                if self.depth > self.max_depth:
                    self.max_depth = self.depth
                pos = value_at
            else:
                pos = value_at + length

    def _undefined_is_sequence(self, tag: int, pos: int) -> bool:
        """Implicit VR, undefined length: a sequence unless the dictionary says otherwise."""
        if (tag >> 16) & 1:
            return True  # a private element of undefined length is a sequence
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return True
        if vr in ("SQ", "UN"):
            return True
        raise self.fail(f"undefined length on an element whose VR is {vr}", pos, tag)

    def _fragments(self, pos: int, frame: _Frame, top: bool) -> int:
        """Walk encapsulated Pixel Data from the first byte after its header; the offset after it."""
        buf = self.buf
        limit = frame.limit
        header = _LE_HEADER
        if limit - pos < 8:
            raise self.fail("encapsulated Pixel Data ends before its Basic Offset Table item", pos, _PIXEL_DATA)
        group, element, length = header.unpack_from(buf, pos)
        tag = group << 16 | element
        if tag != _ITEM:
            raise self.fail(
                "found where encapsulated Pixel Data must begin with its Basic Offset Table item (FFFE,E000)",
                pos,
                tag,
            )
        if length == _UNDEFINED or length % 4:
            shown = "undefined" if length == _UNDEFINED else str(length)
            raise self.fail(
                f"the Basic Offset Table item has length {shown}; it must be a multiple of 4", pos, _PIXEL_DATA
            )
        if length > limit - pos - 8:
            raise self._too_long(_PIXEL_DATA, pos, pos + 8, length, frame)
        offsets: NDArray[Any] | None = None
        what = "Basic Offset Table"
        if length:
            offsets = np.frombuffer(buf, dtype="<u4", count=length // 4, offset=pos + 8)
        elif top and _EXTENDED_OFFSET_TABLE in self.recorded:
            at, size = self.recorded[_EXTENDED_OFFSET_TABLE]
            if size % 8:
                raise self.fail(
                    f"the Extended Offset Table has length {size}, not a multiple of 8", at, _EXTENDED_OFFSET_TABLE
                )
            lengths = self.recorded.get(_EXTENDED_OFFSET_TABLE_LENGTHS)
            if lengths is not None and lengths[1] != size:
                raise self.fail(
                    f"Extended Offset Table Lengths has {lengths[1] // 8} entries, "
                    f"the Extended Offset Table {size // 8}",
                    lengths[0],
                    _EXTENDED_OFFSET_TABLE_LENGTHS,
                )
            offsets = np.frombuffer(buf, dtype="<u8", count=size // 8, offset=at)
            what = "Extended Offset Table"
        elif top and _EXTENDED_OFFSET_TABLE_LENGTHS in self.recorded:
            raise self.fail(
                "Extended Offset Table Lengths without an Extended Offset Table",
                self.recorded[_EXTENDED_OFFSET_TABLE_LENGTHS][0],
                _EXTENDED_OFFSET_TABLE_LENGTHS,
            )
        if length and top and _EXTENDED_OFFSET_TABLE in self.recorded:
            raise self.fail(
                "both a Basic Offset Table and an Extended Offset Table; the Basic one must then be empty",
                pos,
                _PIXEL_DATA,
            )
        count = 0 if offsets is None else len(offsets)
        if count:
            assert offsets is not None
            if int(offsets[0]) != 0 or (count > 1 and not bool(np.all(offsets[1:] > offsets[:-1]))):
                raise self.fail(f"the {what} offsets do not start at 0 and ascend", pos, _PIXEL_DATA)
        pos += 8 + length
        first = pos
        fragments = 0
        index = 0  # the next offset table entry to meet
        expected = int(offsets[0]) if offsets is not None and count else -1
        while True:
            if limit - pos < 8:
                raise self.fail(
                    f"encapsulated Pixel Data is not closed: the data ends after {fragments} fragments "
                    "without a Sequence Delimiter (FFFE,E0DD)",
                    pos,
                    _PIXEL_DATA,
                )
            group, element, length = header.unpack_from(buf, pos)
            tag = group << 16 | element
            if tag == _ITEM:
                if length == _UNDEFINED:
                    raise self.fail(f"fragment {fragments + 1} of Pixel Data has undefined length", pos, tag)
                if length & 1:
                    raise self.fail(f"fragment {fragments + 1} of Pixel Data has odd length {length}", pos, tag)
                if length > limit - pos - 8:
                    raise self.fail(
                        f"fragment {fragments + 1} of Pixel Data: length {length} runs past the end of the data "
                        f"({limit - pos - 8} bytes left)",
                        pos,
                        tag,
                    )
                relative = pos - first
                if relative == expected:
                    index += 1
                    expected = int(offsets[index]) if offsets is not None and index < count else -1
                elif 0 <= expected < relative:
                    raise self.fail(
                        f"{what} entry {index + 1} ({expected}) does not point at a fragment", pos, _PIXEL_DATA
                    )
                fragments += 1
                pos += 8 + length
            elif tag == _SEQUENCE_DELIMITER:
                if length:
                    raise self.fail(f"a Sequence Delimiter must have length 0, not {length}", pos, tag)
                pos += 8
                break
            else:
                raise self.fail(
                    "found inside encapsulated Pixel Data, where only fragment items (FFFE,E000) "
                    "and a Sequence Delimiter (FFFE,E0DD) may appear",
                    pos,
                    tag,
                )
        if fragments == 0:
            raise self.fail("encapsulated Pixel Data has no fragments", first, _PIXEL_DATA)
        if index < count:
            where = "does not point at a fragment" if expected < pos - 8 - first else "points past the last fragment"
            raise self.fail(f"{what} entry {index + 1} ({expected}) {where}", first, _PIXEL_DATA)
        if top:
            self.fragments = fragments
            self.offset_table_entries = count
        return pos

    # -- pixel data consistency --

    def _unsigned_short(self, tag: int) -> int | None:
        if tag not in self.recorded:
            return None
        at, length = self.recorded[tag]
        if length != 2:
            raise self.fail(f"value length {length}; expected 2 (one US value)", at, tag)
        fmt = ">H" if self.encoding == _EXPLICIT_BE else "<H"
        value: int = struct.unpack_from(fmt, self.buf, at)[0]
        return value

    def _text(self, tag: int) -> str | None:
        if tag not in self.recorded:
            return None
        at, length = self.recorded[tag]
        if length > 64:
            raise self.fail(f"value length {length} is too long for this attribute", at, tag)
        return bytes(self.buf[at : at + length]).decode("ascii", "replace").strip(" \x00")

    def _frames(self) -> int:
        text = self._text(_NUMBER_OF_FRAMES)
        if not text:
            return 1
        frames = int(text) if text.lstrip("+").isdigit() and text.isascii() else -1
        if frames < 0:
            raise self.fail(
                f"Number of Frames {text[:16]!r} is not a count", self.recorded[_NUMBER_OF_FRAMES][0], _NUMBER_OF_FRAMES
            )
        return frames

    def check_pixels(self) -> int:
        """Check top-level pixel data against the image attributes; the number of frames."""
        if self.pixel_kind == "none":
            return 0
        assert self.pixel_offset is not None
        frames = self._frames()
        if self.pixel_kind == "encapsulated":
            if self.offset_table_entries and self.offset_table_entries != frames:
                raise self.fail(
                    f"the offset table lists {self.offset_table_entries} frames but Number of Frames is {frames}",
                    self.pixel_offset,
                    _PIXEL_DATA,
                )
            if self.fragments < frames:
                raise self.fail(
                    f"{self.fragments} fragments cannot hold {frames} frames (a fragment holds one frame at most)",
                    self.pixel_offset,
                    _PIXEL_DATA,
                )
            return frames
        assert self.pixel_length is not None
        values: dict[str, int] = {}
        for name, tag in (
            ("Rows", _ROWS),
            ("Columns", _COLUMNS),
            ("Samples per Pixel", _SAMPLES_PER_PIXEL),
            ("Bits Allocated", _BITS_ALLOCATED),
        ):
            value = self._unsigned_short(tag)
            if value is None:
                raise self.fail(
                    f"native pixel data without {_tag_text(tag)} {name}, so its length cannot be checked",
                    self.pixel_offset,
                    self.pixel_tag,
                )
            values[name] = value
        samples = values["Samples per Pixel"]
        photometric = self._text(_PHOTOMETRIC)
        if self.pixel_tag == _PIXEL_DATA and photometric == "YBR_FULL_422" and samples == 3:
            samples = 2  # two chroma samples are shared by each horizontal pair of pixels
        bits = values["Rows"] * values["Columns"] * samples * values["Bits Allocated"] * frames
        expected = (bits + 7) // 8
        length = self.pixel_length
        if length != expected and not (expected % 2 and length == expected + 1):
            raise self.fail(
                f"native pixel data of {length} bytes, but {values['Rows']} rows x {values['Columns']} columns x "
                f"{samples} samples x {values['Bits Allocated']} bits x {frames} frames need {expected}",
                self.pixel_offset,
                self.pixel_tag,
            )
        return frames


# --- inflation --------------------------------------------------------------------------


def _inflate(data: memoryview, cap: int) -> bytearray:
    """Inflate a raw deflate stream, refusing as soon as the output would exceed ``cap`` bytes."""
    inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
    out = bytearray()
    consumed = 0
    try:
        for start in range(0, len(data), _INFLATE_INPUT_STEP):
            chunk: bytes | memoryview = data[start : start + _INFLATE_INPUT_STEP]
            while True:
                piece = inflater.decompress(chunk, min(cap - len(out) + 1, _INFLATE_OUTPUT_STEP))
                out += piece
                if len(out) > cap:
                    raise InflationLimitError(
                        f"the deflated dataset inflates to more than {cap} bytes "
                        f"(refused after {start + len(chunk) - len(inflater.unconsumed_tail)} compressed bytes)"
                    )
                chunk = inflater.unconsumed_tail
                if inflater.eof or (not chunk and len(piece) < _INFLATE_OUTPUT_STEP):
                    break  # else more output is pending, or more of this chunk's input
            consumed = start + _INFLATE_INPUT_STEP
            if inflater.eof:
                break
    except zlib.error as exc:
        raise MalformedDatasetError(f"the deflated dataset cannot be inflated: {exc}") from exc
    if not inflater.eof:
        raise MalformedDatasetError(
            f"the deflated dataset is cut short: the deflate stream does not end ({len(out)} bytes inflated)"
        )
    unused = inflater.unused_data
    tail_length = len(unused) + max(len(data) - consumed, 0)
    if tail_length:
        # One padding byte 00 may make the length even. Some writers end the stream with a
        # gzip-style trailer instead, CRC-32 and length of the inflated bytes; it is accepted
        # only when it matches them exactly.
        trailing = bytes(unused) + bytes(data[consumed:]) if tail_length <= 9 else b""
        trailer = struct.pack("<II", zlib.crc32(out), len(out) & 0xFFFFFFFF) if tail_length >= 8 else b""
        if trailing not in (b"\x00", trailer, trailer + b"\x00") or not trailing:
            raise MalformedDatasetError(
                f"{tail_length} bytes follow the end of the deflate stream; only one padding byte 00 may"
            )
    return out


# --- the check --------------------------------------------------------------------------


class _Reading:
    """One walk of the bytes in one encoding: the walker, and the fault that stopped it, if any."""

    __slots__ = ("walker", "frames", "error")

    def __init__(self, buf: memoryview | bytearray, encoding: int, pixels: int, transfer_syntax_uid: str) -> None:
        self.walker = _Walker(buf, encoding, pixels, transfer_syntax_uid)
        self.frames = 0
        self.error: MalformedDatasetError | None = None
        try:
            self.walker.run()
            self.frames = self.walker.check_pixels()
        except MalformedDatasetError as exc:
            self.error = _detached(exc)


#: Another reading explains the bytes better than the negotiated one when it walks at least
#: this many elements, and this many times as many as the negotiated reading did.
_MISMATCH_MIN_ELEMENTS: Final = 8
_MISMATCH_FACTOR: Final = 4


def _mismatch(
    buf: memoryview | bytearray,
    encoding: int,
    transfer_syntax_uid: str,
    failed: MalformedDatasetError,
    walked: int,
    deflated: bool,
    *,
    inflated: bool = True,
) -> TransferSyntaxMismatchError | None:
    """The error to raise when the bytes read (far) better in another encoding than the negotiated one.

    ``failed`` is the negotiated reading's fault, after ``walked`` elements. ``inflated`` is
    False when the bytes of a deflated syntax could not be inflated: they may then be in the
    negotiated encoding, sent without deflating.
    """
    expected = f"deflated {_ENCODING_NAMES[encoding]}" if deflated else _ENCODING_NAMES[encoding]
    negotiated = f"the negotiated transfer syntax {transfer_syntax_uid} ({expected})"
    plain = "" if inflated else ", not deflated"
    best: tuple[int, _Reading] | None = None
    for other in (_EXPLICIT_LE, _IMPLICIT_LE, _EXPLICIT_BE):
        if other == encoding and inflated:
            continue
        reading = _Reading(buf, other, _EITHER, transfer_syntax_uid)
        if reading.error is None:
            return TransferSyntaxMismatchError(
                f"the dataset is encoded in {_ENCODING_NAMES[other]}{plain}, not in {negotiated}; "
                f"read as negotiated: {failed}",
                tag=failed.tag,
                offset=failed.offset,
            )
        elements = reading.walker.elements
        if elements >= _MISMATCH_MIN_ELEMENTS and elements >= _MISMATCH_FACTOR * max(walked, 1):
            if best is None or elements > best[1].walker.elements:
                best = (other, reading)
    if best is None:
        return None
    other, reading = best
    assert reading.error is not None
    return TransferSyntaxMismatchError(
        f"the dataset reads as {_ENCODING_NAMES[other]}{plain} ({reading.walker.elements} elements), "
        f"not as {negotiated} "
        f"({walked} elements), and is malformed even so: {reading.error}",
        tag=reading.error.tag,
        offset=reading.error.offset,
    )


def check_dataset(
    data: bytes | bytearray | memoryview, transfer_syntax_uid: str, *, max_inflated_bytes: int
) -> WireSummary:
    """Walk a received dataset, encoded in ``transfer_syntax_uid`` without File Meta, end to end.

    Parameters
    ----------
    data
        The dataset bytes as received (no preamble, no File Meta Information).
    transfer_syntax_uid
        The presentation context's transfer syntax.
    max_inflated_bytes
        For a deflated transfer syntax, the most bytes the dataset may inflate to.

    Returns
    -------
    WireSummary
        Counts and the pixel data's kind and position.

    Raises
    ------
    MalformedDatasetError
        The bytes are not a whole, consistent dataset; the subclasses
        :class:`MetaInDatasetError`, :class:`TransferSyntaxMismatchError` and
        :class:`InflationLimitError` name particular faults.
    UnsupportedTransferSyntaxError
        ``transfer_syntax_uid`` is not a standard transfer syntax.
    """
    uid = transfer_syntax_uid.strip(" \x00")
    encoding, pixels, deflated = _syntax(uid)
    outcome = _check(data, uid, encoding, pixels, deflated, max_inflated_bytes)
    if isinstance(outcome, WireSummary):
        return outcome
    # Raised from here with no reference left to the received bytes: the error and its
    # traceback must not keep a view of the caller's buffer (or the inflated bytes) alive.
    del data
    try:
        raise outcome
    finally:
        del outcome


def _detached(error: MalformedDatasetError) -> MalformedDatasetError:
    """``error`` without its traceback and chained exceptions, which would keep the walk's frames alive."""
    error.__traceback__ = None
    error.__cause__ = None
    error.__context__ = None
    return error


def _check(
    data: bytes | bytearray | memoryview, uid: str, encoding: int, pixels: int, deflated: bool, cap: int
) -> WireSummary | MalformedDatasetError:
    """The summary of a well-formed dataset, else the error to raise (detached from any frame)."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    buf: memoryview | bytearray = view
    if deflated:
        try:
            buf = _inflate(view, cap)
        except InflationLimitError as exc:
            return _detached(exc)
        except MalformedDatasetError as exc:
            # Perhaps the peer did not deflate at all.
            mismatch = _mismatch(view, encoding, uid, exc, 0, True, inflated=False) if len(view) else None
            return _detached(mismatch if mismatch is not None else exc)
    reading = _Reading(buf, encoding, pixels, uid)
    failed = reading.error
    if failed is not None:
        if isinstance(failed, MetaInDatasetError | TransferSyntaxMismatchError):
            return failed
        if len(buf) >= 132 and bytes(buf[128:132]) == b"DICM":
            return MetaInDatasetError(
                "the bytes start with a 128-byte preamble and 'DICM': a DICOM file, File Meta Information "
                "included, was sent where a dataset belongs",
                offset=128,
            )
        mismatch = _mismatch(buf, encoding, uid, failed, reading.walker.elements, deflated)
        return mismatch if mismatch is not None else failed
    walker = reading.walker
    return WireSummary(
        transfer_syntax_uid=uid,
        encoded_length=len(view),
        inflated_length=len(buf),
        elements=walker.elements,
        top_level_elements=walker.top_level,
        items=walker.items,
        max_depth=walker.max_depth,
        pixel_data=walker.pixel_kind,
        pixel_data_offset=walker.pixel_offset,
        pixel_data_length=walker.pixel_length,
        frames=reading.frames,
        fragments=walker.fragments,
        top_level_headers=walker.top_headers,
    )
