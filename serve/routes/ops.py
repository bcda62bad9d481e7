"""Operations routes: `/health`, `/ready`, `/metrics`, `/pool`, `/pool/history`, `/dashboard`."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from serve.errors import error_response
from serve.history import history
from serve.liveness import Liveness
from serve.service import current

router = APIRouter()


_liveness = Liveness()


@router.get("/health")
async def health():
    """Live while some base actor can generate (as vLLM's is while its engine is), asked now
    (serve/liveness.py); the bases restart by themselves, so a 503 here is an outage worth a page,
    not a reason to restart."""
    sup = current().supervisor
    if await _liveness.any_live(list(sup.bases), list(sup.healthy)):
        return {"status": "ok", "pool": current().pool_state()}  # the pool's state (pool owner's field)
    return error_response(503, "no base actor is alive (all dead or restarting)", "unhealthy")


@router.get("/ready")
async def ready():
    svc = current()
    if svc.draining():
        return error_response(503, "the server is shutting down", "shutting_down")
    if await svc.ready():
        return {"status": "ready"}
    return error_response(503, "no base actor can generate right now", "not_ready")


@router.get("/metrics")
async def metrics():
    svc = current()
    await svc.snapshot()
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/pool")
async def pool():
    svc = current()
    history.start(svc.pool_json)
    return await svc.pool_json()


@router.get("/pool/history")
async def pool_history(since: float | None = None):
    """The dashboard's samples of the last hour (after `since`, a Unix time, if given)."""
    svc = current()
    history.start(svc.pool_json)
    return {"every_s": history.every_s, "window_s": history.window_s, "samples": history.samples(since)}


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard():
    return HTMLResponse(resources.files("serve").joinpath("static/dashboard.html").read_text())
