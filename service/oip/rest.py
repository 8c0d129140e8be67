"""The Open Inference Protocol over REST (KServe v2 / Triton HTTP), with Triton's binary tensor
data extension: the routes under /v2, the binary framing, and the OIP error body.

Binary framing: a request whose JSON header is followed by tensor bytes says so with
`Inference-Header-Content-Length: <bytes of JSON>`; an input sent that way carries the
parameter `binary_data_size`, which must equal both the bytes that follow and the bytes its
shape needs. Outputs come back as binary when the request output says `binary_data: true`, or
by default when the request says `binary_data_output: true` (what `tritonclient.http` sends
when it names no outputs); the response then has the same header and `binary_data_size` on
each binary output. Bodies may be gzip or deflate encoded (tritonclient's
`request_compression_algorithm`); they are inflated up to `max_body_bytes` and no further.

Order of work, as on v1: the model (404, or 503 while draining), the model's queue (503
before the body is read), the body (413/408 while it streams), the header and tensor checks
(400/413), then the data plane. Errors on /v2 answer `{"error": "<message>"}` with the status
of the service's error (the protocol has no 422: invalid parameters are 400).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from service.access import request_client
from service.dataplane import DataPlane
from service.deps import PlaneDep, RepositoryDep, SettingsDep
from service.detector import Detector
from service.errors import (
    BodyTooLarge,
    InvalidInput,
    ServiceError,
    UnsupportedMediaType,
)
from service.guard import cancel_on_disconnect
from service.oip.codec import (
    check_input_header,
    datatype_of,
    little_endian_bytes,
    parse_options,
    tensor_from_bytes,
    tensor_from_values,
)
from service.oip.infer import InferAnswer, InferRequest, count, infer, plan_outputs
from service.oip.metadata import model_config, model_metadata, parse_version, server_metadata
from service.payload import limited

PREFIX = "/v2"
HEADER_LENGTH = "inference-header-content-length"
BINARY_SIZE = "binary_data_size"


class OipError(BaseModel):
    """The protocol's error body."""

    error: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OipError, "description": text}
    for status, text in {
        400: "A malformed request: JSON, tensor datatype or shape, byte counts, values.",
        401: "An API key is required (when keys are configured).",
        404: "Unknown model or version.",
        405: "Wrong method.",
        408: "The body did not arrive within the body timeout.",
        413: "Body over the byte limit, or too many images.",
        429: "This client is throttled as a prober.",
        503: "Loading, overloaded, deadline passed or shutting down: retry after Retry-After.",
    }.items()
}
router = APIRouter(prefix=PREFIX, tags=["open inference protocol (v2)"], responses=_ERRORS)


# -- server ------------------------------------------------------------------------------------


@router.get("", summary="Server metadata")
async def get_server() -> dict[str, Any]:
    return server_metadata()


@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness (503 while loading or draining)")
async def ready(plane: PlaneDep) -> dict[str, bool]:
    plane.check_ready()
    return {"ready": True}


# -- models ------------------------------------------------------------------------------------


def _detector(plane: DataPlane, name: str, version: str | None) -> Detector:
    return plane.model(name, parse_version(name, version))


@router.get("/models/{name}", summary="Model metadata (newest version)")
async def get_model(name: str, plane: PlaneDep, repository: RepositoryDep) -> dict[str, Any]:
    return model_metadata(_detector(plane, name, None), repository)


@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def get_model_version(
    name: str, version: str, plane: PlaneDep, repository: RepositoryDep
) -> dict[str, Any]:
    return model_metadata(_detector(plane, name, version), repository)


@router.get("/models/{name}/ready", summary="Model readiness (newest version)")
async def model_ready(name: str, plane: PlaneDep) -> dict[str, Any]:
    return {"name": _detector(plane, name, None).name, "ready": True}


@router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness")
async def model_version_ready(name: str, version: str, plane: PlaneDep) -> dict[str, Any]:
    return {"name": _detector(plane, name, version).name, "ready": True}


@router.get("/models/{name}/config", summary="Triton model configuration (newest version)")
async def get_config(name: str, plane: PlaneDep, settings: SettingsDep) -> dict[str, Any]:
    return model_config(_detector(plane, name, None), settings)


