"""The audit trail: who did what to which patient's study, modelled on the DICOM audit messages.

Each event is one JSON line carrying the PS3.15 A.5 / IHE ATNA event ID, action and
outcome codes, the participants (AE titles and hosts) and the studies touched with
their patient. Lines are appended to ``audit.path`` under an exclusive lock (several
acceptor and worker processes share the file), flushed (and fsynced unless
``audit.fsync: false``) before :meth:`AuditTrail.record` returns, so an event is on
disk before the action it describes is acknowledged. Past ``audit.max_bytes`` the file
is renamed to ``<name>.<UTC time>-<pid>`` and made read-only; a rotated file is never
written again. Optionally each line also goes to syslog (``audit.syslog``).

Patient names, IDs and birth dates belong here and nowhere else: operational logs
name UIDs, AE titles and counts only.

Public API: the typed constructors (:func:`application_activity`,
:func:`configuration_loaded`, :func:`association`, :func:`security_alert`,
:func:`instances_stored`, :func:`query`, :func:`transfer_begun`,
:func:`analysis_job`), one :meth:`AuditTrail.record`, and :func:`read_events` for
``pacsnode audit``. :class:`SecurityAlertHandler` turns log records carrying
``extra={"event": "security-alert", ...}`` into Security Alert events.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import logging.handlers
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from pacsnode.storage.model_base import StrictModel

__all__ = [
    "AuditSettings",
    "SyslogSettings",
    "AuditTrail",
    "AuditEvent",
    "AuditError",
    "EventKind",
    "Outcome",
    "Participant",
    "StudyRef",
    "SecurityAlertHandler",
    "application_activity",
    "configuration_loaded",
    "association",
    "security_alert",
    "instances_stored",
    "query",
    "transfer_begun",
    "analysis_job",
    "read_events",
    "audit_files",
    "trail_for",
    "trail_path",
]

logger = logging.getLogger(__name__)


class SyslogSettings(StrictModel):
    """Where each audit line is also sent (RFC 3164 syslog through :class:`logging.handlers.SysLogHandler`)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 514
    protocol: Literal["udp", "tcp"] = "udp"
    # ATNA audit messages go to the security/authorization facility (10: authpriv).
    facility: Literal["auth", "authpriv", "local0", "local1", "local2", "local3", "local4", "user"] = "authpriv"


class AuditSettings(StrictModel):
    """The audit trail (``audit:`` in the config file)."""

    enabled: bool = True
    # The current file; rotated files lie beside it. None: <storage.root>/audit/audit.jsonl.
    path: Path | None = None
    max_bytes: Annotated[int, Field(ge=4096)] = 64 << 20
    fsync: bool = True
    syslog: SyslogSettings | None = None


class AuditError(RuntimeError):
    """The audit trail cannot be written: the action it would describe must not be acknowledged."""


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (PS3.15 A.5.1)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


@dataclass(frozen=True)
class _Code:
    code: str
    meaning: str
    scheme: str = "DCM"

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "scheme": self.scheme, "meaning": self.meaning}


class EventKind(enum.StrEnum):
    """What happened; each kind maps to one DICOM audit EventID (PS3.15 A.5.3)."""

    APPLICATION_START = "application-start"
    APPLICATION_STOP = "application-stop"
    CONFIGURATION_LOADED = "configuration-loaded"
    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REFUSED = "association-refused"
    SECURITY_ALERT = "security-alert"
    INSTANCES_STORED = "instances-stored"
    QUERY = "query"
    TRANSFER_BEGUN = "transfer-begun"
    ANALYSIS_JOB = "analysis-job"


_APPLICATION_ACTIVITY = _Code("110100", "Application Activity")
_SECURITY_ALERT = _Code("110113", "Security Alert")
_USER_AUTHENTICATION = _Code("110114", "User Authentication")
_INSTANCES_TRANSFERRED = _Code("110104", "DICOM Instances Transferred")
_QUERY = _Code("110112", "Query")
_BEGIN_TRANSFERRING = _Code("110102", "Begin Transferring DICOM Instances")
_ORDER_RECORD = _Code("110109", "Order Record")

