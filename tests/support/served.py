"""``pacsnode serve`` as a subprocess on a port of its own, with its config, log and index at hand."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml
from sqlalchemy import create_engine, select

from pacsnode.storage.models import Instance
from tests.support.helpers import REPO, free_port, pacsnode_cmd, wait_for_port, wait_until

T = TypeVar("T")


class Served:
    #: Nodes started and not yet stopped; tests/acceptance/conftest.py stops what a failed test left.
    running: set[Served] = set()

    def __init__(
        self, tmp_path: Path, processes: int = 1, sections: dict[str, object] | None = None, **node: object
    ) -> None:
        self.port = free_port()
        self.http_port = free_port()
        self.root = tmp_path / "store"
        self.db = tmp_path / "index.db"
        self.config = tmp_path / "pacsnode.yaml"
        config = {
            "node": {"port": self.port, "acceptor_processes": processes, "timeouts": {"shutdown_grace": 5}, **node},
            "storage": {"root": str(self.root), "database_url": f"sqlite:///{self.db}", "min_free_bytes": 0},
            "remote_nodes": {"SELF": {"ae_title": "PACSNODE", "host": "127.0.0.1", "port": self.port}},
            "analysis": {"workers": 0},
            "audit": {"fsync": False},  # written as in production, without an fsync per event (test time)
            # Off unless a test turns it on (sections={"http": {"enabled": True, ...}}).
            "http": {"enabled": False, "port": self.http_port},
        }
        for key, value in (sections or {}).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}  # type: ignore[dict-item]
            else:
                config[key] = value
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp_path / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False

    def set_http(self, **keys: object) -> None:
        """Change keys of the http: section before :meth:`start`."""
        self.update_section("http", **keys)

    def update_section(self, section: str, **keys: object) -> None:
        """Set keys of one top-level section of the config before :meth:`start`."""
        config = yaml.safe_load(self.config.read_text())
        config[section] = {**(config.get(section) or {}), **keys}
        self.config.write_text(yaml.safe_dump(config))

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                pacsnode_cmd("--config", str(self.config), "serve"),
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        Served.running.add(self)
        wait_for_port(self.port, proc=self.proc)

    def terminate(self) -> None:
        """Send SIGTERM and return at once; :meth:`stop` then waits for the exit."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self._terminated = True

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.proc = None
        self._terminated = False
        Served.running.discard(self)
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None
        self._terminated = False
        Served.running.discard(self)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pacsnode_cmd("--config", str(self.config), *args),
            cwd=REPO,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    def rows(self) -> dict[str, Instance]:
        engine = create_engine(f"sqlite:///{self.db}")
        try:
            with engine.connect() as conn:
                return {r.sop_instance_uid: r for r in conn.execute(select(Instance)).all()}
        finally:
            engine.dispose()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"

    def wait(self, what: str, check: Callable[[], T], timeout: float) -> T:
        """:func:`wait_until` ``check`` is truthy; on a timeout the failure shows the end of the node's log."""
        return wait_until(check, timeout, what, details=self.log_tail)
