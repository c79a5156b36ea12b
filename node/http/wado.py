"""WADO-RS (PS3.18 10.4): stored instances as multipart/related, metadata, frames, rendered images.

Instances are streamed from the stored files in 1 MiB pieces, as stored unless the client's Accept
names another transfer syntax: then an uncompressed one is decoded with pydicom (the pylibjpeg
plugins), the same conversion C-MOVE/C-GET use; anything else is 406 Not Acceptable.
"""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
    "AcceptedDicom",
    "NotAcceptableError",
    "dicom_parts",
    "frame_parts",
    "metadata_json",
    "multipart_stream",
    "negotiate_dicom",
    "negotiate_frames",
    "negotiate_image",
    "render",
]

_CHUNK = 1 << 20
_BLOCK = 4 << 20  # what one send of a multipart body gathers
_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_BULK_THRESHOLD = 1024  # binary values longer than this are given as a BulkDataURI
_PIXEL_TAGS = ("7FE00010", "7FE00008", "7FE00009")  # Pixel Data, Float and Double Float Pixel Data
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


class NotAcceptableError(ValueError):
    """No representation the client accepts can be produced (406)."""


@dataclass(frozen=True)
class AcceptedDicom:
    """What a retrieve of instances will send: ``None`` = each instance as stored."""

    transfer_syntax_uid: str | None


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    """The Accept header as (media type, parameters) pairs, in the order given (quality ignored)."""
    ranges: list[tuple[str, dict[str, str]]] = []
    for item in _split_outside_quotes(accept, ","):
        parts = _split_outside_quotes(item, ";")
        media = parts[0].strip().lower()
        if not media:
            continue
        params: dict[str, str] = {}
        for part in parts[1:]:
            key, _, value = part.partition("=")
            params[key.strip().lower()] = value.strip().strip('"')
        ranges.append((media, params))
    return ranges


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


def negotiate_dicom(accept: str) -> AcceptedDicom:
    """The transfer syntax a study/series/instance retrieve answers in, from its Accept header.

    No transfer-syntax parameter, or ``*``: as stored. An explicit one: that syntax (an
    uncompressed one is produced from any stored syntax pydicom can decode).
    """
    ranges = _media_ranges(accept) or [("*/*", {})]
    wanted: list[str | None] = []
    for media, params in ranges:
        inner = params.get("type", "").lower()
        if media in ("*/*", "multipart/*", "application/dicom") or (
            media == "multipart/related" and inner in ("", "application/dicom", "*/*", "application/*")
        ):
            syntax = params.get("transfer-syntax")
            wanted.append(None if syntax in (None, "", "*") else syntax)
    if not wanted:
        raise NotAcceptableError(f"cannot answer {accept!r}: instances are sent as multipart/related application/dicom")
    if None in wanted:
        return AcceptedDicom(None)
    for syntax in wanted:
        if syntax in _UNCOMPRESSED:
            return AcceptedDicom(syntax)
    return AcceptedDicom(wanted[0])  # only the stored syntax can satisfy it: decided per instance


