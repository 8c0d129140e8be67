"""The app factory: `create_app(settings)` wires settings, the model repository, the data plane,
metrics, routes, the guard and the one error handler. Run with `rcegate serve` (which adds the
connection limits and the graceful drain) or `uvicorn service.app:create_app --factory`
(settings then come from RCEGATE_* variables).

The lifespan loads the models in a worker thread: `/health/live` answers at once and
`/health/ready` turns true once every loaded model passed its self-test. It owns the data plane
(batchers, decode pool) and stops it last, after the queued work has finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.access import AccessLayer, AccessLog, ApiKeys
from service.dataplane import DataPlane
from service.demo import install_demo
from service.detector import Detector
from service.docs import install_docs
from service.errors import ClientDisconnected, ServiceError, Unavailable
from service.guard import Guard, Lifecycle
from service.imaging import configure_pillow
from service.metrics import Metrics
from service.oip.rest import oip_errors, oip_render
from service.oip.rest import router as oip_router
from service.repository import ModelRepository
from service.routes import PredictFastPath, router
from service.schemas import ErrorBody, ErrorDetail
from service.settings import Settings
from service.text import printable

logger = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(status=status, code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def render_error(exc: ServiceError) -> JSONResponse:
    """A ServiceError in the one error body shape, with its headers (e.g. Retry-After)."""
    return error_response(int(exc.status), exc.code, exc.message, exc.headers)


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The one error handler: every failure becomes `{"error": {status, code, message}}`."""
    if isinstance(exc, ClientDisconnect):
        exc = ClientDisconnected("the client disconnected")
    if isinstance(exc, ClientDisconnected):
        request.app.state.metrics.disconnects.inc()
    headers: dict[str, str] = {}
    if isinstance(exc, ServiceError):
        status, code, message, headers = int(exc.status), exc.code, exc.message, exc.headers
    elif isinstance(exc, RequestValidationError):
        status, code, message = 422, "invalid_parameter", _validation_message(exc)
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        code = _HTTP_CODES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
        message = str(exc.detail)
        headers = dict(exc.headers or {})
    else:
        status, code, message = 500, "internal_error", "internal server error"
    # Client input (the path, filenames in messages) must not split or forge a log line.
    where = f"{request.method} {printable(request.url.path, 256)} -> {status} {code}"
    message_line = printable(message)
    if status == 500:
        # The traceback goes to the log, never into the response body.
        logger.error("%s", where, exc_info=exc)
    elif isinstance(exc, Unavailable | ClientDisconnected):
        # Counted in the metrics; a log line per refusal would only feed an overload.
        logger.debug("%s: %s", where, message_line)
    elif status > 500:
        logger.warning("%s: %s", where, message_line)
    else:
        logger.info("%s: %s", where, message_line)
    return error_response(status, code, message, headers)


def _configure_logging(settings: Settings) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(settings.log_level.upper())


def create_app(settings: Settings | None = None, lifecycle: Lifecycle | None = None) -> FastAPI:
    """The app; a worker process (service/workers.py) passes a `lifecycle` that also sees the
    other workers' readiness and the supervisor's drain."""
    settings = settings or Settings()
    _configure_logging(settings)
    metrics = Metrics()
    repository = ModelRepository(settings)
    plane = DataPlane(settings, repository, metrics, lifecycle)
    access_log = AccessLog(metrics) if settings.access_log else None

    def before_ready(detectors: list[Detector]) -> None:
        metrics.describe_models(detectors)
        plane.start(detectors)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_pillow(settings.max_pixels)
        logger.info("loading models from %s (providers=%s)", settings.model_dir, settings.providers)
        loading = asyncio.create_task(asyncio.to_thread(repository.load, before_ready))
        app.state.loading = loading
        yield
        repository.stop()
        if not loading.done():
            loading.cancel()
        # Whatever is still queued finishes before the inference threads stop.
        await asyncio.to_thread(plane.close, settings.drain_seconds)
        if access_log is not None:
            await asyncio.to_thread(access_log.close)

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
        # Issue 12: no redirect built from the Host header; docs served locally (service/docs.py).
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.repository = repository
    app.state.metrics = metrics
    app.state.plane = plane
    app.state.lifecycle = plane.lifecycle
    app.state.access_log = access_log
    app.include_router(router)
    app.include_router(oip_router)  # Open Inference Protocol v2 over REST (service/oip)
    install_docs(app, settings)
    install_demo(app, settings)
    handled = (ServiceError, RequestValidationError, HTTPException, ClientDisconnect, Exception)
    for exc_class in handled:
        # /v2 answers errors in the protocol's shape `{"error": "..."}`; v1 is unchanged.
        app.add_exception_handler(exc_class, oip_errors(handle_error))
    # The hot v1 predict requests, past routing and dependency solving (service/routes.py).
    app.add_middleware(PredictFastPath, repository=repository, plane=plane, handle=handle_error)
    # --- Trust and access (issue 12): request ids, API keys and the access log, just inside
    # the Guard; CORS (only if configured) between the two, so preflights need no key.
    app.add_middleware(
        AccessLayer,
        settings=settings,
        keys=ApiKeys(settings.api_keys),
        render=oip_render(render_error),
        log=access_log,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    # --- end of trust and access ---
    app.add_middleware(
        Guard,
        metrics=metrics,
        settings=settings,
        lifecycle=plane.lifecycle,
        render=oip_render(render_error),
    )
    return app
