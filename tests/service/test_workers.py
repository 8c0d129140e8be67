"""Worker processes (service/workers.py): the settings they get, readiness across workers, the
supervisor with stand-in workers (real processes, real signals), and a real
`rcegate serve --workers 2`: one port, one scrape for all, a worker killed and replaced."""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from fastapi.testclient import TestClient
from onnxruntime import get_available_providers as ort_providers
from prometheus_client.multiprocess import MultiProcessCollector

from service.metrics import Metrics, WorkerCollector
from service.oip import oip_pb2
from service.oip.grpc import InferenceService
from service.server import uvicorn_config
from service.settings import Settings
from service.worker_process import WorkerServer, worker_app
from service.workers import (
    CUDA_WORKERS,
    DRAIN,
    READY,
    REPLACING,
    RESTARTS,
    STARTING,
    STARTUP_FAILURE,
    Shared,
    Supervisor,
    auto_workers,
    available_cores,
    grpc_port_free,
    uses_cuda,
    worker_count,
    worker_settings,
)
from tests.conftest import DEFAULT_MODEL_DIR
from tests.service import workers_standins as standins
from tests.service.conftest import encode, wait_loaded
from tests.service.live import RCEGATE, Live, free_port, live_server

PNG = {"content-type": "image/png"}
WAIT = 60.0  # upper bound on every wait below; none of them times anything
HELD = 32  # requests held open by their bodies, at most, to have some in each of two workers


def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)  # polling interval, not an assertion
    return condition()


# -- how many workers, with which settings ---------------------------------------------------


def test_workers_share_the_cores_when_threads_are_left_to_the_default() -> None:
    settings = Settings(max_inflight_body_bytes=256 << 20, max_body_bytes=20 << 20)
    four = worker_settings(settings, 4, cores=16)
    assert (four.workers, four.intra_op_threads, four.decode_workers) == (4, 4, 2)
    sixteen = worker_settings(settings, 16, cores=16)
    assert (sixteen.intra_op_threads, sixteen.decode_workers) == (1, 1)
    assert worker_settings(settings, 4, cores=2).intra_op_threads == 1  # never 0 (ORT default)
    # The body budget is the server's: split, but never below one largest body.
    assert four.max_inflight_body_bytes == 64 << 20
    assert sixteen.max_inflight_body_bytes == 20 << 20


def test_threads_an_operator_set_are_kept_in_every_worker() -> None:
    settings = Settings(intra_op_threads=3, decode_workers=5)
    got = worker_settings(settings, 4, cores=16)
    assert (got.intra_op_threads, got.decode_workers) == (3, 5)


def test_auto_is_four_workers_per_gpu_and_one_per_core_on_cpu() -> None:
    assert auto_workers(cuda=True, cores=16) == CUDA_WORKERS == 4
    assert auto_workers(cuda=True, cores=2) == 2
    assert auto_workers(cuda=False, cores=16) == 16
    assert auto_workers(cuda=False, cores=2) == 2
    assert auto_workers(cuda=False, cores=1) == 1
    assert worker_count(Settings(workers="auto", providers="cpu"), cores=8) == 8
    assert worker_count(Settings(workers="auto", providers="cuda"), cores=8) == 4
    assert worker_count(Settings(workers=3), cores=8) == 3
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


