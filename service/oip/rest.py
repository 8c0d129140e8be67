"""The Open Inference Protocol over REST (KServe v2 / Triton HTTP), with Triton's binary tensor
data extension: the routes under /v2, the binary framing, and the OIP error body.

Binary framing: a request whose JSON header is followed by tensor bytes says so with
`Inference-Header-Content-Length: <bytes of JSON>`; an input sent that way carries the
parameter `binary_data_size`, which must equal both the bytes that follow and the bytes its
shape needs. Outputs come back as binary when the request output says `binary_data: true`, or
by default when the request says `binary_data_output: true` (what `tritonclient.http` sends
when it names no outputs); the response then has the same header and `binary_data_size` on
each binary output. Bodies may be gzip or deflate encoded (tritonclient's
`request_compression_algorithm`).

Order of work, as on v1: the model (404, or 503 while draining), the model's queue (503
before the body is read), the body (413/408 while it streams), the header and tensor checks
(400/413), then the data plane. Every step is bounded before it runs (service/oip/bounds.py):
the body, inflated, may hold at most what `max_images` images of the model need (JSON at most
64 KiB + 32 bytes per value; binary data exactly 4 bytes per value), inflating reserves that
much of the in-flight byte budget first, and the JSON's values are counted before it is
parsed. Inflating and parsing over 64 KiB run in the parse pool, off the event loop.

Errors on /v2 answer `{"error": "<message>"}` with the status of the service's error (the
protocol has no 422: invalid parameters are 400).
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
from service.budget import ParsePool, Reservation
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
from service.oip.bounds import (
    MAX_NAME,
    MAX_PARAMETERS,
    MAX_TENSORS,
    MAX_TEXT,
    RequestBounds,
    byte_count,
    json_tokens,
    load_json,
    too_many_values,
)
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
from service.text import shown

PREFIX = "/v2"
HEADER_LENGTH = "inference-header-content-length"
INFLATE_STEP = 64 * 1024  # bytes inflated between two turns of the event loop
BINARY_SIZE = "binary_data_size"


class OipError(BaseModel):
    """The protocol's error body."""

    error: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OipError, "description": text}
    for status, text in {
        400: "A malformed request: JSON, tensor datatype or shape, byte counts, values.",
        401: "An API key is required (when keys are configured).",
        403: "A mode or target_fpr the operator's policy does not permit this client.",
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
    try:
        response = await _infer(plane, name, version, request)
    except BaseException as exc:
        # Not kept in a local: a frame holding its own exception is a reference cycle that
        # keeps the request body alive until the garbage collector runs.
        count(plane.metrics, "oip_rest", exc)
        raise
    count(plane.metrics, "oip_rest", None)
    return response


async def _infer(plane: DataPlane, name: str, version: str | None, request: Request) -> Response:
    arrival = time.monotonic()
    detector = _detector(plane, name, version)
    plane.check_capacity(detector)
    s = plane.settings
    bounds = RequestBounds.of(detector.input_shape, s.max_images)
    encoding = content_encoding(request.headers.get("content-encoding"))
    header_size = header_length(request.headers.get(HEADER_LENGTH), bounds)
    # JSON alone, or a JSON header and binary tensor data: at most what the model can take.
    useful = bounds.json_bytes if header_size is None else header_size + bounds.binary_bytes
    limit = min(s.max_body_bytes, useful)
    body = await read_body(request, limit)
    with Reservation(plane.lifecycle, s.max_inflight_body_bytes, plane.refused) as held:
        if encoding != "identity":
            json_part = limit if header_size is None else header_size
            inflater = Inflater(encoding, limit, json_part, bounds)
            body = await inflater.run(body, held, plane.parsing)
        header, binary = split_body(body, header_size)
        framed = header_size is not None
        decoded = await plane.parsing.run(
            len(header), decode_request, header, binary, detector, s.max_images, framed, bounds
        )
        async with cancel_on_disconnect(request.receive):
            client = request_client(request.scope)
            answer = await infer(plane, detector, decoded.request, plane.deadline(arrival), client)
    return encode_response(answer, decoded.binary_outputs)


# -- the wire format ---------------------------------------------------------------------------


def content_encoding(header: str | None) -> str:
    """identity, gzip or deflate (415 for anything else, before the body is read)."""
    encoding = (header or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {shown(encoding)} is not supported")
    return encoding


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body as sent, refused (413) once it passes `limit`."""
    body = bytearray()
    async for chunk in limited(request, limit).stream():
        body += chunk
    return bytes(body)


class Inflater:
    """A gzip or deflate body inflated up to `limit` bytes (413 beyond), `INFLATE_STEP` bytes
    at a time in the parse pool (zlib releases the GIL): each step's output is reserved in the
    shared byte budget before it is made, and the JSON part's values are counted as they come
    out, so a bomb stops at its first chunk over either bound."""

    def __init__(self, encoding: str, limit: int, json_part: int, bounds: RequestBounds) -> None:
        self.encoding = encoding
        self.limit = limit
        self.json_left = json_part  # bytes of the output that are JSON (the header)
        self.bounds = bounds
        self.tokens = 0
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))

    def _step(self, data: bytes, size: int) -> bytes:
        try:
            chunk = self._zlib.decompress(data, size)
        except zlib.error as exc:
            raise InvalidInput(f"the {self.encoding} body cannot be inflated: {exc}") from None
        if self.json_left > 0:
            self.tokens += json_tokens(chunk[: self.json_left])
            self.json_left -= len(chunk)
            if self.tokens > self.bounds.json_tokens:
                raise too_many_values(self.bounds)
        return chunk

    async def run(self, body: bytes, held: Reservation, pool: ParsePool) -> bytes:
        inflated = bytearray()
        tail = body
        while True:
            step = min(INFLATE_STEP, self.limit + 1 - len(inflated))
            held.resize(len(inflated) + step)
            chunk = await pool.offload(self._step, tail, step)
            inflated += chunk
            if len(inflated) > self.limit:
                raise BodyTooLarge(
                    f"the inflated request body is over the limit of {self.limit} bytes for "
                    "this model"
                )
            tail = self._zlib.unconsumed_tail
            if self._zlib.eof or (not tail and len(chunk) < step):
                break
        held.resize(len(inflated))
        return bytes(inflated)


def header_length(text: str | None, bounds: RequestBounds) -> int | None:
    """Inference-Header-Content-Length: the JSON header's bytes (None: the body is all JSON),
    at most the model's JSON bound (413)."""
    if text is None:
        return None
    size = byte_count(text, "Inference-Header-Content-Length")
    if size > bounds.json_bytes:
        raise BodyTooLarge(
            f"Inference-Header-Content-Length {size} is over the {bounds.json_bytes} bytes "
            "a JSON header for this model may have"
        )
    return size


def split_body(body: bytes, size: int | None) -> tuple[bytes, memoryview]:
    """(JSON header, binary tensor data) by Inference-Header-Content-Length's `size`."""
    if size is None:
        return body, memoryview(b"")
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


def _parameters(value: object, what: str) -> dict[str, Any]:
    parameters = _object(value, what)
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidInput(f"{what} has {len(parameters)} entries, at most {MAX_PARAMETERS}")
    return parameters


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a list")
    if len(value) > MAX_TENSORS:
        raise InvalidInput(f"{what} has {len(value)} entries, at most {MAX_TENSORS}")
    return value


def _flag(parameters: dict[str, Any], key: str, what: str) -> bool | None:
    value = parameters.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{what} parameter {key} must be true or false, got {shown(value)}")
    return value


def _depth(value: object) -> int:
    """How deeply `value` nests lists along its first elements (iteratively, no recursion)."""
    depth = 0
    while isinstance(value, list):
        depth += 1
        value = value[0] if value else None
    return depth


def decode_request(
    header: bytes,
    binary: memoryview,
    detector: Detector,
    max_images: int,
    framed: bool = True,
    bounds: RequestBounds | None = None,
) -> DecodedRest:
    """Parse and check one request (JSON within `bounds`, then every field's type, count and
    length) into the tensor and options the data plane takes."""
    bounds = bounds or RequestBounds.of(detector.input_shape, max_images)
    body = _object(load_json(header, bounds, framed), "the inference request")
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("id must be a string")
    if len(request_id) > MAX_TEXT:
        raise InvalidInput(f"id has {len(request_id)} characters, at most {MAX_TEXT}")
    parameters = _parameters(body.get("parameters"), "parameters")
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
    input_parameters = _parameters(tensor.get("parameters"), "inputs[0].parameters")
    size = input_parameters.get(BINARY_SIZE)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{BINARY_SIZE} must be a byte count, got {shown(size)}")
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
        data = tensor["data"]
        if _depth(data) > len(shape.shape):
            raise InvalidInput(
                f"input 'images': data nests deeper than its shape's {len(shape.shape)} levels"
            )
        images = tensor_from_values(data, shape)

    requested = body.get("outputs")
    names: list[str] | None = None
    binary_outputs: dict[str, bool] = {}
    if requested is not None:
        requested = _list(requested, "outputs")
        names = []
        for i, output in enumerate(requested):
            entry = _object(output, f"outputs[{i}]")
            name = entry.get("name")
            if not isinstance(name, str) or len(name) > MAX_NAME:
                raise InvalidInput(f"outputs[{i}].name must be a name (a string)")
            flag = _flag(
                _parameters(entry.get("parameters"), f"outputs[{i}].parameters"),
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