@router.get("/models/{name}/versions/{version}/config", summary="Triton model configuration")
async def get_version_config(
    name: str, version: str, plane: PlaneDep, settings: SettingsDep
) -> dict[str, Any]:
    return model_config(_detector(plane, name, version), settings)


def _stats(detector: Detector) -> dict[str, Any]:
    # rcegate's statistics are its Prometheus metrics; Triton's clients accept an empty entry.
    return {"model_stats": [{"name": detector.name, "version": str(detector.version)}]}


@router.get("/models/{name}/stats", summary="Inference statistics (see /metrics)")
async def get_stats(name: str, plane: PlaneDep) -> dict[str, Any]:
    return _stats(_detector(plane, name, None))


@router.get("/models/{name}/versions/{version}/stats", summary="Inference statistics")
async def get_version_stats(name: str, version: str, plane: PlaneDep) -> dict[str, Any]:
    return _stats(_detector(plane, name, version))


_INFER: dict[str, Any] = {
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "An OIP inference request: JSON, or JSON followed by binary tensor "
            "data (Triton's extension; set Inference-Header-Content-Length).",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }
}


@router.post("/models/{name}/infer", summary="Inference (newest version)", **_INFER)
async def post_infer(name: str, plane: PlaneDep, request: Request) -> Response:
    return await _counted(plane, name, None, request)


@router.post("/models/{name}/versions/{version}/infer", summary="Inference", **_INFER)
async def post_version_infer(
    name: str, version: str, plane: PlaneDep, request: Request
) -> Response:
    return await _counted(plane, name, version, request)


async def _counted(plane: DataPlane, name: str, version: str | None, request: Request) -> Response:
    error: BaseException | None = None
    try:
        return await _infer(plane, name, version, request)
    except BaseException as exc:
        error = exc
        raise
    finally:
        count(plane.metrics, "oip_rest", error)


async def _infer(plane: DataPlane, name: str, version: str | None, request: Request) -> Response:
    arrival = time.monotonic()
    detector = _detector(plane, name, version)
    plane.check_capacity(detector)
    s = plane.settings
    body = await read_body(request, s.max_body_bytes)
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    framed = HEADER_LENGTH in request.headers
    decoded = decode_request(header, binary, detector, s.max_images, framed)
    async with cancel_on_disconnect(request.receive):
        client = request_client(request.scope)
        answer = await infer(plane, detector, decoded.request, plane.deadline(arrival), client)
    return encode_response(answer, decoded.binary_outputs)


