"""/docs and /openapi.json: Swagger UI from an installed package (no CDN), and a schema that says
exactly what the service accepts.

FastAPI's own /docs loads Swagger UI from a CDN (a blank page offline, and a third party in the
operator's browser); here its assets come from the `fastapi-offline` package (Swagger UI 5,
which renders OpenAPI 3.1) and /redoc is off. The schema gets what the route declarations cannot
say: the image count limits of the `files` array (from the settings), 401 when API keys are on,
429 when probers are throttled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from service.settings import Settings

DOCS = "/docs"
ASSETS = "/docs/assets"
OPEN = ("/health/", "/v2/health/")
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def install_docs(app: FastAPI, settings: Settings) -> None:
    """Serve /docs from local assets and an exact /openapi.json (both only if `settings.docs`)."""
    if not settings.docs:
        return
    import fastapi_offline

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount(ASSETS, StaticFiles(directory=assets), name="docs-assets")

    @app.get(DOCS, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="rcegate",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = exact(schema, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def exact(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Add the limits and answers the route declarations leave out."""
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            body = operation.get("requestBody", {}).get("content", {})
            multipart = body.get("multipart/form-data", {}).get("schema", {})
            files = multipart.get("properties", {}).get("files")
            responses = operation.setdefault("responses", {})
            if files is not None:
                files.update(minItems=1, maxItems=settings.max_images)
                if settings.prober_throttle:
                    responses.setdefault("429", _error("Throttled as a prober (`Retry-After`)."))
            open_metrics = path == "/metrics" and not settings.metrics_require_key
            if settings.api_keys and not path.startswith(OPEN) and not open_metrics:
                responses.setdefault("401", _error("No valid API key (`WWW-Authenticate`)."))
    return schema


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}
