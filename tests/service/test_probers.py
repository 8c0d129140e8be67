"""Probers: per-client rejection tracking in bounded memory, one log line, bounded metrics, 429."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.errors import Throttled
from service.metrics import Metrics
from service.probers import SLOTS, ProberTracker
from service.settings import Settings
from tests.service.conftest import encode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(clock: Clock, **overrides: object) -> tuple[ProberTracker, Metrics]:
    values: dict[str, object] = {
        "prober_window": 100.0,
        "prober_min_images": 20,
        "prober_rejection_rate": 0.5,
        "prober_clients": 3,
        "prober_throttle": True,
    }
    values.update(overrides)
    metrics = Metrics()
    return ProberTracker(Settings(**values), metrics, clock), metrics  # type: ignore[arg-type]


def sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None
    return value


def test_a_client_rejected_far_above_target_is_flagged_once_and_throttled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    probers, metrics = tracker(clock)
    caplog.set_level(logging.WARNING, logger="service.probers")
    probers.observe("key:honest", 100, 5)  # 5% rejected: clean traffic
    probers.observe("key:prober", 10, 9)  # too few images to judge yet
    probers.check("key:prober")
    for _ in range(5):
        probers.observe("key:prober", 10, 9)
    with pytest.raises(Throttled) as raised:
        probers.check("key:prober")
    assert raised.value.headers == {"Retry-After": "10"}
    probers.check("key:honest")
    assert sample(metrics, "rcegate_flagged_clients") == 1
    assert sample(metrics, "rcegate_prober_flags_total") == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "client key:prober flagged as probing: 18 of 20 images rejected in the last 100 s"
    ]


def test_the_flag_lifts_when_the_window_slides_past_the_rejections() -> None:
    clock = Clock()
    probers, metrics = tracker(clock)
    probers.observe("addr:10.0.0.1", 40, 40)
    with pytest.raises(Throttled):
        probers.check("addr:10.0.0.1")
    clock.now += 100.0 * (SLOTS - 1) / SLOTS  # still inside the window
    with pytest.raises(Throttled):
        probers.check("addr:10.0.0.1")
    clock.now += 100.0 / SLOTS + 1
    probers.check("addr:10.0.0.1")  # the rejections left the window
    assert sample(metrics, "rcegate_flagged_clients") == 0


def test_memory_is_bounded_and_flagged_clients_are_evicted_last() -> None:
    clock = Clock()
    probers, metrics = tracker(clock)
    probers.observe("a", 40, 40)  # flagged
    for who in ("b", "c", "d", "e"):  # capacity 3: the unflagged go first, "a" stays
        probers.observe(who, 1, 0)
    assert len(probers) == 3
    assert sample(metrics, "rcegate_flagged_clients") == 1
    with pytest.raises(Throttled):
        probers.check("a")
    for who in ("f", "g", "h"):  # all flagged: the least recently seen of them goes
        probers.observe(who, 40, 40)
    assert len(probers) == 3
    assert sample(metrics, "rcegate_flagged_clients") == 3
    probers.check("a")  # forgotten, so not throttled


def test_ipv6_clients_are_tracked_by_their_64_network() -> None:
    probers, metrics = tracker(Clock())
    for host in range(40):  # one host rotating its addresses inside its /64
        probers.observe(f"addr:2001:db8:0:1::{host:x}", 1, 1)
    probers.observe("addr:::ffff:192.0.2.7", 40, 40)  # IPv4-mapped: the IPv4 client
    assert len(probers) == 2
    with pytest.raises(Throttled):
        probers.check("addr:2001:db8:0:1:ffff::1")
    with pytest.raises(Throttled):
        probers.check("addr:192.0.2.7")
    probers.check("addr:2001:db8:0:2::1")  # another /64
    assert sample(metrics, "rcegate_flagged_clients") == 2


def test_without_throttle_flagged_clients_are_only_counted() -> None:
    probers, metrics = tracker(Clock(), prober_throttle=False)
    probers.observe("a", 40, 40)
    probers.check("a")
    assert sample(metrics, "rcegate_flagged_clients") == 1


def test_a_probing_client_gets_429_over_http_and_the_metric_has_no_client_label(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(prober_throttle=True, prober_min_images=8, prober_rejection_rate=0.5)
    rng = np.random.default_rng(1)
    noise = [encode(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(8)]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(noise)]
    first = client.post("/v1/predict", files=files)
    assert first.status_code == 200
    assert sum(not r["accepted"] for r in first.json()["predictions"]) >= 4
    throttled = client.post("/v1/predict", content=digit_png, headers={"content-type": "image/png"})
    assert throttled.status_code == 429
    assert throttled.json()["error"]["code"] == "throttled"
    assert throttled.headers["retry-after"] == "30"
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    flagged = families["rcegate_flagged_clients"].samples
    assert [(s.labels, s.value) for s in flagged] == [({}, 1.0)]


def test_a_client_is_flagged_at_exactly_the_minimum_images_and_the_rejection_rate() -> None:
    """Both limits are inclusive ("at least"): 20 images of which 10 rejected, with a minimum
    of 20 images and a rate of 0.5, is flagged; one image or one rejection fewer is not."""
    probers, _ = tracker(Clock())
    probers.observe("key:under-rate", 20, 9)
    probers.observe("key:under-count", 19, 19)
    probers.observe("key:at-both", 20, 10)
    probers.check("key:under-rate")
    probers.check("key:under-count")
    with pytest.raises(Throttled):
        probers.check("key:at-both")


def test_the_least_recently_seen_client_is_forgotten_first() -> None:
    clock = Clock()
    probers, metrics = tracker(clock)
    probers.observe("a", 40, 40)  # flagged
    probers.observe("b", 1, 0)
    probers.observe("c", 1, 0)
    probers.observe("a", 1, 1)  # seen again: now "b" is the least recent
    probers.observe("d", 1, 0)  # capacity 3: "b" goes, "a" stays flagged
    with pytest.raises(Throttled):
        probers.check("a")
    assert sample(metrics, "rcegate_flagged_clients") == 1
