"""What every benchmark needs to run its servers on loopback only.

DCMTK storescp and Debian's Orthanc cannot bind to 127.0.0.1 alone, so a
benchmark re-executes itself in a private network namespace with only ``lo``
up, where every server and client it starts can reach each other and nothing
else.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

__all__ = ["enter_private_netns", "wait_port"]

_NS_FLAG = "PACSNODE_BENCH_IN_NETNS"


def enter_private_netns(module: str, tools: tuple[str, ...]) -> None:
    """Re-run ``python -m module`` with the same arguments under ``unshare -n``; inside, bring ``lo`` up.

    Exits with a message when one of ``tools`` is not installed.
    """
    if os.environ.get(_NS_FLAG) != "1":
        for tool in (*tools, "unshare", "ip"):
            if shutil.which(tool) is None:
                sys.exit(f"{tool} is missing: run 'bash .ci/install --peers' first")
        os.execvpe("unshare", ["unshare", "-n", sys.executable, "-m", module, *sys.argv[1:]],
                   {**os.environ, _NS_FLAG: "1"})
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
