"""Who may use the HTTP server: users and roles from the config, HTTP Basic, bearer tokens, session cookies.

Passwords are kept as scrypt hashes in a PHC-like string (``$scrypt$ln=15,r=8,p=1$salt$hash``,
stdlib :func:`hashlib.scrypt`); bearer tokens are random 256-bit secrets kept as their SHA-256
(a token is not guessable, so a slow hash adds nothing). A verified Basic credential is remembered
for a few minutes under an HMAC of the header, so a viewer browsing a study does not pay the scrypt
cost on every request. Every refusal is logged with the client address, method and path.

Routes ask for a role with :func:`require`; :class:`AuthMiddleware` makes sure nothing but the
public paths (``/healthz``, the login form) is served without a login.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote

from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pacsnode.node.http.passwords import hash_password, hash_token, make_token, verify_password
from pacsnode.node.http.settings import HttpUser, Role

__all__ = [
    "SESSION_COOKIE",
    "Auth",
    "AuthMiddleware",
    "User",
    "hash_password",
    "hash_token",
    "make_token",
    "require",
    "verify_password",
]

logger = logging.getLogger(__name__)

SESSION_COOKIE = "pacsnode_session"
_CACHE_SECONDS = 300.0
_CACHE_MAX = 1024


@dataclass(frozen=True, kw_only=True)
class User:
    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return self.role.allows(role)


class Auth:
    """The configured users, and the checks a request goes through.

    Parameters
    ----------
    users
        ``http.users`` from the config.
    session_seconds
        How long a login cookie (:meth:`issue_session`) stays valid.
    """

    def __init__(self, users: Iterable[HttpUser], *, session_seconds: float = 8 * 3600.0) -> None:
        self._users = {user.name: user for user in users}
        self._tokens = {digest: user for user in self._users.values() for digest in user.token_hashes}
        self.session_seconds = session_seconds
        self._key = secrets.token_bytes(32)  # signs session cookies and cache keys; per process
        self._verified: dict[bytes, tuple[User, float]] = {}
        self._lock = threading.Lock()

    @property
    def has_users(self) -> bool:
        return bool(self._users)

    def _user(self, config: HttpUser) -> User:
        return User(name=config.name, role=config.role)

    def check_password(self, name: str, password: str) -> User | None:
        """The user if ``password`` is theirs (the login form and HTTP Basic)."""
        config = self._users.get(name)
        if config is None or config.password_hash is None:
            # Same cost either way, so a timing does not tell which user names exist.
            verify_password(password, _DUMMY_HASH)
            return None
        return self._user(config) if verify_password(password, config.password_hash) else None

    def check_token(self, token: str) -> User | None:
        config = self._tokens.get(hash_token(token))
        return None if config is None else self._user(config)

    def _basic(self, encoded: str) -> User | None:
        cache_key = hmac.new(self._key, encoded.encode("utf-8", "replace"), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(cache_key)
            if hit is not None and hit[1] > now:
                return hit[0]
        try:
            name, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        user = self.check_password(name, password)
        if user is not None:
            with self._lock:
                if len(self._verified) >= _CACHE_MAX:
                    self._verified.clear()
                self._verified[cache_key] = (user, now + _CACHE_SECONDS)
        return user

    def issue_session(self, user: User) -> str:
        """A signed cookie value naming ``user`` until ``session_seconds`` from now."""
        expires = int(time.time() + self.session_seconds)
        payload = f"{user.name}|{expires}"
        signature = hmac.new(self._key, payload.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"{base64.urlsafe_b64encode(payload.encode('utf-8')).decode('ascii')}.{signature}"

    def session_user(self, value: str) -> User | None:
        """The user a cookie from :meth:`issue_session` names, if it is genuine and current."""
        try:
            encoded, signature = value.split(".", 1)
            payload = base64.urlsafe_b64decode(encoded.encode("ascii")).decode("utf-8")
            name, expires = payload.rsplit("|", 1)
            expected = hmac.new(self._key, payload.encode("utf-8"), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(signature, expected) or int(expires) < time.time():
                return None
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        config = self._users.get(name)
        return None if config is None else self._user(config)

    def authenticate(self, conn: HTTPConnection) -> User | None:
        """The user a request speaks for: ``Authorization`` (Basic or Bearer), else the session cookie."""
        header = conn.headers.get("authorization", "")
        scheme, _, credentials = header.partition(" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme == "basic" and credentials:
            return self._basic(credentials)
        if scheme == "bearer" and credentials:
            return self.check_token(credentials)
        if header:
            return None
        cookie = conn.cookies.get(SESSION_COOKIE)
        return self.session_user(cookie) if cookie else None


_DUMMY_HASH = hash_password("pacsnode")


def client_of(conn: HTTPConnection) -> str:
    return f"{conn.client.host}:{conn.client.port}" if conn.client else "?"


def log_refusal(conn: HTTPConnection, code: int, reason: str, user: User | None = None) -> None:
    method = conn.scope.get("method", "WS")
    logger.warning(
        "HTTP %s %s from %s refused with %d: %s",
        method,
        conn.url.path,
        client_of(conn),
        code,
        reason,
        extra={
            "action": "http-refused",
            "status": code,
            "path": conn.url.path,
            "client": client_of(conn),
            "user": user.name if user else None,
        },
    )


def unauthorized(conn: HTTPConnection, reason: str) -> Response:
    log_refusal(conn, 401, reason)
    return PlainTextResponse(
        "authentication required\n",
        status_code=401,
        headers={"WWW-Authenticate": 'Basic realm="pacsnode", charset="UTF-8"'},
    )


def forbidden(conn: HTTPConnection, user: User, needed: Role) -> Response:
    log_refusal(conn, 403, f"user {user.name!r} ({user.role.value}) needs role {needed.value}", user)
    return PlainTextResponse(f"role {needed.value} required\n", status_code=403)


Endpoint = Callable[[Request], Awaitable[Response]]


def require(role: Role) -> Callable[[Endpoint], Endpoint]:
    """Decorate a Starlette endpoint: 401 without a valid login, 403 without ``role``.

    The user is left in ``request.state.user``. The app's :class:`~pacsnode.node.http.context.HttpContext`
    is ``request.app.state.ctx``.
    """

    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def wrapper(request: Request) -> Response:
            user: User | None = getattr(request.state, "user", None)
            if user is None:
                user = request.app.state.ctx.auth.authenticate(request)
                if user is None:
                    return unauthorized(request, "no valid credentials")
                request.state.user = user
            if not user.may(role):
                return forbidden(request, user, role)
            return await endpoint(request)

        return wrapper

    return decorate


class AuthMiddleware:
    """Every request but those to ``public_paths`` needs a login.

    A browser (``Accept: text/html``) without one is sent to ``login_path`` when there is one;
    other clients get 401 with a Basic challenge. The user is left in ``request.state.user``.
    """

    def __init__(
        self, app: ASGIApp, *, auth: Auth, public_paths: frozenset[str], login_path: str | None = None
    ) -> None:
        self.app = app
        self.auth = auth
        self.public_paths = public_paths
        self.login_path = login_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        path = conn.url.path
        if path in self.public_paths:
            await self.app(scope, receive, send)
            return
        user = self.auth.authenticate(conn)
        if user is None:
            reason = "no valid credentials" if "authorization" in conn.headers else "no credentials"
            if self.login_path and "text/html" in conn.headers.get("accept", "") and scope["type"] == "http":
                log_refusal(conn, 303, reason + "; sent to the login page")
                target = f"{self.login_path}?next={quote(path)}"
                response: Response = RedirectResponse(target, status_code=303)
            else:
                response = unauthorized(conn, reason)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["user"] = user
        await self.app(scope, receive, send)
