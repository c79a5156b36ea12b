"""Settings of the HTTP server (the ``http:`` section): address, TLS, users.

Only pydantic here, so loading the config never imports the web stack.
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from pacsnode.storage.model_base import StrictModel

__all__ = ["DicomwebNode", "HttpSettings", "HttpUser", "Role"]


class Role(str, enum.Enum):
    """What a user may do: ``viewer`` reads (QIDO-RS, WADO-RS, the dashboard), ``uploader`` also stores
    (STOW-RS), ``admin`` also retries jobs and exports and sees the configuration."""

    VIEWER = "viewer"
    UPLOADER = "uploader"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.VIEWER: 0, Role.UPLOADER: 1, Role.ADMIN: 2}

_PHC = re.compile(r"^\$scrypt\$ln=\d{1,2},r=\d{1,2},p=\d{1,2}\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}$")
_TOKEN_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def _check_password_hash(value: str | None) -> str | None:
    if value is not None and not _PHC.match(value):
        raise ValueError("a password_hash is written by `pacsnode hash-password` ($scrypt$ln=..,r=..,p=..$salt$hash)")
    return value


def _check_token_hash(value: str) -> str:
    if not _TOKEN_HASH.match(value):
        raise ValueError("a token hash is written by `pacsnode make-token` (sha256:<64 hex digits>)")
    return value


class HttpUser(StrictModel):
    """A user of the HTTP server: a password (HTTP Basic, the login form) and/or bearer tokens, all hashed."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")]
    role: Role = Role.VIEWER
    password_hash: Annotated[str | None, AfterValidator(_check_password_hash)] = None
    token_hashes: list[Annotated[str, AfterValidator(_check_token_hash)]] = []


class DicomwebNode(StrictModel):
    """A DICOMweb server that results are sent to by STOW-RS (top-level ``dicomweb_nodes``; rules name it
    in ``destinations`` like a ``remote_nodes`` entry)."""

    url: Annotated[str, Field(pattern=r"^https?://")]  # the DICOMweb root, e.g. http://host:8042/dicom-web
    username: str | None = None  # HTTP Basic
    password: str | None = None
    token: str | None = None  # bearer token (instead of Basic)
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    verify_tls: bool = True


class HttpSettings(StrictModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8112
    tls_cert: Path | None = None  # PEM certificate (chain); with tls_key, the server speaks HTTPS only
    tls_key: Path | None = None
    # The URL clients reach the node at (behind a proxy, or for clients that send Host without the
    # port); RetrieveURL and BulkDataURI start with it. None: taken from each request.
    public_url: Annotated[str | None, Field(pattern=r"^https?://")] = None
    users: list[HttpUser] = []
    session_seconds: Annotated[float, Field(gt=0)] = 8 * 3600.0  # the dashboard's login cookie
    max_stow_bytes: Annotated[int, Field(ge=1024)] = 4 << 30  # one STOW-RS request body, at most

    @model_validator(mode="after")
    def _check(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("http.tls_cert and http.tls_key go together: give both or neither")
        names = [user.name for user in self.users]
        if len(set(names)) != len(names):
            raise ValueError("http.users: a user name appears twice")
        for user in self.users:
            if user.password_hash is None and not user.token_hashes:
                raise ValueError(f"http.users: {user.name!r} has neither a password_hash nor token_hashes")
        return self
