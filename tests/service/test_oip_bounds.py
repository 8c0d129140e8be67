"""OIP in-process: every bound of service/oip/bounds.py and the adapters' use of them, on the real
app over the committed model, with the real gRPC server started on the app's own event loop
(test_hardening.py replays the same through `rcegate serve`)."""

from __future__ import annotations

import gzip
import json
import shutil
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench import abuse
from service.budget import Reservation
from service.errors import BodyBudgetExceeded, BodyTooLarge, InvalidInput
from service.guard import Lifecycle
from service.oip import oip_pb2 as pb
from service.oip.bounds import RequestBounds, byte_count, load_json
from service.oip.grpc import start_server as start_grpc
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL_DIR
from tests.service.conftest import started, wait_loaded
from tests.service.live import free_port

MODEL = "mnist-rce"
BOUNDS = RequestBounds.of((1, 28, 28), 64)
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    models = tmp_path_factory.mktemp("bounds") / "models"
    shutil.copytree(DEFAULT_MODEL_DIR, models / MODEL / "2")
    # A byte budget (1 MiB) below the model's body limit (1.6 MiB of JSON), to see it refuse;
    # gRPC messages then have 512 KiB.
    settings = Settings(model_dir=models, max_inflight_body_bytes=1 << 20, grpc_port=free_port())
    with started(settings) as client:
        wait_loaded(client)
        yield client


@pytest.fixture(scope="module")
def grpc_target(client: TestClient) -> Iterator[str]:
    """The real gRPC server, on the app's event loop as `rcegate serve` runs it."""
    state = client.app.state  # type: ignore[attr-defined]
    server = client.portal.call(  # type: ignore[union-attr]
        start_grpc, state.plane, state.repository, state.lifecycle, state.metrics, state.settings
    )
    yield f"127.0.0.1:{state.settings.grpc_port}"
    client.portal.call(server.stop, None)  # type: ignore[union-attr]


def document(images: np.ndarray, **fields: Any) -> dict[str, Any]:
    tensor = {"name": "images", "datatype": "FP32", "shape": list(images.shape)}
    return {"inputs": [{**tensor, "data": images.tolist()}], **fields}


def test_the_bounds_follow_the_model() -> None:
    assert BOUNDS.values == 64 * 784
    assert BOUNDS.json_bytes == 64 * 1024 + 32 * 64 * 784
    assert BOUNDS.binary_bytes == 4 * 64 * 784
    assert BOUNDS.body_bytes == BOUNDS.json_bytes + BOUNDS.binary_bytes
    assert BOUNDS.json_tokens == 64 * 784 + 2 * (64 * (1 + 1 + 28) + 1) + 4096


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (b"[" + b"0," * 60_000 + b"0]", BodyTooLarge, "more values than the largest request"),
        (b" " * (BOUNDS.json_bytes + 1), BodyTooLarge, "is at most"),
        (b"[" * 2000 + b"]" * 2000, InvalidInput, "nested too deeply"),
        (b"[" + b"7" * 65 + b"]", InvalidInput, "a JSON number of 65 characters"),
        (b"[0." + b"7" * 70 + b"]", InvalidInput, "a JSON number of 72 characters"),
        (b"{not json", InvalidInput, "not valid JSON"),
        (b"\xff\xfe\x00", InvalidInput, "not valid JSON"),
    ],
)
def test_load_json_refuses_what_no_request_needs(
    text: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        load_json(text, BOUNDS)
    assert message in caught.value.message  # type: ignore[attr-defined]


def test_load_json_parses_numbers_of_every_json_kind() -> None:
    assert load_json(b'{"a": [1, -2.5e-3, NaN, 0]}', BOUNDS) == {
        "a": [1, -0.0025, pytest.approx(float("nan"), nan_ok=True), 0]
    }


@pytest.mark.parametrize("text", ["\xb2", "\u0662", "1_0", "-1", "1.0", "", "9" * 13])
def test_a_byte_count_is_ascii_digits(text: str) -> None:
    with pytest.raises(InvalidInput, match="must be a byte count"):
        byte_count(text, "Inference-Header-Content-Length")
    assert byte_count(" 42\t", "x") == 42


def test_a_reservation_refuses_past_the_shared_budget_and_gives_back_on_exit() -> None:
    life, refused = Lifecycle(), []
    with Reservation(life, 100, refused.append) as held:
        held.resize(60)
        with pytest.raises(BodyBudgetExceeded), Reservation(life, 100, refused.append) as other:
            other.resize(41)
        held.resize(10)
        assert life.body_bytes == 10
    assert life.body_bytes == 0 and len(refused) == 1


def test_rest_answers_json_binary_and_compressed_requests_alike(client: TestClient) -> None:
    images = np.full((2, 1, 28, 28), 0.25, np.float32)
    plain = client.post(INFER, json=document(images, id="a"))
    assert plain.status_code == 200, plain.text
    labels = next(o["data"] for o in plain.json()["outputs"] if o["name"] == "label")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "FP32",
                    "shape": [2, 1, 28, 28],
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        }
    ).encode()
    binary = client.post(
        INFER,
        content=header + images.tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    assert binary.status_code == 200, binary.text
    size = int(binary.headers["inference-header-content-length"])
    assert np.frombuffer(binary.content[size:][:16], "<i8").tolist() == labels
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        body = compress(json.dumps(document(images)).encode())
        answer = client.post(INFER, content=body, headers={"content-encoding": encoding})
        assert answer.status_code == 200, (encoding, answer.text)


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("gzip-20mib-numbers", 413, "more values than the largest request"),
        ("gzip-empty-lists", 413, "more values than the largest request"),
        ("1000-deep", 400, "nested too deeply"),
        ("400k-zeros", 413, "more values than the largest request"),
        ("5000-digit-shape", 400, "a JSON number of 5000 characters"),
        ("100k-parameters", 413, "more values than the largest request"),
        ("largest-parsed", 400, "needs 784 values, got 50176"),
    ],
)
def test_rest_refuses_bombs_before_their_work(
    client: TestClient, name: str, status: int, message: str
) -> None:
    encoding, body = next((e, b) for n, e, b in BOMBS if n == name)
    answer = client.post(INFER, content=body, headers={"content-encoding": encoding.decode()})
    assert answer.status_code == status and message in answer.json()["error"], answer.text


