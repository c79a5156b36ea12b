"""The durable job and export queues and the scheduler, on a real SQLite index."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest

from pacsnode.node.config import Settings
from pacsnode.node.scheduler import Scheduler
from pacsnode.node.worker import Worker
from pacsnode.storage import Archive
from pacsnode.storage.db import migrate
from pacsnode.storage.index import InstanceMeta, add_instance
from pacsnode.storage.queue import ExportQueue, JobQueue, RetryPolicy, utcnow
from tests.support.helpers import make_settings

POLICY = RetryPolicy(max_attempts=3, base_s=0.0, cap_s=0.0)


def _settings(tmp_path: Path, **analysis: object) -> Settings:
    rule = {
        "name": "rec",
        "pipeline": "tests.support.pipelines:Record",
        "match": {"modality": ["CT"]},
        "params": {"log": str(tmp_path / "runs.log")},
    }
    section = {"quiet_seconds": 5, "workers": 0, "rules": [rule], **analysis}
    return make_settings(tmp_path, analysis=section)


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    archive = Archive(_settings(tmp_path).storage)
    migrate(archive.engine)
    yield archive  # type: ignore[misc]
    archive.close()


def _add(archive: Archive, study: str, series: str, n: int, *, modality: str = "CT", start: int = 1) -> None:
    with archive.engine.begin() as conn:
        for i in range(start, start + n):
            meta = InstanceMeta(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"{series}.{i}",
                study_instance_uid=study,
                series_instance_uid=series,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                patient_id="P1",
                modality=modality,
            )
            add_instance(conn, meta, file_path=f"x/{series}.{i}", file_size=0, sha256="0" * 64, calling_ae_title="CT1")


def test_one_pending_job_per_pipeline_study_and_series(archive: Archive) -> None:
    queue = JobQueue(archive.engine)
    first, created = queue.enqueue(rule="r", pipeline="p", study_instance_uid="1.2", max_attempts=3, timeout_s=60)
    again, created_again = queue.enqueue(rule="r", pipeline="p", study_instance_uid="1.2", max_attempts=3, timeout_s=60)
    other, created_other = queue.enqueue(rule="r", pipeline="q", study_instance_uid="1.2", max_attempts=3, timeout_s=60)
    assert created and not created_again and first == again
    assert created_other and other != first
    # Once the first one runs, a new pending job for the same key is allowed (re-analysis).
    claimed = queue.claim("w1", lease_s=30)
    assert claimed is not None and claimed.id == first and claimed.state == "running" and claimed.attempts == 1
    third, created_third = queue.enqueue(rule="r", pipeline="p", study_instance_uid="1.2", max_attempts=3, timeout_s=60)
    assert created_third and third not in (first, other)
    # ... but it waits until the running one is finished, so the newest results are written last.
    second = queue.claim("w2", lease_s=30)
    assert second is not None and second.id == other
    assert queue.claim("w3", lease_s=30) is None
    assert queue.complete(first, "w1", {})
    latest = queue.claim("w3", lease_s=30)
    assert latest is not None and latest.id == third


def test_claim_complete_and_lease_checks(archive: Archive) -> None:
    queue = JobQueue(archive.engine)
    job_id, _ = queue.enqueue(rule="r", pipeline="p", study_instance_uid="1.2", max_attempts=3, timeout_s=60)
    job = queue.claim("w1", lease_s=30)
    assert job is not None and job.id == job_id
    assert queue.claim("w2", lease_s=30) is None  # nothing else due
    assert not queue.heartbeat(job_id, "w2", lease_s=30)  # not w2's job
    assert queue.heartbeat(job_id, "w1", lease_s=30)
    assert not queue.complete(job_id, "w2", {"x": 1})
    assert queue.complete(job_id, "w1", {"x": 1})
    done = queue.get(job_id)
    assert done is not None and done.state == "done" and done.result == {"x": 1} and done.lease_owner is None


def test_expired_lease_is_taken_over_and_attempts_run_out(archive: Archive) -> None:
    queue = JobQueue(archive.engine)
    job_id, _ = queue.enqueue(rule="r", pipeline="p", study_instance_uid="1.2", max_attempts=2, timeout_s=60)
    assert queue.claim("dead-worker", lease_s=0.01) is not None
    threading.Event().wait(0.05)
    taken = queue.claim("w2", lease_s=0.01)
    assert taken is not None and taken.id == job_id and taken.attempts == 2 and taken.lease_owner == "w2"
    assert not queue.complete(job_id, "dead-worker", {})  # the first worker lost it
    threading.Event().wait(0.05)
    assert queue.claim("w3", lease_s=30) is None  # no attempts left: failed, not claimed
    failed = queue.get(job_id)
    assert failed is not None and failed.state == "failed" and "lease expired" in (failed.last_error or "")


def test_failures_retry_with_backoff_then_fail(archive: Archive) -> None:
    queue = JobQueue(archive.engine)
    job_id, _ = queue.enqueue(rule="r", pipeline="p", study_instance_uid="1.2", max_attempts=2, timeout_s=60)
    policy = RetryPolicy(max_attempts=2, base_s=3600, cap_s=7200)
    queue.claim("w", lease_s=30)
    assert queue.fail(job_id, "w", "boom", retry=True, policy=policy) == "pending"
    job = queue.get(job_id)
    assert job is not None and job.not_before > utcnow() + timedelta(minutes=59)
    assert queue.claim("w", lease_s=30) is None  # backing off
    assert policy.delay(1) == 3600 and policy.delay(2) == 7200 and policy.delay(9) == 7200
    # An operator retries it now; the second failure is final.
    queue.retry(job_id)
    claimed = queue.claim("w", lease_s=30)
    assert claimed is not None and claimed.attempts == 1
    with pytest.raises(LookupError, match="running"):
        queue.retry(job_id)
    assert queue.fail(job_id, "w", "input broken", retry=False, policy=policy) == "failed"
    with pytest.raises(LookupError, match="no job"):
        queue.retry(99999)


def test_scheduler_waits_for_quiet_then_queues_once_and_again_after_new_instances(
    tmp_path: Path, archive: Archive
) -> None:
    settings = _settings(tmp_path)
    scheduler = Scheduler(settings, archive)
    _add(archive, "1.2.3", "1.2.3.1", 5)
    _add(archive, "1.2.3", "1.2.3.2", 2, modality="SR")  # no rule for SR
    now = utcnow()
    assert scheduler.scan_once(now) == []  # not quiet yet
    later = now + timedelta(seconds=6)
    queued = scheduler.scan_once(later)
    assert len(queued) == 1
    assert scheduler.scan_once(later + timedelta(seconds=60)) == []  # marked: not again
    from pacsnode.storage.activity import mark_scheduled, unscheduled_series

    _add(archive, "1.2.3", "1.2.3.9", 1, modality="OT")
    with archive.engine.begin() as conn:  # a second scheduler that read the unit before the mark loses
        (unit,) = [u for u in unscheduled_series(conn) if u.series_instance_uid == "1.2.3.9"]
        assert mark_scheduled(conn, unit) and not mark_scheduled(conn, unit)
    job = JobQueue(archive.engine).get(queued[0])
    assert job is not None and job.series_instance_uid == "1.2.3.1" and job.rule == "rec"
    # A late instance: the series is due again after another quiet period; the pending job is reused.
    _add(archive, "1.2.3", "1.2.3.1", 1, start=6)
    assert scheduler.scan_once(utcnow()) == []
    assert scheduler.scan_once(utcnow() + timedelta(seconds=6)) == []  # job 1 still pending: same job
    JobQueue(archive.engine).claim("w", lease_s=30)
    _add(archive, "1.2.3", "1.2.3.1", 1, start=7)
    again = scheduler.scan_once(utcnow() + timedelta(seconds=6))
    assert len(again) == 1 and again[0] != queued[0]


def test_ready_when_instance_count_skips_the_quiet_time(tmp_path: Path, archive: Archive) -> None:
    settings = _settings(
        tmp_path,
        rules=[
            {
                "name": "rec",
                "pipeline": "tests.support.pipelines:Record",
                "match": {"modality": ["CT"], "min_instances": 3},
                "ready_when": {"instances": 4},
            }
        ],
    )
    scheduler = Scheduler(settings, archive)
    _add(archive, "1.2.4", "1.2.4.1", 2)
    assert scheduler.scan_once() == []  # below min_instances and not quiet
    _add(archive, "1.2.4", "1.2.4.1", 2, start=3)
    assert len(scheduler.scan_once()) == 1  # 4 instances: ready at once


def test_worker_runs_the_job_once_and_records_failures(tmp_path: Path, archive: Archive) -> None:
    settings = _settings(tmp_path)
    _add(archive, "1.2.5", "1.2.5.1", 3)
    queue = JobQueue(archive.engine)
    ok_id, _ = queue.enqueue(
        rule="rec",
        pipeline="tests.support.pipelines:Record",
        study_instance_uid="1.2.5",
        series_instance_uid="1.2.5.1",
        params={"log": str(tmp_path / "runs.log")},
        max_attempts=3,
        timeout_s=60,
    )
    bad_id, _ = queue.enqueue(
        rule="x",
        pipeline="tests.support.pipelines:Record",
        study_instance_uid="1.2.5",
        params={"fail": "input"},
        max_attempts=3,
        timeout_s=60,
    )
    crash_id, _ = queue.enqueue(
        rule="y",
        pipeline="tests.support.pipelines:Record",
        study_instance_uid="1.2.6",
        params={"fail": "crash"},
        max_attempts=3,
        timeout_s=60,
    )
    _add(archive, "1.2.6", "1.2.6.1", 1)
    worker = Worker(
        settings.model_copy(update={"analysis": settings.analysis.model_copy(update={"retry_backoff_seconds": 3600})}),
        archive,
    )
    for _ in range(3):
        job = queue.claim("w", lease_s=30)
        assert job is not None
        worker.run_job(job, "w")
    done, bad, crash = queue.get(ok_id), queue.get(bad_id), queue.get(crash_id)
    assert done is not None and done.state == "done" and done.result is not None and done.result["files"] == 3
    assert bad is not None and bad.state == "failed" and bad.attempts == 1
    assert "cannot be analysed" in (bad.last_error or "")
    assert crash is not None and crash.state == "pending" and "RuntimeError" in (crash.last_error or "")
    assert (tmp_path / "runs.log").read_text().count("\n") == 1


def test_export_queue_requeue_bumps_generation_and_dead_letters(archive: Archive) -> None:
    exports = ExportQueue(archive.engine)
    assert exports.enqueue(["1.9.1", "1.9.2"], ["PACS"], max_attempts=2) == 2
    batch = exports.claim("e", lease_s=30, limit=10)
    assert [e.sop_instance_uid for e in batch] == ["1.9.1", "1.9.2"]
    # 1.9.1 is replaced while being sent: the send of the old content must not count.
    exports.enqueue(["1.9.1"], ["PACS"], max_attempts=2)
    assert not exports.mark_sent(batch[0], "e")
    assert exports.mark_sent(batch[1], "e")
    states = {e.sop_instance_uid: e.state for e in exports.list()}
    assert states == {"1.9.1": "pending", "1.9.2": "done"}
    for expected in ("pending", "dead"):
        (item,) = exports.claim("e", lease_s=30, limit=10)
        assert exports.mark_failed(item, "e", "refused", policy=POLICY) == expected
    assert exports.claim("e", lease_s=30, limit=10) == []
    assert exports.retry() == 1
    (item,) = exports.claim("e", lease_s=30, limit=10)
    assert item.attempts == 1 and item.state == "sending"


def test_exports_cli_lists_dead_exports_and_queues_them_again(
    tmp_path: Path, archive: Archive, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import yaml

    from pacsnode.node.cli import main

    config = tmp_path / "pacsnode.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "root": str(tmp_path / "store"),
                    "database_url": str(archive.engine.url),
                    "min_free_bytes": 0,
                }
            }
        )
    )
    exports = ExportQueue(archive.engine)
    exports.enqueue(["1.9.1", "1.9.2"], ["PACS"], max_attempts=1)
    for item in exports.claim("e", lease_s=30, limit=1):
        exports.mark_failed(item, "e", "association rejected", policy=POLICY)
    assert main(["--config", str(config), "exports", "--failed", "--json"]) == 0
    (dead,) = json.loads(capsys.readouterr().out)
    assert dead["state"] == "dead" and dead["last_error"] == "association rejected"
    assert main(["--config", str(config), "exports", "--retry", "99"]) == 1
    assert main(["--config", str(config), "exports", "--retry-dead"]) == 0
    assert "1 export(s) queued again" in capsys.readouterr().out
    assert {e.state for e in exports.list()} == {"pending"}
    assert main(["--config", str(config), "exports"]) == 0
    assert "2 export(s)" in capsys.readouterr().out


def test_a_batching_pipeline_gets_pending_jobs_of_its_rule_in_one_pass(tmp_path: Path, archive: Archive) -> None:
    log = tmp_path / "runs.log"
    rule = {"name": "cnn", "pipeline": "tests.support.pipelines:BatchRecord", "params": {"log": str(log)}}
    settings = make_settings(tmp_path, analysis={"workers": 0, "batch_jobs": 3, "rules": [rule]})
    queue = JobQueue(archive.engine)
    ids = []
    for n in range(4):
        _add(archive, f"1.3.{n}", f"1.3.{n}.1", 2)
        job_id, _ = queue.enqueue(
            rule="cnn",
            pipeline="tests.support.pipelines:BatchRecord",
            study_instance_uid=f"1.3.{n}",
            params={"log": str(log)},
            max_attempts=3,
            timeout_s=60,
        )
        ids.append(job_id)
    _add(archive, "1.3.50", "1.3.50.1", 1)
    other, _ = queue.enqueue(
        rule="other",
        pipeline="tests.support.pipelines:BatchRecord",
        study_instance_uid="1.3.50",
        params={"log": str(log)},
        max_attempts=3,
        timeout_s=60,
    )
    missing, _ = queue.enqueue(
        rule="cnn",
        pipeline="tests.support.pipelines:BatchRecord",
        study_instance_uid="1.3.99",
        params={"log": str(log)},
        max_attempts=3,
        timeout_s=60,
    )
    worker = Worker(settings, archive)
    stop = threading.Event()
    runner = threading.Thread(target=worker.run_jobs, args=(stop,), kwargs={"poll_s": 0.05})
    runner.start()
    try:
        deadline = utcnow() + timedelta(seconds=30)
        while utcnow() < deadline and any(
            (queue.get(i) or queue.get(ids[0])).state in ("pending", "running") for i in [*ids, other, missing]
        ):
            stop.wait(0.05)
    finally:
        stop.set()
        runner.join(timeout=30)
    states = {i: queue.get(i).state for i in [*ids, other, missing]}  # type: ignore[union-attr]
    assert [states[i] for i in ids] == ["done"] * 4 and states[other] == "done", states
    assert states[missing] == "failed" and "no received series" in (queue.get(missing).last_error or "")  # type: ignore[union-attr]
    batches = [line.split()[1:] for line in log.read_text().splitlines() if line.startswith("batch")]
    # At most 3 jobs at once, only jobs of one rule together, and the first pass took a full batch.
    assert all(len(b) <= 3 for b in batches) and len(batches[0]) == 3, batches
    assert not any(str(other) in b and len(b) > 1 for b in batches), batches
    runs = [line.split()[0] for line in log.read_text().splitlines() if not line.startswith("batch")]
    assert sorted(runs) == sorted(str(i) for i in [*ids, other])  # each job ran exactly once
