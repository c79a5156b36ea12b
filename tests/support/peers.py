"""Real DICOM peers for tests: Debian's Orthanc and DCMTK's storescp, each a subprocess.

Neither can bind to 127.0.0.1 only (they listen on every interface), so they run only in
a private network namespace with nothing but loopback, which ``bash .ci/test`` provides
by running pytest under ``unshare -n``. :func:`require_private_netns` fails a test
that would otherwise open them to a real network.

Each peer is started with its own ports, folders and log under a given directory and
stopped by its process id (never by name). Both are context managers::

    with OrthancPeer(tmp_path / "orthanc", modalities={"NODE": ("PACSNODE", "127.0.0.1", 11112)}) as orthanc:
        orthanc.upload(paths)
        query_id, answers = orthanc.query("NODE", "Study", {"PatientID": "", "StudyInstanceUID": ""})
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from pacsnode.node.testing.netns import system_tool
from tests.support.helpers import free_port, wait_for_port

__all__ = [
    "Modality",
    "OrthancPeer",
    "PeerError",
    "StorescpPeer",
    "in_private_netns",
    "require",
    "require_private_netns",
]

_STOP_TIMEOUT = 20.0
_START_TIMEOUT = 60.0
_REST_TIMEOUT = 120.0
# Never through an HTTP proxy from the environment: the peers are on loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class PeerError(RuntimeError):
    """A peer failed to start, or answered a request with an error."""


def in_private_netns() -> bool:
    """Whether this process is in a network namespace whose only interface is loopback.

    ``/sys/class/net`` is not used: sysfs shows the namespace of whoever mounted it, not ours.
    """
    names = {name for _, name in socket.if_nameindex()}
    if names != {"lo"}:
        return False
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            with socket.create_connection(server.getsockname(), timeout=2):
                pass
    except OSError:
        return False  # loopback is down
    return True


def require_private_netns() -> None:
    """Fail the test unless the network namespace holds loopback only (and it is up)."""
    if not in_private_netns():
        pytest.fail(
            "this test starts peers (Orthanc, DCMTK storescp) that listen on every interface, so it runs only "
            "in a private network namespace with loopback alone: run the suite through `bash .ci/test`, "
            "which runs pytest under `unshare -n` with lo up"
        )


def require(tool: str) -> str:
    """The path of the system's ``tool`` (not a same-named venv script); fail the test when it is not installed."""
    path = system_tool(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run the README's test command, which installs it")
    return path


def _stop_process(proc: subprocess.Popen[Any] | None, timeout: float = _STOP_TIMEOUT) -> int | None:
    """SIGTERM the process we started (by its PID), wait, SIGKILL after ``timeout``."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


Modality = tuple[str, str, int]


class OrthancPeer:
    """Debian's ``Orthanc`` with a generated JSON configuration, in a folder of its own.

    Parameters
    ----------
    workdir
        Created if missing; holds the configuration, the storage and index, and ``orthanc.log``.
    ae_title
        Orthanc's own AE title.
    modalities
        The remote DICOM nodes Orthanc knows, by name: ``(ae_title, host, port)``.
        C-MOVE destinations and query targets must be listed here.
    config
        More configuration keys, applied over the generated ones.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.log_path = self.workdir / "orthanc.log"
        self.config_path = self.workdir / "orthanc.json"
        self._extra = dict(config or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def configuration(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        storage = self.workdir / "storage"
        return {
            "Name": "pacsnode-tests",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()},
            # All five are in Orthanc 1.10's own default configuration (/etc/orthanc/orthanc.json).
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomScuTimeout": 30,
            # Answers to C-FIND in UTF-8, so any name survives (the default, Latin1, would not).
            "DefaultEncoding": "Utf8",
            "SynchronousCMove": True,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "MaximumStorageCacheSize": 0,
            "StorageAccessOnFind": "Always",
            **self._extra,
        }

    def start(self) -> OrthancPeer:
        binary = require("Orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.config_path.write_text(json.dumps(self.configuration(), indent=2))
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise PeerError(f"Orthanc exited with {self.proc.returncode} on start:\n{_log_tail(self.log_path)}")
            try:
                self.rest("GET", "/system", timeout=2)
                break
            except (OSError, PeerError):
                if time.monotonic() > deadline:
                    raise PeerError(
                        f"Orthanc's REST API did not answer in {_START_TIMEOUT} s:\n{_log_tail(self.log_path)}"
                    ) from None
                time.sleep(0.1)
        wait_for_port(self.dicom_port, timeout=_START_TIMEOUT, proc=self.proc)

    def stop(self) -> int | None:
        code = _stop_process(self.proc)
        self.proc = None
        return code

    def __enter__(self) -> OrthancPeer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ---------------------------------------------------------------------------

    def rest(self, method: str, path: str, body: Any = None, *, timeout: float = _REST_TIMEOUT) -> Any:
        """One REST call; ``body`` bytes are sent as they are, anything else as JSON.

        Returns the decoded JSON answer (or the raw bytes when it is not JSON).
        """
        data: bytes | None
        headers = {}
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
            headers["Content-Type"] = "application/dicom"
        else:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method, headers=headers
        )
        try:
            with _HTTP.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            exc.close()
            raise PeerError(f"Orthanc {method} {path}: HTTP {exc.code}: {detail}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw

    def upload(self, paths: Iterable[Path]) -> list[str]:
        """POST each file to ``/instances``; return Orthanc's instance ids."""
        ids = []
        for path in paths:
            answer = self.rest("POST", "/instances", Path(path).read_bytes())
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise PeerError(f"Orthanc did not store {path}: {answer}")
            ids.append(answer["ID"])
        return ids

    def instances(self) -> list[str]:
        """Orthanc's ids of every stored instance."""
        return list(self.rest("GET", "/instances"))

    def sop_instance_uids(self) -> set[str]:
        """The SOPInstanceUID of every stored instance."""
        found = self.rest("POST", "/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}

    # -- Orthanc as SCU -----------------------------------------------------------------

    def query(
        self, modality: str, level: str, query: Mapping[str, str], *, normalize: bool = False
    ) -> tuple[str, list[dict[str, str]]]:
        """C-FIND from Orthanc to ``modality``; return the query id and the answers.

        ``level`` is Patient, Study, Series or Instance. Each answer maps keywords to
        string values (Orthanc's ``?simplify`` form: multiple values joined by backslashes;
        Orthanc adds QueryRetrieveLevel, RetrieveAETitle and SpecificCharacterSet).
        ``normalize=False`` sends the keys as given (Orthanc's default would drop keys it
        does not expect at the level).
        """
        created = self.rest(
            "POST", f"/modalities/{modality}/query", {"Level": level, "Query": dict(query), "Normalize": normalize}
        )
        query_id = str(created["ID"])
        answers = self.rest("GET", f"/queries/{query_id}/answers?expand&simplify")
        return query_id, list(answers)

    def move(self, modality: str, level: str, resources: list[Mapping[str, str]], target_aet: str) -> Any:
        """Ask ``modality`` to C-MOVE ``resources`` (each a dict of UIDs) to ``target_aet``; synchronous."""
        return self.rest(
            "POST",
            f"/modalities/{modality}/move",
            {"Level": level, "Resources": [dict(r) for r in resources], "TargetAet": target_aet, "Synchronous": True},
        )

    def retrieve_answers(self, query_id: str, target_aet: str) -> Any:
        """C-MOVE every answer of an earlier :meth:`query` to ``target_aet``; synchronous."""
        return self.rest("POST", f"/queries/{query_id}/retrieve", {"TargetAet": target_aet, "Synchronous": True})


class StorescpPeer:
    """DCMTK's ``storescp`` writing what it receives into ``workdir / "received"``.

    Parameters
    ----------
    workdir
        Created if missing; holds the received files and ``storescp.log``.
    ae_title
        The AE title storescp answers to.
    options
        More storescp options (for example ``+tls KEY CERT +cf CA``).
    """

    def __init__(self, workdir: Path, *, ae_title: str = "STORESCP", options: Iterable[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.ae_title = ae_title
        self.options = list(options)
        self.port = free_port()
        self.received_dir = self.workdir / "received"
        self.log_path = self.workdir / "storescp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StorescpPeer:
        binary = require("storescp")
        self.received_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "-v",
                    "-aet",
                    self.ae_title,
                    "-od",
                    str(self.received_dir),
                    "+xa",
                    *self.options,
                    str(self.port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            wait_for_port(self.port, timeout=_START_TIMEOUT, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise PeerError(f"storescp did not start: {exc}\n{_log_tail(self.log_path)}") from None
        return self

    def store_requests(self) -> int:
        """How many C-STORE requests storescp has logged (each delivery counts, files or not)."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("Received Store Request")

    def received(self) -> list[Path]:
        """The files received so far, sorted by name."""
        return sorted(p for p in self.received_dir.iterdir() if p.is_file())

    def stop(self) -> int | None:
        code = _stop_process(self.proc)
        self.proc = None
        return code

    def __enter__(self) -> StorescpPeer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
