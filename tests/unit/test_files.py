from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pacsnode.storage import InstanceStore, OutOfSpaceError, StorageSettings
from pacsnode.storage.files import uid_digest


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    return InstanceStore(StorageSettings(root=tmp_path / "store", min_free_bytes=0))


def test_stage_then_commit_writes_exact_bytes_atomically(store: InstanceStore) -> None:
    data = [b"abc", memoryview(b"defg")]
    staged = store.stage(data)
    assert staged.path.parent == store.tmp_dir
    assert staged.size == 7
    assert staged.sha256 == hashlib.sha256(b"abcdefg").hexdigest()
    rel = store.relative_path_for("1.2.3", staged.sha256)
    final = store.commit(staged, rel)
    assert final.read_bytes() == b"abcdefg"
    assert not staged.path.exists()
    assert list(store.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("uid", ["../../../etc/passwd", "/abs/path", "a\x00b", "..", "x" * 500, "1.2.3/../../4"])
def test_hostile_uid_never_reaches_a_path(store: InstanceStore, uid: str) -> None:
    rel = store.relative_path_for(uid, "0" * 64)
    assert uid not in rel
    assert rel.startswith("objects/")
    assert ".." not in rel
    assert uid_digest(uid) in rel
    assert store.absolute(rel).is_relative_to(store.root)


def test_absolute_refuses_escape(store: InstanceStore) -> None:
    with pytest.raises(Exception, match="outside the store"):
        store.absolute("../outside.dcm")


def test_free_space_floor(tmp_path: Path) -> None:
    store = InstanceStore(StorageSettings(root=tmp_path / "s", min_free_bytes=1 << 62))
    with pytest.raises(OutOfSpaceError, match="floor"):
        store.check_space(10)


def test_free_space_is_read_again_near_the_floor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Far above the floor a fresh reading is reused; near it, or once stale, the disk is asked again."""
    import shutil

    from pacsnode.storage import files

    free = [10 << 30]
    readings: list[int] = []

    def usage(path: Path) -> shutil._ntuple_diskusage:  # type: ignore[name-defined]
        readings.append(free[0])
        return shutil._ntuple_diskusage(free[0] * 2, free[0], free[0])  # type: ignore[attr-defined]

    monkeypatch.setattr(files.shutil, "disk_usage", usage)
    store = InstanceStore(StorageSettings(root=tmp_path / "s", min_free_bytes=1 << 30))
    store.check_space(1 << 20)
    store.check_space(1 << 20)
    assert len(readings) == 1  # 9 GiB above the floor: the reading of a moment ago serves
    free[0] = (1 << 30) + (100 << 20)  # another writer filled the disk meanwhile
    monkeypatch.setattr(files, "_SPACE_FRESH_S", 0.0)
    store.check_space(1 << 20)
    assert len(readings) == 2
    monkeypatch.setattr(files, "_SPACE_FRESH_S", 60.0)
    store.check_space(1 << 20)  # 100 MiB above the floor: within the slack, read every time
    assert len(readings) == 3
    with pytest.raises(OutOfSpaceError, match="floor"):
        store.check_space(200 << 20)
    assert len(readings) == 4


def test_sweep_removes_crash_debris(store: InstanceStore) -> None:
    (store.tmp_dir / "dead.part").write_bytes(b"half")
    assert store.sweep_tmp() == 1
    assert list(store.tmp_dir.iterdir()) == []


def test_failed_write_leaves_nothing(store: InstanceStore) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b"first"
        raise RuntimeError("peer went away")

    with pytest.raises(RuntimeError):
        store.stage(chunks())
    assert list(store.tmp_dir.iterdir()) == []
