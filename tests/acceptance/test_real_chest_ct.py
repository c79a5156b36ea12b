"""A real chest CT through ``pacsnode serve`` with the default config's rules: DCMTK storescu pushes both
reconstructions (empty BodyPartExamined, SeriesDescription "5mm"); both chest rules (``anatomy: chest``)
analyse each: the lungs' SEG, SR and SC and the lesions' SEG, SR and SC (the tumour as a mass, little
else) arrive at a DCMTK storescp, valid per dciodvfy. A CT without lungs pushed to the same node ends
``skipped`` under both rules and sends nothing.

Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461, CC BY 4.0),
read where it lies (``../shared/data/real-chest-ct`` beside the checkout, or ``$PACSNODE_TEST_DATA``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from pacsnode.analysis.lung.anatomy import NO_LUNGS
from tests.support.analysis import SC, SEG, SR, by_class, jobs_in, storescu, validate_results
from tests.support.anatomy import write_no_lung_ct
from tests.support.helpers import REAL_CHEST_CT_SERIES, REPO, real_chest_ct
from tests.support.peers import StorescpPeer
from tests.support.served import Served


def _default_analysis(destination: str) -> dict[str, Any]:
    """The default config's analysis section, its results sent to ``destination``, its quiet time short."""
    analysis: dict[str, Any] = yaml.safe_load((REPO / "config" / "pacsnode.yaml").read_text())["analysis"]
    for rule in analysis["rules"]:
        rule["destinations"] = [destination]
    return {**analysis, "workers": 1, "quiet_seconds": 1.5, "scan_interval_seconds": 0.3, "lease_seconds": 10}


@pytest.mark.dcmtk
@pytest.mark.slow
def test_the_real_chest_ct_comes_back_as_valid_lung_and_lesion_results_and_a_head_is_skipped(
    tmp_path: Path, storescp_factory: Callable[..., StorescpPeer]
) -> None:
    data = real_chest_ct()
    dest = storescp_factory(ae_title="DEST")
    served = Served(
        tmp_path,
        sections={
            "analysis": _default_analysis("DEST"),
            "remote_nodes": {"DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}},
            "export": {"backoff_seconds": 0.5, "backoff_max_seconds": 2, "poll_seconds": 0.2},
        },
    )
    served.start()
    for name in REAL_CHEST_CT_SERIES:
        storescu(served.port, sorted((data / name).glob("*.dcm")))
    head = write_no_lung_ct(tmp_path / "head", slices=30, size=96)
    storescu(served.port, head)

    # Two chest rules (ct-lung, ct-lung-nodule) for each real series; both skip the head.
    # A deadline, not a speed requirement: four analyses of a 512x512 CT on a busy 2-core CPU.
    listed = jobs_in(served, {"done", "failed", "skipped"}, count=6, timeout=600)
    by_state = Counter((j["rule"], j["state"]) for j in listed)
    expected_states = {("chest-ct-lung", "done"): 2, ("chest-ct-nodules", "done"): 2}
    expected_states |= {("chest-ct-lung", "skipped"): 1, ("chest-ct-nodules", "skipped"): 1}
    assert by_state == Counter(expected_states), [(j["rule"], j["state"], j["last_error"]) for j in listed]
    series = {
        str(pydicom.dcmread(next((data / name).glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        for name in REAL_CHEST_CT_SERIES
    }
    done = [j for j in listed if j["state"] == "done"]
    assert {j["series_instance_uid"] for j in done} == series
    for job in done:
        if job["rule"] == "chest-ct-lung":
            assert job["result"]["total_lung_volume_ml"] > 2000, job["result"]
            continue
        # The lesion pipeline: the tumour as a mass (RECIST 45-80 mm; boxes 55-73 mm) and little else.
        findings = job["result"]["findings"]
        masses = [f for f in findings if f.get("kind") == "mass"]
        assert len(masses) == 1 and 45.0 <= masses[0]["longest_diameter_mm"] <= 80.0, findings
        assert len(findings) - 1 <= 3, findings
    for skipped in (j for j in listed if j["state"] == "skipped"):
        assert skipped["last_error"].startswith(NO_LUNGS) and not skipped["result"].get("results")

    expected = sum(len(j["result"]["results"]) for j in done)
    received = served.wait(
        f"{expected} results at the destination", lambda: len(dest.received()) >= expected and dest.received(), 60
    )
    classes = by_class(received)
    assert set(classes) == {SEG, SR, SC} and classes[SEG] == 4 and len(received) == expected, classes
    study = str(pydicom.dcmread(next((data / REAL_CHEST_CT_SERIES[0]).glob("*.dcm"))).StudyInstanceUID)
    for path in received:
        assert str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID) == study
    validate_results(received)
    assert "skipped" in served.cli("jobs").stdout
    assert served.stop() == 0
