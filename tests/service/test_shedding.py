"""Refusals that stay fast: requests refused as their head arrives, before the app or the body.

A real uvicorn server (the config `rcegate serve` uses) runs the app in a thread of the test,
so the test can hold the model at a gate or hold the event loop itself: each refusal is shown
to come while the accepted work is provably still unfinished, with no clock involved.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import uvicorn

from service.app import create_app
from service.batching import Batcher
from service.dataplane import DataPlane, model_in_path, queue_refusal
from service.errors import QueueFull
from service.server import GC_THRESHOLD, DrainingServer, uvicorn_config
from service.settings import Settings
from tests.conftest import TinyArtifact
from tests.service.conftest import encode
from tests.service.live import free_port
from tests.service.test_batching import FAR, Clock, Model, images, run


def spin_until(condition: Callable[[], bool], tries: int = 3000) -> bool:
    for _ in range(tries):
        if condition():
            return True
        time.sleep(0.01)  # polling interval, not an assertion
    return False


@dataclass
class Running:
    url: str
    port: int
    server: uvicorn.Server
    plane: DataPlane

    def metric(self, name: str, labels: str) -> float:
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def loop(self) -> asyncio.AbstractEventLoop:
        front = self.server.config.http_protocol_class.front  # type: ignore[attr-defined]
        assert front._loop is not None
        loop: asyncio.AbstractEventLoop = front._loop
        return loop


@contextmanager
def running(tiny_artifact: TinyArtifact, **overrides: object) -> Iterator[Running]:
    settings = Settings(
        model_dir=tiny_artifact.model_dir,
        default_model=tiny_artifact.name,
        port=free_port(),
        access_log=False,
        **overrides,  # type: ignore[arg-type]
    )
    app = create_app(settings)
    plane: DataPlane = app.state.plane
    server = uvicorn.Server(uvicorn_config(app, settings, app.state.metrics, plane.refusal_at_head))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        assert spin_until(lambda: server.started and app.state.repository.ready)
        assert httpx.get(f"{url}/health/ready", timeout=10).status_code == 200
        yield Running(url, settings.port, server, plane)
    finally:
        server.should_exit = True
        thread.join(30)


def post_png(port: int, png: bytes, missing: int = 0) -> socket.socket:
    """A predict request on a new connection; with `missing`, its body stays that many bytes
    short, so the request stays in flight (reading its body) until the socket closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(png) + missing, png)
    )
    return sock


def answer(sock: socket.socket) -> tuple[int, bytes]:
    raw = b""
    while b"\r\n\r\n" not in raw or not raw.endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, raw
        raw += chunk
    return int(raw.split(b" ", 2)[1]), raw


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/v1/predict", (None, None)),
        ("/v1/models/tiny/predict", ("tiny", None)),
        ("/v1/models/tiny/versions/2/predict", ("tiny", 2)),
        ("/v2/models/tiny/infer", ("tiny", None)),
        ("/v2/models/tiny/versions/12/infer", ("tiny", 12)),
        ("/v2/models/tiny/versions/\u0662/infer", None),  # Arabic-Indic two: not a version
        ("/v2/models/tiny/versions/x/infer", None),
        ("/v1/models/tiny", None),
        ("/v1/models//predict", None),
        ("/v2/models/tiny/ready", None),
        ("/health/live", None),
    ],
)
def test_head_time_admission_knows_which_model_a_path_names(
    path: str, named: tuple[str | None, int | None] | None
) -> None:
    assert model_in_path(path) == named


