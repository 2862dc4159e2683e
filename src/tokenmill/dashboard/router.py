"""`dashboard_router(registry)`: GET /dashboard (the page) and GET /dashboard/stats (its JSON)."""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry

from tokenmill.dashboard.stats import DashboardStats


def dashboard_router(registry: CollectorRegistry, extra: Callable[[], dict] | None = None,
                     window_s: float = 30.0) -> APIRouter:
    """Routes for one process's registry.

    `extra` is called first on every stats request and its dict is returned under "extra"; an app can use
    it both to add figures the registry lacks (per-pool state, routing split) and to refresh gauges that
    it otherwise updates lazily (e.g. on /metrics scrapes), so the page sees current values.
    """
    router = APIRouter()
    stats = DashboardStats(registry, window_s=window_s)
    page = files("tokenmill.dashboard").joinpath("dashboard.html").read_text(encoding="utf-8")

    @router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @router.get("/dashboard/stats", include_in_schema=False)
    async def dashboard_stats() -> JSONResponse:
        extra_data = extra() if extra is not None else {}
        body = dict(stats.compute())
        body["extra"] = extra_data or {}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return router
