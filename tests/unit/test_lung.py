"""Tests of pacsnode.analysis.volume, pacsnode.analysis.lung.segmentation and pacsnode.analysis.modeldev.synthetic: phantom -> files -> HU volume -> lungs.

The phantom's truth (volumes, LAA-950, mean density) comes from its exact voxel
masks; the segmentation of the written files must find it within 3 % (volumes)
and 1 point (LAA-950). The loader must refuse, with a clear message, what it
cannot make into a regular CT volume, including the real single CT slices
shipped with pydicom and pydicom-data.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.examples
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from pacsnode.analysis.errors import InputError
from pacsnode.analysis.lung.segmentation import segment_lungs
from pacsnode.analysis.modeldev.synthetic import (
    ChestPhantom,
    ChestTruth,
    DicomSpec,
    PhantomSpec,
    make_chest_phantom,
    write_chest_ct,
)
from pacsnode.analysis.types import LungResult, Volume
from pacsnode.analysis.volume import load_series
from tests.support.helpers import pydicom_data_files

# The phantom every accuracy test uses: 80 slices of 128x128, 3.125 mm pixels, 3 mm slices.
CHEST, CHEST_SEED = PhantomSpec(slices=80, size=128, blur_sigma_mm=1.0, noise_hu=15.0), 11
# A small series for the loader's checks (not segmented).
SMALL, SMALL_SEED = PhantomSpec(slices=12, size=48), 5


@dataclass(frozen=True)
class Chest:
    truth: ChestTruth
    phantom: ChestPhantom
    volume: Volume
    result: LungResult


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> Chest:
    truth = write_chest_ct(tmp_path_factory.mktemp("chest"), CHEST, seed=CHEST_SEED)
    phantom = make_chest_phantom(CHEST, seed=CHEST_SEED)
    files = list(truth.paths)
    np.random.default_rng(0).shuffle(files)  # type: ignore[arg-type]
    volume = load_series(files)
    return Chest(truth=truth, phantom=phantom, volume=volume, result=segment_lungs(volume))


@pytest.fixture(scope="module")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> ChestTruth:
    return write_chest_ct(tmp_path_factory.mktemp("small"), SMALL, seed=SMALL_SEED)


@pytest.fixture
def series(small_series: ChestTruth, tmp_path: Path) -> list[Path]:
    """A private copy of the small series, slice order, to break."""
    folder = tmp_path / "series"
    shutil.copytree(small_series.paths[0].parent, folder)
    return [folder / p.name for p in small_series.paths]


def _edit(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _patient_x_of_columns(volume: Volume) -> np.ndarray:
    return volume.origin[0] + np.arange(volume.hu.shape[2]) * volume.spacing[2] * volume.row_direction[0]


# ----------------------------------------------------------------- accuracy


@pytest.mark.parametrize("side", ["right", "left", "total"])
def test_lung_volumes_within_3_percent_of_truth(chest: Chest, side: str) -> None:
    expected = getattr(chest.truth, f"{side}_volume_ml")
    found = getattr(chest.result, f"{side}_volume_ml")
    assert abs(found - expected) <= 0.03 * expected, (side, found, expected)


@pytest.mark.parametrize("side", ["", "right_", "left_"])
def test_laa950_within_one_point_of_truth(chest: Chest, side: str) -> None:
    expected = getattr(chest.truth, f"{side}laa950_percent")
    found = getattr(chest.result, f"{side}laa950_percent")
    assert expected > 0.5  # the phantom has emphysema in both lungs
    assert abs(found - expected) <= 1.0, (side, found, expected)


def test_mean_density_is_the_lung_parenchyma_with_its_vessels(chest: Chest) -> None:
    result, truth = chest.result, chest.truth
    assert -900 < result.mean_density_hu < -800
    assert abs(result.mean_density_hu - truth.mean_density_hu) <= 5.0
    assert abs(result.right_mean_density_hu - truth.right_mean_density_hu) <= 5.0
    assert abs(result.left_mean_density_hu - truth.left_mean_density_hu) <= 5.0
    # Vessels are filled: the density is above that of the bare parenchyma with its emphysema.
    lungs = chest.phantom.labels > 0
    vessel = lungs & (chest.phantom.hu > -400)
    assert np.count_nonzero(vessel & (result.labels > 0)) >= 0.95 * np.count_nonzero(vessel)


def test_right_lung_is_the_patients_right(chest: Chest) -> None:
    result, truth = chest.result, chest.truth
    assert truth.right_volume_ml > 1.15 * truth.left_volume_ml  # the phantom's right lung is the larger
    assert result.right_volume_ml > result.left_volume_ml
    x = _patient_x_of_columns(chest.volume)
    centroid_x = {value: float(x[round(np.mean(np.nonzero(result.labels == value)[2]))]) for value in (1, 2)}
    assert centroid_x[1] < 0 < centroid_x[2]  # LPS: the patient's left is +x
    for value in (1, 2):
        assert _dice(result.labels == value, chest.phantom.labels == value) > 0.98


def test_result_labels(chest: Chest) -> None:
    labels = chest.result.labels
    assert labels.dtype == np.uint8 and labels.shape == chest.volume.hu.shape
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    voxel_ml = chest.volume.voxel_ml
    assert chest.result.right_volume_ml == pytest.approx(np.count_nonzero(labels == 1) * voxel_ml)
    assert chest.result.total_volume_ml == pytest.approx(chest.result.right_volume_ml + chest.result.left_volume_ml)


def test_mirrored_columns_keep_right_and_left(tmp_path: Path) -> None:
    """ImageOrientationPatient -1\\0\\0\\0\\1\\0: the right lung is now on the image's right."""
    spec = PhantomSpec(slices=64, size=96, mirror_columns=True)
    truth = write_chest_ct(tmp_path, spec, seed=2)
    volume = load_series(truth.paths)
    assert volume.row_direction == (-1.0, 0.0, 0.0)
    result = segment_lungs(volume)
    for side in ("right", "left"):
        expected = getattr(truth, f"{side}_volume_ml")
        assert abs(getattr(result, f"{side}_volume_ml") - expected) <= 0.03 * expected, side
    columns = np.nonzero(result.labels == 1)[2]
    assert columns.mean() > volume.hu.shape[2] / 2  # right lung in the image's right half
    phantom = make_chest_phantom(spec, seed=2)
    assert _dice(result.labels == 1, phantom.labels == 1) > 0.98


