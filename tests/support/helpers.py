"""Shared test helpers: ports, settings, sample files, a pynetdicom SCU."""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from pacsnode.node.config import Settings
from pacsnode.node.dicom.handlers import set_nodelay

REPO = Path(__file__).resolve().parents[2]
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"

T = TypeVar("T")


def _validator() -> Path | None:
    """The shared dciodvfy + dsrdump wrapper: ``$PACSNODE_VALIDATOR``, else ``../shared`` beside the checkout."""
    candidates = [Path(p) for p in os.environ.get("PACSNODE_VALIDATOR", "").split(os.pathsep) if p]
    candidates.append(REPO.parent / "shared" / "tools" / "validate" / "validate_dicom.sh")
    return next((c for c in candidates if c.is_file()), None)


#: ``validate_dicom.sh`` (shared/tools/validate) when there is one; otherwise
#: :mod:`tests.support.validate` runs dciodvfy and dsrdump itself with the same rules.
VALIDATOR = _validator()


#: The real chest CT folders every ``real-chest-ct`` copy holds (see its README).
REAL_CHEST_CT_SERIES = ("A0001-5mm-B", "A0001-5mm-L")


def _real_chest_ct_candidates() -> list[Path]:
    """Where the real chest CT may be: under ``$PACSNODE_TEST_DATA``, then ``../shared/data`` beside the checkout."""
    candidates = [Path(p) / "real-chest-ct" for p in os.environ.get("PACSNODE_TEST_DATA", "").split(os.pathsep) if p]
    candidates.append(REPO.parent / "shared" / "data" / "real-chest-ct")
    return candidates


def find_real_chest_ct() -> Path | None:
    """The ``real-chest-ct`` folder with both series present, or None (no skip: for ``skipif`` marks)."""
    for candidate in _real_chest_ct_candidates():
        if all(any((candidate / name).glob("*.dcm")) for name in REAL_CHEST_CT_SERIES):
            return candidate
    return None


def real_chest_ct() -> Path:
    """The real chest CT folder (``A0001-5mm-B/``, ``A0001-5mm-L/``, ``annotations.json``); skip if absent.

    Data: TCIA Lung-PET-CT-Dx (Li et al. 2020, https://doi.org/10.7937/TCIA.2020.NNC2-0461,
    CC BY 4.0). Tests read the files where they are and never copy them into the repository; a test
    using them keeps this attribution in its docstring. Looked for under ``$PACSNODE_TEST_DATA``
    (a folder that contains ``real-chest-ct/``, several joined with ``os.pathsep``), then in
    ``../shared/data/real-chest-ct/`` beside the checkout.
    """
    found = find_real_chest_ct()
    if found is None:
        tried = ", ".join(str(c) for c in _real_chest_ct_candidates())
        pytest.skip(
            "real chest CT not available: no real-chest-ct/ folder with "
            f"{' and '.join(REAL_CHEST_CT_SERIES)} (tried {tried}); set PACSNODE_TEST_DATA to a folder "
            "that contains real-chest-ct/"
        )
    return found


def pydicom_data_files() -> Path:
    """The folder of real images shipped by the pydicom-data package (never fetched)."""
    import data_store

    return Path(data_store.__file__).parent / "data"


_PORTS = random.Random()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up).

    A port the kernel handed out with bind(0) comes from the same range as the
    source ports of outgoing connections, so between choosing it and a peer
    (storescp, Orthanc) binding it, a client connection may take it. Ports
    chosen here never collide with those.
    """
    for _ in range(1000):
        port = _PORTS.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def make_settings(tmp_path: Path, **sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {
        "node": {"port": free_port(), "acceptor_processes": 1, "timeouts": {"shutdown_grace": 5}},
        "storage": {
            "root": str(tmp_path / "store"),
            "database_url": f"sqlite:///{tmp_path / 'index.db'}",
            "min_free_bytes": 0,
        },
        # The trail is written as in production, without an fsync per event (test time).
        "audit": {"fsync": False},
    }
    for key, value in sections.items():
        data.setdefault(key, {})
        if isinstance(value, dict):
            merged = dict(data[key])
            for k, v in value.items():
                if isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
            data[key] = merged
        else:
            data[key] = value
    return Settings.model_validate(data)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_datasets(
    port: int,
    items: list[Dataset | Path],
    *,
    called: str = "PACSNODE",
    calling: str = "TESTSCU",
    transfer_syntaxes: list[str] | None = None,
) -> list[int | None]:
    """C-STORE each dataset or file with pynetdicom; return each status (None: not sent)."""
    ae = AE(ae_title=calling)
    datasets = [pydicom.dcmread(i) if isinstance(i, Path) else i for i in items]
    for ds in datasets:
        ts = transfer_syntaxes or [str(ds.file_meta.TransferSyntaxUID)]
        ae.add_requested_context(ds.SOPClassUID, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    assert assoc.is_established, "association was not established"
    out: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            out.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        assoc.release()
    return out


def echo_status(port: int, *, called: str = "PACSNODE", calling: str = "TESTSCU") -> int | str:
    """C-ECHO; the status, or 'rejected'/'aborted'/'failed' when no association."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_rejected:
        return "rejected"
    if assoc.is_aborted:
        return "aborted"
    if not assoc.is_established:
        return "failed"
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status)
    finally:
        assoc.release()


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    The deadline is a safety net against a hang, not a speed requirement: pick ``timeout`` far
    above the time the condition takes on a slow machine. On expiry the test fails with
    ``what`` (and ``details()``, e.g. the end of a log), not with an assertion on a stale value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{extra}", pytrace=False)
        time.sleep(interval)


def pacsnode_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pacsnode.node", *args]


def hold_reactor(assoc: Any) -> None:
    """Leave a pynetdicom requestor's reactor thread blocked at its checkpoint before a DIMSE request.

    ``send_c_find`` pauses the reactor by clearing its checkpoint and waiting for a flag the
    reactor sets just before it waits; a reactor that had already passed the checkpoint can
    still take the first response off the queue and drop it ("Received unexpected C-FIND
    service message": one match lost, now and then, against a fast peer). Seeing the flag
    twice, a reactor loop apart, leaves it blocked until the request's own resume.
    """
    assoc._reactor_checkpoint.clear()
    for _ in range(2):
        deadline = time.monotonic() + 5
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0001)
        time.sleep(0.005)
