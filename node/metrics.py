"""Prometheus metrics of the node: what its processes count, and what the index says at scrape time.

``serve`` runs acceptors and workers as forked processes, so counters live in
``prometheus_client``'s multi-process mode: each process writes its values to
memory-mapped files in one directory (:func:`install`, called by ``serve``
before it forks), and the process that answers ``/metrics`` merges them
(:func:`process_metrics`). Counters of a process that died stay counted.

The hooks (:func:`instance_received`, :func:`association_closed`, ...) are
one-line calls from the code that does the work and cost nothing where
metrics are not installed (tests that run a node in-process, ``pacsnode
worker`` on another machine, the other CLI commands).

What the index and the store hold (queue depths, disk free, processes alive)
is not counted but read when scraped, by :class:`NodeCollector`.

Label values that peers choose (calling AE titles, destinations) are capped at
:data:`MAX_LABEL_VALUES` distinct values per process; more are counted as
``(other)``, so a peer cannot grow the series without bound.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from pacsnode.storage import Archive
from pacsnode.storage.db import read_connection
from pacsnode.storage.models import Export, ExportState, Job, JobState, Study

__all__ = [
    "ENV_VAR",
    "HEARTBEAT_STALE_S",
    "MAX_LABEL_VALUES",
    "NodeCollector",
    "NodeSnapshot",
    "PeerActivity",
    "association_closed",
    "connection_refused",
    "directory",
    "export_finished",
    "install",
    "install_temporary",
    "installed",
    "instance_received",
    "job_finished",
    "process_ended",
    "process_metrics",
    "query_answered",
    "snapshot",
    "start_heartbeat",
    "uninstall",
]

logger = logging.getLogger(__name__)

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
MAX_LABEL_VALUES = 64
HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_STALE_S = 15.0
"""A process whose heartbeat is older than this is not counted alive."""

_OTHER = "(other)"
_NONE = "(none)"

_QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ASSOCIATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_JOB_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class _Labels:
    """Distinct values of a peer-chosen label, at most ``limit`` per process."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = (value or "").strip() or _NONE
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return _OTHER