def test_lungs_joined_in_one_air_region_are_split_at_the_midline() -> None:
    phantom = make_chest_phantom(PhantomSpec(slices=64, size=96, join_lungs=True, blur_sigma_mm=1.0), seed=4)
    result = segment_lungs(phantom.to_volume())
    for side in ("right", "left", "total"):
        expected = getattr(phantom, f"{side}_volume_ml")
        assert abs(getattr(result, f"{side}_volume_ml") - expected) <= 0.03 * expected, side
    assert abs(result.laa950_percent - phantom.laa950_percent) <= 1.0


def test_phantom_truth_is_the_ellipsoids(chest: Chest) -> None:
    # Lung semi-axes of the phantom (mm): right 60 x 78 x 92, left 54 x 74 x 88, both wholly in the slab.
    assert chest.truth.right_volume_ml == pytest.approx(4 / 3 * np.pi * 60 * 78 * 92 / 1000, rel=0.02)
    assert chest.truth.left_volume_ml == pytest.approx(4 / 3 * np.pi * 54 * 74 * 88 / 1000, rel=0.02)
    assert chest.truth.total_volume_ml == pytest.approx(chest.truth.right_volume_ml + chest.truth.left_volume_ml)


# ----------------------------------------------------------------- loading


def test_shuffled_files_are_sorted_along_the_slice_normal(chest: Chest) -> None:
    volume, truth = chest.volume, chest.truth
    assert truth.paths != sorted(truth.paths)  # the file names are not in slice order
    assert volume.hu.dtype == np.int16 and volume.hu.shape == truth.shape
    assert volume.spacing == pytest.approx(truth.spacing)
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == truth.sop_instance_uids
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert z == sorted(z) and volume.origin[2] == pytest.approx(z[0])
    assert all("PixelData" not in ds for ds in volume.datasets)
    assert np.array_equal(volume.hu, chest.phantom.hu)


def test_any_file_order_gives_the_same_volume(small_series: ChestTruth) -> None:
    rng = np.random.default_rng(1)
    a = load_series(list(rng.permutation(np.array(small_series.paths, dtype=object))), min_slices=12)
    b = load_series(list(reversed(small_series.paths)), min_slices=12)
    assert np.array_equal(a.hu, b.hu)
    assert [ds.SOPInstanceUID for ds in a.datasets] == small_series.sop_instance_uids


def _encoder_or_skip(uid: str) -> None:
    encoder = get_encoder(uid)
    if not encoder.is_available:
        pytest.skip(f"no encoder for {encoder.UID.name}: {encoder.missing_dependencies}")


