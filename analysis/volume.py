"""Load one CT series from its files into a :class:`~pacsnode.analysis.types.Volume` in Hounsfield units.

The loader reads every header first (``stop_before_pixels``) and refuses a
series it cannot turn into a regular volume before decoding any pixel data:
too few slices, another modality, multi-frame or colour images, missing or
mixed geometry, duplicate positions, gaps. Then it decodes each image, in
slice order, straight into one preallocated int16 array (the caller's, when it
passes ``allocate``: pinned memory for a GPU) (pydicom with its pylibjpeg /
pyjpegls plugins decodes JPEG, JPEG-LS, JPEG 2000 and RLE).

Native 16-bit pixel data (Implicit or Explicit VR Little Endian, one frame,
one sample) is read without parsing the file a second time: the header read
notes where the Pixel Data value starts, and decoding is one read at that
offset (straight into the int16 output when no rescaled value can leave
int16), with the unused high bits corrected as pydicom's ``pixel_array``
does (shifted out and sign-extended or zeroed). pydicom's parser is the
ceiling otherwise (each file parsed twice: about 600 slices/s per thread for
512x512 CT). Anything else, or a file whose pixel data is not where and as
long as the header says, takes pydicom's path.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from pacsnode.analysis.errors import InputError
from pacsnode.analysis.types import Volume

__all__ = ["load_series"]

logger = logging.getLogger(__name__)

#: SOP classes whose images are frames of one object, never a stack of single slices.
_MULTI_FRAME_CT_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
_ORIENTATION_TOLERANCE = 1e-3  # direction cosines
_PIXEL_SPACING_TOLERANCE_MM = 1e-3
_DUPLICATE_TOLERANCE_MM = 0.01
_GAP_RELATIVE_TOLERANCE = 0.10  # of the median slice spacing
_GAP_ABSOLUTE_TOLERANCE_MM = 0.05
_MAX_POSITION_OUTLIERS = 2  # at each end of the stack
_OUTLIER_STEP_FACTOR = 3.0  # an end image this many median slice steps (or more) from the stack is an outlier
_PREFERRED_PLUGINS = {
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
}
_INT16_MIN, _INT16_MAX = int(np.iinfo(np.int16).min), int(np.iinfo(np.int16).max)
_PIXEL_DATA_TAG = (0x7FE0, 0x0010)
#: Transfer syntax -> (implicit VR, little endian) of the native syntaxes the fast path reads.
_NATIVE_SYNTAXES = {ImplicitVRLittleEndian: (True, True), ExplicitVRLittleEndian: (False, True)}


@dataclass(frozen=True, kw_only=True)
class _Header:
    path: Path
    ds: Dataset
    rows: int
    columns: int
    orientation: tuple[float, ...]  # 6 direction cosines
    position: tuple[float, float, float]
    pixel_spacing: tuple[float, float]


def load_series(
    paths: Sequence[Path | str],
    *,
    min_slices: int = 10,
    allocate: Callable[[tuple[int, int, int], np.dtype[Any]], np.ndarray] | None = None,
) -> Volume:
    """Read the files of one CT series into a volume of Hounsfield units.

    Parameters
    ----------
    paths
        The files of the series, in any order.
    min_slices
        Refuse a series with fewer images than this.
    allocate
        Makes the empty int16 array the images are decoded into, from its shape and dtype (default
        ``np.empty``): the CNN pipeline passes pinned memory when the volume goes to a GPU, so that it is
        uploaded without a host copy (:func:`~pacsnode.analysis.cnn.feed.host_volume`).

    Returns
    -------
    Volume
        ``hu`` int16 (slices, rows, columns), slices sorted by position along the
        slice normal, ascending; ``datasets`` the headers without pixel data.

    Raises
    ------
    InputError
        When the series cannot be made into a regular CT volume; the message
        says why and names a file. Read and decode errors are chained.
    ValueError
        If ``min_slices`` is less than 1.

    Examples
    --------
    >>> volume = load_series(sorted(Path("series").glob("*.dcm")))  # doctest: +SKIP
    >>> volume.hu.shape, volume.spacing  # doctest: +SKIP
    ((300, 512, 512), (1.0, 0.78125, 0.78125))
    """
    if min_slices < 1:
        raise ValueError(f"min_slices must be at least 1, not {min_slices}")
    started = time.perf_counter()
    files = [Path(p) for p in paths]
    read = [_read_header(path) for path in files]
    datasets = [ds for ds, _ in read]
    pixel_offsets = {path: offset for path, (_, offset) in zip(files, read, strict=True)}
    for path, ds in zip(files, datasets, strict=True):
        _check_image_type(path, ds)
    if len(files) < min_slices:
        raise InputError(
            f"not enough slices: the series has {_count(len(files), 'image')}, the pipeline needs at least {min_slices}"
        )
    _check_single_series(files, datasets)
    headers, dropped = _main_stack(files, datasets)

    first = headers[0]
    row_direction = np.asarray(first.orientation[:3])
    column_direction = np.asarray(first.orientation[3:])
    normal = np.cross(row_direction, column_direction)
    norm = float(np.linalg.norm(normal))
    if not 0.99 < norm < 1.01:
        raise InputError(
            f"invalid ImageOrientationPatient {_fmt(first.orientation)} in {first.path}: "
            "the row and column directions are not orthogonal unit vectors"
        )
    normal /= norm
    along = np.array([float(np.dot(normal, h.position)) for h in headers])
    order = np.argsort(along, kind="stable")
    headers = [headers[i] for i in order]
    along = along[order]
    headers, along, outliers = _drop_position_outliers(headers, along)
    if outliers:
        dropped.append((f"far from the stack along the slice normal ({_count(len(outliers), 'image')})", outliers))
    if dropped:
        logger.info(
            "dropped %d of %d images that are not part of the main stack: %s",
            sum(len(paths) for _, paths in dropped),
            len(files),
            "; ".join(f"{reason}, e.g. {paths[0]}" for reason, paths in dropped),
            extra={"action": "load_series", "dropped": sum(len(paths) for _, paths in dropped)},
        )
    if len(headers) < min_slices:
        raise InputError(
            f"not enough slices: the main stack has {_count(len(headers), 'image')} "
            f"({len(files) - len(headers)} other images dropped: {'; '.join(r for r, _ in dropped)}), "
            f"the pipeline needs at least {min_slices}"
        )
    slice_spacing = _slice_spacing(headers, along)

    shape = (len(headers), first.rows, first.columns)
    hu = np.empty(shape, dtype=np.int16) if allocate is None else allocate(shape, np.dtype(np.int16))
    if hu.shape != shape or hu.dtype != np.int16:
        raise ValueError(f"allocate gave {hu.dtype} {hu.shape}, expected int16 {shape}")
    for index, header in enumerate(headers):
        _decode_into(hu[index], header, pixel_offsets.get(header.path))
    logger.debug(
        "loaded %d slices of %dx%d in %.2f s",
        hu.shape[0],
        hu.shape[1],
        hu.shape[2],
        time.perf_counter() - started,
    )
    return Volume(
        hu=hu,
        spacing=(slice_spacing, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=headers[0].position,
        row_direction=(float(row_direction[0]), float(row_direction[1]), float(row_direction[2])),
        column_direction=(float(column_direction[0]), float(column_direction[1]), float(column_direction[2])),
        datasets=tuple(h.ds for h in headers),
    )


# ----------------------------------------------------------------- headers


def _read_header(path: Path) -> tuple[Dataset, int | None]:
    """The header of ``path`` without pixel data, and the file offset of its native Pixel Data value.

    The offset is None unless :func:`_native_offset` finds that the fast path
    can read the pixel data.
    """
    try:
        with path.open("rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True)
            # pydicom stops with the file at the start of the pixel data element (rewound to its tag)
            element = fp.read(12)
            offset = fp.tell() - len(element)
    except Exception as exc:  # InvalidDicomError, OSError, and whatever a corrupt file makes pydicom raise
        raise InputError(f"cannot read {path} as DICOM: {exc}") from exc
    return ds, _native_offset(ds, element, offset)


def _native_offset(ds: Dataset, element: bytes, offset: int) -> int | None:
    """Where the value of the Pixel Data element that starts at ``offset`` (its first bytes ``element``) begins.

    Only for pixel data the fast path reads exactly as pydicom does: a native
    little endian syntax that the dataset was read in, one frame of one sample
    of 16 bits allocated (the bits stored 1 to 16), Pixel Representation 0 or
    1, and a value of defined length Rows x Columns x 2 bytes. None otherwise:
    pydicom decodes.
    """
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    encoding = _NATIVE_SYNTAXES.get(syntax) if syntax is not None else None
    if encoding is None or ds.original_encoding != encoding:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        representation = int(ds.PixelRepresentation)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = ds.get("NumberOfFrames")
        single = frames is None or int(frames) == 1
    except (AttributeError, TypeError, ValueError):
        return None
    if (
        allocated != 16
        or not 1 <= stored <= 16
        or representation not in (0, 1)
        or samples != 1
        or not single
        or rows < 1
        or columns < 1
    ):
        return None
    if len(element) < 8 or struct.unpack("<HH", element[:4]) != _PIXEL_DATA_TAG:
        return None
    implicit, _ = encoding
    if implicit:
        (length,) = struct.unpack("<L", element[4:8])
        header = 8
    else:
        if len(element) < 12 or element[4:6] not in (b"OW", b"OB"):
            return None
        (length,) = struct.unpack("<L", element[8:12])
        header = 12
    if length != rows * columns * 2:
        return None
    return offset + header


def _check_image_type(path: Path, ds: Dataset) -> None:
    """Refuse images that are not single-frame grayscale CT."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _MULTI_FRAME_CT_CLASSES:
        raise InputError(
            f"multi-frame images are not supported: {path} is {_MULTI_FRAME_CT_CLASSES[sop_class]}; "
            "the pipeline needs a series of single-frame CT images"
        )
    modality = ds.get("Modality")
    if modality != "CT":
        raise InputError(f"not a CT image: {path} has Modality {modality!r}; the pipeline needs CT")
    frames = ds.get("NumberOfFrames")
    if frames is not None and int(frames) != 1:
        raise InputError(
            f"multi-frame images are not supported: {path} has {int(frames)} frames; "
            "the pipeline needs a series of single-frame CT images"
        )
    samples = ds.get("SamplesPerPixel", 1)
    photometric = ds.get("PhotometricInterpretation", "")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"not a grayscale image: {path} has SamplesPerPixel {samples} and PhotometricInterpretation "
            f"{photometric!r}; the pipeline needs MONOCHROME2 (or MONOCHROME1) CT"
        )