def test_a_full_model_queue_refuses_new_requests_at_the_head(
    tiny_artifact: TinyArtifact,
    digits: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The model held at a gate with one batch, two images queued behind it (the queue's bound
    is 2): the next request is refused 503 queue_full before it is routed (the app's guard
    never counts it), while the queued ones are still waiting and health answers."""
    png = encode(digits[0][0])
    gate, entered = threading.Event(), threading.Event()
    with running(tiny_artifact, max_queue_images=2, max_images=2, max_queue_wait=0) as live:
        detector = live.plane.repository.get("tiny")
        original = detector.run_arrays

        def held(images: np.ndarray) -> dict[str, np.ndarray]:
            entered.set()
            assert gate.wait(30)
            return original(images)  # type: ignore[no-any-return]

        monkeypatch.setattr(detector, "run_arrays", held)
        routed = 'route="/v1/predict",status="503"'
        refused = 'reason="queue_full"'
        before = live.metric("rcegate_requests_refused_total", refused)
        waiting = [post_png(live.port, png)]
        try:
            assert entered.wait(30)
            waiting += [post_png(live.port, png) for _ in range(2)]
            batcher = live.plane._batchers[("tiny", 1)]
            assert spin_until(lambda: batcher.reserved == 2)
            with post_png(live.port, png) as late:
                status, raw = answer(late)
            assert status == 503 and b'"code":"overloaded"' in raw
            assert b"retry-after: 1" in raw.lower()
            assert httpx.get(f"{live.url}/health/live", timeout=10).status_code == 200
            assert live.metric("rcegate_requests_refused_total", refused) == before + 1
            assert live.metric("rcegate_http_requests_total", routed) == 0
            gate.set()
            assert [answer(sock)[0] for sock in waiting] == [200, 200, 200]
        finally:
            gate.set()
            for sock in waiting:
                sock.close()


def test_requests_still_sending_their_bodies_count_as_work_ahead_at_the_head(
    tiny_artifact: TinyArtifact, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """A full batch of requests in flight whose images are not queued yet (their bodies are
    still arriving): a new request is refused at its head, although the queue itself is empty,
    since the work ahead of it is over the wait bound."""
    png = encode(digits[0][0])
    with running(tiny_artifact, max_batch_size=2, max_queue_wait=1e-6) as live:
        for _ in range(3):  # a shape's first run is cold; the next ones measure its speed
            ok = httpx.post(
                f"{live.url}/v1/predict", content=png, headers={"content-type": "image/png"}
            )
            assert ok.status_code == 200
        assert live.plane._batchers[("tiny", 1)].expected_wait(2) > 1e-6
        refused = 'reason="queue_full"'
        before = live.metric("rcegate_requests_refused_total", refused)
        held = [post_png(live.port, png, missing=1) for _ in range(2)]
        try:
            assert spin_until(lambda: live.plane.lifecycle.in_flight == 2)
            assert live.plane._batchers[("tiny", 1)].reserved == 0
            with post_png(live.port, png) as late:
                status, raw = answer(late)
            assert status == 503 and b'"code":"overloaded"' in raw
            assert live.metric("rcegate_requests_refused_total", refused) == before + 1
            assert live.metric("rcegate_http_requests_total", 'status="503"') == 0
        finally:
            for sock in held:
                sock.close()


def test_a_loop_running_behind_refuses_requests_but_answers_health(
    tiny_artifact: TinyArtifact, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """The event loop held up (a callback that blocks it, as a stalled parse would) for ten
    times `max_loop_lag`: a request that arrives meanwhile is refused 503 loop_lag as soon as
    the loop runs again, and a health probe that arrives with it is answered."""
    png = encode(digits[0][0])
    with running(tiny_artifact, max_loop_lag=0.05) as live:
        before = live.metric("rcegate_requests_refused_total", 'reason="loop_lag"')
        with (
            socket.create_connection(("127.0.0.1", live.port), timeout=30) as request,
            socket.create_connection(("127.0.0.1", live.port), timeout=30) as probe,
        ):
            assert httpx.get(f"{live.url}/health/live", timeout=10).status_code == 200
            blocked, release = threading.Event(), threading.Event()

            def block() -> None:
                blocked.set()
                release.wait(0.5)  # ten times max_loop_lag, then the loop runs again

            live.loop().call_soon_threadsafe(block)
            assert blocked.wait(30)
            request.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(png), png)
            )
            probe.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            refused, raw = answer(request)
            assert answer(probe)[0] == 200
        assert refused == 503 and b'"code":"overloaded"' in raw
        assert live.metric("rcegate_requests_refused_total", 'reason="loop_lag"') == before + 1
        # The loop caught up: no lag, no refusal. (The test shares the server's process, so a
        # collection of the test's own garbage can hold the loop past 50 ms again: a few tries.)
        statuses = []
        for _ in range(20):
            ok = httpx.post(
                f"{live.url}/v1/predict", content=png, headers={"content-type": "image/png"}
            )
            statuses.append(ok.status_code)
            if ok.status_code == 200:
                break
            assert b"behind its requests" in ok.content
        assert statuses[-1] == 200, statuses


def test_the_capacity_check_before_the_body_judges_the_queue_as_admission_does() -> None:
    """`check_capacity` (before the body) and the head-time refusal refuse on the queue's
    expected wait too, exactly when `reserve` would refuse any request: over the bound with a
    full batch queued, never below one batch."""
    model = Model()
    clock = Clock(model, cold=0.3, warm=0.01)
    batcher = Batcher(
        "m/1",
        clock.run,
        max_batch_size=4,
        max_queue_delay=0,
        max_queue_images=16,
        max_queue_wait=0.005,  # half a batch: even 3 queued images are over it
        timer=clock,
    )

    async def scenario() -> None:
        for _ in range(2):  # shape 4 runs cold, then warm: the speed is measured
            ticket = batcher.reserve(4, time.monotonic() + FAR)
            batcher.submit(ticket, images([1, 2, 3, 4]))
            await ticket.future
        model.gate.clear()  # nothing runs from here on: the queue only fills
        assert queue_refusal(batcher) is None
        first = batcher.reserve(3, time.monotonic() + FAR)
        assert queue_refusal(batcher) is None  # over the bound, but below one batch
        assert queue_refusal(batcher, ahead=2) is None  # fewer in flight than queued
        # Three more requests in flight, not reserved yet (head-time): a full batch is ahead.
        assert isinstance(queue_refusal(batcher, ahead=6), QueueFull)
        second = batcher.reserve(3, time.monotonic() + FAR)  # 6 images: a full batch waits
        refusal = queue_refusal(batcher)
        assert isinstance(refusal, QueueFull) and "ms of work queued" in refusal.message
        with pytest.raises(QueueFull):  # what reserve says to any request now
            batcher.reserve(1, time.monotonic() + FAR)
        batcher.cancel(first)
        batcher.cancel(second)
        assert queue_refusal(batcher) is None

    run(scenario)
    model.gate.set()
    batcher.close(5)


def test_serve_freezes_what_is_loaded_once_the_models_are_ready(
    tiny_artifact: TinyArtifact,
) -> None:
    """`rcegate serve` (its DrainingServer) moves the loaded app and models out of the cyclic
    collector's reach once loading is done, and collects young objects less often: full
    collections otherwise scanned all of it, pausing every request."""
    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    settings = Settings(
        model_dir=tiny_artifact.model_dir,
        default_model=tiny_artifact.name,
        port=free_port(),
        grpc_port=0,
        access_log=False,
    )
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app, settings.drain_seconds)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert spin_until(lambda: server.started and app.state.repository.ready)
        assert spin_until(lambda: gc.get_freeze_count() > frozen)
        assert gc.get_threshold()[0] == GC_THRESHOLD
    finally:
        server.should_exit = True
        thread.join(30)
        gc.unfreeze()
        gc.set_threshold(*threshold)
