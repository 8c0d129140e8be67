"""Cold start: seconds from `rcegate serve` starting to the first 200 on /health/ready.

Readiness waits for every model version to load, pass its self-test and run each batch shape
once (warm-up, issue 20), so this is what an orchestrator waits before sending traffic. Each
configuration starts a fresh process `--runs` times (interleaved, so machine noise hits all
alike); the table shows the median and the spread, and each configuration's warm-up seconds
(the sum over its loaded versions, from GET /v1/models). Configurations:

- `repository`: `rcegate serve` as shipped, every version under models/ (4 on this repository);
- `default model`: only models/mnist-rce/2 (copied into a temporary model directory);
- `default model, pow2`: the same with RCEGATE_BATCH_SHAPES=pow2 (seven shapes to warm up).

    python bench/cold_start.py [--runs 5] [--json bench/results/cold-start.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.processes import stop  # noqa: E402
from bench.results import table, write_result  # noqa: E402

RCEGATE = Path(sys.executable).with_name("rcegate")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cold_start(model_dir: Path, env: dict[str, str], timeout: float = 120.0) -> tuple[float, float]:
    """(seconds from process start to the first 200 on /health/ready, warm-up seconds)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RCEGATE_")}
    clean.update(RCEGATE_GRPC_PORT="0", RCEGATE_LOG_LEVEL="warning", **env)
    command = [str(RCEGATE), "serve", "--port", str(port), "--model-dir", str(model_dir)]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()  # a pipe could fill up and stall the server
    start = time.perf_counter()
    process = subprocess.Popen(command, env=clean, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=url, timeout=2) as client:
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"rcegate serve exited: {log.read().decode()[-2000:]}")
                try:
                    if client.get("/health/ready").status_code == 200:
                        ready = time.perf_counter() - start
                        break
                except httpx.TransportError:
                    pass
                if time.perf_counter() - start > timeout:
                    raise SystemExit(f"not ready in {timeout:.0f} s")
                time.sleep(0.02)  # the poll interval bounds the figure's resolution
            models = client.get("/v1/models").json()["models"]
            warmup = sum(m["warmup_seconds"] for m in models)
    finally:
        stop(process)
        log.close()
    return ready, warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rcegate-cold-") as tmp:
        single = Path(tmp) / "models"
        shutil.copytree(ROOT / "models" / "mnist-rce" / "2", single / "mnist-rce" / "2")
        configs = {
            "repository": (ROOT / "models", {}),
            "default model": (single, {}),
            "default model, pow2": (single, {"RCEGATE_BATCH_SHAPES": "pow2"}),
        }
        load_before = os.getloadavg()[0]
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        for run in range(args.runs):
            for name, (model_dir, env) in configs.items():
                got[name].append(cold_start(model_dir, env))
                ready, warmup = got[name][-1]
                print(f"  run {run + 1}/{args.runs} {name:20s} ready in {ready:.2f} s "
                      f"(warm-up {warmup:.3f} s)", flush=True)  # fmt: skip
        load_after = os.getloadavg()[0]
    figures: dict[str, object] = {"runs": args.runs, "load_average": [load_before, load_after]}
    rows = []
    print(f"cold start to ready, median of {args.runs}; load average {load_before:.1f} before")
    for name, values in got.items():
        ready = [r for r, _ in values]
        warmups = [w for _, w in values]
        median = statistics.median(ready)
        figures[name] = {"ready_s": ready, "warmup_s": warmups, "median_ready_s": median}
        rows.append([name, median, min(ready), max(ready), statistics.median(warmups)])
        print(f"  {name:20s} {median:6.2f} s (min {min(ready):.2f}, max {max(ready):.2f}); "
              f"warm-up {statistics.median(warmups):.3f} s")  # fmt: skip
    if args.json:
        write_result(
            args.json,
            "cold-start",
            f"Cold start: process start to the first 200 on /health/ready (median of {args.runs})",
            figures,
            [
                table(
                    "Seconds to ready (goal for the default model on CPU: < 5 s)",
                    ["configuration", "median s", "min s", "max s", "warm-up s"],
                    rows,
                    ["", ".2f", ".2f", ".2f", ".3f"],
                )
            ],
            ["Includes Python start-up and imports, model verification, self-test and warm-up."],
        )


if __name__ == "__main__":
    main()
