"""Training is reproducible from its seed; the shipped weights come from ``pacsnode train``.

``pacsnode evaluate``, run as a process, is tested in tests/acceptance/test_evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsnode.analysis.cnn.package import load_package
from pacsnode.analysis.modeldev.training import TrainConfig, train
from tests.support.helpers import real_chest_ct

TINY = {"steps": 3, "batch_size": 2, "crop": 64, "studies_in_pool": 1, "slices": 6, "nodules_per_study": 2}


def test_the_same_seed_gives_the_same_weights_and_another_seed_does_not(tmp_path: Path) -> None:
    a = train(tmp_path / "a", TrainConfig(seed=5, **TINY))
    b = train(tmp_path / "b", TrainConfig(seed=5, **TINY))
    c = train(tmp_path / "c", TrainConfig(seed=6, **TINY))
    assert a["weights"]["sha256"] == b["weights"]["sha256"]
    assert a["weights"]["sha256"] != c["weights"]["sha256"]
    package = load_package(tmp_path / "a")  # a valid package: manifest, checksum
    assert package.manifest.training["config"]["seed"] == 5
    assert package.weights_path.stat().st_size < 10 * 1024 * 1024


def test_the_shipped_weights_come_from_pacsnode_train() -> None:
    package = load_package("lung-nodule")
    training = package.manifest.training
    assert training["command"] == "pacsnode train"
    assert "synthetic" in training["data"] and "no patient data" in training["data"]
    assert training["config"]["seed"] == 0


@pytest.mark.slow
def test_training_with_real_series_is_reproducible_and_inserted_nodules_lie_in_the_lungs(tmp_path: Path) -> None:
    """``train(real=...)``: same seed, same weights; the inserted nodules are inside the aerated lung.

    Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0),
    read where it lies via ``real_chest_ct()``; skipped when absent.
    """
    import numpy as np

    from pacsnode.analysis.modeldev.real import insert_nodules, load_real_series

    data = real_chest_ct()
    series = load_real_series(data / "A0001-5mm-L", pixel_mm=0.78125)
    assert series.tumour.any() and not (series.tumour & ~series.region).any()
    image, labels, truths = insert_nodules(series, np.random.default_rng(0), 6)
    assert truths and int(labels.max()) == len(truths)
    assert series.lung[labels > 0].all() and (image[labels > 0] > series.hu[labels > 0]).mean() > 0.9

    real = tmp_path / "real"
    real.mkdir()
    (real / "A0001-5mm-L").symlink_to(data / "A0001-5mm-L")
    (real / "annotations.json").symlink_to(data / "annotations.json")
    config = TrainConfig(seed=5, **{**TINY, "batch_size": 4}, real_crops=2)
    a = train(tmp_path / "a", config, real=real)
    b = train(tmp_path / "b", config, real=real)
    assert a["weights"]["sha256"] == b["weights"]["sha256"]
    assert "A0001-5mm-L" in a["training"]["data"] and a["training"]["command"] == "pacsnode train --real DIR"