def test_a_bad_worker_count_is_refused_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RCEGATE_WORKERS", "auto")
    assert Settings().workers == "auto"
    monkeypatch.setenv("RCEGATE_WORKERS", "2")
    assert Settings().workers == 2
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    done = subprocess.run(
        [str(RCEGATE), "serve", "--workers", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: invalid settings: --workers: give a number of workers from 1 to 256, or auto "
        "(got '0')"
    )


# -- readiness across workers (the real app in-process, with a worker's lifecycle) -------------


def default_model_only(root: Path) -> Path:
    """A model repository holding the committed default model alone (loads fastest)."""
    shutil.copytree(DEFAULT_MODEL_DIR, root / "models" / "mnist-rce" / DEFAULT_MODEL_DIR.name)
    return root / "models"


@pytest.fixture
def worker_one(tmp_path: Path) -> Iterator[tuple[TestClient, Shared]]:
    """Worker 1 of 2 as its process builds it; the test plays the supervisor and worker 2."""
    shared = Shared(2)
    settings = Settings(model_dir=default_model_only(tmp_path))
    with TestClient(worker_app(settings, shared, 0)) as client:
        wait_loaded(client)
        yield client, shared


def server_ready(client: TestClient) -> bool:
    state = client.app.state  # type: ignore[attr-defined]
    service = InferenceService(
        state.plane, state.repository, state.lifecycle, state.metrics, state.settings
    )
    answer = asyncio.run(service.ServerReady(oip_pb2.ServerReadyRequest(), None))
    return bool(answer.ready)


def test_every_readiness_check_waits_for_every_worker(
    worker_one: tuple[TestClient, Shared], digit_png: bytes
) -> None:
    client, shared = worker_one
    shared.states[0] = READY  # this worker loaded (what WorkerServer reports)
    shared.states[1] = STARTING
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["error"]["message"] == "worker 2 of 2 is still starting"
    assert client.get("/v2/health/ready").status_code == 503
    assert not server_ready(client)
    # Not ready, but this worker still answers what it is given.
    assert client.post("/v1/predict", content=digit_png, headers=PNG).status_code == 200
    shared.states[1] = READY
    assert client.get("/health/ready").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert server_ready(client)
    # A replacement loading its models takes no connection yet: readiness holds.
    shared.states[1] = REPLACING
    assert client.get("/health/ready").status_code == 200


def test_the_supervisors_drain_flag_drains_every_worker_at_once(
    worker_one: tuple[TestClient, Shared], digit_png: bytes
) -> None:
    client, shared = worker_one
    shared.states[0] = shared.states[1] = READY
    assert client.post("/v1/predict", content=digit_png, headers=PNG).status_code == 200
    shared.flags[DRAIN] = 1  # before this worker has even seen its SIGTERM
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
    late = client.post("/v1/predict", content=digit_png, headers=PNG)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert not server_ready(client)


# -- the worker side in-process (service/worker_process.py) -----------------------------------


def test_a_replacement_has_loaded_its_models_when_its_server_starts(tmp_path: Path) -> None:
    shared = Shared(2)
    shared.states[0] = REPLACING
    app = worker_app(Settings(model_dir=default_model_only(tmp_path)), shared, 0)
    with TestClient(app) as client:  # the lifespan ran: what uvicorn awaits before accepting
        assert client.app.state.repository.ready  # type: ignore[attr-defined]


def test_a_worker_reports_ready_once_loaded_and_starting_when_nothing_loaded(
    worker_app_client: Callable[[Path], tuple[TestClient, WorkerServer]], tmp_path: Path
) -> None:
    _, server = worker_app_client(default_model_only(tmp_path / "good"))
    server.loaded()
    assert server.shared.states[0] == READY
    empty = tmp_path / "empty"
    empty.mkdir()
    _, broken = worker_app_client(empty)
    broken.shared.states[0] = READY
    broken.loaded()
    assert broken.shared.states[0] == STARTING  # no model: readiness stays off everywhere


def test_a_worker_stops_when_its_supervisor_is_gone(
    worker_app_client: Callable[[Path], tuple[TestClient, WorkerServer]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, server = worker_app_client(default_model_only(tmp_path))
    server.parent = os.getppid()
    server.beat()
    assert server.shared.beats[0] > 0 and not server.should_exit
    server.parent = os.getppid() + 100_000  # not this process's parent: it was re-parented
    server.beat()
    assert server.should_exit
    assert f"the supervisor (pid {server.parent}) is gone: draining" in caplog.text


@pytest.fixture
def worker_app_client() -> Iterator[Callable[[Path], tuple[TestClient, WorkerServer]]]:
    """Worker 1 of 2 over a model directory, with its WorkerServer (not started)."""
    clients: list[TestClient] = []

    def make(model_dir: Path) -> tuple[TestClient, WorkerServer]:
        settings = Settings(model_dir=model_dir)
        shared = Shared(2)
        app = worker_app(settings, shared, 0)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        wait_loaded(client)
        config = uvicorn_config(app, settings)
        return client, WorkerServer(config, app, settings, shared, 0, os.getppid())

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_metrics_of_worker_processes_carry_the_workers_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    metrics = Metrics()
    assert metrics.multiprocess_dir == str(tmp_path)
    metrics.scrape_collectors.append(WorkerCollector(lambda: ({"ready": 3, "starting": 1}, 2)))
    text = metrics.exposition().decode()
    assert 'rcegate_workers{state="ready"} 3.0' in text
    assert 'rcegate_workers{state="starting"} 1.0' in text
    assert 'rcegate_workers{state="replacing"} 0.0' in text
    assert "rcegate_worker_restarts_total 2.0" in text


def test_the_supervisor_refuses_ports_in_use_before_starting_any_worker() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert isinstance(grpc_port_free("127.0.0.1", port), OSError)
        grpc_taken = Settings(port=0, grpc_port=port)
        assert Supervisor(grpc_taken, 2, cores=2).run() == STARTUP_FAILURE
        http_taken = Settings(port=port, grpc_port=0)
        assert Supervisor(http_taken, 2, cores=2).run() == 1
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_cuda_is_used_only_when_asked_for_or_present(monkeypatch: pytest.MonkeyPatch) -> None:
    assert uses_cuda(Settings(providers="cuda")) and not uses_cuda(Settings(providers="cpu"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not uses_cuda(Settings(providers="auto"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    has_gpu = bool(glob.glob("/dev/nvidia[0-9]*"))
    assert uses_cuda(Settings(providers="auto")) == (has_gpu and "CUDA" in str(ort_providers()))


# -- the supervisor, with stand-in workers ---------------------------------------------------
# Stand-in workers (tests/service/workers_standins.py): real processes, no models.


def supervise(
    target: Callable[..., None],
    until: Callable[[Shared], bool],
    then: Callable[[Shared], bool] | None = None,
    **overrides: object,
) -> tuple[int, Supervisor, bool]:
    """Run a Supervisor of two stand-ins in this (main) thread; once `until` holds (or after
    WAIT at most), send this process SIGTERM, as an orchestrator would, and with `then`, a
    second SIGTERM once `then` holds. Returns the exit status, the supervisor, and whether
    `until` (and `then`) held before the supervisor ended."""
    values: dict[str, object] = {"port": 0, "grpc_port": 0, "drain_seconds": 5}
    settings = Settings(**{**values, **overrides})  # type: ignore[arg-type]
    supervisor = Supervisor(settings, 2, cores=2, target=target)
    shared = supervisor.shared
    finished = threading.Event()
    reached: list[bool] = []

    def terminate_when_done() -> None:
        for condition in (until, then):
            if condition is None:
                continue
            wait_until(lambda c=condition: finished.is_set() or c(shared))
            reached.append(not finished.is_set() and condition(shared))
            if not finished.is_set():
                os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's handler takes it

    trigger = threading.Thread(target=terminate_when_done, daemon=True)
    trigger.start()
    try:
        code = supervisor.run()
    finally:
        finished.set()
        trigger.join(timeout=WAIT)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # put back as it was
    assert supervisor.metrics_dir and not os.path.exists(supervisor.metrics_dir)
    return code, supervisor, all(reached)


def all_ready_after_restarts(count: int) -> Callable[[Shared], bool]:
    return lambda shared: (
        shared.flags[RESTARTS] == count and all(state == READY for state in shared.states)
    )


def test_a_worker_that_cannot_start_stops_the_whole_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    code, supervisor, _ = supervise(standins.fail_start, lambda shared: False)
    assert code == STARTUP_FAILURE
    assert supervisor.shared.flags[RESTARTS] == 0  # never replaced: it would fail the same way
    assert "could not start (exit 3): stopping" in caplog.text


def test_a_dead_worker_is_replaced_and_sigterm_then_stops_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.workers")
    code, supervisor, replaced = supervise(standins.crash, all_ready_after_restarts(1))
    assert replaced and code == 0
    assert supervisor.shared.flags[RESTARTS] == 1
    assert re.search(r"worker 1 \(pid \d+\) exited with 1; replacing it\n", caplog.text)
    assert "draining 2 workers" in caplog.text


def test_a_second_signal_stops_workers_still_draining(caplog: pytest.LogCaptureFixture) -> None:
    """The stand-ins never finish a drain; a second SIGTERM must end them (forwarded), not the
    kill that follows drain_seconds (60 here: the test would wait that long, and exit 1)."""
    caplog.set_level(logging.INFO, logger="service.workers")
    code, _, both_signals = supervise(
        standins.slow_drain,
        lambda shared: all(state == READY for state in shared.states),
        then=lambda shared: all(state == STARTING for state in shared.states),
        drain_seconds=60,
    )
    assert both_signals and code == 0  # exited on their own: none was killed
    assert "signal 15 again: stopping the workers now" in caplog.text


def test_a_worker_whose_loop_stops_beating_is_killed_and_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    code, supervisor, replaced = supervise(
        standins.hang, all_ready_after_restarts(1), worker_timeout=0.5
    )
    assert replaced and code == 0
    assert supervisor.shared.flags[RESTARTS] == 1
    assert re.search(r"worker 1 \(pid \d+\) has not answered for \d+ s: killing it", caplog.text)
    assert re.search(r"worker 1 \(pid \d+\) killed by signal 9; replacing it", caplog.text)


# -- a real `rcegate serve --workers 2` --------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Live, int]]:
    """`rcegate serve --workers 2` over the committed models (all four: a replacement then
    takes long enough to load that taking connections before it is ready would show)."""
    grpc_port = free_port()
    log = tmp_path_factory.mktemp("workers") / "server.log"
    # Bodies may be held open (by the test) while a worker is replaced: no 408 meanwhile.
    settings = {
        "grpc_port": str(grpc_port),
        "body_timeout": str(WAIT),
        "request_timeout": str(WAIT),
    }
    with live_server(log, "--workers", "2", **settings) as server:
        yield server, grpc_port


@pytest.fixture(scope="module")
def pngs(digits: tuple[np.ndarray, np.ndarray]) -> list[bytes]:
    return [encode(image) for image in digits[0][:16]]


def prefix(response: httpx.Response) -> str:
    """The answering process: request ids are a per-process random prefix and a counter."""
    return response.headers["x-request-id"][:16]


def test_two_workers_answer_on_one_port_and_one_scrape_counts_both(
    two_workers: tuple[Live, int], pngs: list[bytes]
) -> None:
    server, grpc_port = two_workers
    assert len(server.worker_pids()) == 2
    log = server.log.read_text()
    # Ready (the fixture waited for it) only once both had loaded their models.
    assert len(set(re.findall(r"worker (\d) \(pid \d+\) is ready", log))) == 2
    route = 'route="/v1/predict",status="200"'
    before = server.metric("rcegate_http_requests_total", route)
    answered: set[str] = set()
    sent = 0
    while len(answered) < 2 and sent < 200:  # a fresh connection each: either worker accepts
        answer = httpx.post(f"{server.url}/v1/predict", content=pngs[sent % 16], headers=PNG)
        assert answer.status_code == 200
        answered.add(prefix(answer))
        sent += 1
    assert len(answered) == 2, "one worker answered every request"
    # One scrape, whichever worker answers it, counts every worker's requests.
    assert server.metric("rcegate_http_requests_total", route) == before + sent
    assert server.metric("rcegate_images_total") >= sent
    assert server.metric("rcegate_requests_in_flight") == 1  # this scrape
    assert server.metric("rcegate_workers", 'state="ready"') == 2
    # One series per model version, not one per worker.
    assert server.metric("rcegate_model_info", 'model="mnist-rce"') == 1
    # gRPC: both workers on the one port.
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert client.is_server_ready()
    tensor = tgrpc.InferInput("images", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    assert client.infer("mnist-rce", [tensor]).as_numpy("accepted").shape == (1,)


def test_a_second_server_cannot_share_the_grpc_port_of_a_running_one(
    two_workers: tuple[Live, int], tmp_path: Path
) -> None:
    # The workers hold it with SO_REUSEPORT; a second server must fail, not split the traffic.
    _, grpc_port = two_workers
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    for workers in ("2", "1"):
        command = [str(RCEGATE), "serve", "--port", str(free_port()), "--workers", workers]
        command += ["--grpc-port", str(grpc_port), "--model-dir", str(tmp_path)]
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert done.returncode == 1, (workers, done.stderr)
        assert done.stderr.strip().splitlines() == [
            f"error: the gRPC port {grpc_port} on 127.0.0.1 is in use (--grpc-port)"
        ]


def test_a_second_server_on_a_taken_http_port_fails_at_once(
    two_workers: tuple[Live, int], tmp_path: Path
) -> None:
    server, _ = two_workers
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    command = [str(RCEGATE), "serve", "--port", str(server.port), "--workers", "2"]
    command += ["--grpc-port", "0", "--model-dir", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: the HTTP port {server.port} on 127.0.0.1 is in use (--port)"
    ]


def in_flight_of(server: Live, pid: int) -> float:
    """One worker's `rcegate_requests_in_flight`, read from its own file in the metrics
    directory (no HTTP request, so no scrape counts itself)."""
    (directory,) = re.findall(r"metrics of every worker in (\S+)", server.log.read_text())
    path = Path(directory) / f"gauge_livesum_{pid}.db"
    if not path.exists():
        return 0.0
    for metric in MultiProcessCollector.merge([str(path)]):
        if metric.name == "rcegate_requests_in_flight":
            return sum(sample.value for sample in metric.samples)
    return 0.0


def test_a_killed_worker_is_replaced_while_the_other_keeps_answering(
    two_workers: tuple[Live, int], pngs: list[bytes]
) -> None:
    """kill -9 one of two workers under a bounded stream of requests (4 clients, a fresh
    connection per request), while requests held open by their bodies sit in both workers:
    only requests in the dead worker's hands fail, and only as broken connections; everything
    the other worker holds or receives is answered; the replacement loads, turns ready and
    readiness never drops; /metrics keeps every count and drops the dead worker's gauges."""
    server, _ = two_workers
    route = 'route="/v1/predict",status="200"'
    before = server.metric("rcegate_http_requests_total", route)
    restarts = server.metric("rcegate_worker_restarts_total")
    pids = server.worker_pids()
    release = threading.Event()

    def held_body(png: bytes) -> Iterator[bytes]:
        yield png[: len(png) // 2]
        release.wait(timeout=WAIT)
        yield png[len(png) // 2 :]

    def post_held(png: bytes) -> int | str:
        try:
            answer = httpx.post(
                f"{server.url}/v1/predict", content=held_body(png), headers=PNG, timeout=WAIT
            )
        except httpx.TransportError as exc:
            return type(exc).__name__
        return answer.status_code

    stop = threading.Event()
    killed = threading.Event()
    statuses: list[int] = []
    broken: list[str] = []
    after_kill: list[int] = []

    def client() -> None:
        for i in range(400):  # bounded
            if stop.is_set():
                return
            try:
                answer = httpx.post(
                    f"{server.url}/v1/predict", content=pngs[i % 16], headers=PNG, timeout=30
                )
            except httpx.TransportError as exc:
                broken.append(type(exc).__name__)
                continue
            statuses.append(answer.status_code)
            if killed.is_set():
                after_kill.append(answer.status_code)

    with ThreadPoolExecutor(4 + HELD) as pool:
        held = []
        # Held requests until both workers hold some: each connection goes to whichever worker
        # accepts it first, and on a busy machine one worker can take several in a row (8 all
        # went to one in a full run), so up to HELD of them.
        while len(held) < HELD and not all(in_flight_of(server, pid) for pid in pids):
            held.append(pool.submit(post_held, pngs[len(held)]))
            assert wait_until(lambda: sum(in_flight_of(server, p) for p in pids) == len(held))
        holding = {pid: int(in_flight_of(server, pid)) for pid in pids}
        assert all(holding.values()), holding
        victim, survivor = pids
        clients = [pool.submit(client) for _ in range(4)]
        assert wait_until(lambda: len(statuses) >= 20)
        os.kill(victim, signal.SIGKILL)
        killed.set()
        replaced = wait_until(
            lambda: (
                restarts + 1 == server.metric("rcegate_worker_restarts_total")
                and server.metric("rcegate_workers", 'state="ready"') == 2
            )
        )
        readiness = httpx.get(f"{server.url}/health/ready").status_code
        assert wait_until(lambda: len(after_kill) >= 20)
        stop.set()
        release.set()
        held_results = [future.result() for future in held]
        for done in clients:
            done.result()
    assert replaced, server.log.read_text()[-3000:]
    assert readiness == 200
    assert set(statuses) == {200}
    assert len(broken) <= 4, broken  # at most the streamed requests the dead worker held
    # Exactly the held requests of the dead worker broke; the survivor's were answered.
    assert sorted(map(str, held_results)).count("200") == holding[survivor], held_results
    assert len(held_results) - held_results.count(200) == holding[victim], held_results
    now = server.worker_pids()
    assert survivor in now and victim not in now and len(now) == 2
    log = server.log.read_text()
    (index,) = re.findall(rf"worker (\d) \(pid {victim}\) killed by signal 9; replacing it", log)
    # The replacement took its first connection only after its models had loaded.
    (replacement,) = set(now) - {survivor}
    accepting = log.index(f"worker {index} (pid {replacement}) is accepting connections")
    loaded = log.index(
        f"[worker {index}] service.repository: default model", log.index("replacing it")
    )
    assert loaded < accepting
    # Counts survive the worker (its files stay); its in-flight gauge does not.
    counted = server.metric("rcegate_http_requests_total", route) - before
    answered = len(statuses) + holding[survivor]
    assert answered <= counted <= answered + len(broken)
    assert server.metric("rcegate_requests_in_flight") == 1  # this scrape
    assert server.metric("rcegate_queue_images") == 0


def test_workers_drain_and_exit_when_the_supervisor_is_killed(
    two_workers: tuple[Live, int],
) -> None:
    """kill -9 of the supervisor must not leave workers holding the port. Last in this module:
    it ends the module's server."""
    server, _ = two_workers
    workers = server.worker_pids()
    server.process.kill()
    server.process.wait()
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers))
    log = server.log.read_text()
    gone = f"the supervisor (pid {server.process.pid}) is gone: draining"
    assert log.count(gone) == 2, log[-3000:]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not LISTEN
        sock.bind(("127.0.0.1", server.port))  # nobody listens there any more
    # Only the supervisor removes the metrics directory; here that is left to the test.
    (directory,) = re.findall(r"metrics of every worker in (\S+)", log)
    shutil.rmtree(directory)