# EventTypeCodes (CID 400 Audit Event Type)
_APPLICATION_START = _Code("110120", "Application Start")
_APPLICATION_STOP = _Code("110121", "Application Stop")
_LOGIN = _Code("110122", "Login")
_NODE_AUTHENTICATION = _Code("110126", "Node Authentication")
_SOFTWARE_CONFIGURATION = _Code("110131", "Software Configuration")
_SECURITY_TYPES = {
    "node-authentication": _NODE_AUTHENTICATION,
    "use-of-restricted-function": _Code("110132", "Use of Restricted Function"),
    "security-configuration": _Code("110129", "Security Configuration"),
    "network-configuration": _Code("110128", "Network Configuration"),
    "software-configuration": _SOFTWARE_CONFIGURATION,
}


@dataclass(frozen=True, kw_only=True)
class Participant:
    """An active participant: a peer AE (with its host) or this node."""

    role: str  # "requestor", "source", "destination", "application"
    ae_title: str | None = None
    host: str | None = None
    requestor: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "requestor": self.requestor}
        if self.ae_title is not None:
            out["ae_title"] = self.ae_title
        if self.host is not None:
            out["host"] = self.host
        return out


@dataclass(frozen=True, kw_only=True)
class StudyRef:
    """A study touched by the event, with its patient (participant objects of PS3.15 A.5.2)."""

    study_instance_uid: str
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    instances: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    kind: EventKind
    event_id: _Code
    action: Literal["C", "R", "U", "D", "E"]
    outcome: Outcome = Outcome.SUCCESS
    event_types: tuple[_Code, ...] = ()
    participants: tuple[Participant, ...] = ()
    studies: tuple[StudyRef, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "event_id": self.event_id.as_dict(),
            "action": self.action,
            "outcome": int(self.outcome),
            "event_types": [t.as_dict() for t in self.event_types],
            "participants": [p.as_dict() for p in self.participants],
            "studies": [s.as_dict() for s in self.studies],
            "detail": self.detail,
        }


# -- typed constructors --------------------------------------------------------------------------


def application_activity(*, started: bool, role: str) -> AuditEvent:
    """Application Start / Stop of a pacsnode process (``role``: serve, worker, ...)."""
    return AuditEvent(
        kind=EventKind.APPLICATION_START if started else EventKind.APPLICATION_STOP,
        event_id=_APPLICATION_ACTIVITY,
        action="E",
        event_types=(_APPLICATION_START if started else _APPLICATION_STOP,),
        detail={"role": role},
    )


def configuration_loaded(*, source: Path | None, sha256: str | None) -> AuditEvent:
    """The configuration file a process runs with (Security Alert, Software Configuration)."""
    return AuditEvent(
        kind=EventKind.CONFIGURATION_LOADED,
        event_id=_SECURITY_ALERT,
        action="E",
        event_types=(_SOFTWARE_CONFIGURATION,),
        detail={"source": str(source) if source is not None else None, "sha256": sha256},
    )


def association(
    *, accepted: bool, calling_ae_title: str, called_ae_title: str, host: str, reason: str | None = None
) -> AuditEvent:
    """An association accepted (User Authentication, Login) or refused (Security Alert, Node Authentication)."""
    peer = Participant(role="requestor", ae_title=calling_ae_title, host=host, requestor=True)
    local = Participant(role="application", ae_title=called_ae_title)
    detail = {"reason": reason} if reason else {}
    if accepted:
        return AuditEvent(
            kind=EventKind.ASSOCIATION_ACCEPTED,
            event_id=_USER_AUTHENTICATION,
            action="E",
            event_types=(_LOGIN,),
            participants=(peer, local),
            detail=detail,
        )
    return AuditEvent(
        kind=EventKind.ASSOCIATION_REFUSED,
        event_id=_SECURITY_ALERT,
        action="E",
        outcome=Outcome.MINOR_FAILURE,
        event_types=(_NODE_AUTHENTICATION,),
        participants=(peer, local),
        detail=detail,
    )