def _check_single_series(files: list[Path], datasets: list[Dataset]) -> None:
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in datasets)
    if len(series) > 1:
        (main, _), *others = series.most_common()
        odd = next(
            path for path, ds in zip(files, datasets, strict=True) if str(ds.get("SeriesInstanceUID", "")) != main
        )
        raise InputError(
            f"the files belong to {len(series)} series: {_count(series[main], 'image')} of series {main or '(none)'}, "
            f"{sum(n for _, n in others)} of others (e.g. {odd})"
        )


def _geometry(path: Path, ds: Dataset) -> _Header:
    missing = [
        keyword
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
        if _is_empty(ds.get(keyword))
    ]
    if missing:
        raise InputError(f"missing {', '.join(missing)} in {path}: cannot place the slice in the volume")
    try:
        position = tuple(float(v) for v in ds.ImagePositionPatient)
        orientation = tuple(float(v) for v in ds.ImageOrientationPatient)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (TypeError, ValueError) as exc:
        raise InputError(f"unreadable image plane attributes in {path}: {exc}") from exc
    if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2:
        raise InputError(
            f"malformed image plane attributes in {path}: ImagePositionPatient needs 3 values (has {len(position)}), "
            f"ImageOrientationPatient 6 (has {len(orientation)}), PixelSpacing 2 (has {len(spacing)})"
        )
    if not all(np.isfinite(position + orientation + spacing)) or min(spacing) <= 0:
        raise InputError(
            f"invalid image plane attributes in {path}: ImagePositionPatient {_fmt(position)}, "
            f"ImageOrientationPatient {_fmt(orientation)}, PixelSpacing {_fmt(spacing)} (needs finite values, "
            "spacing above 0)"
        )
    return _Header(
        path=path,
        ds=ds,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        orientation=orientation,
        position=(position[0], position[1], position[2]),
        pixel_spacing=(spacing[0], spacing[1]),
    )


