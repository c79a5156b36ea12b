"""The ``ct-lung`` segmentation on a real chest CT: two reconstructions of one patient's scan.

``A0001-5mm-B`` (soft-tissue kernel) and ``A0001-5mm-L`` (lung kernel), 64 slices of 512x512,
5 mm apart. The same lungs must come out of both; the trachea, traced here independently of
pacsnode's airway tracing, must not count as lung; the main bronchi are left out too.

Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461,
CC BY 4.0), subject Lung_Dx-A0001, read where it lies (``tests.support.helpers.real_chest_ct``);
the tests skip, saying why, when it is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from scipy import ndimage

from pacsnode.analysis.lung.segmentation import NOISY_PARENCHYMA_HU, segment_lungs
from pacsnode.analysis.types import LungResult, Volume
from pacsnode.analysis.volume import load_series
from tests.support.helpers import REAL_CHEST_CT_SERIES, real_chest_ct


@dataclass(frozen=True)
class Series:
    volume: Volume
    result: LungResult


@pytest.fixture(scope="module")
def real() -> dict[str, Series]:
    folder = real_chest_ct()
    out = {}
    for name in REAL_CHEST_CT_SERIES:
        volume = load_series(sorted((folder / name).glob("*.dcm")))
        out[name] = Series(volume=volume, result=segment_lungs(volume))
    return out


def _trace_trachea(volume: Volume) -> np.ndarray:
    """The trachea, from the top slice down to just above the carina, by plain thresholding.

    In the top slice: the 2D air region (below -500 HU, not touching the image border) of a
    trachea's size that is nearest the body's centre column. Then slice by slice downwards: the one
    air region that overlaps the trachea of the slice above and is at most twice its area;
    the trace stops where there is none or more than one (the carina, or where it joins a lung).
    """
    hu = volume.hu
    assert volume.column_direction == (0.0, 1.0, 0.0) and volume.row_direction == (1.0, 0.0, 0.0)
    assert volume.datasets[-1].ImagePositionPatient[2] > volume.datasets[0].ImagePositionPatient[2]
    pixel_mm2 = volume.spacing[1] * volume.spacing[2]
    trachea = np.zeros(hu.shape, dtype=bool)
    previous: np.ndarray | None = None
    for k in range(hu.shape[0] - 1, -1, -1):
        labels, count = ndimage.label(hu[k] < -500)
        border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        if previous is None:
            body_column = float(np.nonzero(hu[k] >= -500)[1].mean())
            candidates = [
                i for i in range(1, count + 1) if i not in border and 80 <= areas[i] * pixel_mm2 <= 600
            ]  # fmt: skip
            assert candidates, "no trachea-sized air region in the top slice"
            best = min(candidates, key=lambda i: abs(float(np.nonzero(labels == i)[1].mean()) - body_column))
        else:
            overlapping = [int(i) for i in np.unique(labels[previous]) if i and i not in border]
            if len(overlapping) != 1 or areas[overlapping[0]] > 2 * np.count_nonzero(previous):
                break
            best = overlapping[0]
        previous = labels == best
        trachea[k] = previous
    return trachea


def test_both_kernels_give_total_volumes_within_2_percent(real: dict[str, Series]) -> None:
    soft, sharp = (real[name].result for name in REAL_CHEST_CT_SERIES)
    assert abs(soft.total_volume_ml - sharp.total_volume_ml) <= 0.02 * min(soft.total_volume_ml, sharp.total_volume_ml)
    for side in ("right", "left"):
        a, b = getattr(soft, f"{side}_volume_ml"), getattr(sharp, f"{side}_volume_ml")
        assert abs(a - b) <= 0.02 * min(a, b), side


@pytest.mark.parametrize("name", REAL_CHEST_CT_SERIES)
def test_lung_volumes_are_plausible(real: dict[str, Series], name: str) -> None:
    result = real[name].result
    assert 3000.0 <= result.total_volume_ml <= 8000.0
    assert result.right_volume_ml > result.left_volume_ml > 1000.0  # the right lung is the larger one
    assert not any("not found" in note for note in result.notes)
    assert -900.0 < result.mean_density_hu < -700.0


def test_the_sharp_kernel_is_flagged_as_too_noisy_for_laa950(real: dict[str, Series]) -> None:
    """The lung kernel's noise puts parenchyma below -950 HU: its LAA-950 is many times the soft kernel's."""
    soft, sharp = (real[name].result for name in REAL_CHEST_CT_SERIES)
    assert soft.parenchyma_noise_hu < NOISY_PARENCHYMA_HU < sharp.parenchyma_noise_hu
    assert soft.notes == ()
    assert len(sharp.notes) == 1 and sharp.notes[0].startswith("LAA-950 is likely overestimated")
    assert sharp.laa950_percent > 10 * soft.laa950_percent


@pytest.mark.parametrize("name", REAL_CHEST_CT_SERIES)
def test_no_voxel_of_the_trachea_is_counted_as_lung(real: dict[str, Series], name: str) -> None:
    series = real[name]
    trachea = _trace_trachea(series.volume)
    traced = np.flatnonzero(trachea.any(axis=(1, 2)))
    assert traced.size >= 10, "the test's own trace should follow the trachea over 5 cm at least"
    assert np.count_nonzero(series.result.labels[trachea]) == 0
    airways = series.result.airways
    assert airways is not None
    assert np.count_nonzero(airways & trachea) >= 0.95 * np.count_nonzero(trachea)


@pytest.mark.parametrize("name", REAL_CHEST_CT_SERIES)
def test_the_main_bronchi_are_left_out_down_to_the_hila(real: dict[str, Series], name: str) -> None:
    """Below the carina the airways go on, on both sides, but stop at the hila: a few tens of mL."""
    series = real[name]
    trachea = _trace_trachea(series.volume)
    lowest = int(np.flatnonzero(trachea.any(axis=(1, 2)))[0])
    centre_column = float(np.nonzero(trachea[lowest])[1].mean())
    airways = series.result.airways
    assert airways is not None
    columns = np.nonzero(airways[:lowest])[2]
    offset_mm = (columns - centre_column) * series.volume.spacing[2]
    assert (offset_mm < -15.0).any() and (offset_mm > 15.0).any()  # both main bronchi, 15 mm off the midline
    assert 15.0 <= series.result.airway_volume_ml <= 100.0
    assert np.count_nonzero(series.result.labels[airways]) == 0