def security_alert(
    *,
    alert: str,
    description: str,
    ae_title: str | None = None,
    host: str | None = None,
    outcome: Outcome = Outcome.MINOR_FAILURE,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """A refusal or failure that concerns security: TLS failure, refused peer, authentication failure.

    ``alert`` names the EventTypeCode: node-authentication (the default for an unknown
    name), use-of-restricted-function, security-configuration, network-configuration,
    software-configuration.
    """
    participants = (Participant(role="requestor", ae_title=ae_title, host=host, requestor=True),)
    return AuditEvent(
        kind=EventKind.SECURITY_ALERT,
        event_id=_SECURITY_ALERT,
        action="E",
        outcome=outcome,
        event_types=(_SECURITY_TYPES.get(alert, _NODE_AUTHENTICATION),),
        participants=participants if ae_title or host else (),
        detail={"alert": alert, "description": description, **(detail or {})},
    )


def instances_stored(
    *, calling_ae_title: str, host: str, called_ae_title: str, study: StudyRef, reidentified: bool = False
) -> AuditEvent:
    """Instances of one study received and stored (DICOM Instances Transferred, action Create)."""
    return AuditEvent(
        kind=EventKind.INSTANCES_STORED,
        event_id=_INSTANCES_TRANSFERRED,
        action="C",
        participants=(
            Participant(role="source", ae_title=calling_ae_title, host=host, requestor=True),
            Participant(role="destination", ae_title=called_ae_title),
        ),
        studies=(study,),
        detail={"reidentified": True} if reidentified else {},
    )


def query(
    *,
    calling_ae_title: str,
    host: str,
    called_ae_title: str,
    sop_class_uid: str,
    level: str,
    keys: dict[str, str],
    matches: int,
    studies: Iterable[StudyRef] = (),
    outcome: Outcome = Outcome.SUCCESS,
) -> AuditEvent:
    """A C-FIND (Query, action Execute): its non-empty keys, the number of matches and the studies matched."""
    return AuditEvent(
        kind=EventKind.QUERY,
        event_id=_QUERY,
        action="E",
        outcome=outcome,
        participants=(
            Participant(role="requestor", ae_title=calling_ae_title, host=host, requestor=True),
            Participant(role="application", ae_title=called_ae_title),
        ),
        studies=tuple(studies),
        detail={"sop_class_uid": sop_class_uid, "level": level, "keys": keys, "matches": matches},
    )


def transfer_begun(
    *,
    service: str,
    requestor: Participant,
    source_ae_title: str,
    destination: Participant,
    studies: Iterable[StudyRef],
    instances: int,
    deidentified: bool = False,
    burned_in_unknown: int = 0,
) -> AuditEvent:
    """Instances about to leave the node (Begin Transferring DICOM Instances): C-MOVE, C-GET or an export.

    ``deidentified``: sent through the destination's de-identification profile;
    ``burned_in_unknown``: how many of them do not say whether they have burned-in annotation.
    """
    detail: dict[str, Any] = {"service": service, "instances": instances}
    if deidentified:
        detail["deidentified"] = True
        detail["burned_in_unknown"] = burned_in_unknown
    return AuditEvent(
        kind=EventKind.TRANSFER_BEGUN,
        event_id=_BEGIN_TRANSFERRING,
        action="E",
        participants=(requestor, Participant(role="source", ae_title=source_ae_title), destination),
        studies=tuple(studies),
        detail=detail,
    )


def analysis_job(
    *,
    job_id: int,
    pipeline: str,
    rule: str,
    state: str,
    study: StudyRef,
    node_ae_title: str,
    outcome: Outcome = Outcome.SUCCESS,
) -> AuditEvent:
    """An analysis job run on a study (Order Record): ``state`` started, done, skipped, retry or failed."""
    return AuditEvent(
        kind=EventKind.ANALYSIS_JOB,
        event_id=_ORDER_RECORD,
        action="C" if state == "started" else "U",
        outcome=outcome,
        participants=(Participant(role="application", ae_title=node_ae_title, requestor=True),),
        studies=(study,),
        detail={"job_id": job_id, "pipeline": pipeline, "rule": rule, "state": state},
    )


# -- the writer ----------------------------------------------------------------------------------


class AuditTrail:
    """Appends audit events to the trail file (and syslog); safe across threads and processes.

    Parameters
    ----------
    settings
        ``audit`` settings.
    path
        The current file (``settings.path`` resolved by the caller).
    ae_title
        This node's AE title (the audit source).
    """

    def __init__(self, settings: AuditSettings, *, path: Path, ae_title: str) -> None:
        self.settings = settings
        self.path = path
        self.ae_title = ae_title
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._pid = 0
        self._host = socket.gethostname()
        self._syslog: logging.handlers.SysLogHandler | None = None
        if settings.syslog is not None:
            s = settings.syslog
            self._syslog = logging.handlers.SysLogHandler(
                address=(s.host, s.port),
                facility=logging.handlers.SysLogHandler.facility_names[s.facility],
                socktype=socket.SOCK_DGRAM if s.protocol == "udp" else socket.SOCK_STREAM,
            )
            self._syslog.ident = "pacsnode-audit: "

    @classmethod
    def disabled(cls) -> AuditTrail:
        """A trail that records nothing (``audit.enabled: false``)."""
        return cls(AuditSettings(enabled=False), path=Path(os.devnull), ae_title="")

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def record(self, event: AuditEvent) -> None:
        """Append ``event``; returns once it is written (and fsynced when configured).

        Raises
        ------
        AuditError
            When the trail cannot be written: the caller must not acknowledge the action.
        """
        if not self.settings.enabled:
            return
        doc = {
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            **event.as_dict(),
            "source": {"ae_title": self.ae_title, "host": self._host, "pid": os.getpid()},
        }
        line = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
        data = line.encode("utf-8")
        try:
            with self._lock:
                self._write(data)
        except OSError as exc:
            logger.error("cannot write the audit trail %s: %s", self.path, exc, extra={"action": "audit"})
            raise AuditError(f"cannot write the audit trail: {exc}") from exc
        if self._syslog is not None:
            try:
                self._syslog.emit(logging.makeLogRecord({"msg": line.rstrip("\n"), "levelno": logging.INFO}))
            except Exception as exc:  # syslog is a copy: the file is the record
                logger.warning("cannot send an audit event to syslog: %s", exc, extra={"action": "audit"})

    def _open(self) -> None:
        if self._pid != os.getpid():  # first use, or a forked child: descriptors of our own (flock is per open)
            self._fd = self._lock_fd = None
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._lock_fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
            )
            self._pid = os.getpid()

    def _write(self, data: bytes) -> None:
        self._open()
        assert self._fd is not None and self._lock_fd is not None
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            self._follow_rotation()
            size = os.fstat(self._fd).st_size
            if size and size + len(data) > self.settings.max_bytes:
                self._rotate()
            os.write(self._fd, data)
            if self.settings.fsync:
                os.fsync(self._fd)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _follow_rotation(self) -> None:
        """Another process rotated the file: write to the new one."""
        assert self._fd is not None
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = -1
        if current != os.fstat(self._fd).st_ino:
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        rotated = self.path.with_name(f"{self.path.name}.{stamp}-{os.getpid()}")
        os.rename(self.path, rotated)
        os.chmod(rotated, 0o440)  # never written again
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._lock_fd):
                if fd is not None and self._pid == os.getpid():
                    os.close(fd)
            self._fd = self._lock_fd = None
        if self._syslog is not None:
            self._syslog.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SecurityAlertHandler(logging.Handler):
    """Records log records marked ``extra={"event": "security-alert", ...}`` as Security Alert events.

    Recognised extras: ``alert`` (the event type name, see :func:`security_alert`),
    ``ae_title`` or ``calling_ae_title``, ``host`` or ``peer``. The record's message
    becomes the description.
    """

    def __init__(self, trail: AuditTrail) -> None:
        super().__init__(logging.NOTSET)
        self.trail = trail

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) != "security-alert":
            return
        action = getattr(record, "action", None)
        if action == "association-rejected":  # recorded as association-refused from EVT_REJECTED
            return
        ae = getattr(record, "ae_title", None) or getattr(record, "calling_ae_title", None)
        host = getattr(record, "host", None) or getattr(record, "peer", None)
        alert = getattr(record, "alert", None) or _ALERT_OF_ACTION.get(str(action), "node-authentication")
        detail = {key: getattr(record, key) for key in _ALERT_DETAIL if getattr(record, key, None) is not None}
        self.trail.record(
            security_alert(
                alert=str(alert),
                description=record.getMessage(),
                ae_title=str(ae) if ae else None,
                host=str(host) if host else None,
                detail=detail or None,
            )
        )


