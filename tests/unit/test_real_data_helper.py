"""``real_chest_ct()``: the real series under ``$PACSNODE_TEST_DATA`` or beside the checkout, else a clear skip."""

from __future__ import annotations

from pathlib import Path

import pytest

import tests.support.helpers as helpers


def _fake_copy(root: Path) -> Path:
    """A folder shaped like ``real-chest-ct/`` (a .dcm file per series; never read here)."""
    folder = root / "real-chest-ct"
    for name in helpers.REAL_CHEST_CT_SERIES:
        (folder / name).mkdir(parents=True)
        (folder / name / "1-01.dcm").write_bytes(b"")
    return folder


def test_the_environment_variable_is_looked_at_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_copy(tmp_path / "data")
    monkeypatch.setenv("PACSNODE_TEST_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(helpers, "REPO", tmp_path / "nowhere" / "checkout")
    assert helpers.real_chest_ct() == folder


def test_beside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_copy(tmp_path / "shared" / "data")
    monkeypatch.delenv("PACSNODE_TEST_DATA", raising=False)
    monkeypatch.setattr(helpers, "REPO", tmp_path / "checkout")
    assert helpers.real_chest_ct() == folder


def test_absent_or_incomplete_data_skips_saying_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    incomplete = tmp_path / "data" / "real-chest-ct" / helpers.REAL_CHEST_CT_SERIES[0]
    incomplete.mkdir(parents=True)
    (incomplete / "1-01.dcm").write_bytes(b"")  # one series only
    monkeypatch.setenv("PACSNODE_TEST_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(helpers, "REPO", tmp_path / "checkout")
    with pytest.raises(pytest.skip.Exception) as skipped:
        helpers.real_chest_ct()
    message = str(skipped.value)
    assert "real chest CT not available" in message and "PACSNODE_TEST_DATA" in message
    assert str(tmp_path / "data" / "real-chest-ct") in message and str(tmp_path / "shared" / "data") in message