def multipart_stream(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """A multipart/related body: each part's Content-Type and bytes, then the closing delimiter.

    Small pieces are gathered into blocks of about 4 MiB: each block the server sends costs a
    hop between threads, so a study of small instances must not cost one per instance.
    """
    block = bytearray()
    for content_type, body in parts:
        block += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")
        for chunk in body:
            block += chunk
            if len(block) >= _BLOCK:
                yield bytes(block)
                block.clear()
        block += b"\r\n"
    block += f"--{boundary}--\r\n".encode("ascii")
    yield bytes(block)


def stored_length(files: list[tuple[Path, str]], boundary: str) -> int:
    """The byte length of :func:`multipart_stream` over files sent as stored (for Content-Length)."""
    total = len(f"--{boundary}--\r\n")
    for path, stored in files:
        head = f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={stored}\r\n\r\n"
        total += len(head) + path.stat().st_size + 2
    return total


def new_boundary() -> str:
    return "pacsnode-" + secrets.token_hex(16)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk


def _transcoded(path: Path, syntax: str) -> bytes:
    ds = dcmread(path)
    stored = ds.file_meta.TransferSyntaxUID
    if stored.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return out.getvalue()


def dicom_parts(files: list[tuple[Path, str]], accepted: AcceptedDicom) -> Iterator[tuple[str, Iterable[bytes]]]:
    """The parts of an instance retrieve: (Content-Type, bytes) per stored (path, transfer syntax)."""
    for path, stored in files:
        target = accepted.transfer_syntax_uid
        if target is None or target == stored:
            yield f"application/dicom; transfer-syntax={stored}", _file_chunks(path)
        else:
            yield f"application/dicom; transfer-syntax={target}", (_transcoded(path, target),)


def check_transcodable(stored_syntaxes: Iterable[str], accepted: AcceptedDicom) -> None:
    """Raise :class:`NotAcceptableError` when an instance cannot be sent in the accepted syntax."""
    target = accepted.transfer_syntax_uid
    if target is None:
        return
    for stored in stored_syntaxes:
        if stored == target:
            continue
        if target not in _UNCOMPRESSED:
            raise NotAcceptableError(f"instances stored as {stored} cannot be sent as {target}")
        if UID(stored).is_compressed and not _can_decode(stored):
            raise NotAcceptableError(f"no decoder for {stored}")


def _can_decode(syntax: str) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    try:
        return bool(get_decoder(UID(syntax)).is_available)
    except NotImplementedError:
        return False


# -- metadata ----------------------------------------------------------------------------------


def metadata_json(path: Path, root: str) -> dict[str, Any]:
    """An instance's header as DICOM JSON; long binary values become BulkDataURIs under the DICOMweb ``root``."""
    ds = dcmread(path, defer_size=_BULK_THRESHOLD)
    instance_url = (
        f"{root}/studies/{ds.get('StudyInstanceUID', '')}/series/{ds.get('SeriesInstanceUID', '')}"
        f"/instances/{ds.get('SOPInstanceUID', '')}"
    )

    def bulk(element: DataElement) -> str:
        return f"{instance_url}/bulkdata/{element.tag:08X}"

    document: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=_BULK_THRESHOLD, bulk_data_element_handler=bulk)
    for tag in _PIXEL_TAGS:  # pixel data is never inline in metadata (PS3.18 F.2), however small
        element = document.get(tag)
        if element is not None and "InlineBinary" in element:
            del element["InlineBinary"]
            element["BulkDataURI"] = f"{instance_url}/bulkdata/{tag}"
    return document


def bulkdata(path: Path, tag: int) -> bytes | None:
    """The value of one top-level binary element, or None when the instance has none there."""
    ds = dcmread(path)
    element = ds.get(tag)
    if element is None or element.VR not in _BINARY_VRS:
        return None
    value = element.value
    return bytes(value) if value is not None else b""


# -- frames ------------------------------------------------------------------------------------


def parse_frame_list(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5]; frame numbers start at 1."""
    if not re.fullmatch(r"\d{1,9}(,\d{1,9})*", text):
        raise ValueError(f"frame list {text[:64]!r} is not a comma-separated list of numbers")
    numbers = [int(part) for part in text.split(",")]
    if any(n < 1 for n in numbers):
        raise ValueError("frame numbers start at 1")
    return numbers


def negotiate_frames(accept: str, stored: str) -> str | None:
    """``None``: raw (uncompressed) frames as application/octet-stream; else the stored syntax's bytes."""
    for media, params in _media_ranges(accept) or [("*/*", {})]:
        inner = params.get("type", "").lower() if media == "multipart/related" else media
        if inner in ("", "*/*", "application/octet-stream", "multipart/*"):
            syntax = params.get("transfer-syntax")
            if syntax in (None, "", "*") and UID(stored).is_compressed and inner != "application/octet-stream":
                return stored
            if syntax in (None, "", "*", ExplicitVRLittleEndian):
                return None
    if UID(stored).is_compressed:
        for _media, params in _media_ranges(accept):
            if params.get("transfer-syntax") in (stored, "*"):
                return stored
    raise NotAcceptableError(f"frames are sent as application/octet-stream (or as stored, {stored})")


def frame_parts(path: Path, numbers: list[int], as_stored: str | None) -> list[tuple[str, bytes]]:
    """The requested frames: raw little-endian pixel bytes, or the stored compressed fragments."""
    ds = dcmread(path)
    if "PixelData" not in ds:
        raise LookupError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if any(n > count for n in numbers):
        raise LookupError(f"the instance has {count} frame(s)")
    syntax = ds.file_meta.TransferSyntaxUID
    if as_stored is not None and syntax.is_compressed:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [(f"application/octet-stream; transfer-syntax={syntax}", frames[n - 1]) for n in numbers]
    out: list[tuple[str, bytes]] = []
    if not syntax.is_compressed:
        raw = bytes(ds.PixelData)
        size = len(raw) // count
        out = [("application/octet-stream", raw[(n - 1) * size : n * size]) for n in numbers]
        return out
    for n in numbers:
        array = pixel_array(ds, index=n - 1, raw=True)
        out.append(
            ("application/octet-stream", np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes())
        )
    return out


