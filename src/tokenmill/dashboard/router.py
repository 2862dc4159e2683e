"""`dashboard_router(registry)`: GET /dashboard (the page) and GET /dashboard/stats (its JSON)."""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CollectorRegistry

from tokenmill.dashboard.stats import DashboardStats

# What the page shows about the process next to its live figures (the server fills them from /version's
# precision keys; the gateway has only uptime). Absent keys are shown as "-".
_INFO_KEYS = ("dtype", "quantization", "kv_cache_dtype", "device", "cpu", "cpu_kernels")


def process_info(started: float, precision: dict, now: float | None = None) -> dict:
    """Uptime (seconds since `started`, a time.time()) and the model's numeric choices for the page.
    Before the model has loaded the CPU is still known, so the page never shows an empty CPU line."""
    from tokenmill.kernels.cpu_features import host_cpu_features

    info = {k: precision.get(k) for k in _INFO_KEYS}
    if info["cpu"] is None and info["device"] in (None, "cpu"):
        info["cpu"] = host_cpu_features().describe()
    info["uptime_s"] = round((time.time() if now is None else now) - started, 1)
    return info


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
