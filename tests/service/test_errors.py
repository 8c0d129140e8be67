"""Every bad input gets a clear JSON 4xx in the one error shape, and the server keeps serving."""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import ImageFile

from tests.service.conftest import encode

PNG = {"content-type": "image/png"}


def error(status: int, code: str, message: str) -> dict[str, object]:
    return {"error": {"status": status, "code": code, "message": message}}


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares width x height: a decompression bomb's header."""
    data = bytearray(encode(np.zeros((8, 8), np.uint8)))
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_predict_rejects_random_bytes(client: TestClient) -> None:
    response = client.post("/v1/predict", content=os.urandom(2048), headers=PNG)
    assert response.status_code == 400
    assert response.json() == error(
        400,
        "invalid_image",
        "request body is not a decodable image (supported: PNG, JPEG, BMP, GIF, WEBP, TIFF)",
    )


def test_predict_rejects_truncated_png(client: TestClient, digit_png: bytes) -> None:
    response = client.post("/v1/predict", content=digit_png[: len(digit_png) // 2], headers=PNG)
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == "invalid_image"
    assert body["error"]["message"].startswith("request body cannot be decoded: ")


def test_predict_names_the_bad_part_among_several(client: TestClient, digit_png: bytes) -> None:
    files = [
        ("files", ("good.png", digit_png, "image/png")),
        ("files", ("bad.png", b"not an image", "image/png")),
    ]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 400
    assert response.json() == error(
        400,
        "invalid_image",
        "files[1] ('bad.png') is not a decodable image "
        "(supported: PNG, JPEG, BMP, GIF, WEBP, TIFF)",
    )


def test_predict_rejects_decompression_bomb_before_decoding(client: TestClient) -> None:
    response = client.post("/v1/predict", content=png_claiming_size(60_000, 60_000), headers=PNG)
    assert response.status_code == 413
    assert response.json() == error(
        413,
        "image_too_large",
        "request body is over the limit of 4096 pixels per side (60000x60000 declared); "
        "refused before decoding",
    )


@pytest.fixture
def pixels_decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pixels of every image Pillow decodes (`ImageFile.load`) while the test runs."""
    decoded: list[int] = []
    load = ImageFile.ImageFile.load

    def counted(image: ImageFile.ImageFile) -> object:
        if image.tile:  # pixel data still to decode (load() again on a loaded image is free)
            decoded.append(image.width * image.height)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted)
    return decoded


def test_predict_refuses_64_one_row_bombs_without_decoding_a_pixel(
    make_client: Callable[..., TestClient], digit_png: bytes, pixels_decoded: list[int]
) -> None:
    # The attack: 1 x 16,777,216 passed the old 4096² pixel limit and cost 20.5 s of CPU for 64.
    # With that pixel limit again, only the side limit stands between the bombs and the decoder.
    client = make_client(max_pixels=4096 * 4096, max_request_pixels=64 * 4096 * 4096)
    bomb = png_claiming_size(1, 16_777_216)
    files = [("files", (f"{i}.png", bomb, "image/png")) for i in range(64)]
    response = client.post("/v1/predict", files=files)
    assert pixels_decoded == [], response.text
    assert response.status_code == 413
    assert response.json() == error(
        413,
        "image_too_large",
        "files[0] ('0.png') is over the limit of 4096 pixels per side (1x16777216 declared); "
        "refused before decoding",
    )
    # The count sees decoding when there is some: a digit decodes its 28 x 28 pixels.
    assert client.post("/v1/predict", content=digit_png, headers=PNG).status_code == 200
    assert pixels_decoded == [28 * 28]


def test_predict_rejects_image_over_pixel_limit(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_pixels=10_000)
    big = client.post("/v1/predict", content=encode(np.zeros((150, 200), np.uint8)), headers=PNG)
    assert big.status_code == 413
    assert big.json() == error(
        413,
        "image_too_large",
        "request body is over the limit of 10000 pixels per image (200x150 = 30000 pixels "
        "declared); refused before decoding",
    )
    # 10,100 pixels: just over our limit and under twice it, where Pillow only warns. The full
    # message (the declared size) is the service's own check, not Pillow's warning.
    files = [("files", ("wide.png", encode(np.zeros((101, 100), np.uint8)), "image/png"))]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413
    assert response.json() == error(
        413,
        "image_too_large",
        "files[0] ('wide.png') is over the limit of 10000 pixels per image (100x101 = 10100 "
        "pixels declared); refused before decoding",
    )


def test_predict_rejects_request_over_pixel_budget_before_decoding(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(max_request_pixels=3 * 28 * 28)
    # The third image's header is valid but its pixel data is cut short: decoding anything
    # before the budget check would answer 400 invalid_image instead.
    truncated = encode(np.full((28, 28), 7, np.uint8))[:-30]
    parts = [digit_png, digit_png, truncated, digit_png]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(parts)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413
    assert response.json() == error(
        413,
        "too_many_pixels",
        "the request's 4 images are over the limit of 2352 pixels per request (3136 pixels "
        "declared; the largest, files[0] ('0.png'), is 28x28); refused before decoding",
    )
    assert client.post("/v1/predict", files=files[:2] + files[3:]).status_code == 200
    assert client.post("/v1/predict", files=files[:3]).json()["error"]["code"] == "invalid_image"


def tiff(array: np.ndarray) -> bytes:
    return encode(array, "TIFF", compression="tiff_adobe_deflate")


@pytest.mark.parametrize(
    ("array", "mode"),
    [
        (np.zeros((4096, 4096), np.float32), "F (32-bit floating point)"),  # 94 KB, 64 MiB
        (np.full((28, 28), np.nan, np.float32), "F (32-bit floating point)"),
        (np.full((28, 28), 70_000, np.int32), "I (32-bit signed integer)"),
    ],
    ids=["float-4096", "nan", "int32"],
)
def test_predict_rejects_32bit_float_and_integer_tiffs(
    client: TestClient, array: np.ndarray, mode: str
) -> None:
    response = client.post(
        "/v1/predict", content=tiff(array), headers={"content-type": "image/tiff"}
    )
    assert response.status_code == 415
    assert response.json() == error(
        415,
        "unsupported_image_mode",
        f"request body has image mode {mode}, which is not supported (supported: 1-bit, "
        "8-bit grey (L, LA), palette (P, PA), RGB, RGBA, CMYK, YCbCr, 16-bit grey)",
    )


def test_predict_answers_a_16bit_png(client: TestClient) -> None:
    array = np.full((28, 28), 40_000, np.uint16)
    response = client.post("/v1/predict", content=encode(array), headers=PNG)
    assert response.status_code == 200
    assert response.json()["predictions"][0]["original_size"] == {"width": 28, "height": 28}


def test_predict_rejects_body_over_byte_limit(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=1000)
    response = client.post("/v1/predict", content=b"\0" * 1001, headers=PNG)
    assert response.status_code == 413
    assert response.json() == error(
        413, "body_too_large", "request body is over the limit of 1000 bytes"
    )


def test_predict_enforces_byte_limit_while_streaming_without_length(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_body_bytes=1000)

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"\0" * 300

    response = client.post("/v1/predict", content=chunks(), headers=PNG)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json() == error(
        413, "body_too_large", "request body is over the limit of 1000 bytes"
    )


def test_predict_rejects_multipart_over_byte_limit(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(max_body_bytes=2000)
    files = [("files", (f"{i}.png", digit_png, "image/png")) for i in range(20)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


def test_predict_rejects_too_many_images(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(max_images=2)
    files = [("files", (f"{i}.png", digit_png, "image/png")) for i in range(3)]
    response = client.post("/v1/predict", files=files)
    assert response.status_code == 413
    assert response.json() == error(413, "too_many_images", "at most 2 images per request")
    assert client.post("/v1/predict", files=files[:2]).status_code == 200


def test_predict_without_any_body_is_no_image(client: TestClient) -> None:
    response = client.post("/v1/predict")
    assert response.status_code == 400
    assert response.json() == error(
        400,
        "no_image",
        "the request has no body; send multipart/form-data with `files` parts or an image",
    )


def test_predict_with_empty_image_body_is_no_image(client: TestClient) -> None:
    response = client.post("/v1/predict", content=b"", headers=PNG)
    assert response.status_code == 400
    assert response.json() == error(400, "no_image", "the request body is empty; send an image")


def test_predict_multipart_without_files_part_is_no_image(client: TestClient) -> None:
    response = client.post("/v1/predict", files=[("image", ("a.png", b"x", "image/png"))])
    assert response.status_code == 400
    assert response.json() == error(400, "no_image", "the multipart body has no `files` part")


def test_predict_multipart_with_text_files_field_is_invalid(client: TestClient) -> None:
    response = client.post("/v1/predict", data={"files": "hello"}, files=[("other", ("x", b"x"))])
    assert response.status_code == 400
    assert response.json() == error(
        400, "invalid_multipart", "files[0] is a text field, not a file"
    )


def test_predict_multipart_without_boundary_is_invalid(client: TestClient) -> None:
    response = client.post(
        "/v1/predict", content=b"--x--", headers={"content-type": "multipart/form-data"}
    )
    assert response.status_code == 400
    assert response.json() == error(
        400, "invalid_multipart", "invalid multipart body: Missing boundary in multipart."
    )


@pytest.mark.parametrize("media", ["text/plain", "image/svg+xml", "application/json"])
def test_predict_rejects_unsupported_content_type(client: TestClient, media: str) -> None:
    response = client.post("/v1/predict", content=b"{}", headers={"content-type": media})
    assert response.status_code == 415
    body = response.json()
    assert body["error"]["code"] == "unsupported_media_type"
    assert body["error"]["message"].startswith(f"Content-Type {media!r} is not supported; send ")


def test_predict_unknown_model_is_404(client: TestClient, digit_png: bytes) -> None:
    response = client.post("/v1/models/nope/predict", content=digit_png, headers=PNG)
    assert response.status_code == 404
    assert response.json() == error(
        404, "model_not_found", "model 'nope' is not loaded (loaded: ['tiny'])"
    )
    response = client.post("/v1/models/tiny/versions/7/predict", content=digit_png, headers=PNG)
    assert response.status_code == 404
    assert response.json() == error(
        404, "model_not_found", "model 'tiny' has no loaded version 7 (loaded: [1])"
    )
    assert client.get("/v1/models/nope").status_code == 404


def test_default_route_without_default_model_is_404(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(default_model="absent")
    response = client.post("/v1/predict", content=digit_png, headers=PNG)
    assert response.status_code == 404
    assert response.json() == error(
        404, "model_not_found", "model 'absent' is not loaded (loaded: ['tiny'])"
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            "target_fpr=abc",
            "query.target_fpr: Input should be a valid number, unable to parse string as a number",
        ),
        ("target_fpr=0", "query.target_fpr: Input should be greater than 0"),
        ("target_fpr=1.5", "query.target_fpr: Input should be less than 1"),
        ("target_fpr=0.9", "target_fpr: target_fpr must lie in [0.001, 0.5], got 0.9"),
        ("target_fpr=nan", "query.target_fpr: Input should be a finite number"),
        ("mode=strict", "query.mode: Input should be 'annotate' or 'enforce'"),
    ],
)
def test_predict_rejects_invalid_query(
    client: TestClient, digit_png: bytes, query: str, message: str
) -> None:
    response = client.post(f"/v1/predict?{query}", content=digit_png, headers=PNG)
    assert response.status_code == 422
    assert response.json() == error(422, "invalid_parameter", message)


def test_unknown_path_and_method_use_the_error_shape(client: TestClient) -> None:
    assert client.get("/nope").json() == error(404, "not_found", "Not Found")
    response = client.get("/v1/predict")
    assert response.status_code == 405
    assert response.json() == error(405, "method_not_allowed", "Method Not Allowed")


def test_internal_error_is_500_without_traceback(
    make_client: Callable[..., TestClient],
    digit_png: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_client(raise_server_exceptions=False)
    detector = client.app.state.repository.get("tiny")  # type: ignore[attr-defined]

    def broken(images: np.ndarray) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(detector, "run_arrays", broken)
    response = client.post("/v1/predict", content=digit_png, headers=PNG)
    assert response.status_code == 500
    assert response.json() == error(500, "internal_error", "internal server error")
    assert "Traceback" not in response.text and "secret" not in response.text
    # The traceback is in the server log instead.
    logged = [r for r in caplog.records if r.name == "service.app" and r.levelno == logging.ERROR]
    assert logged and logged[0].exc_info is not None
    assert logged[0].getMessage() == "POST /v1/predict -> 500 internal_error"


def test_server_keeps_serving_after_bad_requests(client: TestClient, digit_png: bytes) -> None:
    bad = [
        client.post("/v1/predict", content=os.urandom(100), headers=PNG),
        client.post("/v1/predict", content=png_claiming_size(60_000, 60_000), headers=PNG),
        client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}),
        client.post("/v1/predict", content=tiff(np.zeros((8, 8), np.float32)), headers=PNG),
        client.post("/v1/predict?target_fpr=2", content=digit_png, headers=PNG),
    ]
    assert [r.status_code for r in bad] == [400, 413, 415, 415, 422]
    assert client.post("/v1/predict", content=digit_png, headers=PNG).status_code == 200
    assert client.get("/health/ready").status_code == 200
