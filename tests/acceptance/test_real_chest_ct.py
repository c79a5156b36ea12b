"""A real chest CT through ``pacsnode serve`` with the default config's rules: DCMTK storescu pushes both
reconstructions (empty BodyPartExamined, SeriesDescription "5mm"); the chest rule (``anatomy: chest``)
analyses each, and each one's lung SEG, SR and SC arrive at a DCMTK storescp, valid per dciodvfy.
A CT without lungs pushed to the same node ends ``skipped`` and sends nothing.

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
def test_the_real_chest_ct_comes_back_as_valid_lung_results_and_a_head_is_skipped(
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

    listed = jobs_in(served, {"done", "failed", "skipped"}, count=3)
    by_state = Counter(j["state"] for j in listed)
    assert by_state == Counter({"done": 2, "skipped": 1}), [(j["state"], j["last_error"]) for j in listed]
    series = {
        str(pydicom.dcmread(next((data / name).glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        for name in REAL_CHEST_CT_SERIES
    }
    done = [j for j in listed if j["state"] == "done"]
    assert {j["series_instance_uid"] for j in done} == series
    assert all(j["rule"] == "chest-ct-lung" for j in listed)
    for job in done:
        assert job["result"]["total_lung_volume_ml"] > 2000, job["result"]
    (skipped,) = [j for j in listed if j["state"] == "skipped"]
    assert skipped["last_error"].startswith(NO_LUNGS) and not skipped["result"].get("results")

    received = served.wait("10 results at the destination", lambda: len(dest.received()) >= 10 and dest.received(), 60)
    assert by_class(received) == Counter({SEG: 2, SR: 2, SC: 6}), by_class(received)
    study = str(pydicom.dcmread(next((data / REAL_CHEST_CT_SERIES[0]).glob("*.dcm"))).StudyInstanceUID)
    for path in received:
        assert str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID) == study
    validate_results(received)
    assert "skipped" in served.cli("jobs").stdout
    assert served.stop() == 0
