"""Hostile input against `rcegate serve` on 127.0.0.1: schemathesis over the live OpenAPI schema
(fixed seed) and a malformed-image corpus generated here. Never a 5xx, always healthy after."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image

from tests.conftest import TinyArtifact
from tests.service.live import live_server

logger = logging.getLogger(__name__)
SEED = 20261128
EXAMPLES = 30  # per operation and generation mode
ALLOWED = {200, 400, 404, 405, 408, 413, 415, 422}


@pytest.fixture(scope="module")
def live(tiny_artifact: TinyArtifact, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`rcegate serve` over the tiny artifact on a free loopback port."""
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with live_server(
        log,
        model_dir=str(tiny_artifact.model_dir),
        default_model=tiny_artifact.name,
        max_images="8",
    ) as server:
        yield server.url
    assert "Traceback" not in log.read_text(), log.read_text()[-5000:]


# -- schemathesis -----------------------------------------------------------------------------
# Only the test below needs schemathesis: without it that test skips, the corpus and tensor
# tests further down still run.


@pytest.fixture(scope="module")
def schemathesis() -> Any:
    return pytest.importorskip("schemathesis", reason="schemathesis is not installed")


def _checks(schemathesis: Any) -> list[Any]:
    st_checks = schemathesis.checks
    return [
        st_checks.not_a_server_error,
        st_checks.status_code_conformance,
        st_checks.content_type_conformance,
        st_checks.response_schema_conformance,
        st_checks.response_headers_conformance,
        st_checks.unsupported_method,
    ]


def _fuzz(
    operation: Any,
    mode: Any,
    live: str,
    checks: list[Any],
    cases: dict[str, int],
    statuses: dict[int, int],
) -> None:
    key = f"{operation.method.upper()} {operation.path}"

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        cases[key] = cases.get(key, 0) + 1
        response = case.call_and_validate(base_url=live, checks=checks, timeout=30)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    try:
        run()
    except Unsatisfiable:
        # No schema-violating input exists for an operation without parameters or body.
        assert mode.name == "NEGATIVE" and not operation.body and not operation.query


def test_api_conforms_to_its_schema_without_server_errors(live: str, schemathesis: Any) -> None:
    """Every operation of the live schema, positive and negative data, a fixed seed."""
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json")
    checks = _checks(schemathesis)
    cases: dict[str, int] = {}
    statuses: dict[int, int] = {}
    modes = schemathesis.GenerationMode
    for result in schema.get_all_operations():
        for mode in (modes.POSITIVE, modes.NEGATIVE):
            _fuzz(result.ok(), mode, live, checks, cases, statuses)
    logger.info(
        "schemathesis: %d cases, statuses %s", sum(cases.values()), sorted(statuses.items())
    )
    paths = httpx.get(f"{live}/openapi.json").json()["paths"]
    assert set(cases) == {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops}
    assert not any(status >= 500 for status in statuses)
    assert httpx.get(f"{live}/health/ready").status_code == 200


# -- the malformed-image corpus ---------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares `width` x `height` (valid CRCs), with little or no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the SOF0 frame size of a baseline JPEG."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def corpus() -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type): every way an image upload can be wrong or odd."""
    rng = np.random.default_rng(SEED)
    digit = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    items: list[tuple[str, bytes, str]] = []
    for i, size in enumerate([0, 1, 2, 7, 8, 16, 100, 1000, 10_000, 100_000] * 5):
        items.append((f"random-{i}", rng.bytes(size), "image/png"))
    encoded = {
        "PNG": (_save(rgb, "PNG"), "image/png"),
        "JPEG": (_save(rgb, "JPEG", quality=90), "image/jpeg"),
        "GIF": (_save(rgb.convert("P"), "GIF"), "image/gif"),
        "WEBP": (_save(rgb, "WEBP"), "image/webp"),
        "TIFF": (_save(rgb, "TIFF"), "image/tiff"),
        "BMP": (_save(rgb, "BMP"), "image/bmp"),
    }
    for fmt, (data, media) in encoded.items():
        for cut in (1, 8, 16, 33, 64, len(data) // 2, len(data) - 8, len(data) - 1):
            items.append((f"truncated-{fmt}-{cut}", data[:cut], media))
        for flip in range(12):
            corrupt = bytearray(data)
            for at in rng.integers(0, len(corrupt), 1 + flip):
                corrupt[at] ^= 1 << int(rng.integers(0, 8))
            items.append((f"corrupt-{fmt}-{flip}", bytes(corrupt), media))
        items.append((f"wrong-type-{fmt}", data, "image/png" if fmt != "PNG" else "image/gif"))
    # Bombs and lying headers: huge declared sizes, refused before any pixel is decoded.
    bomb = _save(Image.new("L", (16_000, 16_000)), "PNG", optimize=True)
    items.append(("png-bomb-16000x16000", bomb, "image/png"))
    for width, height in ((1, 2**31 - 1), (2**31 - 1, 1), (100_000, 100_000), (0, 0), (1, 0)):
        items.append((f"png-header-{width}x{height}", _png_header(width, height), "image/png"))
    jpeg = encoded["JPEG"][0]
    for width, height in ((65_535, 65_535), (0, 10), (65_535, 1)):
        items.append(
            (f"jpeg-sof-{width}x{height}", _jpeg_with_size(jpeg, width, height), "image/jpeg")
        )
    gif = bytearray(encoded["GIF"][0])
    gif[6:10] = struct.pack("<HH", 65_535, 65_535)
    items.append(("gif-screen-65535", bytes(gif), "image/gif"))
    bmp = bytearray(encoded["BMP"][0])
    bmp[18:26] = struct.pack("<ii", 1_000_000, -1_000_000)
    items.append(("bmp-header-huge", bytes(bmp), "image/bmp"))
    # Odd modes and channel counts; the model takes 1 channel, everything is converted.
    modes = {
        "1": digit.convert("1"),
        "P": rgb.convert("P"),
        "LA": digit.convert("LA"),
        "RGBA": rgb.convert("RGBA"),
        "I;16": Image.fromarray((rng.integers(0, 65_535, (28, 28))).astype(np.uint16)),
        "I": digit.convert("I"),
        "F": digit.convert("F"),
        "CMYK": rgb.convert("CMYK"),
    }
    for mode, image in modes.items():
        fmt = "TIFF" if mode in ("F", "CMYK", "I") else "PNG"
        media = "image/tiff" if fmt == "TIFF" else "image/png"
        items.append((f"mode-{mode}", _save(image, fmt), media))
    transparent = _save(rgb.convert("P"), "PNG", transparency=0)
    items.append(("mode-P-transparent", transparent, "image/png"))
    items.append(("mode-LAB", _save(rgb.convert("LAB"), "TIFF"), "image/tiff"))
    items.append(("jpeg-cmyk", _save(rgb.convert("CMYK"), "JPEG"), "image/jpeg"))
    items.append(("tiny-1x1", _save(Image.new("L", (1, 1)), "PNG"), "image/png"))
    items.append(("wide-2048x1", _save(Image.new("RGB", (2048, 1)), "PNG"), "image/png"))
    # Animated: the first frame is used.
    frames = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(5)]
    for fmt, media in (("GIF", "image/gif"), ("PNG", "image/png"), ("WEBP", "image/webp")):
        data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=10)
        items.append((f"animated-{fmt}", data, media))
    multipage = _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    items.append(("multipage-TIFF", multipage, "image/tiff"))
    # Not an image format we decode, or no image at all.
    items.append(("svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"))
    items.append(("text", b"hello", "text/plain"))
    items.append(("eps-as-png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n", "image/png"))
    return items


