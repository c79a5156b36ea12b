"""Model outputs to findings: components, sizes, side of the body, the cap on their number."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacsnode.analysis.cnn.findings import (
    find_components,
    findings_from_probabilities,
    longest_diameter_mm,
)
from pacsnode.analysis.cnn.package import LabelOutput
from pacsnode.analysis.types import Volume

LABEL = LabelOutput.model_validate(
    {
        "value": 1,
        "name": "nodule",
        "threshold": 0.5,
        "lateralize": True,
        "finding_site": {"scheme": "SCT", "value": "39607008", "meaning": "Lung"},
    }
)


def _volume(shape: tuple[int, int, int], *, body_centre_col: int, origin_x: float = -100.0) -> Volume:
    """1 mm voxels; a body of soft tissue centred on ``body_centre_col`` (patient x = origin_x + col)."""
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[:, 10:-10, body_centre_col - 60 : body_centre_col + 60] = 40
    datasets = []
    for k in range(shape[0]):
        ds = Dataset()
        ds.InstanceNumber = k + 1
        datasets.append(ds)
    return Volume(
        hu=hu,
        spacing=(1.0, 1.0, 1.0),
        origin=(origin_x, -100.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        datasets=tuple(datasets),
    )


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


def test_two_balls_become_two_measured_findings_on_their_side_of_the_body() -> None:
    shape = (30, 120, 200)
    # The body is centred at column 130, patient x = +30 mm: a finding at x = +10 is on the patient's right.
    volume = _volume(shape, body_centre_col=130)
    big = _ball(shape, (15, 60, 110), 6)  # x = +10 mm: right of the midline at +30
    small = _ball(shape, (15, 60, 160), 3)  # x = +60 mm: left
    prob = np.zeros((1, *shape), dtype=np.float16)
    prob[0][big] = 0.9
    prob[0][small] = 0.7
    findings = findings_from_probabilities(prob, volume, [LABEL], "sigmoid")
    assert [f.number for f in findings] == [1, 2]
    first, second = findings
    assert first.volume_ml == pytest.approx(big.sum() / 1000.0)
    assert first.probability == pytest.approx(0.9, abs=1e-3) and second.probability == pytest.approx(0.7, abs=1e-3)
    assert first.centroid_patient_mm == pytest.approx((10.0, -40.0, 15.0))
    assert first.location.startswith("right lung, image 16,") and second.location.startswith("left lung")
    assert first.laterality is not None and first.laterality.meaning == "Right"
    assert 12.0 <= first.longest_diameter_mm <= 14.5  # a 13-voxel-wide ball, measured corner to corner
    assert np.array_equal(first.mask, big)


def test_small_components_below_the_label_minimum_are_dropped() -> None:
    shape = (10, 40, 40)
    mask = np.zeros(shape, dtype=bool)
    mask[2, 2, 2] = True  # 1 mm3
    mask[5:8, 10:13, 10:13] = True  # 27 mm3
    labels, count = find_components(mask, (1.0, 1.0, 1.0), min_volume_mm3=10.0)
    assert count == 1 and labels[2, 2, 2] == 0 and labels[6, 11, 11] == 1


def test_the_number_of_findings_is_capped_keeping_the_largest() -> None:
    shape = (5, 60, 60)
    volume = _volume(shape, body_centre_col=30, origin_x=-30.0)
    prob = np.zeros((1, *shape), dtype=np.float16)
    for i in range(5):
        prob[0, 1:4, 5 + 10 * i : 5 + 10 * i + 2 + i, 5:8] = 0.8  # growing sizes
    findings = findings_from_probabilities(prob, volume, [LABEL], "sigmoid", max_findings=2)
    assert len(findings) == 2
    assert findings[0].volume_ml > findings[1].volume_ml
    assert findings[1].volume_ml == pytest.approx(3 * 5 * 3 / 1000.0)


def test_longest_diameter_of_a_line_of_voxels() -> None:
    index = np.array([[0, 0, i] for i in range(10)])
    assert longest_diameter_mm(index, (2.0, 1.0, 0.5)) == pytest.approx(np.sqrt(2.0**2 + 1.0**2 + 5.0**2))


def test_thresholding_float16_probabilities_as_integers_matches_the_float_comparison() -> None:
    from pacsnode.analysis.cnn.findings import _above

    rng = np.random.default_rng(0)
    probs = rng.random((4, 50, 50)).astype(np.float16)
    probs[0, 0, :4] = [0.0, 0.5, np.float16(0.5) - np.float16(0.0004), 1.0]
    for threshold in (0.0, 0.25, 0.5, 0.9999, 1.0):
        np.testing.assert_array_equal(_above(probs, threshold), probs >= threshold)
    logits = (rng.random((2, 5, 5)) * 4 - 2).astype(np.float16)  # negative values: the plain comparison
    np.testing.assert_array_equal(_above(logits, 0.5), logits >= 0.5)
