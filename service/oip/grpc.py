"""The Open Inference Protocol over gRPC: `inference.GRPCInferenceService` with grpc.aio.

The server runs on the HTTP server's event loop and shares everything with REST: the data
plane (models, batchers, admission, deadlines), the concurrency cap and in-flight count of
the drain (`Lifecycle`), the limits and the metrics. `rcegate serve` starts it on
`grpc_port` (0: off) after the HTTP listener, and stops it before the data plane closes.

Messages come from service/oip/oip.proto (wire-compatible with the published protocol; see
there why its package is private), and the service is registered by hand under the protocol's
name, so no generated stub module is needed. Inputs may come as `raw_input_contents` (what
tritonclient sends) or `contents.fp32_contents`; outputs always go back as
`raw_output_contents`, as Triton does. The checks are the REST ones (codec.py). Errors carry
the service's message with a gRPC status: 400/413/422 INVALID_ARGUMENT, 404 NOT_FOUND,
503 UNAVAILABLE (with `retry-after` in the trailing metadata), DEADLINE_EXCEEDED when the
deadline passed, CANCELLED when the client went away, INTERNAL for a bug (logged, never
described). A client's own gRPC deadline shortens the request's deadline.

Cost before trust (issue 21): every method is served from raw bytes (no deserializer), so a
call's API key is checked from its metadata before a byte of its message is read: a call with
a wrong key costs its headers only (the message stays in the transport's flow-control window
and is dropped). Then ModelInfer passes the drain and the concurrency cap, the call reserves twice
`grpc_max_message_bytes` of the worker's in-flight byte budget (shared with HTTP bodies;
UNAVAILABLE + retry-after beyond: gRPC's buffer and the bytes handed over) and reads its
message within `body_timeout` (DEADLINE_EXCEEDED), keeping twice the message's own size
reserved (the bytes and the parsed message) until it is answered. The message
is checked on its bytes (service/oip/wire.py: field counts, lengths, at most 4,096 fields)
before it is parsed, and parsed in the parse pool when it is over 64 KiB. Messages above
`grpc_max_message_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED); every request but
ModelInfer's may hold 64 KiB; ServerLive, ServerReady and ServerMetadata are never read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc import aio

from service.access import ApiKeys, TrustedProxies, client_name, peer_address
from service.budget import ParsePool, Reservation
from service.dataplane import DataPlane
from service.detector import Detector
from service.errors import (
    BodyTimeout,
    InvalidInput,
    ModelNotFound,
    ServiceError,
    TooManyRequests,
    Unavailable,
)
from service.guard import Lifecycle
from service.metrics import Metrics
from service.oip import oip_pb2 as pb
from service.oip.codec import (
    check_input_header,
    datatype_of,
    little_endian_bytes,
    parse_options,
    tensor_from_bytes,
    tensor_from_fp32,
)
from service.oip.infer import InferAnswer, InferRequest, count, infer, plan_outputs
from service.oip.metadata import model_config, model_metadata, parse_version, server_metadata
from service.oip.wire import INFER_REQUEST, NAMED_REQUEST, Schema, check
from service.repository import ModelRepository
from service.settings import Settings

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    if error.code == "deadline_exceeded":
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return _CODES.get(int(error.status), grpc.StatusCode.INTERNAL)


def parameters_of(parameters: Any) -> dict[str, object]:
    """A map<string, InferParameter> as plain Python values."""
    values: dict[str, object] = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = None if choice is None else getattr(parameter, choice)
    return values


def set_parameter(parameter: pb.InferParameter, value: object) -> None:
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        parameter.int64_param = value
    elif isinstance(value, float):
        parameter.double_param = value
    else:
        parameter.string_param = str(value)


def decode_request(
    request: pb.ModelInferRequest, detector: Detector, max_images: int
) -> InferRequest:
    options = parse_options(parameters_of(request.parameters))
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"the model takes exactly one input, 'images'; got {len(request.inputs)} inputs"
        )
    tensor = request.inputs[0]
    header = check_input_header(
        tensor.name, tensor.datatype, list(tensor.shape), detector.input_shape, max_images
    )
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents holds {len(request.raw_input_contents)} tensors for 1 input"
            )
        if tensor.HasField("contents"):
            raise InvalidInput("input 'images' has both contents and raw_input_contents")
        images = tensor_from_bytes(request.raw_input_contents[0], header)
    else:
        contents = tensor.contents
        others = [f.name for f, _ in contents.ListFields() if f.name != "fp32_contents"]
        if others:
            raise InvalidInput(
                f"input 'images' is FP32 and must use fp32_contents, not {', '.join(others)}"
            )
        images = tensor_from_fp32(contents.fp32_contents, header)
    requested = [output.name for output in request.outputs] if request.outputs else None
    outputs = plan_outputs(detector, options, requested)
    return InferRequest(request.id, images, options, outputs)


def encode_response(answer: InferAnswer) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(
        model_name=answer.detector.name,
        model_version=str(answer.detector.version),
        id=answer.id,
    )
    for key, value in answer.parameters.items():
        set_parameter(response.parameters[key], value)
    for name in answer.outputs:
        array = answer.tensors[name]
        output = response.outputs.add()
        output.name = name
        output.datatype = datatype_of(array)
        output.shape.extend(array.shape)
        response.raw_output_contents.append(little_endian_bytes(array))
    return response


def config_message(config: dict[str, Any]) -> pb.ModelConfig:
    message = pb.ModelConfig(
        name=config["name"],
        platform=config["platform"],
        backend=config["backend"],
        max_batch_size=config["max_batch_size"],
        dynamic_batching=pb.ModelDynamicBatching(**config["dynamic_batching"]),
    )
    for spec in config["input"]:
        message.input.add(
            name=spec["name"], data_type=pb.DataType.Value(spec["data_type"]), dims=spec["dims"]
        )
    for spec in config["output"]:
        output = message.output.add(
            name=spec["name"], data_type=pb.DataType.Value(spec["data_type"]), dims=spec["dims"]
        )
        if "reshape" in spec:
            output.reshape.SetInParent()  # shape [] is the message's default
    for key, value in config["parameters"].items():
        message.parameters[key].string_value = value["string_value"]
    return message


Rpc = Callable[[Any, aio.ServicerContext[Any, Any]], Awaitable[Message]]


@dataclass
class InferenceService:
    """The RPCs; each one translates a message to data-plane calls and back."""

    plane: DataPlane
    repository: ModelRepository
    lifecycle: Lifecycle
    metrics: Metrics
    settings: Settings

    def _model(self, name: str, version: str) -> Detector:
        return self.plane.model(name, parse_version(name, version))

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> Message:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> Message:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> Message:  # noqa: N802
        if not self.plane.ready:
            return pb.ModelReadyResponse(ready=False)
        try:
            self._model(request.name, request.version)
        except ModelNotFound:  # not ready, as tritonclient.http reports a 404 here
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> Message:  # noqa: N802
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> Message:  # noqa: N802
        metadata = model_metadata(self._model(request.name, request.version), self.repository)
        response = pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"]
        )
        for spec in metadata["inputs"]:
            response.inputs.add(**spec)
        for spec in metadata["outputs"]:
            response.outputs.add(**spec)
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> Message:  # noqa: N802
        detector = self._model(request.name, request.version)
        return pb.ModelConfigResponse(config=config_message(model_config(detector, self.settings)))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> Message:  # noqa: N802
        detectors = (
            [self._model(request.name, request.version)]
            if request.name
            else self.repository.detectors()
        )
        return pb.ModelStatisticsResponse(
            model_stats=[pb.ModelStatistics(name=d.name, version=str(d.version)) for d in detectors]
        )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> Message:  # noqa: N802
        try:
            answer = await self._infer(request, context)
        except BaseException as exc:
            # Not kept in a local: a frame holding its own exception is a reference cycle that
            # keeps the request (megabytes) alive until the garbage collector runs.
            count(self.metrics, "oip_grpc", exc)
            raise
        count(self.metrics, "oip_grpc", None)
        return answer

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> Message:
        # The gate (`Gate.admitted`) already counted this call against the concurrency cap
        # and the drain, before its message was read.
        arrival = time.monotonic()
        plane = self.plane
        plane.check_open()
        detector = self._model(request.model_name, request.model_version)
        plane.check_capacity(detector)
        decoded = decode_request(request, detector, self.settings.max_images)
        deadline = plane.deadline(arrival)
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, time.monotonic() + remaining)
        answer = await infer(plane, detector, decoded, deadline, CLIENT.get())
        return encode_response(answer)


_MESSAGES: dict[str, tuple[type[Message], type[Message]]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelStatistics": (pb.ModelStatisticsRequest, pb.ModelStatisticsResponse),
}


# Health RPCs stay open like /health and /v2/health; every other RPC needs a key when keys are on.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
# Requests without fields: their message is never read.
UNREAD_RPCS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})
# The largest request message of every RPC but ModelInfer (a name and a version).
SMALL_MESSAGE_BYTES = 64 * 1024
# Copies of a request message held at once while it is received and parsed.
COPIES = 2
# Who is calling (`key:<id>` or `addr:<ip>`), for prober tracking in ModelInfer.
CLIENT: ContextVar[str | None] = ContextVar("rcegate_grpc_client", default=None)


def _authorize(method: str, keys: ApiKeys, proxies: TrustedProxies, context: Any) -> None:
    """The API key from the call's metadata (`authorization: Bearer ...` or `x-api-key`), read
    before any byte of the message."""
    metadata = context.invocation_metadata() or ()
    headers = {str(k).lower(): str(v) for k, v in metadata}
    identity = None if method in OPEN_RPCS else keys.authorize(headers)
    forwarded = [str(v) for k, v in metadata if str(k).lower() == "x-forwarded-for"]
    address = proxies.client(peer_address(str(context.peer() or "")), forwarded)
    CLIENT.set(client_name(identity, address))


def parse_message(raw: bytes, kind: type[Message], schema: Schema) -> Message:
    """A request message from its bytes: bounded on the wire first (service/oip/wire.py)."""
    name = kind.DESCRIPTOR.name
    check(raw, schema, name)
    try:
        return kind.FromString(raw)
    except DecodeError:
        raise InvalidInput(f"the {name} message is not valid protobuf") from None


@dataclass
class Receiver:
    """Reads one call's request message under the worker's byte budget and deadlines."""

    lifecycle: Lifecycle
    settings: Settings
    pool: ParsePool

    async def receive(
        self, method: str, kind: type[Message], context: Any, held: Reservation
    ) -> Message:
        s = self.settings
        # Reserved before a byte is read: the most gRPC may buffer for the message, twice
        # (its buffer and the bytes handed over; then the bytes and the parsed message).
        held.resize(COPIES * s.grpc_message_limit)
        try:
            raw = await asyncio.wait_for(context.read(), s.body_timeout)
        except TimeoutError:
            raise BodyTimeout(
                f"the request message did not arrive within {s.body_timeout:g} s"
            ) from None
        if raw is aio.EOF or not isinstance(raw, bytes):
            raise InvalidInput("the call carried no request message")
        held.resize(COPIES * len(raw))
        if method != "ModelInfer" and len(raw) > SMALL_MESSAGE_BYTES:
            raise InvalidInput(
                f"a {method} request of {len(raw)} bytes; at most {SMALL_MESSAGE_BYTES}"
            )
        schema = INFER_REQUEST if method == "ModelInfer" else NAMED_REQUEST
        return await self.pool.run(len(raw), parse_message, raw, kind, schema)


def _forget(error: BaseException) -> None:
    """Drop the frames an error carries (and with them the request message, megabytes).
    `context.abort` raises an AbortError chained to this error, and grpc.aio's handling of it
    forms a reference cycle: without this, every refused message stayed in memory until the
    garbage collector ran (issue 21: 40 refused 4 MiB messages held 300 MB)."""
    error.__traceback__ = None


def _instrumented(
    method: str,
    rpc: Rpc,
    kind: type[Message],
    metrics: Metrics,
    gate: Gate,
) -> Callable[[AsyncIterator[bytes], aio.ServicerContext[Any, Any]], Awaitable[Message]]:
    """API keys, admission, the byte budget, metrics for every call, and the service's errors
    as gRPC statuses."""
    requests = metrics.grpc_requests
    duration = metrics.grpc_duration.labels(method)

    async def call(_: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]) -> Message:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            _authorize(method, gate.keys, gate.proxies, context)
            if method in UNREAD_RPCS:
                return await rpc(kind(), context)
            budget = gate.settings.max_inflight_body_bytes
            refused = gate.plane.refused
            with gate.admitted(method), Reservation(gate.lifecycle, budget, refused) as held:
                # No local for the request: see `_forget` below.
                return await rpc(await gate.receiver.receive(method, kind, context, held), context)
        except ServiceError as exc:
            code = status_code(exc)
            trailing = (
                (("retry-after", str(exc.retry_after)),) if isinstance(exc, Unavailable) else ()
            )
            if code == grpc.StatusCode.INTERNAL:
                logger.error("%s/%s -> %s", SERVICE, method, code.name, exc_info=exc)
                _forget(exc)
                await context.abort(code, "internal server error")
            _forget(exc)
            await context.abort(code, exc.message, trailing_metadata=trailing)
            raise  # abort raised already; this line only tells mypy
        except asyncio.CancelledError:  # the client cancelled or went away: its images are freed
            code = grpc.StatusCode.CANCELLED
            metrics.disconnects.inc()
            raise
        except aio.AbortError:
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            logger.error("%s/%s -> INTERNAL", SERVICE, method, exc_info=exc)
            _forget(exc)
            await context.abort(code, "internal server error")
            raise
        finally:
            requests.labels(method, code.name).inc()
            duration.observe(time.perf_counter() - start)

    return call


@dataclass
class Gate:
    """What a call passes before its message is read: its key, then (ModelInfer) the drain and
    the concurrency cap shared with HTTP, then the byte budget (`Receiver`)."""

    keys: ApiKeys
    proxies: TrustedProxies
    plane: DataPlane
    lifecycle: Lifecycle
    settings: Settings
    receiver: Receiver

    @contextmanager
    def admitted(self, method: str) -> Iterator[None]:
        if method != "ModelInfer":
            yield
            return
        self.plane.check_open()  # what the HTTP guard does for REST: no new work while draining
        cap = self.settings.max_concurrent_requests
        if self.lifecycle.in_flight >= cap:
            raise self.plane.refused(
                TooManyRequests(f"more than {cap} requests in flight; retry later")
            )
        self.lifecycle.in_flight += 1  # shared with the HTTP guard: one cap, one drain
        try:
            yield
        finally:
            self.lifecycle.in_flight -= 1


def handler(service: InferenceService, metrics: Metrics, gate: Gate) -> grpc.GenericRpcHandler:
    """Every RPC from raw bytes (a stream-unary handler without a deserializer: the wire is the
    same as a unary call's), so nothing is read or parsed before the gate says so."""
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        name: grpc.stream_unary_rpc_method_handler(
            _instrumented(name, getattr(service, name), request, metrics, gate),
            request_deserializer=None,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in _MESSAGES.items()
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_server(
    plane: DataPlane,
    repository: ModelRepository,
    lifecycle: Lifecycle,
    metrics: Metrics,
    settings: Settings,
    *,
    reuse_port: bool = False,
) -> aio.Server:
    """Bind `host:grpc_port` and start serving; raises RuntimeError if the port is taken.
    `reuse_port`: the worker processes of one `rcegate serve` share the port (SO_REUSEPORT;
    their supervisor has checked that no other program holds it)."""
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.grpc_message_limit),
            ("grpc.max_send_message_length", -1),
            # Otherwise a second server on the same port must fail, not share it.
            ("grpc.so_reuseport", int(reuse_port)),
            # Streams not yet read keep to the 64 KiB initial window (issue 21: a call refused
            # before its message is read must cost no more).
            ("grpc.http2.bdp_probe", 0),
        ],
        maximum_concurrent_rpcs=settings.max_connections,
    )
    service = InferenceService(plane, repository, lifecycle, metrics, settings)
    gate = Gate(
        keys=ApiKeys(settings.api_keys),
        proxies=TrustedProxies(settings.forwarded_allow_ips),
        plane=plane,
        lifecycle=lifecycle,
        settings=settings,
        receiver=Receiver(lifecycle, settings, plane.parsing),
    )
    server.add_generic_rpc_handlers((handler(service, metrics, gate),))
    where = address(settings.host, settings.grpc_port)
    server.add_insecure_port(where)
    await server.start()
    logger.info("OIP gRPC (%s) listening on %s", SERVICE, where)
    return server