# -- the wire format ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) once it passes `limit`; gzip/deflate inflated likewise."""
    body = bytearray()
    async for chunk in limited(request, limit).stream():
        body += chunk
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return bytes(body)
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        inflated = inflater.decompress(bytes(body), limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the {encoding} body cannot be inflated: {exc}") from None
    if len(inflated) > limit:
        raise BodyTooLarge(f"the inflated request body is over the limit of {limit} bytes")
    return inflated


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) by Inference-Header-Content-Length."""
    if header_length is None:
        return body, memoryview(b"")
    if not header_length.strip().isdigit():
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a byte count: {header_length!r}"
        )
    size = int(header_length)
    if not 0 < size <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {size} does not fit a body of {len(body)} bytes"
        )
    return body[:size], memoryview(body)[size:]


class DecodedRest:
    def __init__(self, request: InferRequest, binary_outputs: dict[str, bool]) -> None:
        self.request = request
        self.binary_outputs = binary_outputs  # output name -> returned as binary


def _object(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _flag(parameters: dict[str, Any], key: str, what: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{what} parameter {key} must be true or false, got {value!r}")
    return value


def decode_request(
    header: bytes, binary: memoryview, detector: Detector, max_images: int, framed: bool = True
) -> DecodedRest:
    try:
        document = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        # Only a JSON header followed by other bytes (or bytes that are not text) looks like
        # binary tensor data sent without its framing header; plain bad JSON gets no hint.
        binary_like = isinstance(exc, UnicodeDecodeError) or exc.msg == "Extra data"
        hint = (
            " (binary tensor data needs Inference-Header-Content-Length)"
            if binary_like and not framed
            else ""
        )
        raise InvalidInput(f"the inference request is not valid JSON: {exc}{hint}") from None
    body = _object(document, "the inference request")
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("id must be a string")
    parameters = _object(body.get("parameters"), "parameters")
    options = parse_options(parameters)
    default_binary = bool(_flag(parameters, "binary_data_output", "the request's"))

    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = len(inputs) if isinstance(inputs, list) else "no list of"
        raise InvalidInput(f"the model takes exactly one input, 'images'; got {got} inputs")
    tensor = _object(inputs[0], "inputs[0]")
    shape = check_input_header(
        tensor.get("name"),
        tensor.get("datatype"),
        tensor.get("shape"),
        detector.input_shape,
        max_images,
    )
    input_parameters = _object(tensor.get("parameters"), "inputs[0].parameters")
    size = input_parameters.get(BINARY_SIZE)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{BINARY_SIZE} must be a byte count, got {size!r}")
        if "data" in tensor:
            raise InvalidInput("input 'images' has both data and binary_data_size")
        if size != len(binary):
            raise InvalidInput(
                f"input 'images' declares {BINARY_SIZE} {size} but {len(binary)} bytes of "
                "binary data follow the JSON header"
            )
        images = tensor_from_bytes(binary, shape)
    else:
        if len(binary):
            raise InvalidInput(
                f"{len(binary)} bytes follow the JSON header but no input has {BINARY_SIZE}"
            )
        if "data" not in tensor:
            raise InvalidInput("input 'images' has neither data nor binary_data_size")
        images = tensor_from_values(tensor["data"], shape)

    requested = body.get("outputs")
    names: list[str] | None = None
    binary_outputs: dict[str, bool] = {}
    if requested is not None:
        if not isinstance(requested, list):
            raise InvalidInput("outputs must be a list")
        names = []
        for i, output in enumerate(requested):
            entry = _object(output, f"outputs[{i}]")
            name = entry.get("name")
            if not isinstance(name, str):
                raise InvalidInput(f"outputs[{i}].name must be a string")
            flag = _flag(
                _object(entry.get("parameters"), f"outputs[{i}].parameters"),
                "binary_data",
                f"outputs[{i}]",
            )
            names.append(name)
            binary_outputs[name] = default_binary if flag is None else flag
    outputs = plan_outputs(detector, options, names)
    for name in outputs:
        binary_outputs.setdefault(name, default_binary)
    return DecodedRest(InferRequest(request_id, images, options, outputs), binary_outputs)


def encode_response(answer: InferAnswer, binary_outputs: dict[str, bool]) -> Response:
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in answer.outputs:
        array = answer.tensors[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if binary_outputs[name]:
            data = little_endian_bytes(array)
            entry["parameters"] = {BINARY_SIZE: len(data)}
            blobs.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": answer.detector.name,
        "model_version": str(answer.detector.version),
    }
    if answer.id:
        document["id"] = answer.id
    document["parameters"] = answer.parameters
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *blobs]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# -- errors --------------------------------------------------------------------------------------

Handler = Callable[[Request, Exception], Awaitable[Response]]


def is_oip(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def oip_body(response: Response) -> JSONResponse:
    """The service's error response, reshaped to the protocol's `{"error": "<message>"}`."""
    try:
        message = json.loads(bytes(response.body))["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = "internal server error"
    status = 400 if response.status_code == 422 else response.status_code
    keep = {
        k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")
    }
    return JSONResponse({"error": message}, status_code=status, headers=keep)


def oip_errors(handler: Handler) -> Handler:
    """Wrap the app's one error handler: /v2 paths get the OIP body, the rest are unchanged
    (the status, headers and log line stay the handler's own)."""

    async def handle(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        return oip_body(response) if is_oip(request.url.path) else response

    return handle


def oip_render(render: Callable[[ServiceError], Response]) -> Callable[[ServiceError], ASGIApp]:
    """Wrap the guard's renderer likewise (refusals before routing: overload, drain)."""

    def rendered(exc: ServiceError) -> ASGIApp:
        response = render(exc)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            chosen = oip_body(response) if is_oip(scope["path"]) else response
            await chosen(scope, receive, send)

        return app

    return rendered