def _is_localizer(ds: Dataset) -> bool:
    value = ds.get("ImageType")
    if value is None:
        return False
    values = [value] if isinstance(value, str) else list(value)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _same_geometry(a: _Header, b: _Header) -> bool:
    return (
        (a.rows, a.columns) == (b.rows, b.columns)
        and np.max(np.abs(np.asarray(a.orientation) - np.asarray(b.orientation))) <= _ORIENTATION_TOLERANCE
        and np.max(np.abs(np.asarray(a.pixel_spacing) - np.asarray(b.pixel_spacing))) <= _PIXEL_SPACING_TOLERANCE_MM
    )


def _describe(header: _Header) -> str:
    return (
        f"{header.rows}x{header.columns}, ImageOrientationPatient {_fmt(header.orientation)}, "
        f"PixelSpacing {_fmt(header.pixel_spacing)} mm"
    )


def _main_stack(files: list[Path], datasets: list[Dataset]) -> tuple[list[_Header], list[tuple[str, list[Path]]]]:
    """The images of the main stack, and the dropped ones: (reason, paths) per reason.

    Localizers go first; the rest is grouped by size, orientation and pixel
    spacing, and the largest group is the stack.
    """
    localizers = [path for path, ds in zip(files, datasets, strict=True) if _is_localizer(ds)]
    others = [(path, ds) for path, ds in zip(files, datasets, strict=True) if not _is_localizer(ds)]
    if not others:
        raise InputError(
            f"no images to make a volume of: all {_count(len(files), 'image')} of the series are localizers "
            f"(ImageType LOCALIZER), e.g. {files[0]}"
        )
    groups: list[list[_Header]] = []
    for path, ds in others:
        header = _geometry(path, ds)
        group = next((g for g in groups if _same_geometry(g[0], header)), None)
        if group is None:
            groups.append([header])
        else:
            group.append(header)
    groups.sort(key=len, reverse=True)
    if len(groups) > 1 and len(groups[0]) == len(groups[1]):
        described = "; ".join(f"{_count(len(g), 'image')} of {_describe(g[0])} (e.g. {g[0].path})" for g in groups)
        raise InputError(f"no main stack: the images form groups of the same size: {described}")
    dropped: list[tuple[str, list[Path]]] = []
    if localizers:
        dropped.append((f"{_count(len(localizers), 'localizer')} (ImageType LOCALIZER)", localizers))
    stack = groups[0]
    for group in groups[1:]:
        reference = stack[0]
        odd = group[0]
        if (odd.rows, odd.columns) != (reference.rows, reference.columns):
            what = f"of size {odd.rows}x{odd.columns}, not {reference.rows}x{reference.columns}"
        elif np.max(np.abs(np.asarray(odd.orientation) - np.asarray(reference.orientation))) > _ORIENTATION_TOLERANCE:
            what = f"with ImageOrientationPatient {_fmt(odd.orientation)}, not {_fmt(reference.orientation)}"
        else:
            what = f"with PixelSpacing {_fmt(odd.pixel_spacing)} mm, not {_fmt(reference.pixel_spacing)} mm"
        dropped.append((f"{_count(len(group), 'image')} {what}", [h.path for h in group]))
    return stack, dropped


