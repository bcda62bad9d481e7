"""Operations routes: `/health`, `/ready`, `/metrics`, `/pool`, `/dashboard`."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from serve.errors import error_response
from serve.service import current

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready():
    if await current().ready():
        return {"status": "ready"}
    return error_response(503, "no base actor can generate right now", "not_ready")


@router.get("/metrics")
async def metrics():
    svc = current()
    await svc.snapshot()
    return Response(svc.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/pool")
async def pool():
    return await current().pool_json()


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard():
    return HTMLResponse(resources.files("serve").joinpath("static/dashboard.html").read_text())
