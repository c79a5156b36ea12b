"""A missing output validator skips the check with the reason, except under CI, where it fails the test."""

from __future__ import annotations

import pytest

from tests.support import validate


@pytest.fixture
def no_dciodvfy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate.shutil, "which", lambda tool: None if tool == "dciodvfy" else f"/usr/bin/{tool}")


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_ci_fails_without_dciodvfy(no_dciodvfy: None, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=r"CI=true and output validation needs dciodvfy"):
        validate.require_validator()


@pytest.mark.parametrize("value", [None, "", "false"])
def test_elsewhere_the_check_is_skipped_with_the_reason(
    no_dciodvfy: None, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.skip.Exception, match=r"output validation needs dciodvfy: install dicom3tools"):
        validate.require_validator()
    with pytest.raises(pytest.fail.Exception, match="needs dciodvfy"):
        validate.require_validator(required=True)


def test_dsrdump_is_needed_only_for_sr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(validate.shutil, "which", lambda tool: None if tool == "dsrdump" else f"/usr/bin/{tool}")
    assert validate.missing_validator_tools(sr=True)[-1:] == ["dsrdump"]
    assert "dsrdump" not in validate.missing_validator_tools(sr=False)
