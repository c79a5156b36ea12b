"""Operations endpoints: ``/metrics`` (Prometheus text), ``/healthz`` (alive) and ``/readyz`` (ready).

``/healthz`` needs no login (a load balancer or an orchestrator probes it);
``/metrics`` and ``/readyz`` need a viewer (Prometheus sends a bearer token).
The figures come from :mod:`pacsnode.node.metrics`: the counters every serve
process writes, merged, and what the index and the store say at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from pacsnode.node import metrics
from pacsnode.node.http.auth import require
from pacsnode.node.http.context import HttpContext
from pacsnode.node.http.settings import Role

__all__ = ["PUBLIC_PATHS", "PROMETHEUS_TEXT", "routes"]

PUBLIC_PATHS = ("/healthz",)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def routes(ctx: HttpContext) -> list[BaseRoute]:
    """``/metrics``, ``/healthz`` and ``/readyz`` over one node context."""
    expected = {"acceptor": ctx.settings.node.acceptor_processes, "worker": ctx.settings.analysis.workers}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.NodeCollector(ctx.archive, expected=expected))

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})

    @require(Role.VIEWER)
    async def scrape(request: Request) -> Response:
        body = await run_in_threadpool(generate_latest, registry)
        return Response(body, media_type=PROMETHEUS_TEXT, headers={"Cache-Control": "no-store"})

    @require(Role.VIEWER)
    async def readyz(request: Request) -> Response:
        checks = await run_in_threadpool(lambda: metrics.readiness(ctx.archive, expected=expected))
        ready = all(check.ok for check in checks)
        return JSONResponse(
            {"ready": ready, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}},
            status_code=200 if ready else 503,
            headers={"Cache-Control": "no-store"},
        )

    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]
