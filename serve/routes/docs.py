"""`/docs` (Swagger UI) and `/redoc`, working offline: their scripts and styles come from the
`fastapi-offline` package's files, served here, never from a CDN (a cluster often has no way out).
A Content-Security-Policy keeps the pages to this server: ReDoc's bundle would fetch its logo from
its CDN, which the browser then never asks for."""
from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from serve.errors import APIError

ASSETS = Path(fastapi_offline.__file__).parent / "static"
SERVED = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
PREFIX = "/docs/assets"

router = APIRouter(include_in_schema=False)
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


def _local(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get("/docs")
async def swagger() -> HTMLResponse:
    return _local(get_swagger_ui_html(openapi_url="/openapi.json", title="FA Pool API",
                                      swagger_js_url=f"{PREFIX}/swagger-ui-bundle.js", swagger_css_url=f"{PREFIX}/swagger-ui.css",
                                      swagger_favicon_url=f"{PREFIX}/favicon.png"))


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return _local(get_redoc_html(openapi_url="/openapi.json", title="FA Pool API",
                                 redoc_js_url=f"{PREFIX}/redoc.standalone.js", redoc_favicon_url=f"{PREFIX}/favicon.png",
                                 with_google_fonts=False))


@router.get(PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in SERVED:  # a fixed list: no path from the client reaches the filesystem
        raise APIError(404, f"no docs asset {name!r}", "not_found")
    return FileResponse(ASSETS / name, headers={"Cache-Control": "public, max-age=86400"})
