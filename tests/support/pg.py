"""A throwaway PostgreSQL server for tests: Debian's ``postgresql`` binaries, a fresh cluster.

:class:`PostgresServer` runs ``initdb`` into a new temporary folder (trust authentication,
UTF-8, locale ``C.UTF-8``) and starts ``postgres`` on ``127.0.0.1`` and a Unix socket in
that folder, with durability turned off (``fsync=off``: the cluster is thrown away). The
postmaster is a child process of the test run, stopped by its PID; the folder is removed.
PostgreSQL refuses to run as root, so under root both run as the ``postgres`` system user
(the Debian package creates it; it is created here when missing)::

    with PostgresServer() as server:
        url = server.create_database("t1")   # postgresql+psycopg://postgres@127.0.0.1:PORT/t1
        ...

The binaries come from ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``
(Debian does not put them on PATH), else ``initdb`` on PATH. When none is found the
constructor raises :class:`PostgresNotInstalledError`.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.helpers import free_port

__all__ = ["PostgresError", "PostgresNotInstalledError", "PostgresServer", "find_bindir"]

_SUPERUSER = "postgres"
_SYSTEM_USER = "postgres"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_START_ATTEMPTS = 3


class PostgresError(RuntimeError):
    """The server could not be set up, started or asked to do something."""


class PostgresNotInstalledError(PostgresError):
    """No PostgreSQL server binaries (``initdb``, ``postgres``) on this machine."""


def _usable(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "postgres"))


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: numeric versions, highest first when reversed
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """The folder of ``initdb`` and ``postgres``, or ``None`` when PostgreSQL is not installed."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and _usable(Path(out.stdout.strip())):
            return Path(out.stdout.strip())
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for bindir in candidates:
        if _usable(bindir):
            return bindir
    initdb = shutil.which("initdb")
    if initdb:
        bindir = Path(os.path.realpath(initdb)).parent
        if _usable(bindir):
            return bindir
    return None