BOMBS = abuse.json_bombs()


@pytest.mark.parametrize(
    ("headers", "body", "status", "message"),
    [
        ({"content-encoding": "br"}, b"{}", 415, "Content-Encoding 'br' is not supported"),
        ({"content-encoding": "gzip"}, b"not gzip", 400, "cannot be inflated"),
        ({"inference-header-content-length": "\xb2".encode("latin-1")}, b"{}", 400, "byte count"),
        ({"inference-header-content-length": "99"}, b"{}", 400, "does not fit a body of 2"),
        ({"inference-header-content-length": "9" * 12}, b"{}", 413, "a JSON header for this"),
        ({}, json.dumps({"inputs": [], "id": 7}).encode(), 400, "id must be a string"),
        (
            {},
            json.dumps({"parameters": {f"p{i}": 1 for i in range(65)}}).encode(),
            400,
            "parameters has 65 entries, at most 64",
        ),
        (
            {},
            json.dumps(
                document(np.zeros((1, 1, 28, 28)), outputs=[{"name": "label"}] * 17)
            ).encode(),
            400,
            "outputs has 17 entries, at most 16",
        ),
        (
            {},
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "images",
                            "datatype": "FP32",
                            "shape": [1, 1, 28, 28],
                            "data": [[[[[0.5] * 28] * 28]]],
                        }
                    ]
                }
            ).encode(),
            400,
            "data nests deeper than its shape's 4 levels",
        ),
        (
            {},
            json.dumps(
                {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1] * 17}]}
            ).encode(),
            400,
            "shape must be a list of integers (at most 16)",
        ),
    ],
)
def test_rest_refuses_framing_and_fields_out_of_bounds(
    client: TestClient, headers: dict[str, Any], body: bytes, status: int, message: str
) -> None:
    answer = client.post(INFER, content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"], answer.text


def test_a_gzip_body_past_the_budget_is_refused_as_it_inflates(client: TestClient) -> None:
    body = gzip.compress(json.dumps(document(np.zeros((1, 1, 28, 28)))).encode() + b" " * (9 << 20))
    answer = client.post(INFER, content=body, headers={"content-encoding": "gzip"})
    # 1 MiB of bodies in flight at most: refused at the step that passes it (503), before the
    # body's own limit (413).
    assert answer.status_code == 503, answer.text
    assert client.app.state.lifecycle.body_bytes == 0  # type: ignore[attr-defined]


def call(target: str, method: str, message: bytes) -> tuple[str, str, bytes]:
    import grpc

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as ch:
        try:
            return (
                "OK",
                "",
                ch.unary_unary(f"/inference.GRPCInferenceService/{method}")(message, timeout=30),
            )
        except grpc.RpcError as error:
            return error.code().name, str(error.details()), b""  # type: ignore[attr-defined]


def test_grpc_reads_bounds_and_answers_on_the_apps_loop(grpc_target: str) -> None:
    images = np.full((2, 1, 28, 28), 0.25, np.float32)
    request = pb.ModelInferRequest(model_name=MODEL, id="g")
    request.inputs.add(name="images", datatype="FP32", shape=[2, 1, 28, 28])
    request.raw_input_contents.append(images.tobytes())
    code, _, answer = call(grpc_target, "ModelInfer", request.SerializeToString())
    assert code == "OK" and pb.ModelInferResponse.FromString(answer).id == "g"
    cases = [
        ("ModelInfer", abuse.infer_message(parameters=100), "INVALID_ARGUMENT", "64 entries"),
        ("ModelInfer", abuse.infer_message(raw_bytes=600 << 10), "RESOURCE_EXHAUSTED", "max"),
        ("ModelInfer", b"\xff", "INVALID_ARGUMENT", "not valid protobuf"),
        ("ModelReady", b"\x0a\x80\x80\x04" + b"x" * 65536, "INVALID_ARGUMENT", "at most 65536"),
        (
            "ModelMetadata",
            pb.ModelMetadataRequest(name=MODEL, version="\u00b2").SerializeToString(),
            "NOT_FOUND",
            "has no version",
        ),
    ]
    for method, message, status, said in cases:
        got, details, _ = call(grpc_target, method, message)
        assert (got, said in details) == (status, True), (method, got, details)
    for version, ready in (("2", True), ("02", False), ("\u0662", False)):
        message = pb.ModelReadyRequest(name=MODEL, version=version).SerializeToString()
        assert (
            pb.ModelReadyResponse.FromString(call(grpc_target, "ModelReady", message)[2]).ready
            is ready
        )
    assert pb.ServerLiveResponse.FromString(call(grpc_target, "ServerLive", b"x" * 1000)[2]).live
