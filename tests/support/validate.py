"""Output validation with tools written outside pacsnode: dciodvfy (dicom3tools) and dsrdump (DCMTK).

Both are run through the shared ``validate_dicom.sh`` (:data:`~tests.support.helpers.VALIDATOR`) when
it is beside the checkout; otherwise the tools are run here with the same rules (dciodvfy's
``Error``/``Abort`` lines and ``dsrdump -Ee``'s ``E:``/``F:`` lines are errors). When a tool is missing the test is skipped with the reason, except under CI (``CI=true``), where
a missing validator fails the test: CI must never pass without having validated the output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.support.helpers import VALIDATOR


def in_ci() -> bool:
    """Whether this run is CI's: the ``CI`` environment variable is ``true`` (or ``1``)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def missing_validator_tools(*, sr: bool = True) -> list[str]:
    """What output validation needs and this machine lacks: dciodvfy, and dsrdump for SR files."""
    missing = [tool for tool in ("dciodvfy", *(("dsrdump",) if sr else ())) if shutil.which(tool) is None]
    return missing


def require_validator(*, sr: bool = True, required: bool = False) -> None:
    """Skip the test when the validator cannot run here; fail it instead under ``CI=true`` or when ``required``."""
    missing = missing_validator_tools(sr=sr)
    if not missing:
        return
    reason = (
        f"output validation needs {', '.join(missing)}: install dicom3tools and DCMTK "
        f"(apt-get install -y dicom3tools dcmtk, as bash .ci/install --peers does)"
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
    if VALIDATOR is None:
        report, ok = _validate_here([Path(f) for f in files], sr=sr, quiet=quiet)
        assert ok, report[-8000:]
        return report
    options = [*(["-q"] if quiet else []), *([] if sr else ["--no-sr"])]
    result = subprocess.run(
        ["bash", str(VALIDATOR), *options, *map(str, files)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return result.stdout


_SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def _validate_here(files: list[Path], *, sr: bool, quiet: bool) -> tuple[str, bool]:
    """dciodvfy on every file, ``dsrdump -Ee`` on SR files; the wrapper's report format and verdict."""
    lines: list[str] = []
    failed = 0
    for path in files:
        checks = [("dciodvfy", [str(path)], ("Error", "Abort"), "Warning")]
        if sr and str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID).startswith(_SR_CLASS_PREFIX):
            checks.append(("dsrdump", ["-Ee", str(path)], ("E:", "F:"), "W:"))
        errors = warnings = 0
        for tool, args, error_marks, warning_mark in checks:
            done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=300, check=False)
            messages = done.stderr if tool == "dsrdump" else done.stdout + done.stderr
            found = sum(1 for line in messages.splitlines() if line.startswith(error_marks))
            if done.returncode != 0 and found == 0:
                found = 1
                messages += f"\n{tool} exited with status {done.returncode}"
            errors += found
            warnings += sum(1 for line in messages.splitlines() if line.startswith(warning_mark))
            if not quiet:
                lines += [f"  [{tool}] {line}" for line in messages.splitlines()]
        lines.append(f"{path}: {errors} errors, {warnings} warnings")
        failed += errors > 0
    lines.append(f"TOTAL: {len(files)} files, {failed} failed")
    return "\n".join(lines) + "\n", failed == 0