def _system_user() -> pwd.struct_passwd | None:
    """The user the server runs as: ``postgres`` under root (created if missing), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [
            useradd,
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            _SYSTEM_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise PostgresError(f"cannot create the {_SYSTEM_USER!r} system user: {result.stderr.strip()}")
    return pwd.getpwnam(_SYSTEM_USER)


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, served on ``127.0.0.1``.

    Parameters
    ----------
    bindir
        Folder of ``initdb`` and ``postgres``; found by :func:`find_bindir` when omitted.
    start_timeout, stop_timeout
        Seconds to wait for the server to accept connections, and for it to stop.
    settings
        More ``-c name=value`` server settings, applied after the defaults.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
        settings: dict[str, str] | None = None,
    ) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise PostgresNotInstalledError(
                "PostgreSQL is not installed (no initdb/postgres in `pg_config --bindir`, /usr/lib/postgresql/*/bin "
                "or on PATH)"
            )
        self.bindir = found
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.settings = dict(settings or {})
        self.port = 0
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._user = _system_user()

    # -- paths -----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self._require_workdir() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._require_workdir() / "sock"

    @property
    def log_path(self) -> Path:
        return self._require_workdir() / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _require_workdir(self) -> Path:
        if self.workdir is None:
            raise PostgresError("the server has no folder: call start() first")
        return self.workdir

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _popen_kwargs(self) -> dict[str, Any]:
        env = {
            "PATH": f"{self.bindir}{os.pathsep}/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
            "PGTZ": "UTC",
        }
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self.workdir), "stdin": subprocess.DEVNULL}
        if self._user is not None:
            kwargs.update(user=self._user.pw_uid, group=self._user.pw_gid, extra_groups=[])
            env["HOME"] = str(self.workdir)
        return kwargs

    def start(self) -> PostgresServer:
        """initdb a fresh cluster and start the server; return once it accepts connections."""
        if self._proc is not None:
            raise PostgresError("the server is already started")
        self.workdir = Path(tempfile.mkdtemp(prefix="pacsnode-pg-"))
        try:
            if self._user is not None:
                os.chown(self.workdir, self._user.pw_uid, self._user.pw_gid)
            self.socket_dir.mkdir(mode=0o700)
            if self._user is not None:
                os.chown(self.socket_dir, self._user.pw_uid, self._user.pw_gid)
            self._initdb()
            for attempt in range(_START_ATTEMPTS):
                self.port = free_port()
                if self._launch():
                    return self
                if attempt + 1 < _START_ATTEMPTS and "could not bind" in self._log_tail():
                    continue  # another process took the port between free_port() and the bind
                raise PostgresError(f"postgres did not start:\n{self._log_tail()}")
            raise PostgresError(f"postgres did not start:\n{self._log_tail()}")  # pragma: no cover
        except BaseException:
            self.stop()
            raise

    def _initdb(self) -> None:
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                _SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            timeout=120,
            check=False,
            **self._popen_kwargs(),
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise PostgresError(f"initdb failed ({result.returncode}):\n{output[-3000:]}")

    def _launch(self) -> bool:
        """Start the postmaster on ``self.port``; whether it came up (False: it exited)."""
        settings = {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "timezone": "UTC",
            **self.settings,
        }
        command = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-k",
            str(self.socket_dir),
            "-h",
            self.host,
            "-p",
            str(self.port),
        ]
        setpriv = shutil.which("setpriv")
        if setpriv:
            # If the test run dies without stopping it (SIGKILL), the server shuts down at once
            # (SIGQUIT) instead of staying behind. setpriv execs: the PID stays the postmaster's.
            command = [setpriv, "--pdeathsig", "QUIT", "--", *command]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C on the test run does not reach the server before stop().
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._popen_kwargs()
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if self._accepts_connections():
                return True
            time.sleep(0.05)
        self._stop_process()
        raise PostgresError(
            f"postgres did not accept connections within {self.start_timeout:.0f} s:\n{self._log_tail()}"
        )

    def _accepts_connections(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self._conninfo("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Stop the server (by its PID) and remove its folder. Safe to call twice."""
        try:
            self._stop_process()
        finally:
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def _stop_process(self) -> None:
        """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL; each after a wait.

        SIGTERM would be PostgreSQL's *smart* shutdown, which waits for every client to
        disconnect: a pooled connection a test left open would hold it up until the timeout.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for sig, wait in ((signal.SIGINT, self.stop_timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        proc.wait(timeout=5)

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, PostgresError):
            return "(no log)"

    # -- databases -------------------------------------------------------------------------
    def _conninfo(self, database: str) -> str:
        return f"host={self.host} port={self.port} user={_SUPERUSER} dbname={database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{_SUPERUSER}@{self.host}:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        if self.pid is None:
            raise PostgresError("the server is not running")
        try:
            with psycopg.connect(self._conninfo(database), autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql.encode())
        except psycopg.Error as exc:
            raise PostgresError(f"{sql}: {exc}") from exc

    def create_database(self, name: str, *, icu_locale: str | None = None) -> str:
        """Create an empty UTF-8 database and return its SQLAlchemy URL.

        The database collates like the cluster (``C.UTF-8``) unless ``icu_locale`` (say
        ``"en-US"``) asks for an ICU collation, as a cluster made with a national locale
        would have: text then sorts linguistically, not by code point.
        """
        if not _NAME.match(name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _ (at most 63)")
        sql = f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'"
        if icu_locale is not None:
            if not re.fullmatch(r"[A-Za-z0-9@=;_-]+", icu_locale):
                raise ValueError(f"ICU locale {icu_locale!r}")
            sql += f" LOCALE 'C.UTF-8' LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'"
        self.execute(sql)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any session still connected to it."""
        if not _NAME.match(name):
            raise ValueError(f"database name {name!r}")
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
