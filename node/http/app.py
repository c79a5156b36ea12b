"""The Starlette application: DICOMweb under ``/dicom-web``, the dashboard and ops routes when present.

The dashboard (:mod:`pacsnode.node.http.admin`) and the metrics and health routes
(:mod:`pacsnode.node.http.ops`) are optional modules, each with ``routes(ctx) -> list[BaseRoute]``;
a module may declare ``PUBLIC_PATHS`` (served without a login, e.g. ``/healthz``, the login form)
and ``LOGIN_PATH`` (where a browser without a login is sent).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount

from pacsnode.node.http.auth import AuthMiddleware
from pacsnode.node.http.context import HttpContext
from pacsnode.node.http.dicomweb import routes as dicomweb_routes

__all__ = ["DICOMWEB_PREFIX", "OPTIONAL_MODULES", "build_app"]

logger = logging.getLogger(__name__)

DICOMWEB_PREFIX = "/dicom-web"
OPTIONAL_MODULES = ("pacsnode.node.http.ops", "pacsnode.node.http.admin")
_ALWAYS_PUBLIC = frozenset({"/healthz"})


def _optional(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists but something it imports is missing: a real error
            raise
        return None


def build_app(ctx: HttpContext) -> Starlette:
    """The whole HTTP application over one node context."""
    routes: list[BaseRoute] = [Mount(DICOMWEB_PREFIX, routes=dicomweb_routes(ctx))]
    public = set(_ALWAYS_PUBLIC)
    login_path: str | None = None
    for name in OPTIONAL_MODULES:
        module = _optional(name)
        if module is None:
            continue
        routes.extend(module.routes(ctx))
        public.update(getattr(module, "PUBLIC_PATHS", ()))
        login_path = getattr(module, "LOGIN_PATH", login_path)
    if not ctx.auth.has_users:
        logger.warning("http.users is empty: every HTTP request but /healthz is refused (401)")
    app = Starlette(
        routes=routes,
        middleware=[Middleware(AuthMiddleware, auth=ctx.auth, public_paths=frozenset(public), login_path=login_path)],
    )
    app.state.ctx = ctx
    return app
