"""Admission control through the app: queue full, deadlines, batching across requests.

The model is the tiny real artifact; a gate (threading.Event) around its run holds the
inference thread where a test needs the queue to fill, so nothing depends on timing luck.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.server import uvicorn_config
from service.settings import Settings
from tests.conftest import TinyArtifact
from tests.service.conftest import encode
from tests.service.live import free_port

PNG = {"content-type": "image/png"}


@dataclass
class Held:
    """The model's run, held at a gate; records the size of every batch it ran."""

    entered: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    sizes: list[int] = field(default_factory=list)


@pytest.fixture
def held_client(
    make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[TestClient, Held]]]:
    gates: list[Held] = []

    def make(**settings: object) -> tuple[TestClient, Held]:
        client = make_client(**settings)
        held = hold(client.app, "tiny", monkeypatch)  # type: ignore[arg-type]
        gates.append(held)
        return client, held

    yield make
    for held in gates:
        held.gate.set()


def metric(client: TestClient, name: str, labels: str = "") -> float:
    text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            key = line.split(" ")[0]
            if key == name or key.startswith(name + "{"):
                total += float(line.split(" ")[1])
    return total


def spin_until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # yield the GIL to the server threads; not a timing assertion
    return True


def files(pngs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]


def test_full_queue_refuses_with_503_and_retry_after_before_decoding(
    held_client: Callable[..., tuple[TestClient, Held]], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    client, held = held_client(max_queue_images=3, max_images=3)
    pngs = [encode(image) for image in digits[0][:4]]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/predict", content=pngs[0], headers=PNG)
        assert held.entered.wait(30)  # image 0 is in the model; the queue is empty again
        queued = pool.submit(client.post, "/v1/predict", files=files(pngs[1:4]))
        plane = client.app.state.plane  # type: ignore[attr-defined]
        assert spin_until(lambda: plane.busy)  # the three images are admitted
        decoded = metric(client, "rcegate_decode_duration_seconds_count")
        refused = client.post("/v1/predict", content=pngs[0], headers=PNG)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        assert metric(client, "rcegate_decode_duration_seconds_count") == decoded
        assert metric(client, "rcegate_requests_refused_total", 'reason="queue_full"') == 1
        held.gate.set()
        assert first.result(30).status_code == 200
        assert queued.result(30).status_code == 200
    assert len(queued.result().json()["predictions"]) == 3
    assert held.sizes == [1, 3]
    assert client.post("/v1/predict", content=pngs[0], headers=PNG).status_code == 200


def test_request_whose_deadline_passes_in_the_queue_gets_503_and_never_runs(
    held_client: Callable[..., tuple[TestClient, Held]], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    client, held = held_client(request_timeout=0.5)
    pngs = [encode(image) for image in digits[0][:3]]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/predict", content=pngs[0], headers=PNG)
        assert held.entered.wait(30)
        late = client.post("/v1/predict", files=files(pngs[1:3]))  # waits behind the gate
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "deadline_exceeded"
        assert late.headers["retry-after"] == "1"
        held.gate.set()
        # The first one ran, but its answer came after its own deadline too.
        assert first.result(30).status_code == 503
    # That 503 may come back before the model thread returns: wait for it, then look.
    assert spin_until(lambda: bool(held.sizes) and not client.app.state.plane.busy)  # type: ignore[attr-defined]
    assert held.sizes == [1]  # the two late images never reached the model
    assert metric(client, "rcegate_requests_refused_total", 'reason="deadline"') == 2
    assert client.app.state.plane.busy is False  # type: ignore[attr-defined]


def test_concurrent_requests_share_one_batch_and_each_gets_its_own_rows(
    held_client: Callable[..., tuple[TestClient, Held]], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    client, held = held_client(max_batch_size=64)
    images = digits[0][:7]
    pngs = [encode(image) for image in images]
    held.gate.set()
    alone = [  # the baseline: one request at a time
        client.post("/v1/predict", content=png, headers=PNG).json()["predictions"][0]
        for png in pngs
    ]
    held.gate.clear()
    held.entered.clear()
    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(client.post, "/v1/predict", content=pngs[0], headers=PNG)
        assert held.entered.wait(30)
        together = [
            pool.submit(client.post, "/v1/predict", files=files(pngs[i : i + 2])) for i in (1, 3, 5)
        ]
        batcher = client.app.state.plane._batchers[("tiny", 1)]  # type: ignore[attr-defined]
        assert spin_until(lambda: batcher._queued == 6)  # all three requests are queued
        held.gate.set()
        blocker.result(30)
        answers = [f.result(30).json()["predictions"] for f in together]
    assert held.sizes[-2:] == [1, 6]  # the three queued requests ran as one batch
    for i, answer in zip((1, 3, 5), answers, strict=True):
        for j, result in enumerate(answer):
            assert result["label"] == alone[i + j]["label"]
            assert result["scores"] == pytest.approx(alone[i + j]["scores"], abs=1e-4)


def test_client_that_disconnects_while_queued_cancels_its_images(
    tiny_artifact: TinyArtifact,
    digits: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real uvicorn server (in a thread, so the model can be held): a request waits in the
    queue behind a held batch, its client hangs up, and its images leave the queue at once."""
    settings = Settings(
        model_dir=tiny_artifact.model_dir, default_model=tiny_artifact.name, port=free_port()
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    held = Held()
    try:
        assert spin_until(lambda: server.started and app.state.repository.loaded)
        detector = app.state.repository.get(tiny_artifact.name)
        batcher = app.state.plane._batchers[(tiny_artifact.name, 1)]
        original = detector.run_arrays

        def run(images: np.ndarray) -> dict[str, np.ndarray]:
            held.entered.set()
            assert held.gate.wait(30)
            held.sizes.append(len(images))
            return original(images)  # type: ignore[no-any-return]

        monkeypatch.setattr(detector, "run_arrays", run)
        png = encode(digits[0][0])
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/predict", content=png, headers=PNG)
            assert held.entered.wait(30)
            body = b"".join(encode(image) for image in digits[0][1:2])
            with socket.create_connection(("127.0.0.1", settings.port), timeout=30) as sock:
                sock.sendall(
                    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                assert spin_until(lambda: batcher._queued == 1)  # waiting behind the gate
            assert spin_until(lambda: batcher.reserved == 0)  # hung up: the image left
            held.gate.set()
            assert first.result(30).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'route="/v1/predict",status="499"} 1.0' in metrics
        assert held.sizes == [1]  # the cancelled image never reached the model
    finally:
        held.gate.set()
        server.should_exit = True
        thread.join(30)


@contextmanager
def threaded_server(settings: Settings) -> Iterator[FastAPI]:
    """The app behind a real uvicorn server on 127.0.0.1, in a thread of this process (so a
    test can hold its model); stopped afterwards."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert spin_until(lambda: server.started and app.state.repository.loaded)
        yield app
    finally:
        server.should_exit = True
        thread.join(30)


def hold(app: FastAPI, name: str, monkeypatch: pytest.MonkeyPatch) -> Held:
    """Hold the model's runs at a gate (the data plane looks the run up per batch)."""
    detector = app.state.repository.get(name)
    original = detector.run_arrays
    held = Held()

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        held.entered.set()
        assert held.gate.wait(30), "the test never opened the gate"
        held.sizes.append(len(images))
        return original(images)  # type: ignore[no-any-return]

    monkeypatch.setattr(detector, "run_arrays", run)
    return held


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-case headers, body of its Content-Length), read
    without waiting for the connection to close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split(" ")[1]), headers, body


def test_a_queue_exactly_full_answers_503_before_the_client_sends_the_body(
    tiny_artifact: TinyArtifact,
    digits: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real server whose queue of 1 image holds exactly 1 (queued behind a held batch): a
    client that sends only a request head announcing 1 MB gets its 503 at once, for the v1 and
    the Open Inference Protocol routes, though not one byte of its body was sent. Reading the
    body first would wait for it (408 after the 5 s body timeout)."""
    name = tiny_artifact.name
    settings = Settings(
        model_dir=tiny_artifact.model_dir,
        default_model=name,
        port=free_port(),
        max_queue_images=1,
        max_images=1,
        body_timeout=5.0,
    )
    pngs = [encode(image) for image in digits[0][:2]]
    with threaded_server(settings) as app:
        url = f"http://127.0.0.1:{settings.port}"
        held = hold(app, name, monkeypatch)
        plane = app.state.plane
        try:
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(
                    httpx.post, f"{url}/v1/predict", content=pngs[0], headers=PNG, timeout=60
                )
                assert held.entered.wait(30)  # image 0 is in the model; the queue is empty
                queued = pool.submit(
                    httpx.post, f"{url}/v1/predict", content=pngs[1], headers=PNG, timeout=60
                )
                assert spin_until(lambda: plane.busy)  # image 1 is admitted: the queue is full
                heads = {
                    "/v1/predict": "image/png",
                    f"/v2/models/{name}/infer": "application/json",
                }
                for path, media in heads.items():
                    with socket.create_connection(("127.0.0.1", settings.port), timeout=30) as sock:
                        sock.sendall(
                            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {media}\r\n"
                            "Content-Length: 1000000\r\n\r\n".encode()
                        )
                        status, headers, body = read_answer(sock)  # no body byte was sent
                    assert (status, path) == (503, path), body
                    assert headers["retry-after"] == "1"
                    error = json.loads(body)["error"]
                    message = error if path.startswith("/v2/") else error["message"]
                    assert "at capacity" in message, body
                refused = httpx.get(f"{url}/metrics").text
                assert 'rcegate_requests_refused_total{reason="queue_full"} 2.0' in refused
                held.gate.set()
                assert running.result(30).status_code == 200
                assert queued.result(30).status_code == 200
            assert held.sizes == [1, 1]
        finally:
            held.gate.set()


def test_a_request_refused_for_an_undecodable_image_gives_back_its_queue_places(
    make_client: Callable[..., TestClient], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """Admitted images hold queue places while they decode; a request refused for a bad image
    (400) gives them back, so bad requests cannot fill the queue for everyone."""
    client = make_client(max_queue_images=2, max_images=2)
    good = encode(digits[0][0])
    truncated = good[: len(good) // 2]  # its header is valid: admitted, then decoding fails
    for _ in range(3):
        refused = client.post("/v1/predict", files=files([good, truncated]))
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_image"
    assert client.app.state.plane.busy is False  # type: ignore[attr-defined]
    assert client.post("/v1/predict", files=files([good, good])).status_code == 200


def test_a_request_whose_deadline_passed_before_admission_is_refused_unqueued_and_undecoded(
    make_client: Callable[..., TestClient], digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """A deadline already passed when the images would be admitted (here: a deadline of 1 ns,
    as for a body that took the whole request timeout to arrive): 503 at admission, counted
    as a deadline refusal; nothing is reserved, decoded or run."""
    client = make_client(request_timeout=1e-9)
    late = client.post("/v1/predict", files=files([encode(image) for image in digits[0][:2]]))
    assert late.status_code == 503
    assert late.json()["error"] == {
        "status": 503,
        "code": "deadline_exceeded",
        "message": "the request's deadline passed before admission",
    }
    assert late.headers["retry-after"] == "1"
    assert metric(client, "rcegate_requests_refused_total", 'reason="deadline"') == 1
    assert metric(client, "rcegate_decode_duration_seconds_count") == 0
    assert metric(client, "rcegate_batch_size_count") == 0