# -- rendered ----------------------------------------------------------------------------------


def negotiate_image(accept: str) -> str:
    """image/jpeg (the default) or image/png."""
    for media, _params in _media_ranges(accept) or [("*/*", {})]:
        if media in ("image/jpeg", "image/png"):
            return media
        if media in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptableError("rendered images are image/jpeg or image/png")


def _parse_window(text: str) -> tuple[float, float, str]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (2, 3):
        raise ValueError("window is center,width[,linear|sigmoid|linear-exact]")
    center, width = float(parts[0]), float(parts[1])
    function = parts[2].lower() if len(parts) == 3 else "linear"
    if width <= 0 or function not in ("linear", "linear-exact", "sigmoid"):
        raise ValueError("window width must be positive and the function linear, linear-exact or sigmoid")
    return center, width, function


def _viewport(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split(",")
    try:
        width, height = int(parts[0]), int(parts[1]) if len(parts) > 1 else int(parts[0])
    except ValueError:
        raise ValueError("viewport is width,height") from None
    if not (0 < width <= 8192 and 0 < height <= 8192):
        raise ValueError("viewport sides are 1-8192 pixels")
    return width, height


def render(
    path: Path,
    *,
    frame: int = 1,
    media_type: str = "image/jpeg",
    window: str | None = None,
    viewport: str | None = None,
    quality: str | None = None,
    thumbnail: bool = False,
) -> bytes:
    """One frame as an 8-bit image: modality LUT, then the ``window`` asked for or the image's own VOI LUT.

    Raises ``ValueError`` for a bad parameter and ``LookupError`` for a frame the image does not have.
    """
    from PIL import Image

    ds = dcmread(path)
    if "PixelData" not in ds:
        raise LookupError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= count:
        raise LookupError(f"the instance has {count} frame(s)")
    array = pixel_array(ds, index=frame - 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if array.ndim == 3 and array.shape[-1] == 3:
        image = Image.fromarray(_to_uint8_rgb(array, ds), mode="RGB")
    else:
        image = Image.fromarray(_windowed(array, ds, window, photometric), mode="L")
    size = _viewport(viewport) or ((128, 128) if thumbnail else None)
    if size is not None:
        image.thumbnail(size)
    out = io.BytesIO()
    if media_type == "image/png":
        image.save(out, format="PNG")
    else:
        q = int(quality) if quality and quality.isdigit() else 90
        image.save(out, format="JPEG", quality=max(1, min(q, 100)))
    return out.getvalue()


def _to_uint8_rgb(array: np.ndarray[Any, Any], ds: Dataset) -> np.ndarray[Any, Any]:
    if array.dtype == np.uint8:
        return array
    bits = int(ds.get("BitsStored", 8) or 8)
    return np.clip(array.astype(np.float64) * 255.0 / ((1 << bits) - 1), 0, 255).astype(np.uint8)


def _windowed(array: np.ndarray[Any, Any], ds: Dataset, window: str | None, photometric: str) -> np.ndarray[Any, Any]:
    values = apply_modality_lut(array, ds).astype(np.float64)
    if window:
        center, width, function = _parse_window(window)
        scaled = _window(values, center, width, function)
    elif "WindowCenter" in ds or "VOILUTSequence" in ds:
        voi = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = float(voi.min()), float(voi.max())
        if "VOILUTSequence" in ds or "WindowCenter" not in ds:
            scaled = (voi - low) / max(high - low, 1e-9)
        else:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "LINEAR")).lower().replace("_", "-")
            scaled = _window(values, center, width, function if function in ("linear-exact", "sigmoid") else "linear")
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / max(high - low, 1e-9)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _first(value: Any) -> float:
    if isinstance(value, list | tuple) or hasattr(value, "__getitem__") and not isinstance(value, str | float | int):
        return float(value[0])
    return float(value)


def _window(values: np.ndarray[Any, Any], center: float, width: float, function: str) -> np.ndarray[Any, Any]:
    """PS3.3 C.11.2.1.2: the output range 0..1."""
    if function == "sigmoid":
        result: np.ndarray[Any, Any] = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return result
    if function == "linear-exact":
        return np.clip((values - (center - width / 2.0)) / width, 0.0, 1.0)
    return np.clip(((values - (center - 0.5)) / max(width - 1.0, 1e-9)) + 0.5, 0.0, 1.0)
