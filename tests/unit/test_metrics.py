"""The metric hooks: what they count, under which labels, and that they cost nothing when off."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsnode.node import metrics
from pacsnode.storage.models import ExportState, JobState


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    path = metrics.install(tmp_path / "metrics")
    try:
        yield path
    finally:
        metrics.uninstall()


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.process_metrics() for s in m.samples}


def test_hooks_do_nothing_when_not_installed() -> None:
    assert not metrics.installed()
    metrics.instance_received("SCANNER", 0, 10)
    metrics.job_finished("lung", "done", 1.0)
    assert metrics.process_metrics() == []
    assert metrics.start_heartbeat("worker") is None


def test_counts_by_calling_ae_and_status(installed: Path) -> None:
    metrics.instance_received("SCANNER ", 0x0000, 1000)
    metrics.instance_received("SCANNER", 0x0000, 500)
    metrics.instance_received("SCANNER", 0xA700, 70)
    metrics.association_closed("SCANNER", "released", 0.2)
    metrics.association_closed("", "rejected", 0.01)
    got = _samples()
    assert got[("pacsnode_instances_received_total", (("calling_ae", "SCANNER"), ("status", "0x0000")))] == 2
    assert got[("pacsnode_instances_received_total", (("calling_ae", "SCANNER"), ("status", "0xA700")))] == 1
    assert got[("pacsnode_received_bytes_total", (("calling_ae", "SCANNER"), ("status", "0x0000")))] == 1500
    assert got[("pacsnode_associations_total", (("calling_ae", "(none)"), ("outcome", "rejected")))] == 1
    assert got[("pacsnode_association_duration_seconds_count", (("outcome", "released"),))] == 1
    peers = {p.calling_ae: p for p in metrics.snapshot().peers}
    assert peers["SCANNER"].stored == 2 and peers["SCANNER"].refused == 1
    assert peers["SCANNER"].stored_bytes == 1500
    assert peers["SCANNER"].associations == {"released": 1}
    assert peers["SCANNER"].last_association is not None


def test_peer_chosen_labels_are_capped(installed: Path) -> None:
    for i in range(metrics.MAX_LABEL_VALUES + 5):
        metrics.instance_received(f"AE{i}", 0, 1)
    names = {p.calling_ae for p in metrics.snapshot().peers}
    assert "(other)" in names
    assert len(names) == metrics.MAX_LABEL_VALUES + 1


def test_query_job_and_export_outcomes(installed: Path) -> None:
    metrics.query_answered("C-FIND", "STUDY", 0.004)
    metrics.job_finished("lung", metrics.job_outcome(JobState.DONE), 12.0)
    metrics.job_finished("lung", metrics.job_outcome(JobState.PENDING), 3.0)
    metrics.job_finished("lung", metrics.job_outcome(None), 3.0)
    metrics.export_finished("PACS", "sent")
    metrics.export_finished("PACS", metrics.export_outcome(ExportState.DEAD))
    metrics.export_finished("PACS", metrics.export_outcome(ExportState.PENDING))
    got = _samples()
    assert got[("pacsnode_query_duration_seconds_bucket", (("le", "0.005"), ("level", "STUDY"), ("service", "C-FIND")))]
    assert not got[
        ("pacsnode_query_duration_seconds_bucket", (("le", "0.0025"), ("level", "STUDY"), ("service", "C-FIND")))
    ]
    snap = metrics.snapshot()
    assert snap.jobs_finished == {("lung", "done"): 1, ("lung", "retry"): 1, ("lung", "lost"): 1}
    assert snap.exports_finished == {("PACS", "sent"): 1, ("PACS", "dead"): 1, ("PACS", "retry"): 1}


def test_heartbeat_counts_a_process_alive_until_it_goes_stale(installed: Path) -> None:
    assert metrics.start_heartbeat("worker", interval_s=3600) is not None
    assert metrics.snapshot().alive == {"worker": 1}
    later = time.time() + metrics.HEARTBEAT_STALE_S + 1
    assert metrics.snapshot(now=later).alive == {}


def test_install_empties_a_stale_folder(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"stale")
    try:
        metrics.install(folder)
        assert not (folder / "counter_1.db").exists()
    finally:
        metrics.uninstall()
