"""The analysis path end to end: DCMTK storescu pushes a chest CT to ``pacsnode serve``; after the quiet
time the CT lung pipeline runs in a worker process, and its SEG, SR and SC arrive at a DCMTK storescp,
valid per dciodvfy, with the phantom's true volumes. Also: a destination that is down at first gets
everything exactly once when it comes up; a late instance makes the results be replaced; a single real
512x512 CT slice gives a clear job error.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacsnode.analysis.modeldev.synthetic import ChestTruth, PhantomSpec, write_chest_ct
from tests.support.analysis import SC, SEG, SR, by_class, jobs, jobs_in, storescu, validate_results
from tests.support.helpers import pydicom_data_files
from tests.support.peers import StorescpPeer, require_private_netns
from tests.support.served import Served


def _node(tmp_path: Path, dest: StorescpPeer | None, **analysis: object) -> Served:
    rule: dict[str, Any] = {
        "name": "lung",
        "pipeline": "ct-lung",
        "match": {"modality": ["CT"]},
        "destinations": ["DEST"] if dest is not None else [],
    }
    sections: dict[str, Any] = {
        "analysis": {
            "workers": 1,
            "quiet_seconds": 1.5,
            "scan_interval_seconds": 0.3,
            "lease_seconds": 10,
            "rules": [rule],
            **analysis,
        },
        "export": {"backoff_seconds": 0.5, "backoff_max_seconds": 2, "poll_seconds": 0.2, "max_attempts": 100},
    }
    if dest is not None:
        sections["remote_nodes"] = {"DEST": {"ae_title": dest.ae_title, "host": "127.0.0.1", "port": dest.port}}
    served = Served(tmp_path, sections=sections)
    served.start()
    return served


def _numeric_values(ds: Dataset) -> dict[str, float]:
    """Concept name meaning -> value of every NUM item in an SR content tree (last one wins)."""
    out: dict[str, float] = {}

    def walk(items: Any) -> None:
        for item in items:
            if item.get("ValueType") == "NUM" and "MeasuredValueSequence" in item:
                name = item.ConceptNameCodeSequence[0].CodeMeaning
                out[name] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out


def _sorted_by_position(truth: ChestTruth) -> list[Path]:
    def z(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    return sorted(truth.paths, key=z)


@pytest.mark.dcmtk
def test_pushed_chest_ct_comes_back_as_valid_seg_sr_sc_and_a_late_instance_replaces_them(
    tmp_path: Path, storescp_factory: Callable[..., StorescpPeer]
) -> None:
    truth = write_chest_ct(tmp_path / "ct", PhantomSpec(slices=81, size=128), seed=7)
    ordered = _sorted_by_position(truth)
    first, late = ordered[:-1], ordered[-1]
    dest = storescp_factory(ae_title="DEST")
    served = _node(tmp_path, dest)

    storescu(served.port, first)
    (job,) = jobs_in(served, {"done", "failed"})
    assert job["state"] == "done", job["last_error"]
    received = served.wait("5 results at the destination", lambda: len(dest.received()) >= 5 and dest.received(), 60)
    classes = by_class(received)
    assert classes == Counter({SEG: 1, SR: 1, SC: 3}), classes
    validate_results(received)

    # The measurements: the job's summary and the SR agree, and both are within tolerance of the truth
    # computed for the 80 slices that were pushed.
    truth80 = write_chest_ct(tmp_path / "ct80", PhantomSpec(slices=80, size=128), seed=7)
    result = job["result"]
    assert result["slices"] == 80
    for key, expected in (
        ("right_lung_volume_ml", truth80.right_volume_ml),
        ("left_lung_volume_ml", truth80.left_volume_ml),
        ("total_lung_volume_ml", truth80.total_volume_ml),
    ):
        assert abs(result[key] - expected) <= 0.03 * expected, (key, result[key], expected)
    assert abs(result["laa950_percent"] - truth80.laa950_percent) <= 1.0
    sr = next(pydicom.dcmread(f) for f in received if str(pydicom.dcmread(f).SOPClassUID) == SR)
    values = _numeric_values(sr)
    assert any(abs(v - result["total_lung_volume_ml"]) < 0.5 for v in values.values()), values
    for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in received):
        assert ds.StudyInstanceUID == truth.study_instance_uid
        assert ds.PatientID == "PHANTOM-0001"
        assert ds.SeriesInstanceUID != truth.series_instance_uid

    # Results are first-class: C-FIND on the node sees the three result series in the study.
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", served.port, ae_title="PACSNODE")
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = truth.study_instance_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    modalities = sorted(
        str(ident.Modality)
        for status, ident in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        if status is not None and status.Status in (0xFF00, 0xFF01)
    )
    assoc.release()
    assert modalities == ["CT", "OT", "SEG", "SR"], modalities

    # A late instance: after another quiet period the series is analysed again and the results replace
    # the old ones -- same Series and SOP Instance UIDs, new content, no duplicates here or there.
    before = {f.name for f in received}
    requests_before = dest.store_requests()
    storescu(served.port, [late])
    jobs = jobs_in(served, {"done", "failed"}, count=2)
    newest = max(jobs, key=lambda j: j["id"])
    assert newest["state"] == "done" and newest["result"]["slices"] == 81, newest
    assert sorted(newest["result"]["results"]) == sorted(jobs[-1]["result"]["results"])
    served.wait("the replaced results at the destination", lambda: dest.store_requests() >= requests_before + 5, 60)
    after = dest.received()
    assert {f.name for f in after} == before  # storescp names files by SOP Instance UID: replaced, not added
    sr = next(pydicom.dcmread(f) for f in after if str(pydicom.dcmread(f).SOPClassUID) == SR)
    assert any(abs(v - newest["result"]["total_lung_volume_ml"]) < 0.5 for v in _numeric_values(sr).values())
    studies = json.loads(served.cli("studies", "--json").stdout)
    (study,) = [s for s in studies if s["study_instance_uid"] == truth.study_instance_uid]
    assert study["num_series"] == 4 and study["num_instances"] == 81 + 5
    assert served.stop() == 0


@pytest.mark.dcmtk
def test_destination_down_then_up_gets_every_result_exactly_once(tmp_path: Path) -> None:
    require_private_netns()
    truth = write_chest_ct(tmp_path / "ct", PhantomSpec(slices=40, size=96), seed=3)
    dest = StorescpPeer(tmp_path / "dest", ae_title="DEST")  # its port is chosen, it is not listening yet
    served = _node(tmp_path, dest)
    try:
        storescu(served.port, truth.paths)
        jobs_in(served, {"done"})

        def failing() -> bool:
            exports = json.loads(served.cli("exports", "--failed", "--json").stdout)
            return len(exports) == 5 and all(e["attempts"] >= 2 for e in exports)

        served.wait("exports to fail against the closed port", failing, 60)
        dest.start()
        served.wait("5 results at the destination", lambda: len(dest.received()) >= 5, 60)
        exports = served.wait(
            "every export done",
            lambda: (lambda e: e if all(x["state"] == "done" for x in e) else None)(
                json.loads(served.cli("exports", "--json").stdout)
            ),
            30,
        )
        assert len(exports) == 5
        # A quiet period, not synchronisation: every export is done, so nothing more may arrive; a
        # duplicate sent late would be missed on a slow machine, never invented on a fast one.
        time.sleep(2)
        assert dest.store_requests() == 5
        assert "connection refused" in served.log.read_text().lower() or "could not" in served.log.read_text().lower()
        assert served.stop() == 0
    finally:
        dest.stop()


@pytest.mark.dcmtk
def test_single_real_ct_slice_fails_the_job_with_not_enough_slices(tmp_path: Path) -> None:
    served = _node(
        tmp_path,
        None,
        rules=[
            {
                "name": "lung",
                "pipeline": "ct-lung",
                "match": {"modality": ["CT"]},
            }
        ],
    )
    storescu(served.port, [pydicom_data_files() / "693_UNCI.dcm"])
    (job,) = jobs_in(served, {"done", "failed"})
    assert job["state"] == "failed" and job["attempts"] == 1
    assert "not enough slices" in job["last_error"], job["last_error"]
    out = served.cli("jobs", "--state", "failed").stdout
    assert "not enough slices" in out

    # The operator's commands: retry the failed job, and queue an analysis by hand.
    retried = served.cli("retry", str(job["id"]))
    assert f"job {job['id']} queued again" in retried.stdout
    served.wait(
        "the retried job to fail again",
        lambda: (lambda j: j if j["state"] == "failed" and j["finished_at"] != job["finished_at"] else None)(
            jobs(served)[0]
        ),
        60,
    )
    assert served.cli("retry", "999", check=False).returncode == 1
    study = str(pydicom.dcmread(pydicom_data_files() / "693_UNCI.dcm", stop_before_pixels=True).StudyInstanceUID)
    queued = served.cli("analyze", study, "--pipeline", "ct-lung")
    assert "rule lung (ct-lung)" in queued.stdout, queued.stdout
    assert len(jobs_in(served, {"failed"}, count=2)) == 2
    missing = served.cli("analyze", "1.2.3.4.5", check=False)
    assert missing.returncode == 1 and "no received series" in missing.stderr
    assert served.stop() == 0
