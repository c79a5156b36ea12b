"""Load the admin's YAML file into typed, validated settings.

Each package owns the settings of its part (:class:`storage.StorageSettings`);
this module composes them. Every key has a default, so an empty file is a valid
configuration; an unknown key is an error (a typo must not be ignored).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    model_validator,
)

from pacsnode.analysis.settings import AnalysisSettings
from pacsnode.node.audit import AuditSettings
from pacsnode.node.deid import DeidentifyProfile
from pacsnode.node.errors import ConfigError
from pacsnode.node.http.settings import DicomwebNode, HttpSettings
from pacsnode.storage.model_base import StrictModel
from pacsnode.storage.settings import StorageSettings

__all__ = [
    "Settings",
    "NodeSettings",
    "PolicySettings",
    "RemoteNode",
    "RemoteTls",
    "AllowedPeer",
    "ListenerTls",
    "Service",
    "LoggingSettings",
    "ExportSettings",
    "Timeouts",
    "load",
    "redact_url",
    "redacted",
    "resolve_path",
    "DEFAULT_CONFIG",
]

DEFAULT_CONFIG = Path("config/pacsnode.yaml")
ENV_VAR = "PACSNODE_CONFIG"


def _check_ae_title(value: str) -> str:
    if not value.strip():
        raise ValueError("an AE title cannot be empty or only spaces")
    if len(value) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {value!r} has {len(value)}")
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ValueError(f"an AE title is printable ASCII without backslash; {value!r} is not")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class Timeouts(StrictModel):
    # From TCP connect to a complete A-ASSOCIATE-RQ (PS3.8 ARTIM): a connection that has not asked
    # for an association by then is closed, so scanners and trickling peers cannot hold the node.
    artim: Seconds = 5.0
    acse: Seconds = 30.0
    dimse: Seconds = 60.0
    network: Seconds = 60.0
    shutdown_grace: Seconds = 30.0


class ListenerTls(StrictModel):
    """DICOM TLS (PS3.15 B.1) on the listener: the node's certificate and the CAs its peers' certificates chain to.

    ``port``: unset, ``node.port`` speaks TLS only (no plain listener); a number
    opens a second listener with TLS there, beside the plain ``node.port``.
    ``require_client_certificate``: a peer without a certificate that
    ``ca_certificates`` trusts fails the handshake; otherwise a certificate is
    checked when one is offered (and needed for ``allowed_peers`` entries that
    name a ``certificate_subject``).
    """

    port: Port | None = None
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _trust(self) -> ListenerTls:
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CAs client certificates chain to)")
        return self


class NodeSettings(StrictModel):
    ae_title: AETitle = "PACSNODE"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_associations: Annotated[int, Field(ge=1, le=1024)] = 16  # established ones only
    max_pending_per_host: Annotated[int, Field(ge=1, le=1024)] = 32  # connections still negotiating, per host
    max_pdu: Annotated[int, Field(ge=0, le=1 << 30)] = 4 << 20
    acceptor_processes: Annotated[int, Field(ge=1, le=64)] = 2
    max_instance_bytes: Annotated[int, Field(ge=1024)] = 2 << 30
    # A deflated dataset may inflate to this much, not more (a 1 MiB stream can inflate to gigabytes).
    max_inflated_bytes: Annotated[int, Field(ge=1024)] = 256 << 20
    timeouts: Timeouts = Timeouts()
    # Storage associations (only Verification and storage classes proposed): after pynetdicom's
    # negotiation, "lean" serves their data transfer in pacsnode's own loop (node/dicom/lean.py);
    # "pynetdicom" leaves them to pynetdicom. Other associations always stay with pynetdicom.
    data_path: Literal["lean", "pynetdicom"] = "lean"
    tls: ListenerTls | None = None

    @model_validator(mode="after")
    def _ports(self) -> NodeSettings:
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError("tls.port equals node.port: leave tls.port unset for TLS only on node.port")
        return self


Service = Literal["echo", "store", "find", "move", "get"]
ALL_SERVICES: tuple[Service, ...] = ("echo", "store", "find", "move", "get")


class AllowedPeer(StrictModel):
    """A calling AE title allowed to associate, optionally only from ``host``.

    ``overwrite``: under ``storage.duplicate_policy: overwrite``, this peer's
    instances replace stored ones with other content; every other peer's get
    0x0111. A peer marked here matches on its AE title and, when ``host`` is
    set, its address too.

    ``certificate_subject`` (``"CN=ct1.example.org, O=Hospital"``): the entry
    matches only over TLS with a verified client certificate whose subject
    holds each of these attributes. ``services``: what the peer may ask for;
    anything else is refused with 0x0124 (Refused: Not Authorized).
    ``move_destinations``: the AE titles it may C-MOVE to (unset: any remote node).
    """

    ae_title: AETitle
    host: str | None = None
    certificate_subject: str | None = None
    services: list[Service] = list(ALL_SERVICES)
    move_destinations: list[AETitle] | None = None
    overwrite: bool = False

    @model_validator(mode="after")
    def _subject(self) -> AllowedPeer:
        if self.certificate_subject is not None:
            from pacsnode.node.dicom.tls import parse_subject

            parse_subject(self.certificate_subject)  # ValueError names the bad part
        return self


class PolicySettings(StrictModel):
    require_called_ae_title: bool = True
    allowed_peers: list[AllowedPeer] = []

    def trusted_to_overwrite(self, calling_ae_title: str, host: str) -> bool:
        """Whether an entry marked ``overwrite`` matches this peer (AE title, and host where the entry names one)."""
        calling = calling_ae_title.strip()
        return any(
            peer.overwrite and peer.ae_title == calling and (peer.host is None or peer.host == host)
            for peer in self.allowed_peers
        )


class RemoteTls(StrictModel):
    """DICOM TLS towards a remote node: whom to trust, and the certificate pacsnode shows when asked.

    ``ca_certificates`` unset: the system's trust store. ``server_name``: the
    name the peer's certificate must carry (default: ``host``);
    ``check_hostname: false`` trusts any name under a trusted CA.
    """

    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    server_name: str | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> RemoteTls:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class RemoteNode(StrictModel):
    ae_title: AETitle
    host: str
    port: Port
    tls: RemoteTls | None = None
    # Exports to this node are de-identified (pacsnode.node.deid); None: sent as stored.
    deidentify: DeidentifyProfile | None = None


class QuerySettings(StrictModel):
    max_matches: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    case_insensitive_names: bool = True


class ExportSettings(StrictModel):
    """The durable export queue: how results are sent to remote nodes, and retried."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 30
    backoff_seconds: Seconds = 10.0
    backoff_max_seconds: Seconds = 300.0
    lease_seconds: Annotated[float, Field(ge=1)] = 120.0
    batch: Annotated[int, Field(ge=1, le=10000)] = 100
    poll_seconds: Seconds = 1.0


