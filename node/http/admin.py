"""The admin dashboard: server-rendered pages over the index, for a browser or a phone.

Pages (any logged-in user): ``/`` studies with a search, ``/studies/{uid}`` a
study's series (thumbnails from WADO-RS), its analysis jobs and its result
objects (key images, SR measurements as a table, the SEG over a source slice),
``/jobs``, ``/exports`` (the queue and its dead letters) and ``/health``
(disk free against the floor, queue depths, processes alive, the last
association of each calling AE title). Admins retry a job or a dead export
with a POST that carries a CSRF token (an HMAC of the user name under a key
of this process) from a page of the same origin.

``/login`` is the form the HTTP layer sends a browser without a login to; it
sets the session cookie that :class:`~pacsnode.node.http.auth.Auth` signs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from pacsnode.node import metrics
from pacsnode.node.http import results, views
from pacsnode.node.http.auth import SESSION_COOKIE, User, log_refusal, require
from pacsnode.node.http.context import HttpContext
from pacsnode.node.http.settings import Role
from pacsnode.storage.db import read_connection
from pacsnode.storage.models import ExportState, JobState

__all__ = ["LOGIN_PATH", "PUBLIC_PATHS", "routes"]

logger = logging.getLogger(__name__)

LOGIN_PATH = "/login"
PUBLIC_PATHS = (LOGIN_PATH,)

_TEMPLATES = Path(__file__).parent / "templates"
_PAGE = 50

_FLASH: dict[str, tuple[str, bool]] = {
    "job-retried": ("Job {n} queued again.", False),
    "job-refused": ("Job {n} cannot be queued again now: {why}", True),
    "exports-retried": ("{n} dead export(s) queued again.", False),
    "csrf": ("The form was stale or came from another site; nothing was changed. Try again.", True),
}


def _size(value: float | int | None) -> str:
    if value is None:
        return ""
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TiB"


def _age_until(moment: datetime | None) -> str:
    if moment is None:
        return ""
    seconds = (moment - datetime.now(UTC).replace(tzinfo=None)).total_seconds()
    return "now" if seconds <= 0 else f"in {seconds:.0f} s"


def _unix_age(stamp: float | None) -> str:
    if not stamp:
        return ""
    return views.age(datetime.fromtimestamp(stamp, UTC).replace(tzinfo=None))


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(_TEMPLATES))
    filters = templates.env.filters
    filters["age"] = views.age
    filters["age_until"] = _age_until
    filters["unix_age"] = _unix_age
    filters["size"] = _size
    return templates


def _local(target: str | None, default: str) -> str:
    """``target`` when it is a path on this site (never another host), else ``default``."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else default


