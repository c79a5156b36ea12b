"""The lung nodule pipeline's lesions on a real chest CT: the tumour is found as a mass, at most 3 false findings.

Scored by ``pacsnode evaluate --real``'s own function (two inferences per series, without and with inserted
nodules, shared by the tests).
Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0),
read where it lies via ``real_chest_ct()``; skipped when absent.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.helpers import REAL_CHEST_CT_SERIES, real_chest_ct

# The target for a real chest CT at default settings: at most 3 false findings per series.
# Measured: 0 on both series (the 5 mm slices report masses only; with the model's own nodules allowed on
# them, still 0: the model marks 354 and 935 spots in the lungs, over max_model_spots; with that limit off
# too, 42 on B and 98 on L: LesionFilter(max_nodule_slice_mm=None, max_model_spots=None)).
MAX_FALSE_FINDINGS = 3
# Nodules inserted into each series' lungs (seeded: evaluate's held-out seed).
INSERTED = 12
# Solid masses of 20-50 mm inserted at each series' pleura (seeded the same way).
PLEURAL = 12
# Of those with a RECIST long axis of 30 mm or more, at least this share is found as a mass. Measured 8/10 on
# the two series (4/5 each); 2/10 before a smaller compact blob could be a mass and the long axis was measured
# on the outline rather than the opened core (a crescent against the chest wall loses most to the opening).
PLEURAL_FLOOR = 0.6
# Of those under 30 mm, at least this share is found from the image. Measured 10/12 (4/5, 6/7);
# 1/12 before the image found nodules under the mass size.
PLEURAL_SMALL_FLOOR = 0.3


@pytest.fixture(scope="module")
def scores() -> dict[str, Any]:
    from pacsnode.analysis.cnn.package import load_package
    from pacsnode.analysis.modeldev.evaluation import evaluate_real_series

    report = evaluate_real_series(
        load_package("lung-nodule"), real_chest_ct(), device="cpu", inserted=INSERTED, pleural=PLEURAL
    )
    return {s.series: s for s in report.real_series} | {"report": report}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_CHEST_CT_SERIES))
def test_the_tumour_is_found_as_a_mass_with_at_most_3_false_findings(scores: dict[str, Any], name: str) -> None:
    score = scores[name]
    assert score.tumour_found, "the tumour is not among the findings"
    assert score.tumour_kind == "mass"
    # The boxes are 55-73 mm across on their largest slice; the RECIST long axis measured: 70.9 (B), 69.8 (L) mm
    # with the margin (59.8, 60.5 of the solid core alone).
    assert score.tumour_long_axis_mm is not None and 45.0 <= score.tumour_long_axis_mm <= 80.0
    assert score.false_findings <= MAX_FALSE_FINDINGS


@pytest.mark.slow
def test_the_report_counts_false_findings_per_series(scores: dict[str, Any]) -> None:
    report = scores["report"]
    assert report.real_tumours_found == f"{len(REAL_CHEST_CT_SERIES)}/{len(REAL_CHEST_CT_SERIES)}"
    assert report.real_false_findings_per_series == pytest.approx(
        sum(s.false_findings for s in report.real_series) / len(report.real_series)
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_CHEST_CT_SERIES))
def test_the_tumour_is_measured_without_the_hilum_it_joins(scores: dict[str, Any], name: str) -> None:
    score = scores[name]
    # The boxes span 45 (B) and 55 (L) mm of slices. With the hilar vessels and bronchi joined to its core the
    # mass ran over 95-100 mm of slices with a 3D extent of 98-104 mm; measured now: 35/40 mm, 83.4/82.3 mm.
    assert score.tumour_slices_mm is not None and 20.0 <= score.tumour_slices_mm <= 60.0
    assert score.tumour_extent_mm is not None and score.tumour_long_axis_mm <= score.tumour_extent_mm <= 90.0


@pytest.mark.slow
def test_nodules_inserted_into_the_real_lungs_are_scored_by_size(scores: dict[str, Any]) -> None:
    report = scores["report"]
    for score in report.real_series:
        assert 0 < score.inserted_nodules <= INSERTED
        _assert_counts_add_up(score.inserted_by_size, score.inserted_nodules, score.inserted_found)
        # The nodules add no false finding beyond the floor of the series without them.
        assert score.inserted_false_findings <= MAX_FALSE_FINDINGS
    # On these 5 mm slices the model's findings are not reported, and the image finds solid nodules of 15 mm
    # or more only: none under 10 mm is found (measured 0 of 12; a found one means the thick-slice rule
    # changed, and these figures with it). Of 10-20 mm, 2 of 6 (the solid ones of 15 mm or more).
    small = [report.real_inserted_by_size[k] for k in ("<6 mm", "6-10 mm")]
    assert all(v.startswith("0/") for v in small), report.real_inserted_by_size
    assert report.real_inserted_sensitivity is not None


@pytest.mark.slow
def test_solid_masses_at_the_pleura_are_found_mostly_from_30_mm_and_often_under_it(scores: dict[str, Any]) -> None:
    """A tumour against the chest wall or the mediastinum, like the real one but 20-50 mm across, is found (a
    finding overlaps it: on these 5 mm slices only the image's masses and solid nodules are reported) mostly
    from 30 mm, often under it, and adds no false finding."""
    report = scores["report"]
    for score in report.real_series:
        assert 0 < score.pleural_masses <= PLEURAL
        _assert_counts_add_up(score.pleural_by_size, score.pleural_masses, score.pleural_found)
        assert score.pleural_false_findings <= score.false_findings
    large = [_fraction(report.real_pleural_by_size[k]) for k in ("30-40 mm", ">=40 mm")]
    found, total = sum(f for f, _ in large), sum(t for _, t in large)
    assert total >= 6, report.real_pleural_by_size  # enough of them for the floor to mean something
    assert found >= PLEURAL_FLOOR * total, report.real_pleural_by_size
    small_found, small_total = _fraction(report.real_pleural_by_size["<30 mm"])
    assert small_total >= 6 and small_found >= PLEURAL_SMALL_FLOOR * small_total, report.real_pleural_by_size


def _fraction(value: str) -> tuple[int, int]:
    """``"3/5"`` -> (3, 5): found, inserted."""
    found, total = value.split("/")
    return int(found), int(total)


def _assert_counts_add_up(by_size: dict[str, str], inserted: int, found: int) -> None:
    counts = [_fraction(v) for v in by_size.values()]
    assert sum(total for _, total in counts) == inserted
    assert sum(f for f, _ in counts) == found
