"""The demo page: served with a strict CSP and no external assets, open without an API key
while predictions still need one, off with RCEGATE_DEMO=false, and, in Debian's headless
Chromium against a real server, showing the verdict, label, score and probability bars of the
committed samples (DOM text and a screenshot)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.manifest import Manifest
from service.access import hash_key
from service.demo import CSP
from tests.conftest import DEFAULT_MODEL_DIR, ROOT
from tests.service.live import live_server

ASSETS = ["/demo", "/demo/app.js", "/demo/style.css"]
GREEN, RED = (26, 127, 55), (207, 34, 46)  # the verdict banner (service/static/demo.css)
BLUE, PURPLE = (9, 105, 218), (130, 80, 223)  # probability bars, the predicted class's bar


def test_the_page_and_its_assets_carry_a_strict_csp_and_no_external_reference(
    client: TestClient,
) -> None:
    for path in ASSETS:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        assert not re.search(r"(https?:)?//[a-z]", response.text.replace("://", "")), path
        assert "http://" not in response.text and "https://" not in response.text, path
    page = client.get("/demo").text
    assert "<script>" not in page and "style=" not in page  # nothing inline: CSP allows none
    assert "default-src 'none'" in CSP and "script-src 'self'" in CSP


def test_the_samples_are_listed_and_served_and_nothing_else(client: TestClient) -> None:
    listed = client.get("/demo/samples.json").json()
    files = {s["file"] for s in listed}
    assert files == {p.name for p in (ROOT / "samples").glob("*.png")}
    first = sorted(files)[0]
    response = client.get(f"/demo/samples/{first}")
    assert response.content == (ROOT / "samples" / first).read_bytes()
    assert response.headers["content-type"] == "image/png"
    for name in ("samples.json", "..%2Fpyproject.toml", "missing.png"):
        refused = client.get(f"/demo/samples/{name}")
        assert refused.status_code == 404
        assert refused.json()["error"]["code"] == "not_found"


def test_with_api_keys_the_page_is_open_and_predictions_still_need_the_key(
    make_client: Callable[..., TestClient], digit_png: bytes
) -> None:
    client = make_client(api_keys={"demo": hash_key("s3cret")})
    for path in [*ASSETS, "/demo/samples.json"]:
        assert client.get(path).status_code == 200, path
    files = {"files": ("digit.png", digit_png, "image/png")}
    refused = client.post("/v1/predict", files=files)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    allowed = client.post("/v1/predict", files=files, headers={"Authorization": "Bearer s3cret"})
    assert allowed.status_code == 200


def test_the_demo_can_be_switched_off(make_client: Callable[..., TestClient]) -> None:
    client = make_client(demo=False)
    for path in [*ASSETS, "/demo/samples.json"]:
        response = client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is missing: scripts/test installs Debian's chromium package")
    return found


def browse(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on `url`, its virtual clock run until the page's requests are done."""
    profile = tmp_path / "profile"
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={profile}", "--window-size=800,900", "--virtual-time-budget=30000",
        *args, url,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def pixels_near(image: Image.Image, colour: tuple[int, int, int]) -> int:
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(rgb - np.array(colour)).max(axis=2) <= 8).sum())


@pytest.mark.parametrize(
    ("sample", "state", "verdict", "banner"),
    [
        ("clean-7.png", "accepted", "Accepted: the answer can be trusted", GREEN),
        ("adversarial-5.png", "rejected", "Rejected: do not trust this answer", RED),
    ],
)
def test_chromium_shows_the_verdict_score_and_bars_of_a_sample(
    tmp_path: Path, sample: str, state: str, verdict: str, banner: tuple[int, int, int]
) -> None:
    with live_server(tmp_path / "server.log") as live:
        url = f"{live.url}/demo?sample={sample}"
        dom = browse(url, tmp_path, "--dump-dom").stdout
        shot = tmp_path / "page.png"
        browse(url, tmp_path, f"--screenshot={shot}")
    assert f'<body data-state="{state}">' in dom
    assert verdict in dom
    label = re.search(r'<p id="label">Label (\d+) +\(model mnist-rce v\d+\)</p>', dom)
    assert label is not None
    metric = Manifest.load(DEFAULT_MODEL_DIR).detection.default_metric
    score = re.search(rf"{metric} score (-?[\d.]+) vs threshold (-?[\d.]+)", dom)
    assert score is not None
    assert (float(score[1]) >= float(score[2])) == (state == "accepted")
    assert dom.count('<div class="fill"') == 10
    image = Image.open(shot)
    assert image.size == (800, 900)
    assert pixels_near(image, banner) > 5000  # the verdict banner (and the score gauge)
    assert pixels_near(image, GREEN if banner == RED else RED) < 50
    assert pixels_near(image, BLUE) > 100  # nine probability bars
    assert pixels_near(image, PURPLE) > 200  # the predicted class's bar
