"""Output validation with tools written outside pacsnode: dciodvfy (dicom3tools) and dsrdump (DCMTK).

Both are run through the shared ``validate_dicom.sh`` (:data:`~tests.support.helpers.VALIDATOR`).
When a tool is missing the test is skipped with the reason, except under CI (``CI=true``), where
a missing validator fails the test: CI must never pass without having validated the output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.helpers import VALIDATOR


def in_ci() -> bool:
    """Whether this run is CI's: the ``CI`` environment variable is ``true`` (or ``1``)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_validator_tools(*, sr: bool = True) -> list[str]:
    """What output validation needs and this machine lacks: the wrapper script, dciodvfy, dsrdump."""
    missing = [] if VALIDATOR.is_file() else [str(VALIDATOR)]
    missing += [tool for tool in ("dciodvfy", *(("dsrdump",) if sr else ())) if shutil.which(tool) is None]
    return missing


def require_validator(*, sr: bool = True, required: bool = False) -> None:
    """Skip the test when the validator cannot run here; fail it instead under ``CI=true`` or when ``required``."""
    missing = missing_validator_tools(sr=sr)
    if not missing:
        return
    reason = (
        f"output validation needs {', '.join(missing)}: install dicom3tools and DCMTK as "
        f"{VALIDATOR.parent / 'README.md'} says (apt-get install -y dicom3tools dcmtk), "
        f"then check with: {VALIDATOR} --self-test"
    )
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    if required:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def validate_dicom(
    files: list[Path] | list[str], *, sr: bool = True, quiet: bool = True, required: bool = False
) -> str:
    """Fail the test unless every file passes dciodvfy (and, with ``sr``, SR files pass ``dsrdump -Ee``).

    Returns the validator's report (one summary line per file, then ``TOTAL: ...``).
    """
    require_validator(sr=sr, required=required)
    options = [*(["-q"] if quiet else []), *([] if sr else ["--no-sr"])]
    result = subprocess.run(
        ["bash", str(VALIDATOR), *options, *map(str, files)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return result.stdout
