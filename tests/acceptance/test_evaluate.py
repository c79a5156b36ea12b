"""``pacsnode evaluate`` as a process: the shipped model scored on phantoms and on real single CT images."""

from __future__ import annotations

import json
import subprocess

from tests.support.helpers import REPO, pacsnode_cmd


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
