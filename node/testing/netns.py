"""What every benchmark needs to run its servers on loopback only.

DCMTK storescp and Debian's Orthanc cannot bind to 127.0.0.1 alone, so a
benchmark re-executes itself in a private network namespace with only ``lo``
up, where every server and client it starts can reach each other and nothing
else.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

__all__ = ["enter_private_netns", "require_tool", "stop_process", "system_tool", "wait_port"]

_NS_FLAG = "PACSNODE_BENCH_IN_NETNS"


def system_tool(name: str) -> str | None:
    """The path of the system's ``name`` on PATH, skipping this virtual environment's bin directory.

    Python packages install scripts with DCMTK's names (findscu, storescu) that are not DCMTK.
    """
    venv_bin = os.path.realpath(os.path.join(sys.prefix, "bin"))
    search = os.pathsep.join(
        d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d and os.path.realpath(d) != venv_bin
    )
    return shutil.which(name, path=search)


def require_tool(name: str) -> str:
    """:func:`system_tool`, or exit with the install command when it is missing."""
    path = system_tool(name)
    if path is None:
        sys.exit(f"{name} is missing: run 'bash .ci/install --peers' first")
    return path


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60, *, group: bool = False) -> None:
    """SIGTERM a process we started, SIGKILL it after ``timeout`` (its whole session when ``group``)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            pass
    if group:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children it left behind (acceptors, workers) too
        except ProcessLookupError:
            pass
    elif proc.poll() is None:
        proc.kill()
    proc.wait(timeout=timeout)


def enter_private_netns(module: str, tools: tuple[str, ...]) -> None:
    """Re-run ``python -m module`` with the same arguments under ``unshare -n``; inside, bring ``lo`` up.

    Exits with a message when one of ``tools`` is not installed.
    """
    if os.environ.get(_NS_FLAG) != "1":
        for tool in (*tools, "unshare", "ip"):
            require_tool(tool)
        os.execvpe(
            "unshare", ["unshare", "-n", sys.executable, "-m", module, *sys.argv[1:]], {**os.environ, _NS_FLAG: "1"}
        )
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def wait_port(port: int, timeout: float = 60) -> None:
    """Return once something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} not listening")
