"""The web viewer: `GET /` serves its page, `GET /static/...` its scripts, styles, colour tables
and example images, all from the package's `static/` folder (no build step, nothing fetched
from elsewhere). The page talks to the /v1 API like any other client."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

__all__ = ["STATIC", "router"]

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@functools.cache
def _files() -> dict[str, Path]:
    """Every file under static/, by its path relative to it: the only paths served."""
    return {p.relative_to(STATIC).as_posix(): p for p in STATIC.rglob("*") if p.is_file()}


@router.get("/")
async def index() -> FileResponse:
    """The viewer's page."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/static/{path:path}")
async def static(path: str) -> FileResponse:
    """One of the viewer's files; 404 for any other path."""
    found = _files().get(path)
    if found is None:
        raise HTTPException(404, f"no static file {path!r}")
    return FileResponse(found)
