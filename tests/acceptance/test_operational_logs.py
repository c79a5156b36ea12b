"""``pacsnode serve`` with a distinctive patient: no patient data in its logs, all of it in the audit trail.

A chest CT with a known PatientName, PatientID and PatientBirthDate is pushed with DCMTK
storescu, then an instance whose patient attributes conflict with the indexed ones (same
PatientID, other name and birth date) and one that names the study under another patient
(refused: patient mismatch). The study is analysed and the results exported to storescp.
Every line the serving processes log (at DEBUG, JSON) is searched for the identifying
values: none may appear. The audit trail (file and a syslog UDP socket) has the process
events: application start and stop, the configuration loaded, the analysis job, the export.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pacsnode.analysis.modeldev.synthetic import DicomSpec, PhantomSpec, write_chest_ct
from pacsnode.node.audit import read_events
from tests.support.analysis import jobs_in, storescu
from tests.support.peers import StorescpPeer, require
from tests.support.served import Served

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

PATIENT_ID, PATIENT_NAME, BIRTH_DATE = "LOGX-58213-ZQ", "Vandermolen^Eulalie^Prudence", "19381122"
OTHER_NAME, OTHER_BIRTH_DATE, OTHER_ID = "Brackenbury^Thaddeus", "19290704", "LOGX-99470-WK"
SECRETS = (PATIENT_ID, "Vandermolen", "Eulalie", BIRTH_DATE, "Brackenbury", "Thaddeus", OTHER_BIRTH_DATE, OTHER_ID)


def _udp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    return sock


def _drain(sock: socket.socket) -> list[str]:
    out: list[str] = []
    while True:
        try:
            out.append(sock.recv(65535).decode("utf-8", "replace"))
        except TimeoutError:
            return out


def _rewrite(path: Path, out: Path, **values: str) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def test_patient_data_stays_out_of_the_logs_and_the_process_events_are_audited(
    tmp_path: Path, storescp_factory: Callable[..., StorescpPeer]
) -> None:
    require("storescu")
    dest = storescp_factory(ae_title="DEST")
    syslog = _udp_listener()
    truth = write_chest_ct(
        tmp_path / "ct",
        PhantomSpec(slices=32, size=64),
        seed=3,
        dicom=DicomSpec(patient_id=PATIENT_ID, patient_name=PATIENT_NAME),
    )
    paths = [_rewrite(p, p, PatientBirthDate=BIRTH_DATE) for p in truth.paths]
    extra = tmp_path / "extra"
    extra.mkdir()
    conflicting = _rewrite(  # same PatientID, other name and birth date: the indexed values are kept
        paths[0], extra / "conflict.dcm", PatientName=OTHER_NAME, PatientBirthDate=OTHER_BIRTH_DATE,
        SOPInstanceUID=pydicom.uid.generate_uid(), SeriesInstanceUID=pydicom.uid.generate_uid(),
    )  # fmt: skip
    mismatch = _rewrite(  # the study under another PatientID: refused (storage.patient_mismatch: reject)
        paths[1], extra / "mismatch.dcm", PatientID=OTHER_ID, PatientName=OTHER_NAME,
        SOPInstanceUID=pydicom.uid.generate_uid(), SeriesInstanceUID=pydicom.uid.generate_uid(),
    )  # fmt: skip
    sections: dict[str, Any] = {
        "analysis": {
            "workers": 1,
            "quiet_seconds": 1.5,
            "scan_interval_seconds": 0.3,
            "lease_seconds": 10,
            "rules": [{"name": "lung", "pipeline": "ct-lung", "match": {"modality": ["CT"]}, "destinations": ["DEST"]}],
        },
        "export": {"backoff_seconds": 0.5, "backoff_max_seconds": 2, "poll_seconds": 0.2},
        "remote_nodes": {"DEST": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}},
        "logging": {"level": "DEBUG", "format": "json"},
        "audit": {"syslog": {"host": "127.0.0.1", "port": syslog.getsockname()[1], "protocol": "udp"}},
    }
    served = Served(tmp_path, sections=sections)
    served.start()
    try:
        storescu(served.port, [*paths, conflicting])  # one association: one quiet period, one analysis
        subprocess.run(  # refused with 0xA900 (the study is indexed under PATIENT_ID); the exit status does not matter
            [require("storescu"), "-aec", "PACSNODE", "127.0.0.1", str(served.port), str(mismatch)],
            capture_output=True, timeout=60, check=False, env={"TCP_NODELAY": "1"},
        )  # fmt: skip
        settled = jobs_in(served, {"done", "failed", "skipped"})
        assert any(j["state"] == "done" for j in settled), settled
        served.wait("results at the destination", lambda: len(dest.received()) >= 5, 60)
        served.wait("exports audited", lambda: _kinds(tmp_path).count("transfer-begun") >= 1, 30)
    finally:
        code = served.stop()
    assert code == 0, served.log_tail()

    log = served.log.read_text(errors="replace")
    assert '"level": "DEBUG"' in log  # every level was captured
    leaked = [s for s in SECRETS if s in log or s.replace("^", " ") in log]
    assert not leaked, f"patient data in the operational log: {leaked}"

    events = list(read_events(served.root / "audit" / "audit.jsonl"))
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["application-start", "configuration-loaded"] and kinds[-1] == "application-stop"
    config = next(e for e in events if e["kind"] == "configuration-loaded")
    assert config["detail"]["sha256"] == hashlib.sha256(served.config.read_bytes()).hexdigest()
    jobs = [e for e in events if e["kind"] == "analysis-job"]
    assert {e["detail"]["job_id"]: e["detail"]["state"] for e in jobs} == {j["id"]: j["state"] for j in settled}
    assert {s["patient_id"] for e in jobs for s in e["studies"]} == {PATIENT_ID}
    export = next(e for e in events if e["kind"] == "transfer-begun")
    assert export["detail"]["service"] == "export" and export["detail"]["instances"] >= 5
    assert next(p for p in export["participants"] if p["role"] == "destination")["ae_title"] == "DEST"
    assert export["studies"][0]["study_instance_uid"] == truth.study_instance_uid
    stored = [e for e in events if e["kind"] == "instances-stored"]
    names = {s["patient_name"] for e in stored for s in e["studies"]}
    assert PATIENT_NAME in names and OTHER_NAME in names  # the trail has what the logs must not

    datagrams = _drain(syslog)
    syslog.close()
    assert len(datagrams) == len(events), (len(datagrams), len(events))
    assert all("pacsnode-audit: {" in d for d in datagrams)
    assert '"kind":"application-stop"' in datagrams[-1]


def _kinds(tmp_path: Path) -> list[str]:
    return [e["kind"] for e in read_events(tmp_path / "store" / "audit" / "audit.jsonl")]
