"""The attacker's review of issue 21, replayed against the real `rcegate serve` (HTTP and gRPC on
loopback ports): each class of attack it found, with other inputs of the same kinds.

Two servers. The first faces untrusted clients: API keys (`alice`, held to enforce; `monitor`,
allowed annotate and looser target FPRs), enforce mode, /metrics open (as by default; a
metrics key is tested in test_access.py), gRPC on, a 48 MiB in-flight byte budget. The second
serves a repository with bad entries, trusts X-Forwarded-For from its proxy (::1), tracks
probers in 8 entries and listens on IPv6 loopback.

No wall-clock thresholds: what the attacks cost is judged by statuses and messages, by the
server's peak RSS (VmHWM) and by its CPU time per thread, side by side with normal requests.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import abuse
from models.manifest import BINDING_KEY, MANIFEST_FILE, MODEL_FILE
from service.oip import oip_pb2 as pb
from tests.conftest import DEFAULT_MODEL_DIR
from tests.service.live import Live, free_port, live_server

MODEL = "mnist-rce"
# The methods of RFC 9110: every other method token is counted as "other".
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
SERVICE = "/inference.GRPCInferenceService/"
ALICE, MONITOR = "alice-key-21", "monitor-key-21"
BUDGET = 48 << 20  # max_inflight_body_bytes of the first server: 6 gRPC messages of 4 MiB
MESSAGE_LIMIT = 4 << 20  # the default gRPC message limit
BODY_TIMEOUT = 2.0  # seconds for a body or a gRPC message to arrive


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Live, str]]:
    """The first server, and its gRPC target."""
    grpc_port = free_port()
    settings = {
        "api_keys": json.dumps({"alice": digest(ALICE), "monitor": digest(MONITOR)}),
        "client_policies": json.dumps(
            {"monitor": {"modes": ["annotate", "enforce"], "looser_target_fpr": True}}
        ),
        "mode": "enforce",
        "grpc_port": str(grpc_port),
        "max_inflight_body_bytes": str(BUDGET),
        "body_timeout": str(BODY_TIMEOUT),
    }
    root = tmp_path_factory.mktemp("hardening")
    models = root / "models"
    shutil.copytree(DEFAULT_MODEL_DIR, models / MODEL / "2")  # one model: a quick start
    with live_server(root / "server.log", "--model-dir", str(models), **settings) as server:
        yield server, f"127.0.0.1:{grpc_port}"


# -- helpers ---------------------------------------------------------------------------------------


def raw(live: Live, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes on a new connection: (status, body)."""
    answer = abuse.exchange(live.port, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(abuse.status(answer)), body


def v2_post(
    live: Live, document: dict[str, Any] | bytes, key: str = ALICE, **headers: str
) -> httpx.Response:
    content = document if isinstance(document, bytes) else json.dumps(document).encode()
    return httpx.post(
        f"{live.url}/v2/models/{MODEL}/infer",
        content=content,
        headers={"content-type": "application/json", **bearer(key), **headers},
        timeout=30,
    )


def v2_document(images: np.ndarray, **parameters: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "images",
                "datatype": "FP32",
                "shape": list(images.shape),
                "data": images.ravel().tolist(),
            }
        ],
        "parameters": parameters,
    }


