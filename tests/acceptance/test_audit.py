"""The audit trail against real peers: DCMTK storescu, findscu, movescu -> storescp, getscu, echoscu.

Each event kind caused over the network is checked in the trail (and by ``pacsnode audit``): the
association accepted or refused, instances stored once per study (not per instance) with the
patient, the query with its keys and matches, the C-MOVE and C-GET with who asked, what went
where and whose study it was; a log record marked as a security alert becomes a Security Alert
event. The serve-process kinds (application start/stop, configuration, analysis job, export,
syslog) are in test_operational_logs.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pacsnode.node.audit import read_events, trail_path
from pacsnode.node.cli import main
from pacsnode.node.config import load
from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from tests.support.helpers import free_port
from tests.support.node import RunningNode
from tests.support.peers import StorescpPeer, require

pytestmark = pytest.mark.dcmtk

ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin:/usr/local/bin"}
PATIENT_ID, PATIENT_NAME, BIRTH_DATE = "AUD-7731-XQ", "Quillfeather^Ottoline", "19450317"


def _dcmtk(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require(tool), *args], capture_output=True, text=True, timeout=60, env=ENV, check=False)


def _write_study(folder: Path, count: int) -> tuple[str, list[Path]]:
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    study = generate_uid(UID_PREFIX)
    series = generate_uid(UID_PREFIX)
    paths = []
    for i in range(count):
        ds = make_dataset(
            rows=8,
            columns=8,
            study_uid=study,
            series_uid=series,
            patient_id=PATIENT_ID,
            patient_name=PATIENT_NAME,
            instance_number=i + 1,
            seed=i,
        )
        ds.PatientBirthDate = BIRTH_DATE
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, paths


def _events(node: RunningNode, kind: str) -> list[dict[str, Any]]:
    return list(read_events(trail_path(node.settings.audit, node.settings.storage.root), kinds=[kind]))


def _peer(event: dict[str, Any], role: str) -> dict[str, Any]:
    return next(p for p in event["participants"] if p["role"] == role)


def test_each_network_event_is_audited_with_who_what_and_whose(
    tmp_path: Path,
    start_node: Callable[..., RunningNode],
    storescp_factory: Callable[..., StorescpPeer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    dest = storescp_factory(ae_title="ARCHIVE")
    config = tmp_path / "pacsnode.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"port": free_port(), "acceptor_processes": 1},
                "storage": {"root": "store", "database_url": "sqlite:///index.db", "min_free_bytes": 0},
                "policy": {"allowed_peers": [{"ae_title": "SCANNER"}, {"ae_title": "VIEWER"}]},
                "remote_nodes": {"ARCHIVE": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": dest.port}},
                "audit": {"max_bytes": 4096},  # small: the trail rotates during the test
            }
        )
    )
    settings = load(config)
    node = start_node(settings)
    port = str(node.port)
    study, paths = _write_study(tmp_path / "study", 3)

    # C-STORE: one event for the study, not one per instance, with the patient.
    pushed = _dcmtk("storescu", "-aet", "SCANNER", "-aec", "PACSNODE", "127.0.0.1", port, *map(str, paths))
    assert pushed.returncode == 0, pushed.stderr
    (stored,) = _events(node, "instances-stored")
    assert stored["event_id"]["code"] == "110104" and stored["action"] == "C" and stored["outcome"] == 0
    assert stored["studies"] == [
        {
            "study_instance_uid": study,
            "patient_id": PATIENT_ID,
            "patient_name": PATIENT_NAME,
            "patient_birth_date": BIRTH_DATE,
        }
    ]
    assert _peer(stored, "source")["ae_title"] == "SCANNER" and _peer(stored, "source")["host"] == "127.0.0.1"
    accepted = _events(node, "association-accepted")
    assert [_peer(e, "requestor")["ae_title"] for e in accepted] == ["SCANNER"]

    # C-FIND: the keys asked and the study matched.
    found = _dcmtk(
        "findscu", "-S", "-aet", "VIEWER", "-aec", "PACSNODE",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={PATIENT_ID}", "-k", "StudyInstanceUID",
        "127.0.0.1", port,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    (queried,) = _events(node, "query")
    assert queried["event_id"]["code"] == "110112"
    assert queried["detail"]["keys"]["PatientID"] == PATIENT_ID and queried["detail"]["matches"] == 1
    assert [s["study_instance_uid"] for s in queried["studies"]] == [study]
    assert _peer(queried, "requestor")["ae_title"] == "VIEWER"

    # C-MOVE to a real storescp, then C-GET: who asked, to whom, whose study, how many.
    moved = _dcmtk(
        "movescu", "-S", "-aet", "VIEWER", "-aec", "PACSNODE", "-aem", "ARCHIVE",
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", port,
    )  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert len(dest.received()) == 3
    got_dir = tmp_path / "get"
    got_dir.mkdir()
    got = _dcmtk(
        "getscu", "-S", "-aet", "VIEWER", "-aec", "PACSNODE", "-od", str(got_dir),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", port,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    move, get = _events(node, "transfer-begun")
    for event, service, destination in ((move, "C-MOVE", "ARCHIVE"), (get, "C-GET", "VIEWER")):
        assert event["event_id"]["code"] == "110102"
        assert event["detail"] == {"service": service, "instances": 3}
        assert _peer(event, "requestor")["ae_title"] == "VIEWER"
        assert _peer(event, "destination")["ae_title"] == destination
        assert event["studies"] == [
            {
                "study_instance_uid": study,
                "patient_id": PATIENT_ID,
                "patient_name": PATIENT_NAME,
                "patient_birth_date": BIRTH_DATE,
                "instances": 3,
            }
        ]

    # A peer not on the allow list: refused, audited as a Security Alert (node authentication).
    refused = _dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "PACSNODE", "127.0.0.1", port)
    assert refused.returncode != 0
    (alert,) = _events(node, "association-refused")
    assert alert["event_id"]["code"] == "110113" and alert["outcome"] == 4
    assert alert["event_types"][0]["code"] == "110126"
    assert _peer(alert, "requestor")["ae_title"] == "INTRUDER"

    # A refusal logged with extra={"event": "security-alert"} (how TLS and permission checks report).
    logging.getLogger("pacsnode.node.dicom.server").warning(
        "refused: client certificate not trusted",
        extra={"event": "security-alert", "alert": "node-authentication", "peer": "127.0.0.9"},
    )
    (security,) = _events(node, "security-alert")
    assert security["detail"]["description"] == "refused: client certificate not trusted"
    assert _peer(security, "requestor")["host"] == "127.0.0.9"

    # The trail rotated (a 4 KiB limit) and the rotated files are read-only; nothing was lost.
    files = sorted((node.settings.storage.root / "audit").glob("audit.jsonl.*"))
    rotated = [f for f in files if not f.name.endswith(".lock")]
    assert rotated and all(f.stat().st_mode & 0o222 == 0 for f in rotated)

    # pacsnode audit: who touched this study.
    capsys.readouterr()
    assert main(["--config", str(config), "audit", "--study", study, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["kind"] for e in lines] == ["instances-stored", "query", "transfer-begun", "transfer-begun"]
    assert main(["--config", str(config), "audit", "--peer", "INTRUDER"]) == 0
    out = capsys.readouterr().out
    assert "association-refused" in out and "requestor=INTRUDER@127.0.0.1" in out
    assert main(["--config", str(config), "audit", "--patient", "nobody", "--since", "1d"]) == 0
    assert capsys.readouterr().out == ""