class LoggingSettings(StrictModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(StrictModel):
    node: NodeSettings = NodeSettings()
    policy: PolicySettings = PolicySettings()
    remote_nodes: dict[str, RemoteNode] = {}
    query: QuerySettings = QuerySettings()
    storage: StorageSettings = StorageSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    export: ExportSettings = ExportSettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings = AuditSettings()
    http: HttpSettings = HttpSettings()
    dicomweb_nodes: dict[str, DicomwebNode] = {}  # export destinations reached by STOW-RS
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _names(self) -> Settings:
        for name in self.dicomweb_nodes:
            if name in self.remote_nodes:
                raise ValueError(f"{name!r} is both a remote_nodes and a dicomweb_nodes entry; names are shared")
        for name in [*self.remote_nodes, *self.dicomweb_nodes]:
            if not name or "@" in name:
                raise ValueError(f"remote node name {name!r} must be non-empty and without '@'")
        for rule in self.analysis.rules:
            for destination in rule.destinations:
                if destination not in self.remote_nodes and destination not in self.dicomweb_nodes:
                    known = ", ".join(sorted([*self.remote_nodes, *self.dicomweb_nodes])) or "none defined"
                    raise ValueError(
                        f"analysis.rules: rule {rule.name!r} sends results to {destination!r}, "
                        f"which is not in remote_nodes or dicomweb_nodes ({known})"
                    )
        return self


def redact_url(url: str) -> str:
    """A database URL with its password replaced by ``***``, for showing to anyone."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: show nothing of it
        return "***"


def redacted(dumped: dict[str, Any]) -> dict[str, Any]:
    """Settings dumped for display (``check-config``) with every secret replaced by ``***``."""
    out = dict(dumped)
    storage = dict(out.get("storage") or {})
    if isinstance(storage.get("database_url"), str):
        storage["database_url"] = redact_url(storage["database_url"])
    out["storage"] = storage
    nodes = out.get("dicomweb_nodes")
    if isinstance(nodes, dict):
        out["dicomweb_nodes"] = {
            name: {k: ("***" if k in ("password", "token") and v else v) for k, v in dict(node).items()}
            for name, node in nodes.items()
        }
    return out


def resolve_path(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file to read: ``--config``, else ``$PACSNODE_CONFIG``, else ``config/pacsnode.yaml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_CONFIG


def _key_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    return ".".join(parts) or "(top level)"


def _anchored(value: object, base: Path) -> object:
    """``value`` resolved against ``base`` when it is a relative path; anything else unchanged."""
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return os.path.normpath(base / value)
    return value


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    """Make the relative paths written in a config file relative to the file's own folder.

    So ``pacsnode --config /etc/pacsnode/pacsnode.yaml studies`` finds the same
    store from any working directory. Touched: ``storage.root``, the file of a
    ``sqlite:///`` database URL, and a rule's ``params.model`` when it names a
    folder (contains a path separator or starts with a dot) rather than a
    built-in model, ``audit.path``, and the certificate, key and CA files of ``node.tls`` and
    each remote node's ``tls``. Defaults that the file does not set stay relative to the
    working directory.
    """
    storage = data.get("storage")
    if isinstance(storage, dict):
        if "root" in storage:
            storage["root"] = _anchored(storage["root"], base)
        url = storage.get("database_url")
        if isinstance(url, str) and url.startswith(_SQLITE_PREFIX):
            db_path = url[len(_SQLITE_PREFIX) :]
            if db_path and db_path != ":memory:" and not db_path.startswith("file:"):
                storage["database_url"] = _SQLITE_PREFIX + str(_anchored(db_path, base))
    node = data.get("node")
    tls_sections = [node.get("tls")] if isinstance(node, dict) else []
    remotes = data.get("remote_nodes")
    if isinstance(remotes, dict):
        tls_sections += [r.get("tls") for r in remotes.values() if isinstance(r, dict)]
    for tls in tls_sections:
        if isinstance(tls, dict):
            for key in ("certificate", "private_key", "ca_certificates"):
                if key in tls:
                    tls[key] = _anchored(tls[key], base)
    audit = data.get("audit")
    if isinstance(audit, dict) and "path" in audit:
        audit["path"] = _anchored(audit["path"], base)
    http = data.get("http")
    if isinstance(http, dict):
        for key in ("tls_cert", "tls_key"):
            if key in http:
                http[key] = _anchored(http[key], base)
    analysis = data.get("analysis")
    rules = analysis.get("rules") if isinstance(analysis, dict) else None
    for rule in rules if isinstance(rules, list) else []:
        params = rule.get("params") if isinstance(rule, dict) else None
        if not isinstance(params, dict):
            continue
        model = params.get("model")
        if isinstance(model, str) and ("/" in model or model.startswith(".")):
            params["model"] = _anchored(model, base)


_SQLITE_PREFIX = "sqlite:///"


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate a config file.

    Raises
    ------
    ConfigError
        With one message naming the file, the key path and what is wrong.
    """
    file = resolve_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}:{where}: not valid YAML: {problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: (top level): expected a mapping of sections, got {type(data).__name__}")
    _anchor_paths(data, file.resolve().parent)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        value = first.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        raise ConfigError(f"{file}: {_key_path(first['loc'])}: {first['msg']}{shown}{suffix}") from exc
    return settings.model_copy(update={"source": file})
