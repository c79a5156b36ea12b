"""Tests of pacsnode.analysis.volume, pacsnode.analysis.lung.segmentation and pacsnode.analysis.modeldev.synthetic: phantom -> files -> HU volume -> lungs.

The phantom's truth (volumes, LAA-950, mean density) comes from its exact voxel
masks; the segmentation of the written files must find it within 3 % (volumes)
and 1 point (LAA-950), leave the trachea and main bronchi out, and report a
missing (collapsed) lung instead of failing. The loader must drop the images
that are not part of the main stack (a scout, another orientation, pixel
spacing or size, a stray slice) with a log line, and refuse, with a clear
message, what it cannot make into a regular CT volume, including the real
single CT slices shipped with pydicom and pydicom-data.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pydicom.examples
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from scipy import ndimage

from pacsnode.analysis.errors import InputError
from pacsnode.analysis.lung.pipeline import CtLungParams, CtLungPipeline
from pacsnode.analysis.lung.segmentation import segment_lungs
from pacsnode.analysis.modeldev.synthetic import (
    ChestPhantom,
    ChestTruth,
    DicomSpec,
    PhantomSpec,
    make_chest_phantom,
    write_chest_ct,
)
from pacsnode.analysis.pipelines import PipelineInput, SeriesInput
from pacsnode.analysis.results.core import CODES
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


def _distance_to_segment(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    axis = end - start
    t = np.clip(((points - start) @ axis) / float(axis @ axis), 0.0, 1.0)
    distance: np.ndarray = np.linalg.norm(points - (start + t[..., None] * axis), axis=-1)
    return distance


def test_trachea_and_main_bronchi_joined_to_the_lungs_are_not_lung() -> None:
    """The phantom's trachea continued by two bronchi (air tubes through the mediastinum) into the lungs.

    Joined so, trachea, bronchi and both lungs are one air region; none of the trachea nor the
    bronchi in the mediastinum may be labelled lung, and the lung volumes stay those of the truth.
    """
    spec = PhantomSpec(slices=80, size=128, blur_sigma_mm=1.0)
    phantom = make_chest_phantom(spec, seed=6)
    volume = phantom.to_volume()
    k, r, c = np.meshgrid(*(np.arange(n) for n in phantom.hu.shape), indexing="ij")
    points = np.stack(
        [
            phantom.origin[0] + c * phantom.spacing[2],
            phantom.origin[1] + r * phantom.spacing[1],
            phantom.origin[2] + k * phantom.spacing[0],
        ],
        axis=-1,
    )
    z0 = -150.0  # the phantom's anatomy is centred on this z
    carina = np.array([0.0, -30.0, z0 + 60.0])
    top = np.array([0.0, -30.0, float(points[-1, 0, 0, 2]) + 10.0])
    ends = [np.array([-45.0, -20.0, z0 + 30.0]), np.array([45.0, -20.0, z0 + 34.0])]  # inside each lung
    hu = phantom.hu.copy()
    for end in ends:
        hu[_distance_to_segment(points, carina, end) <= 5.0] = -1000
    trachea_core = _distance_to_segment(points, carina, top) <= 6.0
    # The bronchi in the mediastinum: more than 8 mm from the lungs (the cut at the hila may leave less).
    mediastinum = ndimage.distance_transform_edt(phantom.labels == 0, sampling=phantom.spacing) > 8.0
    bronchi_core = np.zeros(hu.shape, dtype=bool)
    for end in ends:
        bronchi_core |= (_distance_to_segment(points, carina, end) <= 3.0) & mediastinum
    assert trachea_core.any() and bronchi_core.any()

    joined = segment_lungs(replace(volume, hu=hu), remove_airways=False)
    assert joined.labels[trachea_core].any()  # without the airway tracing they count as lung
    result = segment_lungs(replace(volume, hu=hu))
    assert not result.labels[trachea_core].any()
    assert not result.labels[bronchi_core].any()
    assert result.airways is not None and result.airways[trachea_core].all()
    assert 5.0 < result.airway_volume_ml < 60.0
    for side in ("right", "left", "total"):
        expected = getattr(phantom, f"{side}_volume_ml")
        assert abs(getattr(result, f"{side}_volume_ml") - expected) <= 0.03 * expected, side


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


def _odd_copy(series: list[Path], index: int, name: str, **attributes: object) -> Path:
    """A copy of slice ``index`` as a new image of the series (new SOP Instance UID), edited."""
    copy = series[0].with_name(name)
    shutil.copy(series[index], copy)
    _edit(copy, SOPInstanceUID=generate_uid(), **attributes)
    return copy


def _loads_as_the_stack(series: list[Path], odd: list[Path], caplog: pytest.LogCaptureFixture, reason: str) -> None:
    """``series`` plus the ``odd`` images loads to the volume of ``series`` alone, and says it dropped them."""
    reference = load_series(series)
    with caplog.at_level(logging.INFO, logger="pacsnode.analysis.volume"):
        volume = load_series([*series, *odd])
    assert np.array_equal(volume.hu, reference.hu)
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [ds.SOPInstanceUID for ds in reference.datasets]
    dropped = [r.getMessage() for r in caplog.records if "not part of the main stack" in r.getMessage()]
    assert len(dropped) == 1, caplog.text
    assert f"dropped {len(odd)} of {len(series) + len(odd)} images" in dropped[0] and reason in dropped[0]
    assert odd[0].name in dropped[0]


def test_a_scout_in_the_series_is_dropped(series: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    """A localizer (ImageType LOCALIZER), here a coronal one: the axial stack still loads."""
    scout = _odd_copy(
        series, 3, "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
    )  # fmt: skip
    _loads_as_the_stack(series, [scout], caplog, "1 localizer (ImageType LOCALIZER)")


def test_a_scout_in_a_written_phantom_series_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The synthetic chest, with a scout added, still loads and gives the lungs of the phantom."""
    truth = write_chest_ct(tmp_path / "chest", PhantomSpec(slices=64, size=96), seed=3)
    scout = _odd_copy(
        truth.paths, 10, "scout.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1], ImagePositionPatient=[-200.0, 0.0, 0.0],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="pacsnode.analysis.volume"):
        volume = load_series([scout, *truth.paths])
    assert volume.hu.shape == truth.shape
    assert [ds.SOPInstanceUID for ds in volume.datasets] == truth.sop_instance_uids  # the scout is not a slice
    assert "1 localizer" in caplog.text
    result = segment_lungs(volume)
    assert abs(result.total_volume_ml - truth.total_volume_ml) <= 0.03 * truth.total_volume_ml


def test_an_image_of_another_orientation_is_dropped(series: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    odd = _odd_copy(series, 5, "sagittal.dcm", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _loads_as_the_stack(series, [odd], caplog, "1 image with ImageOrientationPatient 0\\1\\0\\0\\0\\-1")


def test_an_image_of_another_pixel_spacing_is_dropped(series: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    odd = _odd_copy(series, 2, "zoomed.dcm", PixelSpacing=[0.7, 0.7])
    _loads_as_the_stack(series, [odd], caplog, "1 image with PixelSpacing 0.7\\0.7 mm")


def test_a_slice_far_from_the_stack_is_dropped(series: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    """A stray image 100 mm beyond the last slice (3 mm apart): an outlier, not a gap to refuse."""
    last = pydicom.dcmread(series[-1], stop_before_pixels=True)
    x, y, z = (float(v) for v in last.ImagePositionPatient)
    odd = _odd_copy(series, 11, "stray.dcm", ImagePositionPatient=[x, y, z + 100.0])
    _loads_as_the_stack(series, [odd], caplog, "far from the stack along the slice normal (1 image)")


def test_a_series_of_localizers_only_is_refused(series: list[Path]) -> None:
    for path in series:
        _edit(path, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    with pytest.raises(InputError, match=r"^no images to make a volume of: all 12 images of the series are localizers"):
        load_series(series)


def test_two_stacks_of_the_same_size_are_refused(series: list[Path]) -> None:
    for path in series[6:]:
        _edit(path, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    with pytest.raises(InputError) as info:
        load_series(series)
    message = str(info.value)
    assert message.startswith("no main stack: the images form groups of the same size: 6 images of 48x48")
    assert "ImageOrientationPatient 1\\0\\0\\0\\1\\0" in message and "0\\1\\0\\0\\0\\-1" in message


def test_a_main_stack_too_small_after_the_odd_images_is_refused(series: list[Path]) -> None:
    for path in series[:4]:
        _edit(path, PixelSpacing=[0.7, 0.7])
    with pytest.raises(InputError) as info:
        load_series(series)
    assert str(info.value).startswith(
        "not enough slices: the main stack has 8 images (4 other images dropped: 4 images with PixelSpacing 0.7\\0.7 mm"
    )


def test_a_gap_in_slice_spacing_is_refused(series: list[Path]) -> None:
    series[6].unlink()
    del series[6]
    with pytest.raises(InputError) as info:
        load_series(series)
    message = str(info.value)
    assert message.startswith("inconsistent slice spacing: the median spacing is 3.000 mm")
    assert "6.000 mm between" in message and "a gap (missing slices?)" in message


def test_an_image_of_another_size_is_dropped(
    small_series: ChestTruth, series: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = write_chest_ct(
        tmp_path / "other",
        PhantomSpec(slices=12, size=64),
        seed=5,
        dicom=DicomSpec(
            study_instance_uid=small_series.study_instance_uid,
            series_instance_uid=small_series.series_instance_uid,
        ),
    )
    odd = series[0].with_name("larger.dcm")
    shutil.copy(other.paths[7], odd)
    _loads_as_the_stack(series, [odd], caplog, "1 image of size 64x64, not 48x48")


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


@pytest.mark.parametrize("missing", ["right", "left"])
def test_one_lung_gives_results_that_say_the_other_was_not_found(missing: str) -> None:
    """A collapsed (airless) lung: the other one is measured, the missing one is 0 mL with a note."""
    phantom = make_chest_phantom(PhantomSpec(slices=80, size=96, blur_sigma_mm=1.0, collapsed_lung=missing), seed=1)
    present = "left" if missing == "right" else "right"
    assert getattr(phantom, f"{missing}_volume_ml") == 0.0
    result = segment_lungs(phantom.to_volume())
    expected = getattr(phantom, f"{present}_volume_ml")
    assert abs(getattr(result, f"{present}_volume_ml") - expected) <= 0.03 * expected
    assert getattr(result, f"{missing}_volume_ml") == 0.0
    assert result.total_volume_ml == getattr(result, f"{present}_volume_ml")
    assert np.isnan(getattr(result, f"{missing}_mean_density_hu"))
    assert np.isnan(getattr(result, f"{missing}_laa950_percent"))
    assert np.isfinite(result.mean_density_hu) and abs(result.laa950_percent - phantom.laa950_percent) <= 1.0
    assert set(np.unique(result.labels).tolist()) == {0, 1 if present == "right" else 2}
    assert len(result.notes) == 1
    assert result.notes[0].startswith(f"{missing} lung not found: no air region of at least 100 mL")
    assert "its volume is reported as 0 mL" in result.notes[0]


def test_stomach_gas_is_not_taken_for_the_missing_lung() -> None:
    """A collapsed left lung and a 180 mL gas bubble under the left diaphragm: the bubble is no lung."""
    phantom = make_chest_phantom(PhantomSpec(slices=80, size=96, collapsed_lung="left"), seed=1)
    k, r, c = np.meshgrid(*(np.arange(n) for n in phantom.hu.shape), indexing="ij")
    x = phantom.origin[0] + c * phantom.spacing[2]
    y = phantom.origin[1] + r * phantom.spacing[1]
    z = phantom.origin[2] + k * phantom.spacing[0]
    bubble = (x - 60.0) ** 2 + y**2 + (z - (-150.0 - 90.0)) ** 2 <= 35.0**2  # below the lungs (centre z -150)
    hu = phantom.hu.copy()
    hu[bubble] = -1000
    assert np.count_nonzero(bubble) * phantom.to_volume().voxel_ml > 150.0
    result = segment_lungs(replace(phantom.to_volume(), hu=hu))
    assert result.left_volume_ml == 0.0 and not result.labels[bubble].any()
    assert [note.split(":")[0] for note in result.notes] == ["left lung not found"]


def test_the_pipeline_reports_a_missing_lung_in_its_summary_sr_and_key_images(tmp_path: Path) -> None:
    truth = write_chest_ct(tmp_path / "chest", PhantomSpec(slices=64, size=96, collapsed_lung="left"), seed=2)
    series = SeriesInput(
        series_instance_uid=truth.series_instance_uid, modality="CT", series_description="", paths=tuple(truth.paths)
    )
    inputs = PipelineInput(job_id=1, study_instance_uid=truth.study_instance_uid, series=(series,), uid_root="2.25")
    output = CtLungPipeline().run(inputs, CtLungParams())
    summary = output.summary
    assert summary["left_lung_volume_ml"] == 0.0
    assert abs(summary["right_lung_volume_ml"] - truth.right_volume_ml) <= 0.03 * truth.right_volume_ml
    assert [note.split(":")[0] for note in summary["notes"]] == ["left lung not found"]
    seg, sr, *scs = output.datasets
    assert len(scs) == 3 and len(seg.SegmentSequence) == 2
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    status = {}
    for group in report.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment is not None
        number = group.referenced_segment.referenced_segment_numbers[0]
        volume = [m.value for m in group.get_measurements() if m.name == CODES.volume]
        values = [e.value for e in group.get_qualitative_evaluations() if e.name == CODES.lung_status]
        status[number] = (volume, values)
    assert status[2] == ([0.0], [CODES.lung_not_found])
    assert status[1][1] == [] and status[1][0][0] > 1000.0


def test_both_lungs_give_no_notes(chest: Chest) -> None:
    assert chest.result.notes == ()


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
