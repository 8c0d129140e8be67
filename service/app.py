"""The app factory: `create_app(settings)` wires settings, the model repository, metrics, routes
and the one error handler. Run with `rcegate serve` or
`uvicorn service.app:create_app --factory` (settings then come from RCEGATE_* variables).

The lifespan loads the models in a worker thread: `/health/live` answers at once and
`/health/ready` turns true once every loaded model passed its self-test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ServiceError
from service.imaging import configure_pillow
from service.metrics import Metrics
from service.repository import ModelRepository
from service.routes import router
from service.schemas import ErrorBody, ErrorDetail
from service.settings import Settings

logger = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one error handler: every failure becomes `{"error": {status, code, message}}`."""
    if isinstance(exc, ServiceError):
        status, code, message = int(exc.status), exc.code, exc.message
    elif isinstance(exc, RequestValidationError):
        status, code, message = 422, "invalid_parameter", _validation_message(exc)
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        code = _HTTP_CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
        message = str(exc.detail)
    else:
        status, code, message = 500, "internal_error", "internal server error"
    where = f"{request.method} {request.url.path} -> {status} {code}"
    if status == 500:
        # The traceback goes to the log, never into the response body.
        logger.error("%s", where, exc_info=exc)
    elif status > 500:
        logger.warning("%s: %s", where, message)
    else:
        logger.info("%s: %s", where, message)
    body = ErrorBody(error=ErrorDetail(status=status, code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status)


class HttpMetricsMiddleware:
    """Counts requests and latency by route template (never the raw path), method and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_duration.labels(route, method).observe(time.perf_counter() - start)


def _configure_logging(settings: Settings) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(settings.log_level.upper())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _configure_logging(settings)
    metrics = Metrics()
    repository = ModelRepository(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_pillow(settings.max_pixels)
        logger.info("loading models from %s (providers=%s)", settings.model_dir, settings.providers)
        loading = asyncio.create_task(asyncio.to_thread(repository.load, metrics.describe_models))
        app.state.loading = loading
        yield
        if not loading.done():
            loading.cancel()

    app = FastAPI(
        title="rcegate",
        summary="Image classification that says whether to trust each answer.",
        description=(
            "Predictions from a Reverse Cross-Entropy model with the K-density thresholding test "
            "of Pang et al., NeurIPS 2018: an image is accepted iff its detection score is at "
            "least the threshold calibrated for the target false-positive rate."
        ),
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.repository = repository
    app.state.metrics = metrics
    app.include_router(router)
    for exc_class in (ServiceError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_class, handle_error)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return app
