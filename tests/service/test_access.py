"""Access control, no score oracle, and a tight HTTP surface."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.access import ACCESS_LOGGER, AccessLog, ApiKeys, Identity
from service.errors import Unauthorized
from service.metrics import Metrics
from service.text import printable
from tests.service.conftest import encode

PNG = {"content-type": "image/png"}
KEY = "s3cret-key-for-ci"
KEYS = {"ci": hashlib.sha256(KEY.encode()).hexdigest()}
UNAUTHORIZED = {
    "error": {
        "status": 401,
        "code": "unauthorized",
        "message": "an API key is required: send `Authorization: Bearer <key>`",
    }
}


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """Everything the access logger writes while the test runs. (At INFO: an AccessLog made
    while this handler is attached finds the logger configured and leaves its level alone.)"""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(ACCESS_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_authorize_accepts_bearer_and_x_api_key_and_names_the_client() -> None:
    keys = ApiKeys(KEYS)
    assert keys.authorize({"authorization": f"Bearer {KEY}"}) == Identity("ci")
    assert keys.authorize({"authorization": f"bearer   {KEY}"}) == Identity("ci")
    assert keys.authorize({"x-api-key": KEY}) == Identity("ci")
    assert ApiKeys({}).authorize({}) is None  # keys off: everyone, no identity
    for headers in ({}, {"authorization": "Basic abc"}, {"x-api-key": ""}):
        with pytest.raises(Unauthorized, match="an API key is required"):
            keys.authorize(headers)
    with pytest.raises(Unauthorized, match="the API key is not valid"):
        keys.authorize({"x-api-key": KEY + "x"})


# Three clients: the keys are hashed in order, so a lookup that names every caller after the
# first (or the last) configured key shows at once.
CLIENT_KEYS = {ident: f"{ident}-key-for-ci" for ident in ("alice", "bob", "carol")}
CLIENTS = {ident: hashlib.sha256(key.encode()).hexdigest() for ident, key in CLIENT_KEYS.items()}


def test_authorize_names_each_of_several_clients_by_its_own_key() -> None:
    keys = ApiKeys(CLIENTS)
    for ident, key in CLIENT_KEYS.items():
        assert keys.authorize({"authorization": f"Bearer {key}"}) == Identity(ident)
        assert keys.authorize({"x-api-key": key}) == Identity(ident)
    with pytest.raises(Unauthorized, match="the API key is not valid"):
        keys.authorize({"x-api-key": KEY})  # another deployment's key


def test_each_api_key_is_its_own_client_in_the_access_log_and_prober_tracking(
    make_client: Callable[..., TestClient], digit_png: bytes, access_lines: io.StringIO
) -> None:
    """Three keys; bob (neither the first nor the last configured) sends mostly rejected noise
    and is throttled; alice and carol, who sent nothing suspicious, are still answered, and the
    access log names every request's own client."""
    client = make_client(
        api_keys=CLIENTS, prober_throttle=True, prober_min_images=8, prober_rejection_rate=0.5
    )

    def digit_from(ident: str) -> int:
        headers = {**PNG, "x-api-key": CLIENT_KEYS[ident]}
        return client.post("/v1/predict", content=digit_png, headers=headers).status_code

    rng = np.random.default_rng(1)
    noise = [encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(8)]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(noise)]
    probe = client.post("/v1/predict", files=files, headers={"x-api-key": CLIENT_KEYS["bob"]})
    assert probe.status_code == 200
    assert sum(not r["accepted"] for r in probe.json()["predictions"]) >= 4
    assert digit_from("bob") == 429
    assert digit_from("alice") == 200
    assert digit_from("carol") == 200
    client.app.state.access_log.close()  # type: ignore[attr-defined]
    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    assert [(line["client"], line["status"]) for line in lines] == [
        ("key:bob", 200),
        ("key:bob", 429),
        ("key:alice", 200),
        ("key:carol", 200),
    ]