def _drop_position_outliers(headers: list[_Header], along: np.ndarray) -> tuple[list[_Header], np.ndarray, list[Path]]:
    """Drop up to :data:`_MAX_POSITION_OUTLIERS` images at either end that lie far from the rest of the stack."""
    if len(headers) < 2 * _MAX_POSITION_OUTLIERS + 3:
        return headers, along, []
    steps = np.diff(along)
    median = float(np.median(steps))
    if median <= _DUPLICATE_TOLERANCE_MM:
        return headers, along, []
    far = steps > _OUTLIER_STEP_FACTOR * median
    start, stop = 0, len(headers)
    for i in range(_MAX_POSITION_OUTLIERS):  # a far step after the first 1 or 2 images
        if far[i]:
            start = i + 1
    for i in range(_MAX_POSITION_OUTLIERS):  # a far step before the last 1 or 2 images
        if far[len(steps) - 1 - i]:
            stop = len(headers) - 1 - i
    if start == 0 and stop == len(headers):
        return headers, along, []
    outliers = [h.path for h in headers[:start] + headers[stop:]]
    return headers[start:stop], along[start:stop], outliers


def _slice_spacing(headers: list[_Header], along: np.ndarray) -> float:
    """Check positions (sorted ``along`` the normal) for duplicates and gaps; the mean spacing."""
    if len(headers) == 1:
        ds = headers[0].ds
        value = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        return abs(float(value)) or 1.0
    steps = np.diff(along)
    duplicate = np.flatnonzero(steps < _DUPLICATE_TOLERANCE_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise InputError(
            f"duplicate slice positions: {_count(duplicate.size, 'pair')} of images at the same position, "
            f"e.g. {headers[i].path} and {headers[i + 1].path} both at {along[i]:.3f} mm along the slice normal"
        )
    median = float(np.median(steps))
    tolerance = max(_GAP_RELATIVE_TOLERANCE * median, _GAP_ABSOLUTE_TOLERANCE_MM)
    bad = np.flatnonzero(np.abs(steps - median) > tolerance)
    if bad.size:
        i = int(bad[0])
        kind = "a gap (missing slices?)" if steps[i] > median else "slices too close"
        raise InputError(
            f"inconsistent slice spacing: the median spacing is {median:.3f} mm but "
            f"{_count(bad.size, 'step')} differ by more than {tolerance:.3f} mm, e.g. {steps[i]:.3f} mm "
            f"between {headers[i].path} and {headers[i + 1].path}, {kind}"
        )
    return float((along[-1] - along[0]) / (len(along) - 1))


# ----------------------------------------------------------------- pixels


def _decode_into(out: np.ndarray, header: _Header, pixel_offset: int | None = None) -> None:
    """Decode the image of ``header`` and write its HU values into ``out`` (rows, columns) int16.

    ``pixel_offset``: where the native pixel data starts in the file (see
    :func:`_native_offset`), None to decode with pydicom.
    """
    ds = header.ds
    if pixel_offset is not None and _read_native_hu(out, header, pixel_offset):
        return
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    stored = _read_native(header, pixel_offset) if pixel_offset is not None else None
    try:
        if stored is None:
            stored = _decode(header.path, syntax)
    except Exception as exc:  # any decoder failure: pydicom, pylibjpeg, pyjpegls, numpy
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise InputError(f"cannot decode the pixel data of {header.path} ({name}): {exc}") from exc
    if stored.shape != out.shape:
        raise InputError(
            f"the pixel data of {header.path} has shape {stored.shape}, expected "
            f"{out.shape[0]}x{out.shape[1]} (Rows x Columns)"
        )
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(stored, ds)
        np.copyto(out, np.clip(np.rint(values), _INT16_MIN, _INT16_MAX), casting="unsafe")
        return
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope == 1.0 and intercept.is_integer():
        wide = stored.astype(np.int32) + int(intercept)
    else:
        wide = np.rint(stored.astype(np.float64) * slope + intercept)
    np.clip(wide, _INT16_MIN, _INT16_MAX, out=wide)
    np.copyto(out, wide, casting="unsafe")


def _read_native_hu(out: np.ndarray, header: _Header, offset: int) -> bool:
    """Read native pixel data straight into ``out`` and make it HU there, when no value can leave int16.

    For Rescale Slope 1 and an integer intercept whose sums with every value
    of Bits Stored fit int16: one read into ``out`` (int16 holds the stored
    bit patterns, signed or unsigned), the unused bits corrected in place as
    pydicom does, then the intercept added, with no array in between. False,
    with ``out`` to be overwritten, when that does not apply or the file is
    short: :func:`_decode_into` takes its general path.
    """
    ds = header.ds
    if "ModalityLUTSequence" in ds or not out.flags.c_contiguous or out.shape != (header.rows, header.columns):
        return False
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0 or not intercept.is_integer() or not _fits_int16(ds, int(intercept)):
        return False
    view = out.data.cast("B")
    try:
        with header.path.open("rb", buffering=0) as fp:
            fp.seek(offset)
            filled = 0
            while filled < len(view):
                n = fp.readinto(view[filled:])
                if not n:
                    return False
                filled += n
    except OSError:
        return False
    bits = int(ds.BitsStored)
    if bits < 16:
        if int(ds.PixelRepresentation) == 1:
            # pydicom's correct_unused_bits on int16: shift out and back, sign-extending
            np.left_shift(out, 16 - bits, out=out)
            np.right_shift(out, 16 - bits, out=out)
        else:
            # the same on uint16 zeroes the unused bits; the values (below 2**15, see _fits_int16) are int16 too
            np.bitwise_and(out, (1 << bits) - 1, out=out)
    if intercept:
        out += int(intercept)
    return True


def _fits_int16(ds: Dataset, intercept: int) -> bool:
    """Whether every value of ``ds``'s Bits Stored and Pixel Representation, and it plus ``intercept``, is an int16."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    return _INT16_MIN <= low and high <= _INT16_MAX and _INT16_MIN <= low + intercept and high + intercept <= _INT16_MAX


def _read_native(header: _Header, offset: int) -> np.ndarray | None:
    """The stored values of native 16-bit pixel data at ``offset``, as pydicom's ``pixel_array`` gives them.

    None when the file does not hold them (it was truncated or changed since
    the header was read): pydicom's path then decodes, or says what is wrong.
    """
    ds = header.ds
    signed = int(ds.PixelRepresentation) == 1
    count = header.rows * header.columns
    try:
        flat = np.fromfile(header.path, dtype="<i2" if signed else "<u2", count=count, offset=offset)
    except (OSError, ValueError):
        return None
    if flat.size != count:
        return None
    shift = 16 - int(ds.BitsStored)
    if shift:
        # pydicom's correct_unused_bits: shift the unused high bits out and back in, which
        # sign-extends a signed value and zeroes them for an unsigned one
        np.left_shift(flat, shift, out=flat)
        np.right_shift(flat, shift, out=flat)
    return flat.reshape(header.rows, header.columns)


def _decode(path: Path, syntax: UID | None) -> np.ndarray:
    """The stored values of ``path``, with the fastest installed decoder for its transfer syntax."""
    plugin = _preferred_plugin(syntax)
    if plugin:
        try:
            return pixel_array(path, decoding_plugin=plugin)
        except Exception:  # try every other plugin before giving up
            logger.debug("the %s plugin failed on %s, trying the others", plugin, path, exc_info=True)
    return pixel_array(path)


@lru_cache(maxsize=32)
def _preferred_plugin(syntax: UID | None) -> str:
    """The decoding plugin to try first for ``syntax``; "" lets pydicom choose.

    Per 512x512 slice on one core: CharLS (pyjpegls) decodes JPEG-LS in about
    6 ms, libjpeg (pylibjpeg) in 20 to 35 ms; OpenJPEG (pylibjpeg) decodes
    JPEG 2000 in 35 ms, Pillow in 50 ms.
    """
    if syntax is None or not syntax.is_compressed:
        return ""
    preferred = _PREFERRED_PLUGINS.get(syntax)
    if preferred is None:
        return ""
    try:
        available = get_decoder(syntax).available_plugins
    except NotImplementedError:
        return ""
    return preferred if preferred in available else ""


# ----------------------------------------------------------------- messages


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt(values: Sequence[float]) -> str:
    return "\\".join(f"{v:g}" for v in values)


def _is_empty(value: object) -> bool:
    if value is None or value == "":
        return True
    return isinstance(value, Sized) and len(value) == 0
