"""``pacsnode train`` is reproducible from its seed; ``pacsnode evaluate`` reports on phantoms and real CT."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pacsnode.analysis.cnn.package import load_package
from pacsnode.analysis.modeldev.training import TrainConfig, train
from tests.helpers import REPO, pacsnode_cmd

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


def test_evaluate_reports_phantom_scores_and_real_ct_false_positives() -> None:
    result = subprocess.run(
        pacsnode_cmd("evaluate", "--studies", "1", "--slices", "12", "--device", "cpu", "--json"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == "lung-nodule 1.0.0"
    (study,) = report["studies"]
    assert study["seed"] == 1_000_000
    assert 0.0 <= report["dice"] <= 1.0 and 0.0 <= report["sensitivity"] <= 1.0
    assert report["false_positives_per_study"] == study["false_positives"]
    assert report["real_ct_images"] >= 4  # the single-frame CT images of pydicom-data
    assert report["real_ct_false_positives"] == sum(f.get("findings", 0) for f in report["real_ct_files"])
