"""Which series a job analyses: one decision for the scheduler, the worker and ``pacsnode analyze``.

A study holds a small scout series (64x64) and an axial series (128x128). A
study-scope rule with ``min_rows: 100`` must give its pipeline the axial
series only, whichever path queued the job; a job whose study has no
matching series fails with the reason instead of taking every series.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from pacsnode.node.cli import main
from pacsnode.node.config import Settings
from pacsnode.node.scheduler import Scheduler
from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.node.worker import Worker
from pacsnode.storage import Archive, read_header
from pacsnode.storage.db import migrate
from pacsnode.storage.queue import JobQueue, utcnow
from tests.support.helpers import make_settings

STUDY = UID_PREFIX + "77.1"
SCOUT = UID_PREFIX + "77.1.1"
AXIAL = UID_PREFIX + "77.1.2"


def _rule(tmp_path: Path, *, scope: str = "study", **match: object) -> dict[str, object]:
    return {
        "name": "sized",
        "pipeline": "tests.support.pipelines:Record",
        "scope": scope,
        "match": {"modality": ["CT"], **match},
        "params": {"log": str(tmp_path / "runs.log")},
    }


def _settings(tmp_path: Path, rule: dict[str, object]) -> Settings:
    return make_settings(tmp_path, analysis={"quiet_seconds": 5, "workers": 0, "rules": [rule]})


def _store_study(archive: Archive) -> None:
    """Store the study as received instances (the same staging, header read and index as C-STORE)."""
    for series, size, count in ((SCOUT, 64, 2), (AXIAL, 128, 5)):
        for i in range(1, count + 1):
            ds = make_dataset(rows=size, columns=size, study_uid=STUDY, series_uid=series, instance_number=i)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            staged = archive.stage([buffer.getvalue()])
            meta = read_header(
                staged.path,
                expected_sop_class_uid=str(ds.SOPClassUID),
                expected_sop_instance_uid=str(ds.SOPInstanceUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            )
            archive.add(staged, meta, calling_ae_title="CT1")


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """An archive under ``tmp_path`` holding the two-series study."""
    archive = Archive(_settings(tmp_path, _rule(tmp_path)).storage)
    migrate(archive.engine)
    _store_study(archive)
    archive.close()
    return tmp_path


def _run_all(settings: Settings) -> list[tuple[str, dict[str, object] | None, str | None]]:
    archive = Archive(settings.storage)
    try:
        queue = JobQueue(archive.engine)
        worker = Worker(settings, archive)
        while (job := queue.claim("w", lease_s=30)) is not None:
            worker.run_job(job, "w")
        return [(j.state, j.result, j.last_error) for j in queue.list()]
    finally:
        archive.close()


def test_scheduler_and_worker_give_a_sized_study_rule_only_the_matching_series(stored: Path) -> None:
    settings = _settings(stored, _rule(stored, min_rows=100))
    archive = Archive(settings.storage)
    try:
        queued = Scheduler(settings, archive).scan_once(utcnow() + timedelta(seconds=60))
    finally:
        archive.close()
    assert len(queued) == 1
    [(state, result, _error)] = _run_all(settings)
    assert state == "done"
    assert result is not None and result["files"] == 5  # the axial series, not the 2 scouts


def test_a_series_rule_with_a_size_condition_queues_only_the_series_that_fit(stored: Path) -> None:
    settings = _settings(stored, _rule(stored, scope="series", max_rows=100))
    archive = Archive(settings.storage)
    try:
        Scheduler(settings, archive).scan_once(utcnow() + timedelta(seconds=60))
        jobs = JobQueue(archive.engine).list()
    finally:
        archive.close()
    assert [j.series_instance_uid for j in jobs] == [SCOUT]


def test_analyze_applies_the_size_conditions(stored: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = stored / "pacsnode.yaml"
    settings = _settings(stored, _rule(stored, min_rows=100))
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json(exclude={"source"}))))
    assert main(["--config", str(config), "analyze", STUDY]) == 0
    [(state, result, _error)] = _run_all(settings)
    assert state == "done" and result is not None and result["files"] == 5

    # No series is big enough: nothing is queued, and the command says which rule matched nothing.
    too_big = _settings(stored, _rule(stored, min_rows=1000))
    config.write_text(yaml.safe_dump(json.loads(too_big.model_dump_json(exclude={"source"}))))
    assert main(["analyze", STUDY, "--config", str(config)]) == 1
    assert "no series of study" in capsys.readouterr().err


def test_a_study_job_whose_series_no_longer_match_fails_with_the_reason(stored: Path) -> None:
    settings = _settings(stored, _rule(stored, min_rows=1000))
    archive = Archive(settings.storage)
    try:
        JobQueue(archive.engine).enqueue(
            rule="sized",
            pipeline="tests.support.pipelines:Record",
            study_instance_uid=STUDY,
            params={"log": str(stored / "runs.log")},
            max_attempts=3,
            timeout_s=60,
        )
    finally:
        archive.close()
    [(state, _result, error)] = _run_all(settings)
    assert state == "failed"
    assert error is not None and "matches rule 'sized'" in error
    assert not (stored / "runs.log").exists()  # the pipeline never ran on the scouts
