"""Request paths no other test takes: a body without Content-Type, a streamed multipart body
over the byte limit without Content-Length, version 0 in the path, and how the metrics label a
request no route matched and one that ended in a 500."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import service.app

PNG = {"content-type": "image/png"}


def error(status: int, code: str, message: str) -> dict[str, object]:
    return {"error": {"status": status, "code": code, "message": message}}


def http_requests(client: TestClient) -> dict[tuple[str, str, str], float]:
    """rcegate_http_requests_total by (route, method, status), as scraped."""
    return {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
        if s.name == "rcegate_http_requests_total"
    }


def test_a_body_without_content_type_is_415(client: TestClient, digit_png: bytes) -> None:
    response = client.post("/v1/predict", content=digit_png)
    assert "content-type" not in response.request.headers
    assert response.status_code == 415
    assert response.json() == error(
        415,
        "unsupported_media_type",
        "a missing Content-Type is not supported; send multipart/form-data with `files` parts, "
        "or one image body with Content-Type one of image/bmp, image/gif, image/jpeg, "
        "image/jpg, image/png, image/tiff, image/webp, image/x-bmp, image/x-ms-bmp",
    )


def test_streamed_multipart_over_the_byte_limit_without_length_is_413(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(max_body_bytes=2000)
    boundary = uuid.uuid4().hex
    part = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="d.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + digit_png
        + b"\r\n"
    )
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(20):  # far more than 2000 bytes, never announced in a header
            sent.append(len(part))
            yield part
        yield f"--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/v1/predict", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json() == error(
        413, "body_too_large", "request body is over the limit of 2000 bytes"
    )
    # The same parts under the limit are answered: the limit, not the framing, refused it.
    small = make_client(max_body_bytes=len(part) * 20 + 100)
    assert small.post("/v1/predict", content=chunks(), headers=headers).status_code == 200


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_version_zero_in_the_path_is_an_invalid_parameter(
    client: TestClient, digit_png: bytes, method: str
) -> None:
    path = "/v1/models/tiny/versions/0" + ("/predict" if method == "POST" else "")
    response = client.request(method, path, content=digit_png, headers=PNG)
    assert response.status_code == 422
    assert response.json() == error(
        422,
        "invalid_parameter",
        "path.version: Value error, a version is 1-10 ASCII digits without a leading zero, "
        "at most 1000000000",
    )


def test_metrics_label_unmatched_paths_and_count_500s(
    make_client: Callable[..., TestClient],
    digit_png: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = make_client(raise_server_exceptions=False)
    assert client.get("/no/such/path").status_code == 404
    assert client.post("/v1/models/tiny/versions/1/nope").status_code == 404
    detector = client.app.state.repository.get("tiny")  # type: ignore[attr-defined]

    def broken(images: np.ndarray) -> None:
        raise RuntimeError("inference crashed")

    monkeypatch.setattr(detector, "run_arrays", broken)
    assert client.post("/v1/predict", content=digit_png, headers=PNG).status_code == 500
    counts = http_requests(client)
    # Raw paths never become labels: every unmatched request shares one bounded series.
    assert counts[("unmatched", "GET", "404")] == 1
    assert counts[("unmatched", "POST", "404")] == 1
    assert not any("nope" in route or "/no/" in route for route, _, _ in counts)
    # The error handler rendered the 500 inside the guard, which saw it go out.
    assert counts[("/v1/predict", "POST", "500")] == 1
    assert ("/v1/predict", "POST", "200") not in counts

    # Rendering the error fails too: the exception escapes the guard before any response
    # started, and the guard still counts a 500 (its default), not a missing series.
    def unrenderable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the error handler itself failed")

    monkeypatch.setattr(service.app, "error_response", unrenderable)
    assert client.post("/v1/predict", content=digit_png, headers=PNG).status_code == 500
    monkeypatch.undo()  # /metrics renders normally again
    assert http_requests(client)[("/v1/predict", "POST", "500")] == 2