# The ``action`` of the refusals logged by node.dicom.permissions and node.dicom.tls, as alert types.
_ALERT_OF_ACTION = {"not-authorized": "use-of-restricted-function", "tls-refused": "node-authentication"}
_ALERT_DETAIL = ("action", "service", "move_destination", "status", "certificate_subject", "reason")


# -- reading -------------------------------------------------------------------------------------


def audit_files(path: Path) -> list[Path]:
    """The trail's files, oldest first: the rotated ones (by their time stamp), then the current one."""
    rotated = sorted(p for p in path.parent.glob(path.name + ".*") if not p.name.endswith(".lock"))
    return [*rotated, path] if path.exists() else rotated


def read_events(
    path: Path,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    peer: str | None = None,
    since: datetime | None = None,
    kinds: Iterable[str] = (),
) -> Iterator[dict[str, Any]]:
    """The events of the trail (rotated files included) that match every filter given, oldest first."""
    wanted = set(kinds)
    for file in audit_files(path):
        with file.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write: the rest still counts
                    continue
                if _matches(doc, patient_id, study_uid, peer, since, wanted):
                    yield doc


def _matches(
    doc: dict[str, Any],
    patient_id: str | None,
    study_uid: str | None,
    peer: str | None,
    since: datetime | None,
    kinds: set[str],
) -> bool:
    if kinds and doc.get("kind") not in kinds:
        return False
    studies = doc.get("studies") or []
    if patient_id is not None and not any(s.get("patient_id") == patient_id for s in studies):
        return False
    if study_uid is not None and not any(s.get("study_instance_uid") == study_uid for s in studies):
        return False
    if peer is not None and not any(p.get("ae_title") == peer for p in doc.get("participants") or []):
        return False
    if since is not None:
        try:
            when = datetime.fromisoformat(doc["time"])
        except (KeyError, ValueError):
            return False
        if when < since:
            return False
    return True


def trail_for(settings: AuditSettings, *, storage_root: Path, ae_title: str) -> AuditTrail:
    """The trail a process writes: ``settings.path``, else ``<storage_root>/audit/audit.jsonl``."""
    if not settings.enabled:
        return AuditTrail.disabled()
    return AuditTrail(settings, path=trail_path(settings, storage_root), ae_title=ae_title)


def trail_path(settings: AuditSettings, storage_root: Path) -> Path:
    return settings.path if settings.path is not None else storage_root / "audit" / "audit.jsonl"
