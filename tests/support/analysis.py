"""What the analysis acceptance tests share: result SOP classes, DCMTK pushes, the node's job list."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom

from tests.support.peers import require
from tests.support.served import Served
from tests.support.validate import validate_dicom

SEG, SR, SC = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"


def storescu(port: int, files: list[Path]) -> None:
    """Push ``files`` with DCMTK storescu to the node on ``port``; fail the test unless all were stored."""
    result = subprocess.run(
        [require("storescu"), "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def jobs(served: Served) -> list[dict[str, Any]]:
    """The node's analysis jobs, as ``pacsnode jobs --json`` lists them."""
    return json.loads(served.cli("jobs", "--json").stdout)  # type: ignore[no-any-return]


def jobs_in(served: Served, states: set[str], count: int = 1, timeout: float = 120) -> list[dict[str, Any]]:
    """Wait (up to ``timeout`` seconds) until at least ``count`` jobs exist and every one is in ``states``."""

    def check() -> list[dict[str, Any]] | None:
        listed = jobs(served)
        return listed if len(listed) >= count and all(j["state"] in states for j in listed) else None

    return served.wait(f"{count} job(s) in {states}", check, timeout=timeout)


def by_class(files: list[Path]) -> Counter[str]:
    """How many of ``files`` there are of each SOP Class UID."""
    return Counter(str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files)


def validate_results(files: list[Path]) -> None:
    """Fail the test unless the results pass dciodvfy and dsrdump; a missing tool fails it too."""
    validate_dicom(files, required=True)
