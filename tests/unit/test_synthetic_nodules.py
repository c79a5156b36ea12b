"""Tests of the lung nodules of the synthetic chest phantom (pacsnode.analysis.modeldev.synthetic).

Asking for no nodules must leave the phantom exactly as it was before nodules
existed (hashes taken from the code before they were added); asked for, the
nodules' truth (label volume and :class:`NoduleTruth`) must agree with the
painted voxels, lie inside the stated lung, keep apart and have the HU of
their kind.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pacsnode.analysis.modeldev.synthetic import (
    BENCHMARK_PHANTOM,
    ChestPhantom,
    NoduleTruth,
    PhantomSpec,
    make_benchmark_volume,
    make_chest_phantom,
    write_chest_ct,
)

# sha256 of make_chest_phantom(PhantomSpec(slices=20, size=64), seed=3).hu / .labels, taken before nodules were added.
HU_SHA256 = "ddc0fadb660ac29d9ce6e8df0ff1311c621b1c896d0fae9519e32ee4149fe609"
LABELS_SHA256 = "8e2de59c755a7072b7f9a2043dc3644a5ba648d48dec6a23d2c087c4693f008d"

# 1.56 mm pixels, 2 mm slices, a 160 mm slab: fine enough for 8 mm nodules to look like ellipsoids.
FINE, FINE_SEED = PhantomSpec(slices=80, size=256, slice_thickness_mm=2.0), 4
KIND_HU = {"solid": (0.0, 60.0), "ground-glass": (-700.0, -450.0)}
HALO_HU = (-650.0, -450.0)
SIDE_LABEL = {"right": 1, "left": 2}


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def plain() -> ChestPhantom:
    """The FINE phantom without nodules and without noise."""
    return make_chest_phantom(replace(FINE, noise_hu=0.0), seed=FINE_SEED)


@pytest.fixture(scope="module")
def nodular() -> ChestPhantom:
    """The FINE phantom with 8 nodules of 8 to 20 mm, without noise."""
    return make_chest_phantom(replace(FINE, noise_hu=0.0, nodules=8, nodule_diameter_mm=(8.0, 20.0)), seed=FINE_SEED)


def test_no_nodules_is_bit_identical_to_the_phantom_before_nodules() -> None:
    for phantom in (
        make_chest_phantom(PhantomSpec(slices=20, size=64), seed=3),
        make_chest_phantom(
            PhantomSpec(
                slices=20,
                size=64,
                nodules=0,
                nodule_diameter_mm=(4.0, 24.0),
                nodule_kinds=("solid", "part-solid", "ground-glass"),
                vessel_spheres=True,
            ),
            seed=3,
        ),
    ):
        assert _sha256(phantom.hu) == HU_SHA256
        assert _sha256(phantom.labels) == LABELS_SHA256
        assert phantom.nodule_labels is None
        assert phantom.nodules == ()


def test_nodules_change_nothing_but_their_voxels() -> None:
    """The nodules have their own generator: the noise, vessels and lungs stay the same."""
    spec = PhantomSpec(slices=40, size=128, noise_hu=15.0)
    without = make_chest_phantom(spec, seed=9)
    with_ = make_chest_phantom(replace(spec, nodules=5, nodule_diameter_mm=(10.0, 20.0)), seed=9)
    assert with_.nodule_labels is not None
    outside = with_.nodule_labels == 0
    np.testing.assert_array_equal(with_.hu[outside], without.hu[outside])
    np.testing.assert_array_equal(with_.labels, without.labels)
    assert with_.total_volume_ml == without.total_volume_ml


def test_nodule_truth_agrees_with_the_labels(nodular: ChestPhantom) -> None:
    labels = nodular.nodule_labels
    assert labels is not None
    assert labels.dtype == np.uint16 and labels.shape == nodular.hu.shape
    assert len(nodular.nodules) == 8
    assert [n.number for n in nodular.nodules] == list(range(1, 9))
    assert set(np.unique(labels).tolist()) == set(range(9))
    assert {n.side for n in nodular.nodules} <= {"right", "left"}
    voxel_ml = float(np.prod(nodular.spacing)) / 1000.0
    xs = nodular.origin[0] + np.arange(labels.shape[2]) * nodular.spacing[2] * nodular.row_direction[0]
    ys = nodular.origin[1] + np.arange(labels.shape[1]) * nodular.spacing[1]
    zs = nodular.origin[2] + np.arange(labels.shape[0]) * nodular.spacing[0]
    for nodule in nodular.nodules:
        assert isinstance(nodule, NoduleTruth)
        mask = labels == nodule.number
        assert nodule.voxels == int(np.count_nonzero(mask)) >= 3
        assert nodule.volume_ml == pytest.approx(nodule.voxels * voxel_ml)
        assert nodule.diameter_mm == pytest.approx((6.0 * nodule.volume_ml * 1000.0 / np.pi) ** (1.0 / 3.0))
        k, r, c = np.nonzero(mask)
        x, y, z = nodule.centre_mm
        assert xs[c].min() <= x <= xs[c].max()
        assert ys[r].min() <= y <= ys[r].max()
        assert zs[k].min() <= z <= zs[k].max()
        # Inside the stated lung: every voxel keeps that lung's label.
        assert np.all(nodular.labels[mask] == SIDE_LABEL[nodule.side])
        # Noise-free: the mean of the (rounded) voxels is the truth's mean.
        assert float(nodular.hu[mask].mean()) == pytest.approx(nodule.mean_hu, abs=0.5)


def test_painted_voxels_are_the_labelled_voxels(plain: ChestPhantom, nodular: ChestPhantom) -> None:
    assert nodular.nodule_labels is not None
    np.testing.assert_array_equal(nodular.hu != plain.hu, nodular.nodule_labels > 0)
    np.testing.assert_array_equal(nodular.labels, plain.labels)


def test_nodules_never_overlap_nor_touch(nodular: ChestPhantom) -> None:
    assert nodular.nodule_labels is not None
    _, count = ndimage.label(nodular.nodule_labels > 0, structure=np.ones((3, 3, 3)))
    assert count == len(nodular.nodules)
    for nodule in nodular.nodules:  # each nodule a single piece
        _, pieces = ndimage.label(nodular.nodule_labels == nodule.number, structure=np.ones((3, 3, 3)))
        assert pieces == 1


def test_diameters_are_in_the_requested_range(nodular: ChestPhantom) -> None:
    for nodule in nodular.nodules:
        assert 0.7 * 8.0 <= nodule.diameter_mm <= 1.3 * 20.0


def test_some_nodules_lie_against_the_pleura() -> None:
    spec = replace(FINE, noise_hu=0.0, nodules=20, nodule_diameter_mm=(6.0, 12.0))
    phantom = make_chest_phantom(spec, seed=FINE_SEED)
    assert phantom.nodule_labels is not None
    lung = phantom.labels > 0
    touching = 0
    for nodule in phantom.nodules:
        mask = phantom.nodule_labels == nodule.number
        touching += bool(np.any(ndimage.binary_dilation(mask) & ~lung))
    assert 1 <= touching <= len(phantom.nodules) // 2


@pytest.mark.parametrize("kind", ["solid", "part-solid", "ground-glass"])
def test_kinds_have_their_hu(kind: str) -> None:
    spec = replace(FINE, noise_hu=0.0, nodules=4, nodule_diameter_mm=(12.0, 20.0), nodule_kinds=(kind,))
    phantom = make_chest_phantom(spec, seed=FINE_SEED)
    assert phantom.nodule_labels is not None
    assert len(phantom.nodules) == 4
    for nodule in phantom.nodules:
        assert nodule.kind == kind
        values = phantom.hu[phantom.nodule_labels == nodule.number].astype(float)
        if kind == "part-solid":
            solid = (values >= 0.0) & (values <= 60.0)
            halo = (values >= HALO_HU[0]) & (values <= HALO_HU[1])
            assert np.all(solid | halo)
            # A core of half the diameter: about 1/8 of the volume.
            assert 0.05 < np.count_nonzero(solid) / values.size < 0.25
            assert HALO_HU[0] <= nodule.mean_hu <= 60.0
        else:
            low, high = KIND_HU[kind]
            assert np.all((values >= low) & (values <= high))
            assert np.ptp(values) == 0.0  # one value per nodule
            assert low <= nodule.mean_hu <= high


def test_written_series_carries_the_nodules(tmp_path: Path) -> None:
    spec = PhantomSpec(slices=24, size=96, nodules=3, nodule_diameter_mm=(10.0, 20.0))
    truth = write_chest_ct(tmp_path, spec, seed=2)
    phantom = make_chest_phantom(spec, seed=2)
    assert len(truth.nodules) == 3
    assert truth.nodules == phantom.nodules


def test_mirror_columns_mirrors_the_nodule_labels() -> None:
    spec = PhantomSpec(slices=30, size=128, nodules=4, nodule_diameter_mm=(8.0, 16.0))
    straight = make_chest_phantom(spec, seed=6)
    mirrored = make_chest_phantom(replace(spec, mirror_columns=True), seed=6)
    assert straight.nodule_labels is not None and mirrored.nodule_labels is not None
    assert np.any(straight.nodule_labels)
    np.testing.assert_array_equal(mirrored.nodule_labels, straight.nodule_labels[:, :, ::-1])
    np.testing.assert_array_equal(mirrored.hu, straight.hu[:, :, ::-1])
    assert mirrored.nodules == straight.nodules  # patient coordinates do not change


def test_vessel_spheres_off_keeps_only_tubes() -> None:
    spec = PhantomSpec(slices=30, size=96, noise_hu=0.0)
    spheres = make_chest_phantom(spec, seed=8)
    tubes = make_chest_phantom(replace(spec, vessel_spheres=False), seed=8)
    assert not np.array_equal(spheres.hu, tubes.hu)
    np.testing.assert_array_equal(spheres.labels, tubes.labels)  # vessels are inside the lungs
    assert np.array_equal(make_chest_phantom(replace(spec, vessel_spheres=True), seed=8).hu, spheres.hu)
    with_nodules = make_chest_phantom(
        replace(spec, vessel_spheres=False, nodules=2, nodule_diameter_mm=(12.0, 20.0)), seed=8
    )
    assert len(with_nodules.nodules) == 2


def test_benchmark_volume_passes_nodules_through() -> None:
    volume, phantom = make_benchmark_volume(
        replace(
            BENCHMARK_PHANTOM,
            slices=60,
            size=128,
            nodules=2,
            nodule_diameter_mm=(10.0, 14.0),
            nodule_kinds=("solid",),
            vessel_spheres=False,
        )
    )
    assert volume.hu is phantom.hu
    assert [n.kind for n in phantom.nodules] == ["solid", "solid"]
    assert phantom.nodule_labels is not None and phantom.nodule_labels.max() == 2


def test_a_slab_too_thin_gets_no_nodules() -> None:
    phantom = make_chest_phantom(PhantomSpec(slices=2, size=64, nodules=3, nodule_diameter_mm=(20.0, 24.0)))
    assert phantom.nodules == ()
    assert phantom.nodule_labels is not None and not np.any(phantom.nodule_labels)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nodules": -1},
        {"nodules": 1, "nodule_diameter_mm": (0.0, 10.0)},
        {"nodules": 1, "nodule_diameter_mm": (12.0, 10.0)},
        {"nodules": 1, "nodule_kinds": ()},
        {"nodules": 1, "nodule_kinds": ("calcified",)},
    ],
)
def test_bad_nodule_parameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="nodule"):
        PhantomSpec(slices=4, size=32, **kwargs)  # type: ignore[arg-type]


def test_all_requested_nodules_fit_a_full_size_phantom() -> None:
    phantom = make_chest_phantom(PhantomSpec(slices=64, size=512, nodules=8))
    assert len(phantom.nodules) == 8
