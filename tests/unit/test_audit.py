"""The audit trail's file: records, rotation into read-only files, filters, and refusing when it cannot write."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pacsnode.node import audit


def _stored(study: str, patient: str, ae: str) -> audit.AuditEvent:
    return audit.instances_stored(
        calling_ae_title=ae,
        host="10.0.0.7",
        called_ae_title="PACSNODE",
        study=audit.StudyRef(study_instance_uid=study, patient_id=patient, patient_name="Doe^Jane"),
    )


def test_events_rotate_into_read_only_files_and_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    trail = audit.AuditTrail(audit.AuditSettings(max_bytes=4096, fsync=False), path=path, ae_title="PACSNODE")
    for i in range(40):
        trail.record(_stored(f"1.2.3.{i}", f"P{i % 3}", "CT1" if i % 2 else "CT2"))
    trail.close()
    rotated = audit.audit_files(path)[:-1]
    assert len(rotated) >= 2
    assert all(f.stat().st_mode & 0o222 == 0 for f in rotated)  # never written again
    assert all(f.stat().st_size <= 4096 for f in audit.audit_files(path))
    events = list(audit.read_events(path))
    assert [e["studies"][0]["study_instance_uid"] for e in events] == [f"1.2.3.{i}" for i in range(40)]
    assert events[0]["event_id"] == {"code": "110104", "scheme": "DCM", "meaning": "DICOM Instances Transferred"}
    assert events[0]["source"]["ae_title"] == "PACSNODE"
    assert len(list(audit.read_events(path, patient_id="P1"))) == 13
    assert len(list(audit.read_events(path, peer="CT1", patient_id="P1"))) == 7
    assert [e["studies"][0]["study_instance_uid"] for e in audit.read_events(path, study_uid="1.2.3.7")] == ["1.2.3.7"]
    assert not list(audit.read_events(path, since=datetime.now(UTC) + timedelta(minutes=1)))
    assert not list(audit.read_events(path, kinds=["query"]))


def test_a_trail_that_cannot_be_written_refuses(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    trail = audit.AuditTrail(audit.AuditSettings(), path=blocker / "audit.jsonl", ae_title="PACSNODE")
    with pytest.raises(audit.AuditError):
        trail.record(audit.application_activity(started=True, role="serve"))


def test_disabled_trail_writes_nothing(tmp_path: Path) -> None:
    trail = audit.trail_for(audit.AuditSettings(enabled=False), storage_root=tmp_path, ae_title="PACSNODE")
    trail.record(audit.application_activity(started=True, role="serve"))
    assert not (tmp_path / "audit").exists()


def test_log_records_marked_as_security_alerts_are_audited(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    trail = audit.AuditTrail(audit.AuditSettings(fsync=False), path=path, ae_title="PACSNODE")
    log = logging.getLogger("pacsnode.test.alerts")
    handler = audit.SecurityAlertHandler(trail)
    log.addHandler(handler)
    try:
        log.warning("TLS handshake failed", extra={"event": "security-alert", "peer": "10.9.9.9", "alert": "x"})
        log.warning("an ordinary line")
        log.warning(
            "C-MOVE to PACS refused",
            extra={"event": "security-alert", "alert": "use-of-restricted-function", "calling_ae_title": "VIEW"},
        )
    finally:
        log.removeHandler(handler)
    first, second = audit.read_events(path)
    assert first["kind"] == "security-alert" and first["detail"]["description"] == "TLS handshake failed"
    assert first["event_types"][0]["code"] == "110126"  # an unknown alert name: node authentication
    assert first["participants"][0]["host"] == "10.9.9.9"
    assert second["event_types"][0]["code"] == "110132" and second["participants"][0]["ae_title"] == "VIEW"
