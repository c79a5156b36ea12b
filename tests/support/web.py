"""The HTTP app in-process over a fresh archive, users for each role, and STOW-RS bodies."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pacsnode.node.http.passwords import hash_password, hash_token
from tests.support.helpers import make_settings

# Cheap hashes for tests (verification reads the parameters from the string); the node's default is N=2^17.
PASSWORD = "correct horse battery staple"
_TEST_LN = 10

USERS = {"viewer": "vera", "uploader": "ulla", "admin": "ada"}
TOKEN = secrets.token_urlsafe(32)  # the uploader's bearer token


def users_config() -> list[dict[str, Any]]:
    users: list[dict[str, Any]] = [
        {"name": name, "role": role, "password_hash": hash_password(PASSWORD, ln=_TEST_LN)}
        for role, name in USERS.items()
    ]
    users[1]["token_hashes"] = [hash_token(TOKEN)]
    return users


def auth(role: str) -> tuple[str, str]:
    return USERS[role], PASSWORD


def stow_body(files: Iterable[Path], boundary: str = "pacsnode-test-boundary") -> tuple[bytes, str]:
    """A STOW-RS request body and its Content-Type."""
    parts = [
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + Path(f).read_bytes() + b"\r\n"
        for f in files
    ]
    body = b"".join(parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def web_settings(tmp_path: Path, **sections: dict[str, Any]) -> Any:
    http = {"users": users_config(), **sections.pop("http", {})}
    return make_settings(tmp_path, http=http, **sections)