@pytest.mark.parametrize(
    ("transfer_syntax_uid", "bits_stored"),
    [(RLELossless, 12), (JPEGLSLossless, 12), (JPEG2000Lossless, 16), ("1.2.840.10008.1.2", 16)],
    ids=["rle", "jpeg-ls", "jpeg2000", "implicit"],
)
def test_compressed_series_load_to_the_same_hu(
    small_series: ChestTruth, tmp_path: Path, transfer_syntax_uid: str, bits_stored: int
) -> None:
    if transfer_syntax_uid != "1.2.840.10008.1.2":
        _encoder_or_skip(transfer_syntax_uid)
    dicom = DicomSpec(transfer_syntax_uid=transfer_syntax_uid, bits_stored=bits_stored)
    truth = write_chest_ct(tmp_path, SMALL, seed=SMALL_SEED, dicom=dicom)
    assert str(pydicom.dcmread(truth.paths[0]).file_meta.TransferSyntaxUID) == transfer_syntax_uid
    reference = load_series(small_series.paths)
    volume = load_series(truth.paths)
    assert np.array_equal(volume.hu, reference.hu)
    assert volume.hu.min() == -1024 and volume.hu.max() > 400  # air clipped at the stored 0; bone


def test_modality_lut_is_applied(series: list[Path]) -> None:
    reference = load_series(series)
    ds = pydicom.dcmread(series[3])
    stored = ds.pixel_array.astype(np.int32)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -2048  # the same HU from halved stored values
    ds.PixelData = ((stored + 1024) // 2).astype(np.uint16).tobytes()  # (HU + 2048) / 2, HU = stored - 1024
    ds.save_as(series[3])
    volume = load_series(series)
    assert np.abs(volume.hu[3].astype(np.int32) - reference.hu[3]).max() <= 1
    assert np.array_equal(volume.hu[2], reference.hu[2])


# ----------------------------------------------------------------- refusals


def test_one_slice_is_not_enough(small_series: ChestTruth) -> None:
    with pytest.raises(InputError) as info:
        load_series([small_series.paths[0]])
    assert str(info.value) == "not enough slices: the series has 1 image, the pipeline needs at least 10"


def test_min_slices(small_series: ChestTruth) -> None:
    with pytest.raises(InputError, match=r"the series has 12 images, the pipeline needs at least 20"):
        load_series(small_series.paths, min_slices=20)
    with pytest.raises(InputError, match="has 0 images"):
        load_series([])


def _real_ct_slices() -> list[Path]:
    data = pydicom_data_files()
    names = ["693_UNCI.dcm", "693_UNCR.dcm", "693_J2KR.dcm", "explicit_VR-UN.dcm", "bad_sequence.dcm"]
    return [pydicom.examples.get_path("ct"), *(data / name for name in names)]


@pytest.mark.parametrize("path", _real_ct_slices(), ids=lambda p: p.name)
def test_a_real_single_ct_slice_is_refused_with_not_enough_slices(path: Path) -> None:
    with pytest.raises(
        InputError, match=r"^not enough slices: the series has 1 image, the pipeline needs at least 10$"
    ):
        load_series([path])


def test_a_real_single_ct_slice_decodes_when_one_slice_is_allowed() -> None:
    volume = load_series([pydicom.examples.get_path("ct")], min_slices=1)
    ds = pydicom.examples.ct
    assert volume.hu.shape == (1, 128, 128)
    expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert np.array_equal(volume.hu[0], expected)


def test_enhanced_ct_is_refused_as_multi_frame() -> None:
    with pytest.raises(InputError, match="multi-frame images are not supported: .*eCT_Supplemental.dcm"):
        load_series([pydicom_data_files() / "eCT_Supplemental.dcm"] * 12)


@pytest.mark.parametrize("name", ["MR2_UNCI.dcm", "US1_UNCR.dcm", "SC_rgb.dcm"])
def test_other_modalities_are_refused(name: str) -> None:
    with pytest.raises(InputError, match=r"not a CT image: .* has Modality '(MR|US|OT)'"):
        load_series([pydicom_data_files() / name] * 12)


def test_colour_ct_is_refused(series: list[Path]) -> None:
    _edit(series[4], SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0)
    with pytest.raises(InputError, match=r"not a grayscale image: .*IM\d+\.dcm has SamplesPerPixel 3"):
        load_series(series)


def test_mixed_orientation_is_refused(series: list[Path]) -> None:
    _edit(series[5], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    with pytest.raises(InputError) as info:
        load_series(series)
    message = str(info.value)
    assert message.startswith(
        "mixed orientation: 11 images with ImageOrientationPatient 1\\0\\0\\0\\1\\0, 1 with another"
    )
    assert series[5].name in message and "0\\1\\0\\0\\0\\-1" in message


def test_a_gap_in_slice_spacing_is_refused(series: list[Path]) -> None:
    series[6].unlink()
    del series[6]
    with pytest.raises(InputError) as info:
        load_series(series)
    message = str(info.value)
    assert message.startswith("inconsistent slice spacing: the median spacing is 3.000 mm")
    assert "6.000 mm between" in message and "a gap (missing slices?)" in message


def test_mixed_image_sizes_are_refused(small_series: ChestTruth, series: list[Path], tmp_path: Path) -> None:
    other = write_chest_ct(
        tmp_path / "other",
        PhantomSpec(slices=12, size=64),
        seed=5,
        dicom=DicomSpec(
            study_instance_uid=small_series.study_instance_uid,
            series_instance_uid=small_series.series_instance_uid,
        ),
    )
    shutil.copy(other.paths[7], series[7])
    with pytest.raises(
        InputError, match=r"^mixed image sizes \(rows x columns\): 11 images of 48x48, 1 image of 64x64"
    ):
        load_series(series)


def test_mixed_pixel_spacing_is_refused(series: list[Path]) -> None:
    _edit(series[2], PixelSpacing=[0.7, 0.7])
    with pytest.raises(InputError, match=r"^mixed pixel spacing: 11 images with PixelSpacing 8\.33333\\8\.33333 mm"):
        load_series(series)


def test_duplicate_positions_are_refused(series: list[Path]) -> None:
    copy = series[0].with_name("copy.dcm")
    shutil.copy(series[3], copy)
    _edit(copy, SOPInstanceUID=generate_uid())
    with pytest.raises(InputError, match=r"^duplicate slice positions: 1 pair of images at the same position"):
        load_series([*series, copy])


def test_missing_position_is_refused(series: list[Path]) -> None:
    _edit(series[8], ImagePositionPatient=None)
    with pytest.raises(InputError, match=r"^missing ImagePositionPatient in .*: cannot place the slice"):
        load_series(series)


def test_files_of_two_series_are_refused(series: list[Path]) -> None:
    _edit(series[1], SeriesInstanceUID=generate_uid())
    with pytest.raises(InputError, match=r"^the files belong to 2 series: 11 images of series"):
        load_series(series)


def test_a_file_that_is_not_dicom_is_refused(series: list[Path]) -> None:
    series[9].write_text("not a DICOM file")
    with pytest.raises(InputError, match=r"^cannot read .* as DICOM") as info:
        load_series(series)
    assert info.value.__cause__ is not None


def test_truncated_pixel_data_is_refused(series: list[Path]) -> None:
    ds = pydicom.dcmread(series[10])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(series[10])
    with pytest.raises(InputError, match=r"^cannot decode the pixel data of .*Explicit VR Little Endian") as info:
        load_series(series)
    assert info.value.__cause__ is not None


def test_corrupt_compressed_pixel_data_is_refused(tmp_path: Path) -> None:
    _encoder_or_skip(RLELossless)
    truth = write_chest_ct(tmp_path, SMALL, seed=SMALL_SEED, dicom=DicomSpec(transfer_syntax_uid=RLELossless))
    ds = pydicom.dcmread(truth.paths[4])
    ds.PixelData = encapsulate([b"\x02\x00\x00\x00" + b"\xff" * 60])  # an RLE header that lies
    ds.save_as(truth.paths[4])
    with pytest.raises(InputError, match=r"^cannot decode the pixel data of .*RLE Lossless") as info:
        load_series(truth.paths)
    assert info.value.__cause__ is not None


def test_no_lungs_found_is_an_input_error() -> None:
    phantom = make_chest_phantom(PhantomSpec(slices=80, size=64), seed=1)
    hu = phantom.hu.copy()
    hu[phantom.labels > 0] = 40  # solid chest; the trachea and bowel gas are left
    volume = Volume(
        hu=hu,
        spacing=phantom.spacing,
        origin=phantom.origin,
        row_direction=phantom.row_direction,
        column_direction=phantom.column_direction,
        datasets=(),
    )
    with pytest.raises(InputError, match=r"^no lungs found: the largest air region inside the body is \d+ mL"):
        segment_lungs(volume)
    empty = Volume(
        hu=np.full((12, 32, 32), -1000, dtype=np.int16),
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        datasets=(),
    )
    with pytest.raises(InputError, match="^no lungs found"):
        segment_lungs(empty)


def test_one_lung_only_is_an_input_error() -> None:
    phantom = make_chest_phantom(PhantomSpec(slices=40, size=64), seed=1)
    hu = phantom.hu.copy()
    hu[phantom.labels == 2] = 40  # no left lung
    volume = Volume(
        hu=hu,
        spacing=phantom.spacing,
        origin=phantom.origin,
        row_direction=phantom.row_direction,
        column_direction=phantom.column_direction,
        datasets=(),
    )
    with pytest.raises(InputError, match=r"^found only one lung: the right one"):
        segment_lungs(volume)


# ----------------------------------------------------------------- phantom files


def test_phantom_headers(small_series: ChestTruth) -> None:
    ds = pydicom.dcmread(small_series.paths[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.Modality == "CT" and ds.BodyPartExamined == "CHEST"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation) == (1, -1024, 0)
    assert ds.InstanceNumber == 1 and ds.StudyInstanceUID == small_series.study_instance_uid
    assert len({p.name for p in small_series.paths}) == SMALL.slices
