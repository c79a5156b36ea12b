"""Stored forms of HTTP secrets: scrypt password hashes (PHC-like strings) and SHA-256 token hashes.

No web imports: ``pacsnode hash-password`` and ``make-token`` use these without loading the server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

__all__ = ["hash_password", "hash_token", "make_token", "verify_password"]

_SCRYPT_LN, _SCRYPT_R, _SCRYPT_P = 17, 8, 1  # OWASP's scrypt parameters: N=2^17 (128 MiB), r=8, p=1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, ln: int = _SCRYPT_LN) -> str:
    """The stored form of a password: ``$scrypt$ln=15,r=8,p=1$<salt>$<hash>`` (base64, no padding)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << ln, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=256 << 20, dklen=32
    )
    return f"$scrypt$ln={ln},r={_SCRYPT_R},p={_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches a :func:`hash_password` string (constant-time comparison)."""
    try:
        _, scheme, params, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        values = dict(item.split("=", 1) for item in params.split(","))
        expected = _unb64(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=_unb64(salt),
            n=1 << int(values["ln"]),
            r=int(values["r"]),
            p=int(values["p"]),
            maxmem=256 << 20,
            dklen=len(expected),
        )
    except (ValueError, KeyError, binascii.Error):
        return False
    return hmac.compare_digest(actual, expected)


def make_token() -> str:
    """A new bearer token (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a bearer token: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()
