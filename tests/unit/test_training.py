"""Training is reproducible from its seed; the shipped weights come from ``pacsnode train``.

``pacsnode evaluate``, run as a process, is tested in tests/acceptance/test_evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

from pacsnode.analysis.cnn.package import load_package
from pacsnode.analysis.modeldev.training import TrainConfig, train

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
