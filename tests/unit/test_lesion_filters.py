"""Lung lesions among model findings: the lungs' region, tube and sheet shapes dropped, RECIST axes, masses.

The shape tests run on probability maps over a uniform body (``SHAPE_ONLY``); the density, slice and
mass tests on painted images (lung at -850 HU, soft tissue at 40 HU).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from pacsnode.analysis.cnn.findings import (
    MASS_MM,
    SHAPE_ONLY,
    LesionFilter,
    axial_diameter_mm,
    findings_from_probabilities,
)
from pacsnode.analysis.cnn.writers import Finding
from pacsnode.analysis.lung.region import region_from_labels
from pacsnode.analysis.types import Volume
from tests.unit.test_findings import LABEL, _ball, _volume

SHAPE = (60, 120, 120)


def _prob(mask: np.ndarray) -> np.ndarray:
    return mask[None].astype(np.float32)


LESIONS = SHAPE_ONLY


def _findings(
    mask: np.ndarray, region: np.ndarray | None = None, lesions: LesionFilter | None = LESIONS
) -> list[Finding]:
    volume = _volume(SHAPE, body_centre_col=60)
    return findings_from_probabilities(_prob(mask), volume, [LABEL], "sigmoid", region=region, lesions=lesions)


def test_a_sphere_is_kept_a_tube_and_a_sheet_are_dropped() -> None:
    sphere = _ball(SHAPE, (30, 40, 40), 6)
    tube = np.zeros(SHAPE, dtype=bool)
    tube[10:50, 90:93, 90:93] = True  # a vessel: 40 mm long, 3 mm wide
    sheet = np.zeros(SHAPE, dtype=bool)
    sheet[20:45, 60:62, 20:50] = True  # pleura: 25 x 30 mm, 2 mm thin
    found = _findings(sphere | tube | sheet)
    assert len(found) == 1
    assert found[0].mask[30, 40, 40]
    # Without the filter all three are findings: the test above can tell them apart.
    assert len(_findings(sphere | tube | sheet, lesions=None)) == 3


def test_a_rim_along_the_region_edge_is_dropped_a_ball_inside_kept() -> None:
    region = np.zeros(SHAPE, dtype=bool)
    region[:, 20:100, 20:100] = True
    rim = region & ~np.pad(np.ones((60, 76, 76), dtype=bool), ((0, 0), (22, 22), (22, 22)))  # 2 mm inside the edge
    rim[:, 20:60, :] = False  # an arc of it: thin and curved, not one plane
    rim[:, :, 20:40] = False
    ball = _ball(SHAPE, (30, 60, 60), 7)
    found = _findings(rim | ball, region=region)
    assert [bool(f.mask[30, 60, 60]) for f in found] == [True]
    assert len(_findings(rim | ball, region=region, lesions=None)) == 2


def test_findings_outside_the_lung_region_are_dropped() -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[:, 20:100, 15:55] = 1
    labels[:, 20:100, 65:105] = 2
    region = region_from_labels(labels)
    inside = _ball(SHAPE, (30, 60, 35), 5)
    between = _ball(SHAPE, (30, 60, 60), 4)  # the mediastinum, between the two lungs
    found = _findings(inside | between, region=region)
    assert len(found) == 1 and found[0].mask[30, 60, 35]
    assert len(_findings(inside | between, region=None)) == 2


def test_the_region_closes_a_bay_of_the_lung_outline() -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[:, 20:100, 15:55] = 1
    labels[:, 50:70, 15:30] = 0  # a tumour against the chest wall: soft tissue, a bay in the air
    region = region_from_labels(labels)
    assert region[30, 60, 25] and not (labels[30, 60, 25])
    assert not region[30, 60, 70]


def test_recist_long_axis_is_in_plane_the_3d_extent_second() -> None:
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    # Semi-axes 25 mm along the slices, 8 mm along rows, 12 mm along columns (1 mm voxels).
    ellipsoid = ((z - 30) / 25.0) ** 2 + ((y - 60) / 8.0) ** 2 + ((x - 60) / 12.0) ** 2 <= 1.0
    (finding,) = _findings(ellipsoid, lesions=None)
    assert finding.longest_diameter_mm == pytest.approx(25.0, abs=2.0)  # 2 x 12 mm, on the middle slice
    assert finding.extent_mm is not None and finding.extent_mm == pytest.approx(51.0, abs=2.0)  # 2 x 25 mm
    assert axial_diameter_mm(np.argwhere(ellipsoid), (1.0, 1.0, 1.0)) == finding.longest_diameter_mm


@pytest.mark.parametrize(("radius", "kind"), [(16.0, "mass"), (13.0, "nodule")])
def test_a_lesion_of_30_mm_or_more_is_a_mass(radius: float, kind: str) -> None:
    (finding,) = _findings(_ball(SHAPE, (30, 60, 60), radius))
    assert finding.kind == kind
    assert (finding.longest_diameter_mm >= MASS_MM) == (kind == "mass")


def _lung_volume(slice_mm: float = 1.0) -> tuple[Volume, np.ndarray]:
    """A lung of -850 HU filling the middle of the body (1 mm pixels, ``slice_mm`` slices) and its region."""
    volume = _volume(SHAPE, body_centre_col=60)
    hu = volume.hu.copy()
    region = np.zeros(SHAPE, dtype=bool)
    region[:, 20:100, 20:100] = True
    hu[region] = -850
    return replace(volume, hu=hu, spacing=(slice_mm, 1.0, 1.0)), region


def _lesions_in(volume: Volume, prob_mask: np.ndarray, region: np.ndarray, **rules: Any) -> list[Finding]:
    return findings_from_probabilities(
        _prob(prob_mask), volume, [LABEL], "sigmoid", region=region, lesions=LesionFilter(**rules)
    )


def test_a_dense_nodule_is_kept_a_faint_one_and_a_branching_streak_dropped() -> None:
    volume, region = _lung_volume()
    nodule = _ball(SHAPE, (30, 40, 40), 5)
    faint = _ball(SHAPE, (30, 80, 40), 5)
    streak = np.zeros(SHAPE, dtype=bool)  # the blur along a branching vessel, as the phantom model marks it
    streak[28:33, 60:64, 60:84] = True
    streak[28:33, 60:84, 80:84] = True
    volume.hu[nodule] = 0
    volume.hu[faint] = -800  # 50 HU above its lung: noise, not ground glass
    volume.hu[streak] = -500
    found = _lesions_in(volume, nodule | faint | streak, region)
    assert [bool(f.mask[30, 40, 40]) for f in found] == [True]
    assert found[0].kind == "nodule"
    # The shape tests alone keep all three: the fill and density tests are what tells them apart.
    shape_only = findings_from_probabilities(
        _prob(nodule | faint | streak), volume, [LABEL], "sigmoid", lesions=LESIONS
    )
    assert len(shape_only) == 3


def test_on_thick_slices_only_masses_are_reported() -> None:
    volume, region = _lung_volume(slice_mm=5.0)
    nodule = _ball(SHAPE, (30, 40, 40), 6)
    mass = np.zeros(SHAPE, dtype=bool)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    mass = ((z - 30) * 5.0 / 20.0) ** 2 + ((y - 70) / 18.0) ** 2 + ((x - 70) / 18.0) ** 2 <= 1.0  # 36 mm across
    volume.hu[nodule] = 0
    volume.hu[mass] = 35
    rim = _ball(SHAPE, (30, 70, 70), 0) | (mass & ~np.roll(mass, 3, axis=2))  # the model marks only an edge
    found = _lesions_in(volume, nodule | rim, region)
    assert len(found) == 1 and found[0].kind == "mass" and found[0].mask[30, 70, 70]
    assert found[0].longest_diameter_mm == pytest.approx(37.0, abs=2.5)
    # On thin slices the same nodule is reported beside the mass.
    thin, _ = _lung_volume(slice_mm=1.0)
    thin.hu[:] = volume.hu
    kinds = sorted(f.kind or "" for f in _lesions_in(thin, nodule, region))
    assert kinds == ["nodule"]


def test_a_model_marking_more_spots_than_the_limit_has_none_reported() -> None:
    volume, region = _lung_volume()
    nodule = _ball(SHAPE, (30, 40, 40), 5)
    spots = np.zeros(SHAPE, dtype=bool)
    for k in range(6):  # the blur of vessels crossing the slices, as the model marks it on a real chest
        spots |= _ball(SHAPE, (10 + 8 * k, 80, 30 + 10 * k), 2)
    volume.hu[nodule] = 0
    marked = nodule | spots  # 7 separate spots
    assert any(f.mask[30, 40, 40] for f in _lesions_in(volume, marked, region, max_model_spots=7))
    assert _lesions_in(volume, marked, region, max_model_spots=6) == []
    assert any(f.mask[30, 40, 40] for f in _lesions_in(volume, marked, region, max_model_spots=None))


def test_the_pipeline_params_set_the_spot_limit() -> None:
    from pacsnode.analysis.cnn.pipeline import LungNodulePipeline, ModelParams

    pipeline = LungNodulePipeline()
    default = pipeline._lesions(ModelParams())
    assert default is not None and default.max_model_spots == LesionFilter().max_model_spots
    off = pipeline._lesions(ModelParams(max_model_spots=None))
    assert off == replace(LesionFilter(), max_model_spots=None)


def test_soft_tissue_thinner_than_the_mass_core_is_no_mass() -> None:
    volume, region = _lung_volume(slice_mm=5.0)
    volume.hu[:, 58:66, 20:100] = 40  # a band of tissue 8 mm thick across the lung (a fissure, a vessel): no mass
    assert _lesions_in(volume, np.zeros(SHAPE, dtype=bool), region) == []


def _hilar_mass() -> tuple[Volume, np.ndarray, dict[str, np.ndarray]]:
    """On 5 mm slices: a solid mass 36 mm across (slices 26-34) with a ground-glass margin 6 mm wide on its
    lateral side, a vessel 2 mm wide leaving it medially, and a hilar trunk 16 mm across joined to its top
    that runs on 80 mm above it (slices 10-30)."""
    volume, region = _lung_volume(slice_mm=5.0)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    in_plane = np.sqrt((y - 60.0) ** 2 + (x - 60.0) ** 2)
    slab = np.broadcast_to(np.abs(z - 30) <= 4, SHAPE)
    radius = 18.0 * np.sqrt(np.clip(1.0 - ((z - 30) * 5.0 / 22.0) ** 2, 0.0, None))  # the solid's, per slice
    solid = slab & (in_plane <= radius)
    vessel = np.zeros(SHAPE, dtype=bool)
    vessel[30, 59:61, 21:42] = True
    trunk = np.broadcast_to((z >= 10) & (z <= 30), SHAPE) & (in_plane <= 8.0)
    margin = slab & (in_plane > radius) & (in_plane <= radius + 6.0) & (x > 66) & ~trunk
    volume.hu[margin] = -400
    volume.hu[vessel | trunk | solid] = 40
    return volume, region, {"solid": solid, "margin": margin, "vessel": vessel, "trunk": trunk & ~slab}


def test_a_mass_has_no_probability_and_says_it_comes_from_the_image() -> None:
    volume, region, _ = _hilar_mass()
    (mass,) = _lesions_in(volume, np.zeros(SHAPE, dtype=bool), region)
    assert (mass.kind, mass.source, mass.probability) == ("mass", "image rule", None)
    # Its key image is the slice of its long axis.
    assert mass.key_slice is not None
    assert axial_diameter_mm(np.argwhere(mass.mask[mass.key_slice])[:, [0, 0, 1]] * [0, 1, 1], (5.0, 1.0, 1.0)) == (
        pytest.approx(mass.longest_diameter_mm)
    )


def test_a_mass_takes_in_its_margin_but_not_a_vessel_or_the_hilar_trunk() -> None:
    volume, region, parts = _hilar_mass()
    (mass,) = _lesions_in(volume, np.zeros(SHAPE, dtype=bool), region)
    # All of the solid but its two polar slices, whose sections are under half its long axis (as a trunk's are).
    assert mass.mask[parts["solid"]].mean() > 0.9
    # Most of the margin (the averaging leaves its outer millimetre out); the opened core alone has none of it.
    kept = mass.mask.any(axis=(1, 2))
    assert mass.mask[parts["margin"] & kept[:, None, None]].mean() > 0.6
    # The vessel is left out beyond the blur at the mass's edge.
    assert not mass.mask[30, 59:61, 21:38].any()
    # The trunk above the mass is not the mass: its slices, extent and volume are the mass's own.
    assert not mass.mask[parts["trunk"]].any()
    slices = np.flatnonzero(mass.mask.any(axis=(1, 2)))
    assert slices.min() >= 26 and slices.max() <= 34
    assert mass.extent_mm is not None and mass.extent_mm < 60.0  # with the trunk: over 100 mm
    # Without the margin and slice rules the core is what is measured.
    core_only = findings_from_probabilities(
        _prob(np.zeros(SHAPE, dtype=bool)), volume, [LABEL], "sigmoid", region=region,
        lesions=LesionFilter(margin_hu=None, min_section_fraction=None),
    )  # fmt: skip
    (core,) = core_only
    assert core.mask[parts["trunk"]].any() and not core.mask[parts["margin"]].any()
    assert core.extent_mm is not None and core.extent_mm > 100.0


def test_a_compact_mass_under_the_volume_of_a_30_mm_sphere_is_a_mass_a_tangle_of_that_size_not() -> None:
    """A tumour of 30-40 mm against the chest wall has less than a 30 mm sphere's volume in the lung: it is a
    mass when it is compact; the vessels and bronchi of a hilum that survive the opening are not."""
    from pacsnode.analysis.cnn.findings import find_masses, shape_of

    volume, region = _lung_volume(slice_mm=5.0)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    # Half an ellipsoid against the region's edge (column 20): 36 mm along the chest wall, 19 mm into the
    # lung, 25 mm of slices.
    compact = ((z - 30) * 5.0 / 12.5) ** 2 + ((y - 40) / 18.0) ** 2 + ((x - 20) / 19.0) ** 2 <= 1.0
    compact &= region
    # An L of two bars 12 mm wide, 32 and 32 mm long, over 4 slices (20 mm): a tangle with a longer reach.
    tangle = np.zeros(SHAPE, dtype=bool)
    tangle[28:32, 60:72, 44:76] = True
    tangle[28:32, 72:92, 44:56] = True
    volume.hu[compact | tangle] = 40
    sphere_mm3 = np.pi / 6.0 * MASS_MM**3
    for blob in (compact, tangle):
        assert np.count_nonzero(blob) * 5.0 < sphere_mm3  # under the old volume floor
    assert (
        shape_of(np.argwhere(compact), (5.0, 1.0, 1.0)).fill > 0.8 > shape_of(np.argwhere(tangle), (5.0, 1.0, 1.0)).fill
    )
    found = _lesions_in(volume, np.zeros(SHAPE, dtype=bool), region)
    assert [(f.kind, bool(f.mask[30, 40, 25])) for f in found] == [("mass", True)]
    assert found[0].longest_diameter_mm >= MASS_MM
    # Without the compactness tests the tangle is a mass too; without the compact rule the tumour is none.
    loose = _lesions_in(volume, np.zeros(SHAPE, dtype=bool), region, compact_mass_fill=0.0, compact_mass_elongation=9.0)
    assert len(loose) == 2
    assert find_masses(volume.hu, volume.spacing, region, LesionFilter(compact_mass_mm=None)) == []


def test_a_mass_cut_by_the_regions_arc_takes_in_the_tissue_within_its_hull_not_the_mediastinum() -> None:
    """The lungs' region bridges the hilum with an arc; a tumour against the mediastinum runs on beyond it.
    Its outline takes in the tissue outside the region within its own convex hull (the chord across the
    arc), and nothing of the mediastinum beyond that chord."""
    volume, region = _lung_volume(slice_mm=5.0)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    bay = np.broadcast_to((y - 60) ** 2 + (x - 20) ** 2 <= 15**2, SHAPE)  # the arc, bulging into the lung
    region &= ~bay
    volume.hu[~region] = 40  # the mediastinum and the chest wall: soft tissue
    volume.hu[:, :, :20] = 40
    solid = np.broadcast_to(np.abs(z - 30) <= 4, SHAPE) & ((y - 60) ** 2 + (x - 38) ** 2 <= 18**2)
    volume.hu[solid] = 40
    # The circles cross at column 26.25: the chord there, the arc bulging to column 35 at row 60.
    (mass,) = _lesions_in(volume, np.zeros(SHAPE, dtype=bool), region)
    assert mass.kind == "mass"
    assert mass.mask[30, 60, 28:35].all()  # between the chord and the arc
    assert not mass.mask[30, 60, :25].any()  # the mediastinum beyond the chord
    (cut,) = _lesions_in(volume, np.zeros(SHAPE, dtype=bool), region, hull_outside_region=False)
    assert not cut.mask[30, 60, 28:35].any()  # without it the outline follows the arc


@pytest.mark.parametrize("diameter", [20.0, 26.0])
def test_a_round_solid_nodule_is_found_in_the_image_away_from_the_hila_on_thick_slices(diameter: float) -> None:
    """On 5 mm slices, where the model's findings are not reported, a round solid nodule of 20 mm in the lung is
    an image-rule nodule; the same one within ``hilum_mm`` of the traced bronchi is not (the hilar vessels
    leave blobs as round), nor is anything without traced airways, nor a vessel segment as thick."""
    volume, region = _lung_volume(slice_mm=5.0)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    r = diameter / 2.0
    nodule = ((z - 30) * 5.0 / r) ** 2 + ((y - 45) / r) ** 2 + ((x - 45) / r) ** 2 <= 1.0
    vessel = np.zeros(SHAPE, dtype=bool)
    vessel[26:35, 80:88, 60:80] = True  # 20 x 8 mm in-plane, over 45 mm of slices: a tube, not a nodule
    volume.hu[nodule | vessel] = 40
    far = np.zeros(SHAPE, dtype=bool)
    far[:, 115:118, 2:5] = True  # a bronchus 70 mm and more away
    near = np.zeros(SHAPE, dtype=bool)
    near[20:40, 45:49, 70:74] = True  # one 15 mm from the nodule's edge
    none = np.zeros(SHAPE, dtype=bool)

    def image_findings(airways: np.ndarray | None) -> list[Finding]:
        return findings_from_probabilities(
            _prob(none), volume, [LABEL], "sigmoid", region=region, lesions=LesionFilter(), airways=airways
        )

    (found,) = image_findings(far)
    assert (found.kind, found.source, found.probability) == ("nodule", "image rule", None)
    assert found.mask[30, 45, 45] and not found.mask[30, 84, 76]
    # Under the mass size whatever the core's (a 26 mm ball's core is a mass's size: the mass test takes it,
    # its outline is under 30 mm, and it stays a nodule).
    assert diameter - 3.0 <= found.longest_diameter_mm < MASS_MM
    assert image_findings(near) == []
    assert image_findings(None) == []
    # The shape tests are what leaves the vessel out.
    loose = findings_from_probabilities(
        _prob(none),
        volume,
        [LABEL],
        "sigmoid",
        region=region,
        lesions=LesionFilter(compact_mass_elongation=9.0, compact_mass_fill=0.0, nodule_max_flatness=9.0),
        airways=far,
    )
    assert len(loose) == 2
    off = findings_from_probabilities(
        _prob(none), volume, [LABEL], "sigmoid", region=region, lesions=LesionFilter(nodule_mm=None), airways=far
    )
    assert off == []