def test_keys_guard_v1_and_docs_but_not_health(
    make_client: Callable[..., TestClient], digit_png: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client = make_client(api_keys=KEYS)
    for method, path in (
        ("POST", "/v1/predict"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/tiny"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/nowhere"),  # no key, no way to tell which paths exist
        ("GET", "/health/live/../../v1/models"),  # not a health path, whatever it resolves to
        ("GET", "/health/other"),
        ("POST", "/v2/models/tiny/infer"),
    ):
        response = client.request(method, path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == 'Bearer realm="rcegate"'
        if path.startswith("/v2/"):  # the Open Inference Protocol's own error shape
            assert response.json() == {"error": UNAUTHORIZED["error"]["message"]}
        else:
            assert response.json() == UNAUTHORIZED
    wrong = client.get("/v1/models", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == (
        "the API key is not valid"
    )
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    assert client.get("/metrics").status_code == 200  # open unless metrics_require_key
    ok = client.post(
        "/v1/predict", content=digit_png, headers={**PNG, "authorization": f"Bearer {KEY}"}
    )
    assert ok.status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
    # Neither the key nor its hash ever reaches a log line.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in text and KEYS["ci"] not in text


def test_metrics_can_require_a_metrics_key_that_no_client_key_opens(
    make_client: Callable[..., TestClient],
) -> None:
    scraper = "s3cret-scraper-key"
    client = make_client(
        api_keys=KEYS,
        metrics_require_key=True,
        metrics_keys={"prometheus": hashlib.sha256(scraper.encode()).hexdigest()},
    )
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"x-api-key": KEY}).status_code == 401  # a client's
    assert client.get("/metrics", headers={"x-api-key": scraper}).status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": scraper}).status_code == 401
    assert client.get("/health/live").status_code == 200


def test_enforce_mode_withholds_scores_of_rejected_images(
    make_client: Callable[..., TestClient], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    client = make_client(mode="enforce", client_modes=["enforce", "annotate"])
    # Real digits and random noise: at target_fpr 0.5 about half of the clean digits are
    # accepted (that is what the calibration promises; 16 make "none" a 1-in-65,536 event
    # for a calibrated model) and the noise is rejected.
    rng = np.random.default_rng(0)
    noise = [encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(7)]
    clean = [encode(image) for image in digits[0][::300][:16]]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(clean + noise)]
    body = client.post("/v1/predict?target_fpr=0.5", files=files).json()
    results = body["predictions"]
    assert {r["accepted"] for r in results} == {True, False}
    for result in results:
        if result["accepted"]:
            assert result["label"] is not None and result["scores"] is not None
            assert result["decision"]["threshold"] is not None
        else:
            assert result["label"] is None and result["probabilities"] is None
            assert result["scores"] is None
            assert result["decision"]["score"] is None and result["decision"]["threshold"] is None
    annotated = client.post("/v1/predict?target_fpr=0.5&mode=annotate", files=files).json()
    assert all(r["scores"] is not None for r in annotated["predictions"])
    # The old behaviour stays available: withhold only the label.
    labels_only = make_client(mode="enforce", withhold_rejected=False)
    body = labels_only.post("/v1/predict?target_fpr=0.5", files=files).json()
    for result in body["predictions"]:
        assert result["scores"] is not None
        assert (result["label"] is None) == (not result["accepted"])


def test_request_id_is_echoed_when_valid_and_generated_otherwise(client: TestClient) -> None:
    given = client.get("/health/live", headers={"x-request-id": "abc-123.X:y_z"})
    assert given.headers["x-request-id"] == "abc-123.X:y_z"
    generated = client.get("/health/live", headers={"x-request-id": "bad id\twith\tspaces"})
    assert len(generated.headers["x-request-id"]) == 32
    assert generated.headers["x-request-id"] != client.get("/health/live").headers["x-request-id"]


def test_access_log_is_one_json_line_per_request_without_payload(
    client: TestClient, digit_png: bytes, access_lines: io.StringIO
) -> None:
    client.post("/v1/predict", content=digit_png, headers={**PNG, "x-request-id": "r1"})
    client.get("/v1/models/%0Aforged%20line%0D%0A")
    client.app.state.access_log.close()  # type: ignore[attr-defined]
    lines = access_lines.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["request_id"] == "r1"
    assert (first["method"], first["route"], first["status"]) == ("POST", "/v1/predict", 200)
    assert first["client"] == "addr:testclient"
    assert set(first) == {
        "ts", "request_id", "client", "method", "path", "route", "status", "duration_ms"
    }  # fmt: skip
    assert second["path"] == "/v1/models/\nforged line\r\n" and second["status"] == 404


def test_error_log_lines_cannot_be_split_by_client_input(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service")
    client.get("/v1/models/x%0AINFO%20forged")
    messages = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert messages and all("\n" not in m for m in messages)
    assert "x\\nINFO forged" in messages[0]
    assert printable("a\x1b[31mb\u2028c") == "a\\x1b[31mb\\u2028c"


def test_no_redirect_is_built_from_the_host_header(client: TestClient) -> None:
    response = client.get("/v1/models/", headers={"host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404
    assert "location" not in response.headers


def test_head_on_health_and_405_with_allow(client: TestClient) -> None:
    assert client.head("/health/live").status_code == 200
    assert client.head("/health/ready").status_code == 200
    response = client.delete("/v1/predict")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_docs_are_served_without_a_cdn(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    asset = client.get("/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000
    assert client.get("/redoc").status_code == 404


def test_docs_can_be_turned_off(make_client: Callable[..., TestClient]) -> None:
    client = make_client(docs=False)
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 404


def test_cors_is_off_unless_configured(make_client: Callable[..., TestClient]) -> None:
    origin = {"origin": "https://app.example"}
    closed = make_client()
    assert "access-control-allow-origin" not in closed.get("/health/live", headers=origin).headers
    opened = make_client(cors_origins=["https://app.example"], api_keys=KEYS)
    preflight = opened.options(
        "/v1/predict",
        headers={**origin, "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 200  # a preflight needs no key
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_openapi_schema_states_the_limits(make_client: Callable[..., TestClient]) -> None:
    schema = (
        make_client(max_images=5, api_keys=KEYS)
        .get("/openapi.json", headers={"x-api-key": KEY})
        .json()
    )
    predict = schema["paths"]["/v1/predict"]["post"]
    files = predict["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert (files["files"]["minItems"], files["files"]["maxItems"]) == (1, 5)
    target = next(p for p in predict["parameters"] if p["name"] == "target_fpr")
    number = next(s for s in target["schema"]["anyOf"] if s["type"] == "number")
    assert (number["exclusiveMinimum"], number["exclusiveMaximum"]) == (0, 1)
    assert "401" in predict["responses"]
    assert "401" not in schema["paths"]["/health/live"]["get"]["responses"]
    assert "head" in schema["paths"]["/health/live"]


def test_api_keys_come_from_the_environment_as_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("RCEGATE_API_KEYS", json.dumps(KEYS))
    monkeypatch.setenv("RCEGATE_METRICS_REQUIRE_KEY", "true")
    with pytest.raises(ValidationError, match="metrics_require_key needs metrics_keys"):
        Settings()
    monkeypatch.setenv("RCEGATE_METRICS_KEYS", json.dumps({"prometheus": KEYS["ci"]}))
    settings = Settings()
    assert settings.api_keys == KEYS and settings.metrics_require_key
    monkeypatch.setenv("RCEGATE_API_KEYS", json.dumps({"ci": KEY}))  # the key, not its hash
    with pytest.raises(ValidationError, match="give the sha256 of the key"):
        Settings()
    monkeypatch.setenv("RCEGATE_API_KEYS", json.dumps({"bad id": KEYS["ci"]}))
    with pytest.raises(ValidationError, match="api key id 'bad id'"):
        Settings()


def test_access_log_drops_and_counts_lines_while_its_writer_is_behind(
    access_lines: io.StringIO,
) -> None:
    """The event loop only enqueues: with the writer stuck and its queue (capacity 1) full, a
    line is dropped and counted, never waited for."""
    entered, release = threading.Event(), threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            assert release.wait(30), "the test never released the writer"

    stuck = Stuck()
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(stuck)
    metrics = Metrics()
    log = AccessLog(metrics, capacity=1)
    try:
        log.write({"n": 1})
        assert entered.wait(30)  # the writer holds line 1; the queue is empty
        log.write({"n": 2})  # queued
        log.write({"n": 3})  # no room: dropped at once
        assert metrics.registry.get_sample_value("rcegate_access_log_dropped_total") == 1
    finally:
        release.set()
        log.close()
        logger.removeHandler(stuck)
    assert [json.loads(line) for line in access_lines.getvalue().splitlines()] == [
        {"n": 1},
        {"n": 2},
    ]


def test_access_log_reaches_a_handler_attached_without_a_level() -> None:
    """An operator's logging config that attaches a handler to rcegate.access but sets no level
    still gets every line (the logger would otherwise inherit root's WARNING)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger(ACCESS_LOGGER)
    saved = logger.level
    logger.setLevel(logging.NOTSET)
    logger.addHandler(handler)
    try:
        log = AccessLog(Metrics())
        log.write({"path": "/v1/predict", "status": 200})
        log.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved)
    assert [json.loads(line) for line in stream.getvalue().splitlines()] == [
        {"path": "/v1/predict", "status": 200}
    ]
