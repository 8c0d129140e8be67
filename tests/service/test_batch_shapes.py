"""Shape-stable batching through the data plane and the app (issue 20), on the real tiny model.

The ONNX Runtime session is the real one, wrapped to record the batch shape of every run it
gets (self-test, warm-up and traffic). For admission, model time comes from an injected clock:
a run at a shape the session has not seen costs `COLD` seconds on it (cuDNN's algorithm search
on the H200 cost 255-680 ms), any other run `WARM`, so the estimates and the decisions they lead
to are the same on any machine. Nothing sleeps.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from bench.shape_collapse import LegacyEwma, legacy_would_refuse
from models.manifest import INPUT_NAME
from service import detector as detector_module
from service.batching import CostModel
from service.dataplane import DataPlane, Prediction, PredictOptions
from service.detector import CPU
from service.errors import Unavailable
from service.metrics import Metrics
from service.repository import ModelRepository
from service.settings import Settings
from tests.conftest import TinyArtifact
from tests.service.conftest import READY_TIMEOUT, started, wait_loaded

COLD = 0.3  # seconds on the clock for a shape's first run
WARM = 0.001


class Clock:
    """Model time that only the recorded session advances."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recording:
    """A real ORT session that records each run's batch shape. A run at a new shape costs COLD
    on the clock; a run at `hold_at` waits for `gate` once (to look at the service meanwhile)."""

    def __init__(self, session: Any, clock: Clock, hold_at: int | None = None) -> None:
        self.session = session
        self.clock = clock
        self.shapes: list[int] = []
        self.cold: list[int] = []  # the shapes of cold runs, in order
        self.hold_at = hold_at
        self.holding = threading.Event()
        self.gate = threading.Event()

    def run(self, names: Any, feed: dict[str, np.ndarray], *args: Any) -> Any:
        shape = len(feed[INPUT_NAME])
        if shape == self.hold_at:
            self.hold_at = None
            self.holding.set()
            assert self.gate.wait(READY_TIMEOUT), "the test never opened the gate"
        if shape not in self.shapes:
            self.cold.append(shape)
            self.clock.now += COLD
        else:
            self.clock.now += WARM
        self.shapes.append(shape)
        return self.session.run(names, feed, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


@pytest.fixture
def sessions(monkeypatch: pytest.MonkeyPatch) -> list[Recording]:
    """Every session the service creates, recorded (with a fresh clock each)."""
    made: list[Recording] = []
    real = detector_module.create_session

    def create(*args: Any, **kwargs: Any) -> Any:
        made.append(Recording(real(*args, **kwargs), Clock()))
        return made[-1]

    monkeypatch.setattr(detector_module, "create_session", create)
    return made


def loaded_plane(settings: Settings, clock: Clock) -> tuple[DataPlane, Metrics]:
    """A data plane over the repository, loaded the way the app's lifespan loads it."""
    metrics = Metrics()
    repository = ModelRepository(settings)
    plane = DataPlane(settings, repository, metrics)
    plane.timer = clock

    def before_ready(detectors: list[Any]) -> None:
        metrics.describe_models(detectors)
        plane.start(detectors)

    repository.load(before_ready)
    assert repository.ready, repository.refused
    return plane, metrics


async def traffic(
    plane: DataPlane, pool: np.ndarray, clients: int, requests: int, seed: int
) -> list[tuple[list[int], Prediction | Unavailable]]:
    """`clients` concurrent closed-loop clients, each sending `requests` requests of 1-9
    random images: (image indices, answer or refusal) per request."""
    detector = plane.model()
    rng = random.Random(seed)
    done: list[tuple[list[int], Prediction | Unavailable]] = []

    async def client() -> None:
        for _ in range(requests):
            picked = rng.sample(range(len(pool)), rng.randint(1, 9))
            deadline = plane.deadline(time.monotonic())
            try:
                answer: Prediction | Unavailable = await plane.predict_arrays(
                    detector, pool[picked], PredictOptions(), deadline
                )
            except Unavailable as refused:
                answer = refused
            done.append((picked, answer))

    await asyncio.gather(*(client() for _ in range(clients)))
    return done


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def settings_for(tiny: TinyArtifact, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_dir": tiny.model_dir,
        "default_model": tiny.name,
        "max_batch_size": 16,
        "max_queue_images": 512,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def pool(digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return digits[0][:200, None].astype(np.float32) / np.float32(255)


@pytest.mark.parametrize("spec", ["pow2", "3,16"])
def test_session_sees_only_the_configured_shapes_and_padding_reaches_no_answer_or_metric(
    tiny_artifact: TinyArtifact, sessions: list[Recording], pool: np.ndarray, spec: str
) -> None:
    plane, metrics = loaded_plane(settings_for(tiny_artifact, batch_shapes=spec), Clock())
    (session,) = sessions
    allowed = {"pow2": {1, 2, 4, 8, 16}, "3,16": {3, 16}}[spec]
    loading = len(session.shapes)

    async def scenario() -> list[tuple[list[int], Prediction | Unavailable]]:
        answers = await traffic(plane, pool, clients=12, requests=6, seed=1)
        # Then a lone request of 5 images, which no allowed shape fits: whatever batches the
        # concurrent traffic formed, at least this one is padded (to 8, or to 16).
        picked = list(range(5))
        deadline = plane.deadline(time.monotonic())
        lone = await plane.predict_arrays(plane.model(), pool[picked], PredictOptions(), deadline)
        return [*answers, (picked, lone)]

    try:
        answers = asyncio.run(scenario())
    finally:
        plane.close(30)
    assert set(session.shapes) <= allowed, session.shapes  # self-test and warm-up included
    assert set(session.shapes[:loading]) == allowed  # every shape warmed up before traffic
    runs = session.shapes[loading:]
    images = sum(len(picked) for picked, _ in answers)
    assert len(answers) == 73 and not [a for _, a in answers if isinstance(a, Unavailable)]
    assert sum(runs) > images  # some batches were padded ...
    # ... and no padded row reached an answer: each is what the model says for those images.
    for picked, answer in answers:
        assert isinstance(answer, Prediction) and len(answer) == len(picked)
        alone = session.session.run(["label", "log_kd"], {INPUT_NAME: pool[picked]})
        assert answer.outputs.label.tolist() == alone[0].tolist()
        np.testing.assert_allclose(answer.outputs.arrays["log_kd"], alone[1], rtol=1e-4, atol=1e-4)
    # Nor a metric: images and batch sizes count real images; padding is counted apart.
    assert metric(metrics, "rcegate_images_total") == images
    assert metric(metrics, "rcegate_batch_size_sum") == images
    assert metric(metrics, "rcegate_batch_padding_images_total") == sum(runs) - images
    for shape in set(runs):
        runs_at = metric(metrics, "rcegate_batch_shape_runs_total", shape=str(shape))
        assert runs_at == runs.count(shape)


class Shadow:
    """The batcher's estimate (it decides), fed alongside the old one (it only says what it
    would have decided for a request of one image arriving at a queue of one image)."""

    def __init__(self, estimate: CostModel, max_queue_wait: float) -> None:
        self.estimate = estimate
        self.old = LegacyEwma()
        self.max_queue_wait = max_queue_wait
        self.old_would_refuse: list[bool] = []

    def observe(self, shape: int, images: int, seconds: float) -> None:
        self.estimate.observe(shape, images, seconds)
        self.old.observe(shape, images, seconds)
        self.old_would_refuse.append(legacy_would_refuse(self.old, 1, 1, self.max_queue_wait))

    def expected_seconds(self, images: int) -> float:
        return self.estimate.expected_seconds(images)


@pytest.mark.parametrize("spec", ["any", "pow2"])
def test_slow_first_run_of_each_shape_no_longer_makes_admission_refuse(
    tiny_artifact: TinyArtifact, sessions: list[Recording], pool: np.ndarray, spec: str
) -> None:
    """The collapse of issue 20 in miniature: every new shape's first run takes 300 ms. With any
    shapes the old admission would refuse after the first cold batch; the new one (first runs
    ignored, never below one full batch) answers everything. With buckets and warm-up no run
    during traffic is cold at all."""
    clock = Clock()
    settings = settings_for(tiny_artifact, batch_shapes=spec, max_queue_wait=0.1)
    plane, metrics = loaded_plane(settings, clock)
    (session,) = sessions
    session.clock = clock
    batcher = plane._batchers[(tiny_artifact.name, tiny_artifact.version)]
    shadow = Shadow(batcher.cost, settings.max_queue_wait)
    batcher.cost = shadow
    cold_at_load = len(session.cold)

    async def scenario() -> list[tuple[list[int], Prediction | Unavailable]]:
        detector = plane.model()
        # One request alone first: 3 images, a shape no warm-up ran for `any` (1 and 16).
        first = await plane.predict_arrays(
            detector, pool[:3], PredictOptions(), plane.deadline(time.monotonic())
        )
        return [([0, 1, 2], first), *await traffic(plane, pool, clients=16, requests=6, seed=2)]

    try:
        answers = asyncio.run(scenario())
    finally:
        plane.close(30)
    refused = [a for _, a in answers if isinstance(a, Unavailable)]
    assert (len(answers), len(refused)) == (97, 0)
    assert metric(metrics, "rcegate_requests_refused_total") == 0
    cold_in_traffic = session.cold[cold_at_load:]
    if spec == "any":
        assert cold_in_traffic[0] == 3  # the first batch paid the cold shape ...
        assert shadow.old_would_refuse[0]  # ... and the old admission would refuse after it
    else:
        assert cold_in_traffic == []  # buckets, all warmed up: nothing cold under load
    assert batcher.expected_wait(16 + 1) < settings.max_queue_wait


def test_every_shape_is_warmed_up_before_ready_and_the_time_is_exported(
    tiny_artifact: TinyArtifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = detector_module.create_session
    recordings: list[Recording] = []

    def create(*args: Any, **kwargs: Any) -> Any:
        recording = Recording(real(*args, **kwargs), Clock(), hold_at=16)  # warm-up's last
        recordings.append(recording)
        return recording

    monkeypatch.setattr(detector_module, "create_session", create)
    with started(settings_for(tiny_artifact, batch_shapes="pow2")) as client:
        try:
            assert _wait(lambda: bool(recordings) and recordings[0].holding.is_set())
            (session,) = recordings
            assert session.shapes == [2, 1, 2, 4, 8]  # self-test, then warm-up so far
            ready = client.get("/health/ready")
            assert (ready.status_code, ready.json()["error"]["code"]) == (503, "not_ready")
        finally:
            for recording in recordings:
                recording.gate.set()
        wait_loaded(client)
        assert client.get("/health/ready").status_code == 200
        assert session.shapes == [2, 1, 2, 4, 8, 16]
        info = client.get("/v1/models/tiny").json()
        text = client.get("/metrics").text
    assert info["batch_shapes"] == [1, 2, 4, 8, 16]
    assert info["provider_options"] == {CPU: {}}
    found = re.search(
        r'^rcegate_model_warmup_seconds\{model="tiny",version="1"\} (\S+)$', text, re.M
    )
    assert found and float(found.group(1)) == pytest.approx(info["warmup_seconds"])
    assert info["warmup_seconds"] > 0


def _wait(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)  # polls another thread's progress; not a timing assertion
    return True