def grpc_call(
    target: str, method: str, message: bytes, key: str | None = ALICE
) -> tuple[str, str, bytes]:
    """A raw gRPC call: (status code name, details, response bytes)."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    metadata = () if key is None else tuple(bearer(key).items())
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(SERVICE + method)
        try:
            return "OK", "", call(message, metadata=metadata, timeout=60)
        except grpc.RpcError as error:
            return error.code().name, str(error.details()), b""  # type: ignore[attr-defined]


def infer_request(images: np.ndarray, **parameters: Any) -> bytes:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="images", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.astype("<f4").tobytes())
    for name, value in parameters.items():
        if isinstance(value, float):
            request.parameters[name].double_param = value
        else:
            request.parameters[name].string_param = value
    return request.SerializeToString()


def grpc_outputs(answer: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    response = pb.ModelInferResponse.FromString(answer)
    dtypes = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}
    arrays = {
        o.name: np.frombuffer(data, dtypes[o.datatype]).reshape(list(o.shape))
        for o, data in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    parameters = {
        k: getattr(v, str(v.WhichOneof("parameter_choice"))) for k, v in response.parameters.items()
    }
    return arrays, parameters


def thread_cpu(live: Live) -> tuple[float, float]:
    """CPU seconds of the server's main (event-loop) thread and of all its other threads."""
    main = other = 0
    for task in Path(f"/proc/{live.process.pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        if task.name == str(live.process.pid):
            main += ticks
        else:
            other += ticks
    hz = 100  # os.sysconf("SC_CLK_TCK") on Linux
    return main / hz, other / hz


def metrics_text(live: Live) -> str:
    answer = httpx.get(f"{live.url}/metrics", timeout=30)  # open, as by default
    assert answer.status_code == 200
    return answer.text


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """Images every detector rejects (uniform noise), float32 [2, 1, 28, 28] in [0, 1]."""
    return np.random.default_rng(21).random((2, 1, 28, 28), dtype=np.float32)


@pytest.fixture(scope="module")
def clean(digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Real digits the default model accepts at its served threshold (checked in the tests)."""
    return (digits[0][[0, 1]][:, None] / np.float32(255.0)).astype(np.float32)


# -- 1. parsing: bounded before it starts, large parses off the event loop ------------------------

BOMBS = {
    "gzip-20mib-numbers": (413, "the JSON holds more values than the largest request"),
    "deflate-20mib-numbers": (413, "the JSON holds more values than the largest request"),
    "gzip-20mib-nested": (413, "the JSON holds more values than the largest request"),
    "gzip-empty-lists": (413, "the JSON holds more values than the largest request"),
    "deep-nesting": (413, "the JSON holds more values than the largest request"),
    "1000-deep": (400, "nested too deeply"),
    "400k-zeros": (413, "the JSON holds more values than the largest request"),
    "5000-digit-shape": (400, "a JSON number of 5000 characters"),
    "megabyte-id": (400, "id has 1048576 characters, at most 1024"),
    "100k-parameters": (413, "the JSON holds more values than the largest request"),
    "largest-parsed": (400, "needs 784 values, got 50176"),
}


def test_json_bombs_are_refused_before_their_work_and_parsed_off_the_event_loop(
    guarded: tuple[Live, str],
) -> None:
    live, _ = guarded
    bombs = {name: (encoding, body) for name, encoding, body in abuse.json_bombs()}
    assert set(bombs) == set(BOMBS)
    peak = live.peak_rss_bytes()
    for name, (status, message) in BOMBS.items():
        encoding, body = bombs[name]
        headers = {
            b"Content-Type": b"application/json",
            b"Content-Encoding": encoding,
            b"Authorization": f"Bearer {ALICE}".encode(),
        }
        got, answer = raw(
            live, abuse.http_request(b"POST", b"/v2/models/mnist-rce/infer", body, headers)
        )
        assert (got, message in answer.decode()) == (status, True), (name, answer[:300])
    # A 20 MiB JSON parse used to add 300 MB; the bounds keep every bomb far below that.
    assert live.peak_rss_bytes() - peak < 64 << 20
    # The largest JSON every bound lets through is parsed in the pool, not on the loop.
    encoding, body = bombs["largest-parsed"]
    headers = {
        b"Content-Encoding": encoding,
        b"Authorization": f"Bearer {ALICE}".encode(),
    }
    request = abuse.http_request(b"POST", b"/v2/models/mnist-rce/infer", body, headers)
    main, other = thread_cpu(live)
    for _ in range(8):
        assert raw(live, request)[0] == 400
    main_after, other_after = thread_cpu(live)
    assert main_after - main < other_after - other


def test_grpc_messages_are_bounded_on_the_wire_before_they_are_parsed(
    guarded: tuple[Live, str], clean: np.ndarray
) -> None:
    live, target = guarded
    cases = {
        "250k-parameters": (
            abuse.infer_message(parameters=250_000),  # 3.7 MB, under the message limit
            "INVALID_ARGUMENT",
            "ModelInferRequest.parameters: more than 64 entries",
        ),
        "600k-parameters": (
            abuse.infer_message(parameters=600_000),  # 9 MB
            "RESOURCE_EXHAUSTED",
            f"vs. {MESSAGE_LIMIT})",
        ),
        "unpacked-shape": (
            abuse.infer_message(shape_entries=1_900_000),
            "INVALID_ARGUMENT",
            "ModelInferRequest.inputs.shape: more than 16 entries",
        ),
        "garbage": (b"\xff" * 64, "INVALID_ARGUMENT", "is not valid protobuf"),
    }
    for name, (message, code, details) in cases.items():
        got, said, _ = grpc_call(target, "ModelInfer", message)
        assert (got, details in said) == (code, True), (name, said)
    # Side by side: refusing five 3.7 MB parameter bombs costs the server less CPU than
    # answering five normal 64-image requests (it used to take seconds each).
    bomb = cases["250k-parameters"][0]
    normal = infer_request(np.repeat(clean, 32, axis=0))
    before = sum(thread_cpu(live))
    for _ in range(5):
        assert grpc_call(target, "ModelInfer", bomb)[0] == "INVALID_ARGUMENT"
    refusing = sum(thread_cpu(live)) - before
    before = sum(thread_cpu(live))
    for _ in range(5):
        assert grpc_call(target, "ModelInfer", normal)[0] == "OK"
    answering = sum(thread_cpu(live)) - before
    assert refusing < answering


# -- 2. gRPC bytes: nothing before the key, a shared budget after it ------------------------------


def test_grpc_calls_with_a_wrong_key_cost_nothing_and_the_rest_share_the_byte_budget(
    guarded: tuple[Live, str],
) -> None:
    live, target = guarded
    big = abuse.infer_message(raw_bytes=MESSAGE_LIMIT - 4096)  # just under the limit
    peak = live.peak_rss_bytes()
    with ThreadPoolExecutor(100) as pool:
        codes = list(
            pool.map(lambda _: grpc_call(target, "ModelInfer", big, "wrong")[0], range(100))
        )
    assert set(codes) == {"UNAUTHENTICATED"}
    assert live.peak_rss_bytes() - peak < 64 << 20  # 100 x 4 MiB were never read
    # Six slow senders (headers, then nothing) hold the whole 48 MiB budget: each call
    # reserves twice the most gRPC may buffer for its message before reading it.
    release = threading.Event()
    with grpc.insecure_channel(target) as channel:
        stream = channel.stream_unary(SERVICE + "ModelInfer")

        def nothing() -> Iterator[bytes]:
            release.wait(30)
            yield from ()

        slow = [
            stream.future(nothing(), metadata=tuple(bearer(ALICE).items()), timeout=30)
            for _ in range(BUDGET // (2 * MESSAGE_LIMIT))
        ]
        refusal = _eventually(
            lambda: next(
                (a for a in [grpc_call(target, "ModelInfer", big)] if a[0] == "UNAVAILABLE"), None
            )
        )
        release.set()
        endings = {_code(future) for future in slow}
    assert refusal is not None and "too many request bodies" in refusal[1]
    # A sender that never finished was cut after body_timeout; one that ended sent nothing.
    assert endings <= {"DEADLINE_EXCEEDED", "INVALID_ARGUMENT"}
    # With the budget free again, 40 messages at once: read under the budget or refused first.
    peak = live.peak_rss_bytes()
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: grpc_call(target, "ModelInfer", big), range(40)))
    assert {code for code, _, _ in answers} <= {"INVALID_ARGUMENT", "UNAVAILABLE"}
    assert live.peak_rss_bytes() - peak < 3 * BUDGET  # 40 at once held 480 MB before
    counted = sample(metrics_text(live), "rcegate_requests_refused_total", reason="body_budget")
    assert counted >= 1


def test_a_slow_grpc_sender_is_cut_after_the_body_timeout(guarded: tuple[Live, str]) -> None:
    _, target = guarded
    release = threading.Event()
    with grpc.insecure_channel(target) as channel:
        stream = channel.stream_unary(SERVICE + "ModelInfer")

        def nothing() -> Iterator[bytes]:
            release.wait(30)
            yield from ()

        call = stream.future(nothing(), metadata=tuple(bearer(ALICE).items()), timeout=30)
        try:
            error = call.exception(timeout=30)
        finally:
            release.set()
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert f"did not arrive within {BODY_TIMEOUT:g} s" in error.details()  # type: ignore[attr-defined]


def _code(future: Any) -> str:
    error = future.exception(timeout=60)
    return "OK" if error is None else str(error.code().name)


# -- 4. bounded metric series ---------------------------------------------------------------------


def test_every_metric_label_a_client_can_touch_comes_from_a_closed_set(
    guarded: tuple[Live, str],
) -> None:
    live, target = guarded
    rng = random.Random(4)
    for turn in range(150):  # random tokens, and the WebDAV methods a strict parser takes
        path = f"/v1/{rng.getrandbits(64):x}".encode()
        raw(live, abuse.http_request(abuse.random_method(rng, turn), path))
    with grpc.insecure_channel(target) as channel:
        for i in range(20):
            call = channel.unary_unary(f"/inference.GRPCInferenceService/Nope{i}")
            with pytest.raises(grpc.RpcError):
                call(b"", timeout=10)
    text = metrics_text(live)
    series = [
        s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("rcegate_http_request", "rcegate_grpc_request"))
    ]
    methods = {s.labels["method"] for s in series if "route" in s.labels}
    assert methods <= METHODS | {"other"} and "other" in methods
    assert {s.labels["method"] for s in series if "code" in s.labels} <= {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelConfig",
        "ModelStatistics",
    }
    http = {(s.labels["route"], s.labels["method"]) for s in series if "route" in s.labels}
    assert all(
        r == "unmatched" or r.startswith(("/v1", "/v2", "/health", "/metrics")) for r, _ in http
    )
    assert len(http) < 40  # 150 random methods and paths added a pair or two, not 150


# -- 6, 7. enforce mode: the verdict only, and no client can undo it ------------------------------


def test_a_rejected_image_gets_its_verdict_only_over_every_protocol(
    guarded: tuple[Live, str], noise: np.ndarray, clean: np.ndarray
) -> None:
    live, target = guarded
    images = np.concatenate([clean, noise])
    body = v2_post(live, v2_document(images)).json()
    outputs = {o["name"]: np.reshape(o["data"], o["shape"]) for o in body["outputs"]}
    grpc_code, _, answer = grpc_call(target, "ModelInfer", infer_request(images))
    assert grpc_code == "OK"
    arrays, parameters = grpc_outputs(answer)
    for got, params in ((outputs, body["parameters"]), (arrays, parameters)):
        assert got["accepted"].tolist() == [True, True, False, False]
        assert got["label"][2:].tolist() == [-1, -1]
        for name in ("probabilities", "logits", "confidence", "non_me", "log_kd"):
            assert not np.asarray(got[name])[2:].any(), name
            assert np.asarray(got[name])[:2].any(), name
        assert "threshold" not in params and params["withheld_count"] == 2
    png = abuse.digit_png()
    v1 = httpx.post(
        f"{live.url}/v1/predict",
        files=[
            ("files", ("noise.png", _png(noise[0]), "image/png")),
            ("files", ("d.png", png, "image/png")),
        ],
        headers=bearer(ALICE),
        timeout=30,
    ).json()["predictions"][0]
    assert (v1["accepted"], v1["label"], v1["scores"], v1["decision"]["threshold"]) == (
        False,
        None,
        None,
        None,
    )


def _png(image: np.ndarray) -> bytes:
    from tests.service.conftest import encode

    return encode((image[0] * 255).astype(np.uint8))


def test_a_client_held_to_enforce_cannot_undo_it(
    guarded: tuple[Live, str], noise: np.ndarray
) -> None:
    live, target = guarded
    png = _png(noise[0])

    def v1(key: str, query: str) -> httpx.Response:
        return httpx.post(
            f"{live.url}/v1/predict?{query}",
            content=png,
            headers={"content-type": "image/png", **bearer(key)},
            timeout=30,
        )

    def every_protocol(key: str, **parameters: Any) -> list[tuple[int | str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in parameters.items())
        rest = v2_post(live, v2_document(noise[:1], **parameters), key)
        code, said, answer = grpc_call(
            target, "ModelInfer", infer_request(noise[:1], **parameters), key
        )
        return [(v1(key, query).status_code, None), (rest.status_code, rest), (code, answer)]

    forbidden = [403, 403, "PERMISSION_DENIED"]
    assert [s for s, _ in every_protocol(ALICE, mode="annotate")] == forbidden
    assert [s for s, _ in every_protocol(ALICE, target_fpr=0.001)] == forbidden  # looser
    assert [s for s, _ in every_protocol(ALICE, target_fpr=0.1)] == [200, 200, "OK"]  # stricter
    # Bisecting target_fpr finds nothing: every looser value is refused, every stricter one
    # still rejects the image and withholds its scores.
    for target_fpr in np.geomspace(0.001, 0.5, 12):
        answer = v2_post(live, v2_document(noise[:1], target_fpr=float(target_fpr)), ALICE)
        if answer.status_code == 200:
            outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
            assert outputs["accepted"] == [False] and outputs["log_kd"] == [0.0]
        else:
            assert answer.status_code == 403 and "looser decision" in answer.json()["error"]
    # The operator's trusted client keeps everything.
    assert [s for s, _ in every_protocol(MONITOR, mode="annotate", target_fpr=0.001)] == [
        200,
        200,
        "OK",
    ]
    annotated = v2_post(live, v2_document(noise[:1], mode="annotate"), MONITOR).json()
    assert {o["name"]: o["data"] for o in annotated["outputs"]}["log_kd"][0] < 0


def test_open_metrics_show_no_more_than_the_answers(
    guarded: tuple[Live, str], noise: np.ndarray, clean: np.ndarray
) -> None:
    live, _ = guarded
    rejected = {"model": MODEL, "decision": "rejected"}
    before = metrics_text(live)
    # alice, enforce: two digits accepted (shown), two noise images rejected (withheld)
    assert v2_post(live, v2_document(np.concatenate([clean, noise]))).status_code == 200
    after = metrics_text(live)
    assert (
        sample(after, "rcegate_images_total", **rejected, predicted_class="")
        == sample(before, "rcegate_images_total", **rejected, predicted_class="") + 2
    )
    # No class of a withheld label, no score of a withheld image.
    assert (
        sample(after, "rcegate_images_total", **rejected)
        == sample(before, "rcegate_images_total", **rejected) + 2
    )
    count = {"model": MODEL, "metric": "log_kd"}
    assert (
        sample(after, "rcegate_detection_score_count", **count)
        == sample(before, "rcegate_detection_score_count", **count) + 2  # the accepted two
    )
    # What an annotate answer showed, the metrics may show too.
    assert v2_post(live, v2_document(noise, mode="annotate"), MONITOR).status_code == 200
    shown = metrics_text(live)
    assert (
        sample(shown, "rcegate_detection_score_count", **count)
        == sample(after, "rcegate_detection_score_count", **count) + 2
    )
    assert sample(shown, "rcegate_images_total", **rejected, predicted_class="") == sample(
        after, "rcegate_images_total", **rejected, predicted_class=""
    )


# -- 8, 13. no 500 for client input; one spelling per version -------------------------------------


def test_client_input_never_gives_a_500(guarded: tuple[Live, str], noise: np.ndarray) -> None:
    live, target = guarded
    auth = f"Bearer {ALICE}".encode()
    document = json.dumps(v2_document(noise[:1])).encode()
    cases = [
        # an integer of 5,000 digits in `id` (in `shape`: test_json_bombs_...)
        (
            b"POST",
            b"/v2/models/mnist-rce/infer",
            document[:-1] + b',"id":' + b"7" * 5000 + b"}",
            {},
        ),
        # a header byte count that str.isdigit() takes and int() does not
        (
            b"POST",
            b"/v2/models/mnist-rce/infer",
            document,
            {b"Inference-Header-Content-Length": b"\xb2"},
        ),
        (b"GET", b"/v1/models/mnist-rce/versions/%C2%B2", b"", {}),
        (b"GET", b"/v1/models/mnist-rce/versions/" + b"9" * 5000, b"", {}),
        (b"GET", b"/v2/models/mnist-rce/versions/%C2%B2", b"", {}),
        (b"GET", b"/v2/models/mnist-rce/versions/" + b"9" * 5000, b"", {}),
        (b"POST", b"/v2/models/mnist-rce/versions/%D9%A2/infer", document, {}),
    ]
    for method, path, body, headers in cases:
        status, answer = raw(
            live, abuse.http_request(method, path, body, {b"Authorization": auth, **headers})
        )
        assert 400 <= status < 500, (path[:60], status, answer[:200])
    request = pb.ModelReadyRequest(name=MODEL, version="²").SerializeToString()
    code, _, answer = grpc_call(target, "ModelReady", request, key=None)  # open RPC
    assert code == "OK" and not pb.ModelReadyResponse.FromString(answer).ready
    metadata = pb.ModelMetadataRequest(name=MODEL, version="²").SerializeToString()
    assert grpc_call(target, "ModelMetadata", metadata)[0] == "NOT_FOUND"
    log = live.log.read_text()
    assert "Traceback" not in log and "INTERNAL" not in log


def test_a_version_has_one_spelling_everywhere(guarded: tuple[Live, str]) -> None:
    live, target = guarded
    for spelling in ("0002", "2.0", "%202", "2_0", "%D9%A2", "+2"):
        v1 = httpx.get(f"{live.url}/v1/models/{MODEL}/versions/{spelling}", headers=bearer(ALICE))
        v2 = httpx.get(f"{live.url}/v2/models/{MODEL}/versions/{spelling}", headers=bearer(ALICE))
        assert (v1.status_code, v2.status_code) == (422, 404), spelling
    assert httpx.get(f"{live.url}/v1/models/{MODEL}/versions/2", headers=bearer(ALICE)).is_success
    assert httpx.get(f"{live.url}/v2/models/{MODEL}/versions/2", headers=bearer(ALICE)).is_success
    for version, ready in (("02", False), ("٢", False), ("2", True)):
        request = pb.ModelReadyRequest(name=MODEL, version=version).SerializeToString()
        answer = grpc_call(target, "ModelReady", request, key=None)[2]
        assert pb.ModelReadyResponse.FromString(answer).ready is ready, version


# -- 9. forwarded headers -------------------------------------------------------------------------


def access_clients(log: Path, request_id: str) -> list[str]:
    return [
        json.loads(line)["client"]
        for line in log.read_text().splitlines()
        if line.startswith("{") and f'"request_id":"{request_id}"' in line
    ]


def test_x_forwarded_for_is_ignored_by_default(guarded: tuple[Live, str]) -> None:
    live, _ = guarded
    headers = {"x-forwarded-for": "203.0.113.9", "x-request-id": "xff-default-21"}
    assert httpx.get(f"{live.url}/health/live", headers=headers).status_code == 200
    # The access log line is written by a thread: poll for it.
    assert _eventually(lambda: access_clients(live.log, "xff-default-21")) == ["addr:127.0.0.1"]


def _eventually(read: Any, tries: int = 100) -> Any:
    import time

    for _ in range(tries):
        value = read()
        if value:
            return value
        time.sleep(0.05)  # polling for a log line, not timing anything
    return read()


# -- the second server: a repository with bad entries, trusted proxies, IPv6 ----------------------


def forge(target: Path, version: int, edit: Any) -> None:
    """A consistent copy of the default model at `version` whose manifest and graph binding
    both carry `edit`'s change (as an attacker with write access, or a buggy export, would)."""
    shutil.copytree(DEFAULT_MODEL_DIR, target)
    data = json.loads((target / MANIFEST_FILE).read_text())
    data["version"] = version
    edit(data)
    binding = {
        "objective": data["objective"],
        "class_names": data["dataset"]["class_names"],
        "input": data["input"],
        "detection": data["detection"],
    }
    model = onnx.load(str(target / MODEL_FILE))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != BINDING_KEY]
    del model.metadata_props[:]
    for key, value in [*kept, (BINDING_KEY, json.dumps(binding, sort_keys=True))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    graph = model.SerializeToString()
    (target / MODEL_FILE).write_bytes(graph)
    data["sha256"] = hashlib.sha256(graph).hexdigest()
    (target / MANIFEST_FILE).write_text(json.dumps(data))  # `Infinity` where edited so


def _infinite_threshold(data: dict[str, Any]) -> None:
    data["detection"]["thresholds"]["log_kd"] = float("inf")


def _overflowing_table(data: dict[str, Any]) -> None:
    table = data["detection"]["calibration_table"]["thresholds"]["log_kd"]
    table[-1] = 1.7e308  # finite, but 1.7e308 above its neighbour: the slope overflows
    table[-2] = -1.7e308


MISNAMED = ("²", "①", "0002", "٢", "2.0")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Live, str, Path]]:
    root = tmp_path_factory.mktemp("repository")
    models = root / "models"
    shutil.copytree(DEFAULT_MODEL_DIR, models / MODEL / "2")
    for name in MISNAMED:
        (models / MODEL / name).mkdir()
    forge(models / MODEL / "3", 3, _infinite_threshold)
    forge(models / MODEL / "4", 4, _overflowing_table)
    grpc_port = free_port()
    settings = {
        "host": "::1",  # IPv6 loopback: HTTP and gRPC peers are ipv6 addresses
        "grpc_port": str(grpc_port),
        "forwarded_allow_ips": json.dumps(["::1"]),
        "prober_clients": "8",
        "prober_min_images": "4",
        "prober_throttle": "true",
    }
    with live_server(root / "server.log", "--model-dir", str(models), **settings) as server:
        yield server, f"[::1]:{grpc_port}", root


