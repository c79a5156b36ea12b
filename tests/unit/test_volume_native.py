"""The series loader's fast path for native 16-bit pixel data gives what pydicom's ``pixel_array`` gives.

Each test decodes the same files twice, once on the fast path (the header read notes the Pixel Data
offset, one ``np.fromfile``) and once with the fast path switched off (pydicom decodes), and wants
byte-identical arrays: synthetic phantoms in every variant the fast path takes, pydicom's bundled
files that qualify, and the real chest CT (TCIA Lung-PET-CT-Dx, Li et al. 2020,
https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0; skipped, saying why, when absent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from pacsnode.analysis import volume
from pacsnode.analysis.errors import InputError
from pacsnode.analysis.modeldev.synthetic import ChestTruth, DicomSpec, PhantomSpec, write_chest_ct
from pacsnode.analysis.volume import load_series
from tests.support.helpers import REAL_CHEST_CT_SERIES, pydicom_data_files, real_chest_ct

_SMALL = PhantomSpec(slices=12, size=64, slice_thickness_mm=20.0)


def _pydicom_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volume, "_native_offset", lambda *args: None)


def _both(paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """The HU volume of ``paths`` on the fast path, then on pydicom's."""
    fast = load_series(paths, min_slices=1).hu
    with monkeypatch.context() as patch:
        _pydicom_path(patch)
        slow = load_series(paths, min_slices=1).hu
    return fast, slow


def _offset(path: Path) -> int | None:
    return volume._read_header(path)[1]


def _rewrite(truth: ChestTruth, *, signed: bool, bits_stored: int, garbage: bool) -> list[Path]:
    """Rewrite the phantom's files with the given Pixel Representation and Bits Stored, random high bits if ``garbage``."""
    rng = np.random.default_rng(7)
    for path in truth.paths:
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        if signed:
            stored = hu
            ds.RescaleIntercept = 0
        else:
            stored = hu + 1024
            ds.RescaleIntercept = -1024
        low = -(1 << (bits_stored - 1)) if signed else 0
        high = (1 << (bits_stored - 1)) - 1 if signed else (1 << bits_stored) - 1
        raw = np.clip(stored, low, high).astype(np.int64) & 0xFFFF
        if garbage and bits_stored < 16:
            noise = rng.integers(0, 1 << (16 - bits_stored), size=raw.shape) << bits_stored
            raw = (raw & ((1 << bits_stored) - 1)) | noise
        ds.PixelRepresentation = int(signed)
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelData = raw.astype("<u2").tobytes()
        ds.save_as(path)
    return list(truth.paths)


def _image_header(path: Path, ds: Dataset) -> volume._Header:
    """The loader's record of one image, for decoding it alone (geometry irrelevant here)."""
    return volume._Header(
        path=path,
        ds=ds,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        position=(0.0, 0.0, 0.0),
        pixel_spacing=(1.0, 1.0),
    )


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize(
    ("signed", "bits_stored", "garbage"),
    [(False, 12, False), (False, 12, True), (False, 16, False), (True, 13, False), (True, 13, True), (True, 16, False)],
)
def test_phantom_is_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str, signed: bool, bits_stored: int, garbage: bool
) -> None:
    truth = write_chest_ct(tmp_path, _SMALL, dicom=DicomSpec(transfer_syntax_uid=syntax))
    paths = _rewrite(truth, signed=signed, bits_stored=bits_stored, garbage=garbage)
    assert all(_offset(path) is not None for path in paths)
    fast, slow = _both(paths, monkeypatch)
    assert fast.dtype == slow.dtype == np.int16
    assert fast.tobytes() == slow.tobytes()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_written_phantom_is_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, syntax: str) -> None:
    truth = write_chest_ct(tmp_path, _SMALL, dicom=DicomSpec(transfer_syntax_uid=syntax))
    assert all(_offset(path) is not None for path in truth.paths)
    fast, slow = _both(list(truth.paths), monkeypatch)
    assert fast.tobytes() == slow.tobytes()