CORPUS = corpus()


def test_malformed_images_never_cause_a_server_error(live: str) -> None:
    outcomes: dict[int, int] = {}
    with httpx.Client(base_url=live, timeout=30) as http:
        for name, data, media in CORPUS:
            raw = http.post("/v1/predict", content=data, headers={"content-type": media})
            part = http.post("/v1/predict", files=[("files", (name, data, media))])
            for response in (raw, part):
                assert response.status_code in ALLOWED, (name, response.text[:300])
                assert response.headers["content-type"] == "application/json"
                outcomes[response.status_code] = outcomes.get(response.status_code, 0) + 1
                if response.status_code == 200:
                    result = response.json()["predictions"][0]
                    assert all(np.isfinite(v) for v in result["probabilities"])
        # Multipart oddities: too many parts, a text field, no `files` part, a broken boundary.
        many = [("files", (f"{i}.png", CORPUS[-10][1], "image/png")) for i in range(9)]
        assert http.post("/v1/predict", files=many).status_code == 413
        text = http.post("/v1/predict", data={"files": "x"}, files=[("other", ("a", b"b"))])
        assert text.status_code == 400
        broken = http.post(
            "/v1/predict",
            content=b"--x\r\nContent-Disposition: form-data; name=files\r\n\r\n",
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert broken.status_code == 400
        # Healthy after: ready, and a real answer for a real image.
        assert http.get("/health/ready").status_code == 200
        ok = http.post("/v1/predict", files=[("files", ("ok.png", CORPUS[-10][1], "image/png"))])
        assert ok.status_code == 200
    logger.info(
        "corpus: %d inputs x 2 encodings, statuses %s", len(CORPUS), sorted(outcomes.items())
    )
    assert len(CORPUS) >= 200
    assert outcomes.get(200, 0) > 0 and outcomes.get(400, 0) > 0 and outcomes.get(413, 0) > 0


def _tensor(value: float, dtype: type = np.float32, shape: tuple[int, ...] = (2, 1, 28, 28)):
    array = np.full(shape, 0.5, dtype=dtype)
    if array.size:
        array.flat[7] = value
    return array


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (_tensor(np.nan), "images contains NaN or infinite values"),
        (_tensor(np.inf), "images contains NaN or infinite values"),
        (_tensor(-np.inf), "images contains NaN or infinite values"),
        (_tensor(1.5), "image values must lie in [0, 1]"),
        (_tensor(-1e-3), "image values must lie in [0, 1]"),
        (_tensor(0.5, np.float64), "images must be float32, got float64"),
        (_tensor(0, np.int64), "images must be float32, got int64"),
        (_tensor(0.5, shape=(1, 3, 28, 28)), "images must have shape [N, 1, 28, 28]"),
        (_tensor(0.5, shape=(0, 1, 28, 28)), "images holds no image (N = 0)"),
        (_tensor(0.5, shape=(1, 28, 28)), "images must have shape [N, 1, 28, 28]"),
    ],
    ids=["nan", "inf", "-inf", "above", "below", "float64", "int64", "channels", "empty", "3d"],
)
def test_hostile_tensors_are_refused_by_the_data_plane(
    client: Any, images: np.ndarray, message: str
) -> None:
    """What the v2 adapters hand over (decoded tensors) is checked before any batch runs."""
    import asyncio
    import time

    from service.dataplane import PredictOptions
    from service.errors import InvalidInput

    plane = client.app.state.plane
    detector = plane.model()
    with pytest.raises(InvalidInput) as raised:
        asyncio.run(plane.predict_arrays(detector, images, PredictOptions(), time.monotonic() + 10))
    assert raised.value.message.startswith(message)
    assert client.get("/health/ready").status_code == 200
