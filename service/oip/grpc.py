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
described). Messages above `max_body_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED).
A client's own gRPC deadline shortens the request's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc import aio

from service.access import ApiKeys, client_name
from service.dataplane import DataPlane
from service.detector import Detector
from service.errors import (
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
from service.repository import ModelRepository
from service.settings import Settings

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
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
        error: BaseException | None = None
        try:
            return await self._infer(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            count(self.metrics, "oip_grpc", error)

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> Message:
        arrival = time.monotonic()
        plane, life = self.plane, self.lifecycle
        plane.check_open()  # what the HTTP guard does for REST: no new work while draining
        detector = self._model(request.model_name, request.model_version)
        if life.in_flight >= self.settings.max_concurrent_requests:
            raise plane.refused(
                TooManyRequests(
                    f"more than {self.settings.max_concurrent_requests} requests in flight; "
                    "retry later"
                )
            )
        life.in_flight += 1  # shared with the HTTP guard: one cap, one drain
        try:
            plane.check_capacity(detector)
            decoded = decode_request(request, detector, self.settings.max_images)
            deadline = plane.deadline(arrival)
            remaining = context.time_remaining()
            if remaining is not None:
                deadline = min(deadline, time.monotonic() + remaining)
            answer = await infer(plane, detector, decoded, deadline, CLIENT.get())
        finally:
            life.in_flight -= 1
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
# Who is calling (`key:<id>` or `addr:<ip>`), for prober tracking in ModelInfer.
CLIENT: ContextVar[str | None] = ContextVar("rcegate_grpc_client", default=None)


def _authorize(method: str, keys: ApiKeys, context: Any) -> None:
    """The API key from the call's metadata (`authorization: Bearer ...` or `x-api-key`)."""
    metadata = {str(k).lower(): str(v) for k, v in (context.invocation_metadata() or ())}
    identity = None if method in OPEN_RPCS else keys.authorize(metadata)
    peer = str(context.peer() or "")  # e.g. ipv4:127.0.0.1:50312
    address = peer.split(":")[1] if peer.count(":") >= 2 else peer or None
    CLIENT.set(client_name(identity, address))


def _instrumented(method: str, rpc: Rpc, metrics: Metrics, keys: ApiKeys) -> Rpc:
    """API keys, metrics for every call, and the service's errors as gRPC statuses."""
    requests = metrics.grpc_requests
    duration = metrics.grpc_duration.labels(method)

    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Message:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            _authorize(method, keys, context)
            return await rpc(request, context)
        except ServiceError as exc:
            code = status_code(exc)
            trailing = (
                (("retry-after", str(exc.retry_after)),) if isinstance(exc, Unavailable) else ()
            )
            if code == grpc.StatusCode.INTERNAL:
                logger.error("%s/%s -> %s", SERVICE, method, code.name, exc_info=exc)
                await context.abort(code, "internal server error")
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
            await context.abort(code, "internal server error")
            raise
        finally:
            requests.labels(method, code.name).inc()
            duration.observe(time.perf_counter() - start)

    return call


def handler(service: InferenceService, metrics: Metrics, keys: ApiKeys) -> grpc.GenericRpcHandler:
    methods = {
        name: grpc.unary_unary_rpc_method_handler(
            _instrumented(name, getattr(service, name), metrics, keys),
            request_deserializer=request.FromString,
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
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            ("grpc.max_send_message_length", -1),
            # Otherwise a second server on the same port must fail, not share it.
            ("grpc.so_reuseport", int(reuse_port)),
        ],
        maximum_concurrent_rpcs=settings.max_connections,
    )
    service = InferenceService(plane, repository, lifecycle, metrics, settings)
    keys = ApiKeys(settings.api_keys)
    server.add_generic_rpc_handlers((handler(service, metrics, keys),))
    where = address(settings.host, settings.grpc_port)
    server.add_insecure_port(where)
    await server.start()
    logger.info("OIP gRPC (%s) listening on %s", SERVICE, where)
    return server