class _Metrics:
    """The counted metrics of one process tree (created after the multi-process value class is chosen)."""

    def __init__(self) -> None:
        registry = CollectorRegistry(auto_describe=False)  # ours only; never prometheus_client's global one
        self.ae = _Labels(MAX_LABEL_VALUES)
        self.destination = _Labels(MAX_LABEL_VALUES)
        self.instances = Counter(
            "pacsnode_instances_received",
            "C-STORE requests answered, by calling AE title and DIMSE status (0x0000: stored)",
            ["calling_ae", "status"],
            registry=registry,
        )
        self.received_bytes = Counter(
            "pacsnode_received_bytes",
            "Dataset bytes of the C-STORE requests answered, by calling AE title and DIMSE status",
            ["calling_ae", "status"],
            registry=registry,
        )
        self.associations = Counter(
            "pacsnode_associations",
            "Associations ended, by calling AE title and outcome (released, aborted, rejected, closed)",
            ["calling_ae", "outcome"],
            registry=registry,
        )
        self.association_seconds = Histogram(
            "pacsnode_association_duration_seconds",
            "From TCP connect to close, by outcome",
            ["outcome"],
            buckets=_ASSOCIATION_BUCKETS,
            registry=registry,
        )
        self.last_association = Gauge(
            "pacsnode_last_association_timestamp_seconds",
            "When the last association of each calling AE title ended (Unix time)",
            ["calling_ae"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.refused = Counter(
            "pacsnode_connections_refused",
            "TCP connections closed before association negotiation, by reason",
            ["reason"],
            registry=registry,
        )
        self.query_seconds = Histogram(
            "pacsnode_query_duration_seconds",
            "Time to parse a query and match it in the index, by service (C-FIND, QIDO-RS) and level",
            ["service", "level"],
            buckets=_QUERY_BUCKETS,
            registry=registry,
        )
        self.jobs = Counter(
            "pacsnode_jobs_finished",
            "Analysis job attempts ended, by pipeline and outcome (done, retry, failed, skipped, timeout, lost)",
            ["pipeline", "outcome"],
            registry=registry,
        )
        self.job_seconds = Histogram(
            "pacsnode_job_duration_seconds",
            "Wall time of an analysis job attempt, by pipeline and outcome",
            ["pipeline", "outcome"],
            buckets=_JOB_BUCKETS,
            registry=registry,
        )
        self.exports = Counter(
            "pacsnode_exports_finished",
            "Export attempts ended, by destination and outcome (sent, retry, dead)",
            ["destination", "outcome"],
            registry=registry,
        )
        self.heartbeat = Gauge(
            "pacsnode_process_heartbeat_timestamp_seconds",
            "Last sign of life of each acceptor and worker process (Unix time)",
            ["role"],
            multiprocess_mode="liveall",
            registry=registry,
        )


# The process's metrics, like prometheus_client's own global registry: one per process tree,
# set by install() before serve forks and inherited by its children.
_state: dict[str, Any] = {"metrics": None, "directory": None, "value_class": None}


def install(path: Path | None = None) -> Path:
    """Turn metrics on for this process and the processes it forks afterwards.

    Parameters
    ----------
    path
        An empty or stale folder for the per-process files: emptied first. ``None``:
        join the folder named by ``$PROMETHEUS_MULTIPROC_DIR`` (a process started,
        not forked, by one that installed), as it is.

    Returns
    -------
    The folder in use.
    """
    if path is None:
        named = os.environ.get(ENV_VAR)
        if not named:
            raise RuntimeError(f"metrics: no folder given and ${ENV_VAR} is not set")
        path = Path(named)
    else:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.unlink(stale)
    os.environ[ENV_VAR] = str(path)
    if _state["value_class"] is None:
        _state["value_class"] = values.ValueClass
    # prometheus_client picks its value class when it is first imported, from the environment; the
    # node decides where the files go only once its config is read, so it picks the multi-process
    # class here, before any of its metrics exist.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _state["metrics"] = _Metrics()
    _state["directory"] = path
    return path


def install_temporary() -> Path | None:
    """:func:`install` into a new private temporary folder, removed when this process exits (``serve``).

    None, and metrics off, when no temporary folder can be made: the node serves without them.
    """
    try:
        path = Path(tempfile.mkdtemp(prefix="pacsnode-metrics-"))
    except OSError as exc:
        logger.warning("metrics are off: cannot make a temporary folder for them: %s", exc)
        return None
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # never from a forked child that ends through the interpreter
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return install(path)


def uninstall() -> None:
    """Turn metrics off in this process (tests); the files stay."""
    if _state["value_class"] is not None:
        values.ValueClass = _state["value_class"]
    os.environ.pop(ENV_VAR, None)
    _state.update(metrics=None, directory=None)


def installed() -> bool:
    return _state["metrics"] is not None


def directory() -> Path | None:
    """The folder of the per-process files, when metrics are installed."""
    path: Path | None = _state["directory"]
    return path


def _metrics() -> _Metrics | None:
    found: _Metrics | None = _state["metrics"]
    return found


def _safely(fn: Any) -> Any:
    """A hook never breaks the work it watches: a failure to count is logged once, and skipped."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        m = _metrics()
        if m is None:
            return
        try:
            fn(m, *args, **kwargs)
        except Exception:  # noqa: BLE001 - counting must not cost an instance, a job or an export
            if not _state.get("warned"):
                _state["warned"] = True
                logger.exception("metrics: cannot record %s", fn.__name__)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# -- hooks ---------------------------------------------------------------------------------------


@_safely
def instance_received(m: _Metrics, calling_ae: str, status: int, size: int) -> None:
    """One C-STORE answered with ``status`` (``size``: dataset bytes received)."""
    labels = (m.ae(calling_ae), f"0x{status:04X}")
    m.instances.labels(*labels).inc()
    m.received_bytes.labels(*labels).inc(max(0, size))


@_safely
def association_closed(m: _Metrics, calling_ae: str, outcome: str, duration_s: float) -> None:
    """An association (or a connection that never became one) ended."""
    ae = m.ae(calling_ae)
    m.associations.labels(ae, outcome).inc()
    m.association_seconds.labels(outcome).observe(max(0.0, duration_s))
    m.last_association.labels(ae).set(time.time())


@_safely
def connection_refused(m: _Metrics, reason: str) -> None:
    """A TCP connection closed before negotiation (e.g. too many pending from one host)."""
    m.refused.labels(reason).inc()


@_safely
def query_answered(m: _Metrics, service: str, level: str, duration_s: float) -> None:
    """A query parsed and matched in the index (C-FIND, QIDO-RS)."""
    m.query_seconds.labels(service, level or _NONE).observe(max(0.0, duration_s))


@_safely
def job_finished(m: _Metrics, pipeline: str, outcome: str, duration_s: float) -> None:
    """An analysis job attempt ended (``outcome``: done, retry, failed, skipped, timeout, lost)."""
    m.jobs.labels(pipeline, outcome).inc()
    m.job_seconds.labels(pipeline, outcome).observe(max(0.0, duration_s))


@_safely
def export_finished(m: _Metrics, destination: str, outcome: str) -> None:
    """An export attempt ended (``outcome``: sent, retry, dead)."""
    m.exports.labels(m.destination(destination), outcome).inc()


def job_outcome(state: object) -> str:
    """The ``outcome`` label of a job attempt from the state it was left in (None: lease lost)."""
    if state is None:
        return "lost"
    value = str(getattr(state, "value", state))
    return "retry" if value == JobState.PENDING.value else value


def export_outcome(state: object) -> str:
    """The ``outcome`` label of a failed export attempt from the state it was left in."""
    value = str(getattr(state, "value", state))
    return "dead" if value == ExportState.DEAD.value else "retry"


def start_heartbeat(role: str, *, interval_s: float = HEARTBEAT_INTERVAL_S) -> threading.Thread | None:
    """Mark this process alive every ``interval_s`` seconds from a daemon thread (acceptors, workers)."""
    m = _metrics()
    if m is None:
        return None
    try:
        gauge = m.heartbeat.labels(role)
        gauge.set(time.time())
    except Exception:  # noqa: BLE001 - no heartbeat (the process shows as not alive), but it runs
        logger.exception("metrics: cannot write the %s heartbeat", role)
        return None

    def beat() -> None:
        while True:
            try:
                gauge.set(time.time())
            except Exception:  # noqa: BLE001 - a full disk must not end the process
                logger.debug("metrics: heartbeat not written", exc_info=True)
            time.sleep(interval_s)

    thread = threading.Thread(target=beat, name=f"metrics-heartbeat-{role}", daemon=True)
    thread.start()
    return thread


def process_ended(pid: int) -> None:
    """The supervisor saw process ``pid`` end: its heartbeat is forgotten (its counters stay)."""
    path = directory()
    if path is not None:
        multiprocess.mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]


# -- reading ------------------------------------------------------------------------------------


def process_metrics() -> list[Metric]:
    """Every process's counted metrics, merged (empty when metrics are not installed)."""
    path = directory()
    if path is None:
        return []
    files = glob.glob(os.path.join(path, "*.db"))
    merged: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
    return list(merged)


@dataclass
class PeerActivity:
    """What one calling AE title did since the node started."""

    calling_ae: str
    last_association: float | None = None
    associations: dict[str, float] = field(default_factory=dict)  # outcome -> count
    stored: float = 0.0
    refused: float = 0.0  # C-STOREs answered with a failure status
    stored_bytes: float = 0.0


@dataclass
class NodeSnapshot:
    """The counted metrics the dashboard shows, read from the per-process files."""

    installed: bool
    peers: list[PeerActivity]
    alive: dict[str, int]  # role -> processes with a fresh heartbeat
    jobs_finished: dict[tuple[str, str], float]  # (pipeline, outcome) -> count
    exports_finished: dict[tuple[str, str], float]  # (destination, outcome) -> count


def snapshot(*, now: float | None = None) -> NodeSnapshot:
    """Merge the per-process files into what the dashboard shows."""
    now = time.time() if now is None else now
    peers: dict[str, PeerActivity] = {}
    alive: dict[str, int] = {}
    jobs: dict[tuple[str, str], float] = {}
    exports: dict[tuple[str, str], float] = {}

    def peer(ae: str) -> PeerActivity:
        return peers.setdefault(ae, PeerActivity(calling_ae=ae))

    for metric in process_metrics():
        for sample in metric.samples:
            labels = sample.labels
            if sample.name == "pacsnode_last_association_timestamp_seconds":
                peer(labels["calling_ae"]).last_association = sample.value
            elif sample.name == "pacsnode_associations_total":
                peer(labels["calling_ae"]).associations[labels["outcome"]] = sample.value
            elif sample.name == "pacsnode_instances_received_total":
                activity = peer(labels["calling_ae"])
                if labels["status"] == "0x0000":
                    activity.stored += sample.value
                else:
                    activity.refused += sample.value
            elif sample.name == "pacsnode_received_bytes_total" and labels["status"] == "0x0000":
                peer(labels["calling_ae"]).stored_bytes += sample.value
            elif sample.name == "pacsnode_process_heartbeat_timestamp_seconds":
                if now - sample.value <= HEARTBEAT_STALE_S:
                    alive[labels["role"]] = alive.get(labels["role"], 0) + 1
            elif sample.name == "pacsnode_jobs_finished_total":
                jobs[(labels["pipeline"], labels["outcome"])] = sample.value
            elif sample.name == "pacsnode_exports_finished_total":
                exports[(labels["destination"], labels["outcome"])] = sample.value
    ordered = sorted(peers.values(), key=lambda p: -(p.last_association or 0.0))
    return NodeSnapshot(installed=installed(), peers=ordered, alive=alive, jobs_finished=jobs, exports_finished=exports)


@dataclass(frozen=True)
class IndexFigures:
    """Queue depths and sizes read from the index, and the store's free space."""

    jobs: dict[str, int]  # state -> count
    exports: dict[tuple[str, str], int]  # (destination, state) -> count
    studies: int
    free_bytes: int
    floor_bytes: int
    total_bytes: int


def index_figures(archive: Archive) -> IndexFigures:
    """Read the queue depths and the study count (one short read transaction) and the disk's free space.

    Raises
    ------
    sqlalchemy.exc.SQLAlchemyError, OSError
        The database or the store cannot be read.
    """
    usage = shutil.disk_usage(archive.store.root)
    with read_connection(archive.engine) as conn:
        jobs = {str(state): int(n) for state, n in conn.execute(select(Job.state, func.count()).group_by(Job.state))}
        exports = {
            (str(dest), str(state)): int(n)
            for dest, state, n in conn.execute(
                select(Export.destination, Export.state, func.count()).group_by(Export.destination, Export.state)
            )
        }
        studies = int(conn.execute(select(func.count()).select_from(Study)).scalar_one())
    return IndexFigures(
        jobs={state.value: jobs.get(state.value, 0) for state in JobState},
        exports=exports,
        studies=studies,
        free_bytes=usage.free,
        floor_bytes=archive.settings.min_free_bytes,
        total_bytes=usage.total,
    )


class NodeCollector(Collector):
    """Scrape-time figures: queue depths, studies, disk free, processes alive; plus the counted metrics.

    Parameters
    ----------
    archive
        The archive whose index and store are read at each scrape.
    expected
        How many processes of each role ``serve`` runs (``acceptor``, ``worker``).
    """

    def __init__(self, archive: Archive, *, expected: dict[str, int] | None = None) -> None:
        self.archive = archive
        self.expected = dict(expected or {})

    def collect(self) -> Iterator[Metric]:
        yield from process_metrics()
        up = GaugeMetricFamily("pacsnode_index_up", "1 when the index database answered this scrape")
        try:
            figures = index_figures(self.archive)
        except Exception as exc:  # noqa: BLE001 - a scrape reports the failure, it does not fail
            logger.warning("metrics: cannot read the index or the store: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _figures(figures)
        yield from self._alive()

    def _alive(self) -> Iterable[Metric]:
        counted = snapshot().alive if installed() else {}
        alive = GaugeMetricFamily(
            "pacsnode_processes_alive", "Processes with a heartbeat in the last 15 s, by role", labels=["role"]
        )
        expected = GaugeMetricFamily("pacsnode_processes_expected", "Processes serve runs, by role", labels=["role"])
        for role in sorted(set(counted) | set(self.expected)):
            alive.add_metric([role], counted.get(role, 0))
            expected.add_metric([role], self.expected.get(role, 0))
        yield alive
        yield expected


def _figures(figures: IndexFigures) -> Iterable[Metric]:
    jobs = GaugeMetricFamily("pacsnode_jobs", "Analysis jobs in the queue, by state", labels=["state"])
    for state, count in figures.jobs.items():
        jobs.add_metric([state], count)
    yield jobs
    exports = GaugeMetricFamily(
        "pacsnode_exports", "Exports in the queue, by destination and state", labels=["destination", "state"]
    )
    for (destination, state), count in sorted(figures.exports.items()):
        exports.add_metric([destination, state], count)
    yield exports
    yield GaugeMetricFamily("pacsnode_studies", "Studies in the index", value=figures.studies)
    yield GaugeMetricFamily("pacsnode_store_free_bytes", "Free space on the store's disk", value=figures.free_bytes)
    yield GaugeMetricFamily(
        "pacsnode_store_free_floor_bytes",
        "storage.min_free_bytes: instances are refused below this",
        value=figures.floor_bytes,
    )
    yield GaugeMetricFamily("pacsnode_store_size_bytes", "Size of the store's disk", value=figures.total_bytes)


@dataclass(frozen=True)
class Check:
    """One readiness check: its name, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str


def readiness(archive: Archive, *, expected: dict[str, int]) -> list[Check]:
    """What ``/readyz`` answers: the database answers, the store is writable and above its floor,
    and each role ``serve`` runs (``expected``) has at least one process alive."""
    checks: list[Check] = []
    try:
        with read_connection(archive.engine) as conn:
            conn.execute(select(1)).scalar_one()
        checks.append(Check("database", True, "answers"))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks.append(Check("database", False, f"{type(exc).__name__}: {exc}"[:300]))
    store = archive.store
    try:
        usage = shutil.disk_usage(store.root)
        writable = store.objects_dir.is_dir() and os.access(store.tmp_dir, os.W_OK)
        checks.append(Check("store", writable, "writable" if writable else f"{store.tmp_dir} is not writable"))
        above = usage.free >= archive.settings.min_free_bytes
        checks.append(
            Check(
                "disk",
                above,
                f"{usage.free} bytes free, floor {archive.settings.min_free_bytes}",
            )
        )
    except OSError as exc:
        checks.append(Check("store", False, f"{exc.strerror or exc}"))
    counted = snapshot().alive if installed() else None
    for role, want in sorted(expected.items()):
        if want <= 0:
            continue
        if counted is None:
            checks.append(Check(f"{role}s", True, "not monitored (metrics not installed)"))
            continue
        have = counted.get(role, 0)
        checks.append(Check(f"{role}s", have > 0, f"{have} of {want} alive"))
    return checks
