"""Pages for people, served by this process with every asset they load (no CDN; works offline).

- `/playground`: a form for both endpoints, live progress and previews, the result and code snippets
  (`static/playground.*`, plain HTML/CSS/JS, no build step).
- `/docs` (Swagger UI) and `/redoc` (ReDoc) over `/openapi.json`, from the Swagger UI and ReDoc builds that
  the `fastapi-offline` package ships (FastAPI's own pages load them from a CDN).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from ovi_server.config import load_variant
from ovi_server.shapes import size_note

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = "/docs/assets"
PLAYGROUND_ASSETS = "/playground/assets"


def _docs_static() -> Path:
    return Path(str(importlib.resources.files("fastapi_offline") / "static"))


# ReDoc's sidebar credit shows a logo from Redocly's CDN; our copy points it at a local picture instead.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def install(app: FastAPI) -> None:
    """Routes for the pages (out of the OpenAPI document); call with docs_url=None, redoc_url=None."""
    redoc_js = (
        (_docs_static() / "redoc.standalone.js")
        .read_bytes()
        .replace(REDOC_LOGO, f"{DOCS_ASSETS}/favicon.png".encode())
    )

    @app.get(f"{DOCS_ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_script() -> Response:  # before the mount, which would serve the original
        return Response(redoc_js, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})

    app.mount(DOCS_ASSETS, StaticFiles(directory=_docs_static()), name="docs-assets")
    app.mount(PLAYGROUND_ASSETS, StaticFiles(directory=STATIC), name="playground-assets")

    @app.get("/playground", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "playground.html", media_type="text/html")

    @app.get("/playground/config.json", include_in_schema=False)
    async def playground_config(request: Request) -> dict[str, Any]:
        """What the page needs to know about this server: whether it asks for a key, the model."""
        config = request.app.state.config
        variant = load_variant(config.engine.variant)
        note = size_note(variant.name, variant.video_area)
        if variant.random_weights_seed is not None and config.engine.weights_dir is None:
            note = f"{note}. Random weights: the pictures and sound are noise."
        return {
            "auth": not request.app.state.keys.open,
            "variant": variant.name,
            "previews": config.engine.preview_every,
            "tls_port": config.tls_port,
            "note": note,
        }

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            # the default validator badge asks validator.swagger.io about the document
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
