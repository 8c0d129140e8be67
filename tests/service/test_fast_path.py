"""The lean v1 predict path: the fast path past FastAPI's routing answers as the routes do, and
the body built with orjson is the documented schema byte for byte.

A query string sends a request through FastAPI's routes (`?mode=annotate` changes nothing in
the default annotate mode), so each pair below is the same request on the two paths.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.schemas import PredictResponse
from tests.service.conftest import encode

PNG = {"content-type": "image/png"}
ROUTED = "?mode=annotate"  # the same request, through FastAPI's routing and dependencies


def route_counts(client: TestClient, route: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("rcegate_http_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/predict", "digit", PNG),
        ("/v1/models/tiny/predict", "digit", PNG),
        ("/v1/models/nope/predict", "digit", PNG),  # 404 model_not_found
        ("/v1/predict", "digit", {"content-type": "text/plain"}),  # 415
        ("/v1/predict", "", PNG),  # 400 no_image
        ("/v1/predict", "junk", PNG),  # 400 invalid_image
        ("/v1/predict", "files", {}),  # multipart
    ],
    ids=["default", "named", "unknown-model", "415", "empty", "undecodable", "multipart"],
)
def test_fast_path_answers_as_the_routes_do(
    client: TestClient,
    digits: tuple[np.ndarray, np.ndarray],
    path: str,
    body: str,
    headers: dict[str, str],
) -> None:
    png = encode(digits[0][0])
    template = "/v1/predict" if path == "/v1/predict" else "/v1/models/{name}/predict"
    counted = route_counts(client, template)

    def send(url: str) -> tuple[int, dict[str, str], bytes]:
        if body == "files":
            files = [
                ("files", (f"{i}.png", encode(d), "image/png")) for i, d in enumerate(digits[0][:3])
            ]
            response = client.post(url, files=files)
        else:
            content = {"digit": png, "junk": b"\x89PNG not really", "": b""}[body]
            response = client.post(url, content=content, headers=headers)
        kept = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "date")}
        return response.status_code, kept, response.content

    fast, routed = send(path), send(path + ROUTED)
    assert fast == routed
    # Both are counted under the route template, as the metrics promise.
    assert route_counts(client, template) == counted + 2


def test_predict_body_is_the_documented_schema_byte_for_byte(
    make_client: Callable[..., TestClient], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """The body is built as plain data and serialised once by orjson (no pydantic model per
    request); pydantic's own serialisation of the same data gives the same bytes, in annotate
    and enforce mode, with rejected images (noise) among accepted ones."""
    rng = np.random.default_rng(0)
    images = [*digits[0][::400][:12], *rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)]
    files = [("files", (f"{i}.png", encode(image), "image/png")) for i, image in enumerate(images)]
    for mode, withhold in (("annotate", True), ("enforce", True), ("enforce", False)):
        client = make_client(mode=mode, withhold_rejected=withhold)
        body = client.post("/v1/predict?target_fpr=0.5", files=files).content
        parsed = PredictResponse.model_validate_json(body)
        assert {p.accepted for p in parsed.predictions} == {True, False}
        assert parsed.model_dump_json().encode() == body


def test_access_log_keeps_one_json_line_per_request_whatever_the_path(
    make_client: Callable[..., TestClient],
) -> None:
    """Lines are serialised by orjson and written in batches; a path with line separators
    that orjson leaves raw (U+2028, U+0085) is still escaped, so no client splits a line."""
    client = make_client()
    log = client.app.state.access_log  # type: ignore[attr-defined]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log.logger.addHandler(handler)
    try:
        paths = ["/health/live", "/v1/a%E2%80%A8b", "/v1/c%C2%85d%0Ae", "/v1/\u00e9t\u00e9"]
        for path in paths:
            client.get(path)
        log.close()
    finally:
        log.logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["path"] for line in lines] == [
        "/health/live",
        "/v1/a\u2028b",
        "/v1/c\x85d\ne",
        "/v1/\u00e9t\u00e9",
    ]


def test_a_request_over_its_pixel_budget_decodes_not_even_a_thumbnail(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    """Thumbnails decode on the event loop without a separate header pass, but only when they
    cannot pass the request's pixel budget; otherwise every header is judged first."""
    client = make_client(max_request_pixels=3 * 28 * 28)
    files = [("files", (f"{i}.png", digit_png, "image/png")) for i in range(4)]
    assert client.post("/v1/predict", files=files).json()["error"]["code"] == "too_many_pixels"
    assert "rcegate_decode_duration_seconds_count 0.0" in client.get("/metrics").text
    assert client.post("/v1/predict", files=files[:3]).status_code == 200
    assert "rcegate_decode_duration_seconds_count 3.0" in client.get("/metrics").text
