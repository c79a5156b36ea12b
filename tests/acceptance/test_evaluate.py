"""``pacsnode evaluate`` as a process: the shipped model scored on phantoms and on real CT, against quality floors."""

from __future__ import annotations

import json
import subprocess

from tests.support.helpers import REPO, pacsnode_cmd

# Quality floors of the shipped model on the first held-out seed (1 study of 12 slices, CPU, the
# ct-lung-nodule pipeline's lung region and lesion filter). Measured: 9 of 10 nodules found, 0 false
# positives, Dice 0.914. A regression below these fails CI.
MIN_SENSITIVITY = 0.8
MAX_FALSE_POSITIVES_PER_STUDY = 1.0
MIN_DICE = 0.85


def test_evaluate_reports_phantom_scores_above_the_floors_and_real_ct_false_positives() -> None:
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
    assert report["lesion_filter"] is True
    (study,) = report["studies"]
    assert study["seed"] == 1_000_000
    assert report["sensitivity"] >= MIN_SENSITIVITY, report["sensitivity_by_size"]
    assert report["false_positives_per_study"] <= MAX_FALSE_POSITIVES_PER_STUDY
    assert report["dice"] >= MIN_DICE
    assert report["false_positives_per_study"] == study["false_positives"]
    assert sum(int(v.split("/")[0]) for v in report["sensitivity_by_size"].values()) == study["found"]
    assert report["real_ct_images"] >= 4  # the single-frame CT images of pydicom-data
    assert report["real_ct_false_positives"] == sum(f.get("findings", 0) for f in report["real_ct_files"])
    assert report["real_series"] == []  # no --real folder given