def test_a_bad_version_entry_refuses_only_itself_and_says_why_without_paths(
    repository: tuple[Live, str, Path],
) -> None:
    live, _, root = repository
    listed = httpx.get(f"{live.url}/v1/models").json()
    assert [(m["name"], m["version"]) for m in listed["models"]] == [(MODEL, 2)]
    refused = {r["version"]: r["reason"] for r in listed["refused"]}
    assert set(refused) == {*MISNAMED, "3", "4"}
    for name in MISNAMED:
        assert refused[name].startswith("not a version"), refused[name]
    assert "detection.thresholds.log_kd: Input should be a finite number" in refused["3"]
    assert "interpolates to a non-finite threshold" in refused["4"]
    assert not any(str(root) in reason or "/tmp" in reason for reason in refused.values())


def test_a_flagged_prober_outlives_a_flood_of_new_clients(
    repository: tuple[Live, str, Path], noise: np.ndarray, clean: np.ndarray
) -> None:
    live, _, _ = repository

    def post(images: np.ndarray, client: str) -> int:
        headers = {"x-forwarded-for": client, "x-request-id": f"from-{client}".replace(":", ".")}
        return v2_post(live, v2_document(images), "none", **headers).status_code

    assert post(np.concatenate([noise, noise]), "198.51.100.1") == 200  # 4 of 4 rejected
    assert post(clean, "198.51.100.1") == 429
    for host in range(1, 21):  # 20 new clients through the trusted proxy, tracker of 8
        assert post(clean, f"203.0.113.{host}") == 200
    assert post(clean, "198.51.100.1") == 429  # still flagged: unflagged clients went first
    assert _eventually(lambda: access_clients(live.log, "from-203.0.113.7")) == ["addr:203.0.113.7"]


def test_grpc_ipv6_peers_are_known_by_their_address(
    repository: tuple[Live, str, Path], noise: np.ndarray
) -> None:
    live, target, _ = repository
    request = infer_request(np.concatenate([noise, noise]))
    assert grpc_call(target, "ModelInfer", request, key=None)[0] == "OK"  # 4 of 4 rejected
    assert grpc_call(target, "ModelInfer", request, key=None)[0] == "RESOURCE_EXHAUSTED"
    flagged = re.findall(r"client (\S+) flagged as probing", live.log.read_text())
    assert "addr:::/64" in flagged  # ::1 by its /64 (the peer was `ipv6:[::1]:port`)
