"""Group commit: concurrent instances share index transactions, and a failed one fails them all."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from pacsnode.node.testing.corpus import UID_PREFIX, make_dataset
from pacsnode.storage import AddOutcome, DuplicatePolicy, StorageError, StorageSettings
from pacsnode.storage.archive import Archive
from pacsnode.storage.index import count_rows
from tests.integration.test_archive import _add
from tests.support.helpers import wait_until


def _open(tmp_path: Path) -> Archive:
    return Archive.open(
        StorageSettings(
            root=tmp_path / "store",
            database_url=f"sqlite:///{tmp_path / 'index.db'}",
            duplicate_policy=DuplicatePolicy.REJECT,
            min_free_bytes=0,
        )
    )


def _queued(archive: Archive) -> int:
    group = archive._group
    assert group is not None
    with group._cond:
        return len(group._queue)


def _taken(archive: Archive) -> int:
    group = archive._group
    assert group is not None
    with group._cond:
        return group.batches


def _stored_files(archive: Archive) -> list[Path]:
    return [path for path in (archive.settings.root / "objects").rglob("*") if path.is_file()]


def _push_concurrently(archive: Archive, datasets: list[Any]) -> list[BaseException | AddOutcome]:
    """Add each dataset from its own thread while the index is held, so they queue up together.

    The first leads a transaction (blocked on the held index) before the others start, so
    they queue while it waits and join its transaction once it has the index. Batches may
    have been taken before (an earlier add): count from there, or the test cannot tell that
    the first instance's batch has begun before the others arrive.
    """
    outcomes: list[BaseException | AddOutcome] = [AddOutcome.STORED] * len(datasets)

    def push(i: int) -> None:
        try:
            outcomes[i] = _add(archive, datasets[i]).outcome
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=push, args=(i,)) for i in range(len(datasets))]
    taken = _taken(archive)
    with archive._write_gate():  # another writer holds the index: its transaction waits
        threads[0].start()
        wait_until(lambda: _taken(archive) == taken + 1, 60, "the first instance's transaction begun")
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: _queued(archive) == len(datasets) - 1, 60, "the others queued behind it")
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_concurrent_instances_share_one_commit(tmp_path: Path) -> None:
    archive = _open(tmp_path)
    study = generate_uid(UID_PREFIX)
    datasets = [make_dataset(rows=8, columns=8, study_uid=study, series_uid=generate_uid(UID_PREFIX)) for _ in range(5)]
    commits: list[int] = []
    event.listen(archive.engine, "commit", lambda conn: commits.append(1))
    outcomes = _push_concurrently(archive, datasets)
    assert outcomes == [AddOutcome.STORED] * 5
    assert len(commits) == 1  # the four that queued while the first waited for the index joined its transaction
    [summary] = archive.studies()
    assert (summary.num_series, summary.num_instances) == (5, 5)
    with archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 1, "studies": 1, "series": 5, "instances": 5}
    assert len(_stored_files(archive)) == 5
    archive.close()


def test_a_refused_member_leaves_the_others_committed(tmp_path: Path) -> None:
    archive = _open(tmp_path)
    first = make_dataset(rows=8, columns=8)
    _add(archive, first)
    changed = make_dataset(rows=8, columns=8, study_uid=str(first.StudyInstanceUID), seed=3)
    changed.SOPInstanceUID = first.SOPInstanceUID  # same UID, other content: refused (policy reject)
    changed.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    others = [make_dataset(rows=8, columns=8) for _ in range(3)]
    outcomes = _push_concurrently(archive, [make_dataset(rows=8, columns=8), changed, *others])
    assert outcomes[0] == AddOutcome.STORED and outcomes[2:] == [AddOutcome.STORED] * 3
    assert type(outcomes[1]).__name__ == "DuplicateInstanceError"
    assert _taken(archive) == 2  # the first add; then all five (the refused one included) in one transaction
    with archive.engine.connect() as conn:
        assert count_rows(conn)["instances"] == 5
    assert len(_stored_files(archive)) == 5  # the refused copy was removed
    archive.close()


def test_an_index_failure_fails_every_member_and_keeps_no_file(tmp_path: Path) -> None:
    archive = _open(tmp_path)
    failing = {"on": True}

    def fail_commit(conn: Any) -> None:
        if failing["on"]:
            raise OperationalError("COMMIT", None, Exception("disk I/O error"))

    event.listen(archive.engine, "commit", fail_commit)
    outcomes = _push_concurrently(archive, [make_dataset(rows=8, columns=8) for _ in range(4)])
    assert all(isinstance(outcome, StorageError) for outcome in outcomes), outcomes
    assert all("index database error" in str(outcome) for outcome in outcomes)
    with archive.engine.connect() as conn:
        assert count_rows(conn) == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    assert _stored_files(archive) == []
    failing["on"] = False
    assert _add(archive, make_dataset(rows=8, columns=8)).outcome is AddOutcome.STORED
    archive.close()


@pytest.mark.parametrize("group_commit", [True, False])
def test_the_switch(tmp_path: Path, group_commit: bool) -> None:
    archive = Archive.open(
        StorageSettings(
            root=tmp_path / "store",
            database_url=f"sqlite:///{tmp_path / 'index.db'}",
            min_free_bytes=0,
            group_commit=group_commit,
        )
    )
    assert (archive._group is not None) is group_commit
    assert _add(archive, make_dataset(rows=8, columns=8)).outcome is AddOutcome.STORED
    archive.close()