@pytest.mark.parametrize(
    ("signed", "bits_stored", "slope", "intercept"),
    [(False, 16, 1.0, 32000), (False, 12, 0.5, -1024), (True, 13, 0.5, 0), (True, 13, 1.0, -32000)],
)
def test_rescale_that_may_leave_int16_is_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signed: bool, bits_stored: int, slope: float, intercept: int
) -> None:
    """A slope other than 1, or sums that can leave int16, take the general rescale: the same HU, clipped alike."""
    truth = write_chest_ct(tmp_path, _SMALL)
    paths = _rewrite(truth, signed=signed, bits_stored=bits_stored, garbage=bits_stored < 16)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.save_as(path)
    fast, slow = _both(paths, monkeypatch)
    assert fast.tobytes() == slow.tobytes()


def _bundled_files() -> list[Path]:
    folders = [Path(get_testdata_file("CT_small.dcm") or "").parent, pydicom_data_files()]
    return sorted(p for folder in folders for p in folder.glob("*.dcm"))


def test_bundled_files_that_qualify_are_byte_identical() -> None:
    checked, short = [], []
    for path in _bundled_files():
        try:
            ds, offset = volume._read_header(path)
        except InputError:
            continue
        if offset is None:
            continue
        header = _image_header(path, ds)
        stored = volume._read_native(header, offset)
        fast = np.empty((header.rows, header.columns), np.int16)
        slow = np.empty_like(fast)
        if stored is None:  # the header promises more pixel data than the file holds: both paths refuse alike
            with pytest.raises(InputError) as fast_error:
                volume._decode_into(fast, header, offset)
            with pytest.raises(InputError) as slow_error:
                volume._decode_into(slow, header, None)
            assert str(fast_error.value) == str(slow_error.value)
            short.append(path.name)
            continue
        reference = pixel_array(path)
        assert stored.dtype == reference.dtype and stored.tobytes() == reference.tobytes(), path
        volume._decode_into(fast, header, offset)
        volume._decode_into(slow, header, None)
        assert fast.tobytes() == slow.tobytes(), path
        checked.append(path.name)
    assert {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"} <= set(checked)
    assert "MR_truncated.dcm" in short


@pytest.mark.parametrize(
    "name",
    [
        "JPEG-LL.dcm",  # JPEG Lossless
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_RLE.dcm",  # RLE Lossless
        "emri_small.dcm",  # multi-frame
        "OBXXXX1A.dcm",  # 8 bits allocated
        "SC_rgb.dcm",  # 3 samples per pixel
    ],
)
def test_files_that_do_not_qualify_take_pydicom_path(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    assert _offset(Path(path)) is None


def test_compressed_phantom_takes_pydicom_path(tmp_path: Path) -> None:
    truth = write_chest_ct(tmp_path, _SMALL, dicom=DicomSpec(transfer_syntax_uid=RLELossless))
    assert all(_offset(path) is None for path in truth.paths)


def test_truncated_file_raises_the_same_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    truth = write_chest_ct(tmp_path, _SMALL)
    paths = list(truth.paths)
    offset = _offset(paths[3])
    assert offset is not None
    with paths[3].open("r+b") as f:
        f.truncate(offset + 100)
    with pytest.raises(InputError, match="cannot decode the pixel data") as fast:
        load_series(paths)
    with monkeypatch.context() as patch:
        _pydicom_path(patch)
        with pytest.raises(InputError, match="cannot decode the pixel data") as slow:
            load_series(paths)
    assert str(fast.value) == str(slow.value)


def test_file_truncated_after_the_header_read_falls_back(tmp_path: Path) -> None:
    """A file cut short between header read and decode: pydicom's path reports it."""
    truth = write_chest_ct(tmp_path, _SMALL)
    path = truth.paths[0]
    ds, offset = volume._read_header(path)
    assert offset is not None
    header = _image_header(path, ds)
    with path.open("r+b") as f:
        f.truncate(offset + 10)
    assert volume._read_native(header, offset) is None
    with pytest.raises(InputError, match="cannot decode the pixel data"):
        volume._decode_into(np.empty((header.rows, header.columns), np.int16), header, offset)


@pytest.mark.parametrize("series", REAL_CHEST_CT_SERIES)
def test_real_chest_ct_is_byte_identical(series: str, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = sorted((real_chest_ct() / series).glob("*.dcm"))
    assert all(_offset(path) is not None for path in paths)
    fast, slow = _both(paths, monkeypatch)
    assert fast.tobytes() == slow.tobytes()
