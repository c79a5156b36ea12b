"""``pacsnode worker`` processes against one database: exactly once, crash recovery, timeouts.

Jobs run the test pipeline ``tests.support.pipelines:Record``, which appends one line
per completed run to a log, so "exactly once" is checked by counting lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sqlalchemy import Engine

from pacsnode.storage import Archive, StorageSettings
from pacsnode.storage.db import migrate
from pacsnode.storage.index import InstanceMeta, add_instance
from pacsnode.storage.queue import JobQueue, JobRecord
from tests.support.helpers import REPO, pacsnode_cmd, wait_until


class Workers:
    """``pacsnode worker --count N`` as a subprocess, stopped by its PID."""

    def __init__(self, tmp_path: Path, database_url: str, *, name: str = "w", **analysis: object) -> None:
        self.config = tmp_path / f"{name}.yaml"
        config = {
            "storage": {"root": str(tmp_path / "store"), "database_url": database_url, "min_free_bytes": 0},
            "node": {"timeouts": {"shutdown_grace": 5}},
            "analysis": {"lease_seconds": 2, "retry_backoff_seconds": 0.2, "retry_backoff_max_seconds": 1, **analysis},
        }
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp_path / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, count: int) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                pacsnode_cmd("--config", str(self.config), "worker", "--count", str(count)),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def workers(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[Workers] = []

    def _start(database_url: str, count: int, *, name: str = "w", **analysis: object) -> Workers:
        w = Workers(tmp_path, database_url, name=name, **analysis)
        w.start(count)
        started.append(w)
        return w

    yield _start
    for w in started:
        w.stop()


def _index(tmp_path: Path, database_url: str) -> Engine:
    archive = Archive(StorageSettings(root=tmp_path / "store", database_url=database_url, min_free_bytes=0))
    migrate(archive.engine)
    return archive.engine


def _study(engine: Engine, n: int) -> str:
    study = f"1.2.826.0.1.3680043.10.9999.{n}"
    with engine.begin() as conn:
        add_instance(
            conn,
            InstanceMeta(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"{study}.1.1",
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                patient_id="P",
                modality="CT",
            ),
            file_path=f"x/{n}",
            file_size=0,
            sha256="0" * 64,
            calling_ae_title="CT",
        )
    return study


def _wait_jobs(queue: JobQueue, ids: list[int], states: set[str], timeout: float) -> list[JobRecord]:
    def check() -> list[JobRecord] | None:
        jobs = [queue.get(i) for i in ids]
        return jobs if all(j is not None and j.state in states for j in jobs) else None  # type: ignore[return-value]

    return wait_until(
        check,
        timeout,
        f"jobs {ids} to be {states}",
        interval=0.2,
        details=lambda: str([(j.id, j.state) for j in (queue.get(i) for i in ids) if j]),
    )


def _run_many(tmp_path: Path, url: str, workers, supervisors: int, per: int, jobs: int) -> None:  # type: ignore[no-untyped-def]
    engine = _index(tmp_path, url)
    queue = JobQueue(engine)
    log = tmp_path / "runs.log"
    release = tmp_path / "release"  # runs hold until this exists: several processes must have claimed a job
    ids = [
        queue.enqueue(
            rule="r",
            pipeline="tests.support.pipelines:Record",
            study_instance_uid=_study(engine, n),
            params={"log": str(log), "hold_until": str(release)},
            max_attempts=3,
            timeout_s=60,
        )[0]
        for n in range(jobs)
    ]
    for s in range(supervisors):
        # A lease long enough for a freshly started process on a busy 2-core machine to import the
        # pipeline between its claim and its first renewal: this test is about exactly-once, not takeover.
        workers(url, per, name=f"w{s}", lease_seconds=6)

    def owners() -> set[str]:
        running = (queue.get(i) for i in ids)
        return {j.lease_owner for j in running if j is not None and j.state == "running" and j.lease_owner}

    wait_until(lambda: len(owners()) >= 2, 120, "two worker processes to run a job each")
    release.touch()
    done = _wait_jobs(queue, ids, {"done", "failed"}, timeout=120)
    assert [j.state for j in done] == ["done"] * jobs, [(j.id, j.last_error) for j in done if j.state != "done"]
    lines = log.read_text().splitlines()
    runs = Counter(int(line.split()[0]) for line in lines)
    assert sorted(runs) == sorted(ids) and set(runs.values()) == {1}, runs
    assert len({line.split()[1] for line in lines}) > 1  # several processes shared the work
    assert all(j.attempts == 1 for j in done)
    engine.dispose()


def test_many_workers_on_postgresql_run_every_job_exactly_once(tmp_path: Path, postgres_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    """Two worker supervisors (as on two machines) with 3 processes each, on PostgreSQL (SKIP LOCKED)."""
    _run_many(tmp_path, postgres_url, workers, supervisors=2, per=3, jobs=60)


def test_many_workers_on_sqlite_run_every_job_exactly_once(tmp_path: Path, workers) -> None:  # type: ignore[no-untyped-def]
    _run_many(tmp_path, f"sqlite:///{tmp_path / 'index.db'}", workers, supervisors=1, per=3, jobs=30)


def test_kill_9_of_a_worker_mid_job_the_job_completes_after_restart(tmp_path: Path, workers) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'index.db'}"
    engine = _index(tmp_path, url)
    queue = JobQueue(engine)
    log = tmp_path / "runs.log"
    release = tmp_path / "release"  # the run holds until this exists: it is certainly mid-job when killed
    job_id, _ = queue.enqueue(
        rule="r",
        pipeline="tests.support.pipelines:Record",
        study_instance_uid=_study(engine, 1),
        params={"log": str(log), "hold_until": str(release)},
        max_attempts=3,
        timeout_s=60,
    )
    w = workers(url, 1)
    (running,) = _wait_jobs(queue, [job_id], {"running"}, timeout=30)
    victim = int((running.lease_owner or "").split(":")[1])
    assert victim != w.proc.pid  # the worker process, not its supervisor
    os.kill(victim, signal.SIGKILL)
    release.touch()  # the next run may finish
    (done,) = _wait_jobs(queue, [job_id], {"done", "failed"}, timeout=60)
    assert done.state == "done" and done.attempts == 2
    assert int(done.result["files"]) == 1 if done.result else False
    (line,) = log.read_text().splitlines()  # the killed run never finished: one completed run
    assert int(line.split()[1]) != victim
    assert "exited (signal 9); starting another" in w.log.read_text()
    engine.dispose()


def test_a_job_past_its_timeout_is_stopped_and_retried_then_failed(tmp_path: Path, workers) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'index.db'}"
    engine = _index(tmp_path, url)
    queue = JobQueue(engine)
    job_id, _ = queue.enqueue(
        rule="r",
        pipeline="tests.support.pipelines:Record",
        study_instance_uid=_study(engine, 1),
        params={"seconds": 60},
        max_attempts=2,
        timeout_s=1.5,
    )
    w = workers(url, 1)
    (failed,) = _wait_jobs(queue, [job_id], {"failed", "done"}, timeout=60)
    assert failed.state == "failed" and failed.attempts == 2
    assert "timed out after 1.5 s (attempt 2 of 2)" in (failed.last_error or "")
    wait_until(  # the supervisor logs each timed-out worker it replaces
        lambda: w.log.read_text().count("ended a job past its timeout; starting another") >= 2,
        30,
        "the supervisor to report both timed-out runs",
        details=lambda: w.log.read_text()[-3000:],
    )
    engine.dispose()
