"""The real thing: `rcegate serve` in its own process, held-out MNIST digits as PNG over HTTP,
checked against the artifact run directly in ONNX Runtime; and proof that the service never
loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from models.manifest import MODEL_FILE, OUTPUT_NAMES, Manifest
from tests.conftest import DEFAULT_MODEL_DIR, ROOT, TinyArtifact
from tests.service.conftest import encode
from tests.service.live import live_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`rcegate serve` out of the box (default model repository), on a free loopback port."""
    with live_server(tmp_path_factory.mktemp("server") / "server.log") as live:
        yield live.url, live.log


def run_onnx(model_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    batch = (images.astype(np.float32) / 255.0)[:, None]
    return dict(zip(OUTPUT_NAMES, session.run(None, {"images": batch}), strict=True))


def test_served_mnist_digits_match_onnx_runtime(
    server: tuple[str, Path], default_test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    url, log = server
    # Digits of the artifact's own test split: never trained or calibrated on.
    images, labels = default_test_digits[0][:48], default_test_digits[1][:48]
    expected = run_onnx(DEFAULT_MODEL_DIR, images)
    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    with httpx.Client(base_url=url, timeout=30) as http:
        batch = http.post(
            "/v1/predict",
            files=[
                ("files", (f"{i}.png", encode(img), "image/png"))
                for i, img in enumerate(images[:32])
            ],
        )
        singles = [
            http.post(
                f"/v1/models/{manifest.name}/predict",
                content=encode(img),
                headers={"content-type": "image/png"},
            )
            for img in images[32:]
        ]
        info = http.get(f"/v1/models/{manifest.name}").json()
    assert batch.status_code == 200 and all(r.status_code == 200 for r in singles)
    results = batch.json()["predictions"] + [r.json()["predictions"][0] for r in singles]
    assert len(results) == len(images)
    got = np.array([r["label"] for r in results])
    np.testing.assert_array_equal(got, expected["label"])
    np.testing.assert_allclose(
        [r["probabilities"] for r in results], expected["probabilities"], atol=1e-5
    )
    np.testing.assert_array_equal([r["accepted"] for r in results], expected["accepted"])
    np.testing.assert_allclose(
        [r["scores"]["log_kd"] for r in results], expected["log_kd"], atol=1e-3
    )
    # Held-out digits are classified and accepted about as the manifest says (98.2% and 97%).
    assert (got == labels).mean() >= 0.9
    assert np.mean([r["accepted"] for r in results]) >= 0.85
    assert info["providers"][-1] == "CPUExecutionProvider"
    text = log.read_text()
    assert f"loaded model {manifest.name}/{manifest.version}" in text
    assert f"on {','.join(info['providers'])}" in text


NO_TORCH = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
import rcegate.cli  # the `rcegate` command, with every installed stage's subcommands
from service.app import create_app
from service.settings import Settings
model_dir, name, png = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).read_bytes()
app = create_app(Settings(model_dir=model_dir, default_model=name))
with TestClient(app) as client:
    assert app.state.repository.wait(60)
    response = client.post("/v1/predict", content=png, headers={"content-type": "image/png"})
    status = response.status_code
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(json.dumps({"status": status, "torch": torch}))
"""


def test_service_never_imports_torch(
    tiny_artifact: TinyArtifact, digit_png: bytes, tmp_path: Path
) -> None:
    png = tmp_path / "digit.png"
    png.write_bytes(digit_png)
    args = [str(tiny_artifact.model_dir), tiny_artifact.name, str(png)]
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"status": 200, "torch": []}