class _Csrf:
    """Tokens for the dashboard's forms: an HMAC of the user name under this process's key."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def token(self, user: User) -> str:
        return hmac.new(self._key, f"csrf|{user.name}".encode(), hashlib.sha256).hexdigest()[:40]

    def valid(self, request: Request, user: User, submitted: str) -> bool:
        if not hmac.compare_digest(submitted.encode(), self.token(user).encode()):
            return False
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = request.headers.get("host", "")
            return urlsplit(origin).netloc == host
        return True


class _Dashboard:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.templates = _templates()
        self.csrf = _Csrf()
        self.expected = {"acceptor": ctx.settings.node.acceptor_processes, "worker": ctx.settings.analysis.workers}
        try:
            self.version = version("pacsnode")
        except PackageNotFoundError:  # pragma: no cover - run from a checkout without installing
            self.version = "unknown"

    # -- rendering -----------------------------------------------------------------------------
    def page(self, request: Request, name: str, section: str, **context: Any) -> Response:
        user: User | None = getattr(request.state, "user", None)
        flash, flash_error = self._flash(request)
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "user": user,
                "is_admin": bool(user and user.may(Role.ADMIN)),
                "csrf": self.csrf.token(user) if user else "",
                "node_title": self.ctx.settings.node.ae_title,
                "section": section,
                "here": _strip_flash(here),
                "flash": flash,
                "flash_error": flash_error,
                **context,
            },
            headers={"Cache-Control": "no-store"},
        )

    @staticmethod
    def _flash(request: Request) -> tuple[str, bool]:
        code = request.query_params.get("flash", "")
        found = _FLASH.get(code)
        if found is None:
            return "", False
        text, error = found
        n = request.query_params.get("n", "")
        why = request.query_params.get("why", "")
        return text.format(n=n if n.isdigit() else "?", why=why[:200]), error

    async def read(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            with read_connection(self.ctx.engine) as conn:
                return fn(conn, *args, **kwargs)

        return await run_in_threadpool(run)

    # -- pages ---------------------------------------------------------------------------------
    async def studies(self, request: Request) -> Response:
        q = request.query_params.get("q", "")[:200]
        offset = _int(request.query_params.get("offset"), 0)
        studies, more = await self.read(views.list_studies, search=q, limit=_PAGE, offset=offset)
        return self.page(
            request, "studies.html", "studies", studies=studies, more=more, q=q, offset=offset, limit=_PAGE
        )

    async def study(self, request: Request) -> Response:
        uid = request.path_params["study_uid"]
        page: views.StudyPage | None = await self.read(views.study_page, uid)
        if page is None:  # the studies page, searching for it: "No study matches ..."
            missing = self.page(
                request, "studies.html", "studies", studies=[], more=False, q=uid, offset=0, limit=_PAGE
            )
            missing.status_code = 404
            return missing
        reports, segmentations = await run_in_threadpool(self._result_details, page)
        key_images = [r for r in page.results if r.kind == "sc"]
        return self.page(
            request,
            "study.html",
            "studies",
            page=page,
            key_images=key_images,
            reports=reports,
            segmentations=segmentations,
        )

    def _result_details(self, page: views.StudyPage) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        reports: list[dict[str, Any]] = []
        segmentations: list[dict[str, Any]] = []
        for obj in page.results:
            path = self.ctx.archive.instance_path(obj.file_path)
            if obj.kind == "sr":
                try:
                    reports.append({"obj": obj, "rows": results.measurements(path), "error": ""})
                except Exception as exc:  # noqa: BLE001 - one unreadable report must not break the page
                    logger.warning("dashboard: cannot read SR %s: %s", obj.sop_instance_uid, exc)
                    reports.append({"obj": obj, "rows": [], "error": f"cannot read this report: {exc}"})
            elif obj.kind == "seg":
                try:
                    _sources, legend = results.seg_sources(path)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("dashboard: cannot read SEG %s: %s", obj.sop_instance_uid, exc)
                    continue
                segmentations.append({"obj": obj, "legend": legend})
        return reports, segmentations

    async def jobs(self, request: Request) -> Response:
        state = request.query_params.get("state", "")
        if state not in {s.value for s in JobState}:
            state = ""
        jobs = await self.read(views.job_rows, state=state or None, limit=200)
        figures = await run_in_threadpool(metrics.index_figures, self.ctx.archive)
        return self.page(
            request,
            "jobs.html",
            "jobs",
            jobs=jobs,
            state=state,
            states=[s.value for s in JobState],
            counts=figures.jobs,
        )

    async def exports(self, request: Request) -> Response:
        counts = await self.read(views.export_counts)
        dead = await self.read(views.export_rows, state=ExportState.DEAD.value, limit=200)
        recent = await self.read(views.export_rows, limit=50)
        return self.page(
            request,
            "exports.html",
            "exports",
            counts=counts,
            dead=dead,
            recent=recent,
            states=[s.value for s in ExportState],
            known=self._destinations(),
        )

    def _destinations(self) -> set[str]:
        settings = self.ctx.settings
        return set(settings.remote_nodes) | set(getattr(settings, "dicomweb_nodes", {}) or {})

    async def health(self, request: Request) -> Response:
        figures: metrics.IndexFigures | None = None
        index_error = ""
        try:
            figures = await run_in_threadpool(metrics.index_figures, self.ctx.archive)
        except Exception as exc:  # noqa: BLE001 - the page says so instead of failing
            index_error = f"{type(exc).__name__}: {exc}"[:300]
        totals: dict[str, int] = {}
        for (_dest, state), count in (figures.exports if figures else {}).items():
            totals[state] = totals.get(state, 0) + count
        snapshot = await run_in_threadpool(metrics.snapshot)
        return self.page(
            request,
            "health.html",
            "health",
            figures=figures,
            index_error=index_error,
            export_totals=totals,
            snapshot=snapshot,
            expected=self.expected,
            uptime=_duration(time.time() - self.ctx.started_at),
            settings=self.ctx.settings,
            known=self._destinations(),
            version=self.version,
        )

    async def seg_overlay(self, request: Request) -> Response:
        from pacsnode.node.http.wado import render

        uid = request.path_params["sop_uid"]
        found = await self.read(views.instance_file, uid)
        if found is None or found[1] != views.SEG_CLASS:
            return Response("no such segmentation\n", status_code=404, media_type="text/plain")
        seg_path = self.ctx.archive.instance_path(found[0])
        try:
            sources, _legend = await run_in_threadpool(results.seg_sources, seg_path)
            source_uid = await self.read(views.source_slice, sources)
            source = await self.read(views.instance_file, source_uid) if source_uid else None
            if source_uid is None or source is None:
                return Response("the segmentation's source images are not stored\n", 404, media_type="text/plain")
            png = await run_in_threadpool(
                results.seg_overlay, seg_path, self.ctx.archive.instance_path(source[0]), source_uid, render
            )
        except Exception as exc:  # noqa: BLE001 - a broken object is a 422, not a crash
            logger.warning("dashboard: cannot draw SEG %s: %s", uid, exc)
            return Response(f"cannot draw this segmentation: {exc}\n", 422, media_type="text/plain")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    # -- actions -------------------------------------------------------------------------------
    async def _checked_form(self, request: Request) -> tuple[User, dict[str, str]] | Response:
        user: User = request.state.user
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not self.csrf.valid(request, user, fields.get("csrf", "")):
            log_refusal(request, 403, "missing or wrong CSRF token", user)
            back = _local(fields.get("next"), "/")
            return _redirect(back, flash="csrf")
        return user, fields

    async def retry_job(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        user, fields = checked
        job_id = request.path_params["job_id"]
        back = _local(fields.get("next"), "/jobs")
        try:
            await run_in_threadpool(self.ctx.jobs.retry, job_id)
        except LookupError as exc:
            return _redirect(back, flash="job-refused", n=str(job_id), why=str(exc))
        logger.info("job %d queued again by %s from the dashboard", job_id, user.name, extra={"action": "job-retry"})
        return _redirect(back, flash="job-retried", n=str(job_id))

    async def retry_export(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        user, fields = checked
        export_id = request.path_params["export_id"]
        count = await run_in_threadpool(lambda: self.ctx.exports.retry(export_id=export_id))
        logger.info("export %d queued again by %s from the dashboard", export_id, user.name)
        return _redirect(_local(fields.get("next"), "/exports"), flash="exports-retried", n=str(count))

    async def retry_dead(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        user, fields = checked
        destination = fields.get("destination") or None
        count = await run_in_threadpool(lambda: self.ctx.exports.retry(destination=destination))
        logger.info("%d dead export(s) queued again by %s from the dashboard", count, user.name)
        return _redirect(_local(fields.get("next"), "/exports"), flash="exports-retried", n=str(count))

    # -- login ---------------------------------------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        return self.page(
            request, "login.html", "", next=_local(request.query_params.get("next"), "/"), error="", user=None
        )

    async def login(self, request: Request) -> Response:
        form = await request.form()
        name = str(form.get("username", ""))[:64]
        password = str(form.get("password", ""))[:1024]
        target = _local(str(form.get("next", "")), "/")
        user = await run_in_threadpool(self.ctx.auth.check_password, name, password)
        if user is None:
            log_refusal(request, 401, f"wrong user name or password for {name!r} on the login form")
            response = self.page(
                request, "login.html", "", next=target, error="Wrong user name or password.", user=None
            )
            response.status_code = 401
            return response
        logger.info("user %s logged in from the dashboard", user.name, extra={"action": "login", "user": user.name})
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            self.ctx.auth.issue_session(user),
            max_age=int(self.ctx.auth.session_seconds),
            httponly=True,
            samesite="strict",
            secure=self.ctx.settings.http.tls_cert is not None,
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        checked = await self._checked_form(request)
        if isinstance(checked, Response):
            return checked
        response = RedirectResponse(LOGIN_PATH, status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response


def _strip_flash(path: str) -> str:
    base, _, query = path.partition("?")
    kept = [p for p in query.split("&") if p and not p.startswith(("flash=", "n=", "why="))]
    return base + ("?" + "&".join(kept) if kept else "")


def _redirect(target: str, **flash: str) -> Response:
    separator = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{separator}{urlencode(flash)}", status_code=303)


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(text or default))
    except ValueError:
        return default


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


Endpoint = Callable[[Request], Awaitable[Response]]


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """The dashboard's routes over one node context."""
    d = _Dashboard(ctx)
    viewer = require(Role.VIEWER)
    admin = require(Role.ADMIN)
    return [
        Route("/", viewer(d.studies), methods=["GET"]),
        Route("/studies/{study_uid}", viewer(d.study), methods=["GET"]),
        Route("/jobs", viewer(d.jobs), methods=["GET"]),
        Route("/exports", viewer(d.exports), methods=["GET"]),
        Route("/health", viewer(d.health), methods=["GET"]),
        Route("/ui/segmentations/{sop_uid}/overlay.png", viewer(d.seg_overlay), methods=["GET"]),
        Route("/jobs/{job_id:int}/retry", admin(d.retry_job), methods=["POST"]),
        Route("/exports/{export_id:int}/retry", admin(d.retry_export), methods=["POST"]),
        Route("/exports/retry-dead", admin(d.retry_dead), methods=["POST"]),
        Route(LOGIN_PATH, d.login_form, methods=["GET"]),
        Route(LOGIN_PATH, d.login, methods=["POST"]),
        Route("/logout", viewer(d.logout), methods=["POST"]),
    ]
