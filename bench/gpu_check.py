"""The GPU check (bench/gpu_check.sh): every option issue 20 asks about, measured in one run.

On a machine with onnxruntime-gpu and an NVIDIA GPU, on the default model (mnist-rce/2):

1. Raw ONNX Runtime on CUDA, once per `cudnn_conv_algo_search` (EXHAUSTIVE, HEURISTIC,
   DEFAULT): the cost of each change of batch shape (the first run of batch 1, 2, 3, 5, 8, 16, 64,
   then shapes seen before after another shape ran), and steady batch 1 and batch 64 (images/s,
   p50). Then batch 64 with IO binding (outputs bound to the CPU) and with a CUDA graph (input
   and outputs on the device, copies included), the two options that pay only if they beat the
   plain run by a clear margin; and CUDA vs CPU parity on 64 real digits.
2. The echo floor (bench/echo.py) at 1 and 64 connections.
3. The service (`rcegate serve`, RCEGATE_PROVIDERS=cuda), one variant at a time: batch shapes
   `max` (one shape: padding on), `pow2` (a few buckets: padding on) and `any` (padding off),
   each with EXHAUSTIVE and DEFAULT search; wrk at 1, 16 and 64 connections; per variant the
   time from process start to ready, the warm-up time, the provider options ORT reports, and the
   distinct batch shapes the session ran under load (rcegate_batch_shape_runs_total).

It prints a table, the issue's targets per variant (0 answers 503 at 16 and 64; service@64 >=
0.5x the serving limit 1/(1/raw_b64 + 1/echo@64); p50@1 <= raw b1 p50 + 1.5 ms) and the variant
that meets them with the most images/s at 64 connections, and writes every figure to `--json`
(default bench/results/gpu-check.json). It exits 1 with "FAIL: CUDA is not in use" before
measuring anything when onnxruntime-gpu is missing or either raw ORT or the service would run
on the CPU. `--budget` (seconds) shortens the runs so the whole check fits the GPU machine's
time (about 5 minutes with the defaults); `--allow-cpu` runs the same steps on the CPU (a dry
run of this script, not a measurement).

    bash bench/gpu_check.sh [--duration 4] [--rounds 1] [--budget 330] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from serving import (  # noqa: E402
    Measured,
    Server,
    cuda_preflight,
    ensure_wrk,
    free_port,
    mnist_digits,
    model_providers,
    png_files,
    raw_run,
    shape_runs,
    shapes_between,
    started,
    wait_ready,
    wrk_run,
)

from bench.results import table, write_result  # noqa: E402
from models.manifest import INPUT_NAME, OUTPUT_NAMES  # noqa: E402
from service.detector import CUDA, create_session, session_options  # noqa: E402

SEARCHES = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
# The order of first runs, then shapes seen before after another shape ran.
PROBE_SHAPES = (1, 2, 3, 5, 8, 16, 64, 3, 5, 64, 1, 64)
VARIANTS = (
    ("max", "EXHAUSTIVE"),
    ("max", "DEFAULT"),
    ("pow2", "EXHAUSTIVE"),
    ("pow2", "DEFAULT"),
    ("any", "EXHAUSTIVE"),
    ("any", "DEFAULT"),
)
CONNECTIONS = (1, 16, 64)
STARTUP_S = 10.0  # what one variant's start-up is budgeted at (CUDA init, warm-up)
RAW_S = 45.0  # the raw probes, all three searches


@dataclass
class Variant:
    shapes: str
    search: str
    ready_s: float | None = None
    warmup_s: float | None = None
    provider_options: dict[str, Any] = field(default_factory=dict)
    providers: list[str] = field(default_factory=list)
    rows: dict[str, Any] = field(default_factory=dict)  # "service @c" -> medians + rounds
    shape_runs: dict[str, float] = field(default_factory=dict)  # shape -> runs under load
    padding_images: float = 0.0
    targets: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def name(self) -> str:
        return f"{self.shapes}/{self.search}"


def median_row(rounds: list[Measured]) -> dict[str, Any]:
    def med(key: str) -> float:
        return float(statistics.median(getattr(r, key) for r in rounds))

    return {
        "images_per_s": med("images_per_s"),
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "requests": sum(r.requests for r in rounds),
        "non_2xx": sum(r.non_2xx for r in rounds),
        "refused_503": sum(r.refused_503 for r in rounds),
        "errors": sum(r.errors for r in rounds),
        "rounds": [asdict(r) for r in rounds],
    }


# Raw ONNX Runtime ---------------------------------------------------------------------------


def cuda_options(search: str) -> dict[str, str]:
    return {"device_id": "0", "cudnn_conv_algo_search": search}


def probe_search(model: bytes, search: str, images: np.ndarray, seconds: float) -> dict[str, Any]:
    """One fresh CUDA session with `search`: shape-change costs, then steady b1 and b64."""
    providers = "cuda" if search else "cpu"
    start = time.perf_counter()
    session = create_session(model, providers, session_options(), cuda_options(search))
    created = time.perf_counter() - start
    probes = []
    seen: set[int] = set()
    for shape in PROBE_SHAPES:
        batch = np.ascontiguousarray(np.resize(images, (shape, *images.shape[1:])))
        began = time.perf_counter()
        session.run(None, {INPUT_NAME: batch})
        ms = 1000 * (time.perf_counter() - began)
        probes.append({"shape": shape, "ms": ms, "seen_before": shape in seen})
        seen.add(shape)
    b1 = raw_run(session, [images[i : i + 1] for i in range(len(images))], seconds)
    b64 = raw_run(session, [images[:64]], seconds)
    first = [p["ms"] for p in probes if not p["seen_before"]]
    again = [p["ms"] for p in probes if p["seen_before"]]
    return {
        "search": search,
        "providers": session.get_providers(),
        "session_create_s": created,
        "shape_probes": probes,
        "first_run_ms": {"min": min(first), "median": statistics.median(first), "max": max(first)},
        "seen_before_ms": {
            "min": min(again),
            "median": statistics.median(again),
            "max": max(again),
        },
        "batch_1": asdict(b1),
        "batch_64": asdict(b64),
    }


def probe_binding(
    model: bytes, images: np.ndarray, seconds: float, on_cuda: bool
) -> dict[str, Any]:
    """Batch 64 with IO binding (CPU input and outputs), and with a CUDA graph (device input and
    outputs, host copies included): whether either beats the plain run (measured above)."""
    import onnxruntime as ort

    batch = np.ascontiguousarray(images[:64])
    result: dict[str, Any] = {}
    session = create_session(model, "cuda" if on_cuda else "cpu", session_options(), {})

    def timed(step: Any) -> dict[str, Any]:
        for _ in range(3):
            step()
        latencies = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            began = time.perf_counter()
            step()
            latencies.append(time.perf_counter() - began)
        latencies.sort()
        return {
            "images_per_s": 64 * len(latencies) / sum(latencies),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "runs": len(latencies),
        }

    binding = session.io_binding()

    def bound() -> None:
        binding.bind_cpu_input(INPUT_NAME, batch)
        for name in OUTPUT_NAMES:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    try:
        result["io_binding_b64"] = timed(bound)
    except Exception as exc:  # ORT raises its own types; the figure is then simply missing
        result["io_binding_b64"] = {"error": str(exc)}
    if not on_cuda:
        result["cuda_graph_b64"] = {"error": "CUDA graphs need the CUDA provider"}
        return result
    try:
        options = {**cuda_options("EXHAUSTIVE"), "enable_cuda_graph": "1"}
        graphed = create_session(model, "cuda", session_options(), options)
        device_in = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        graph_binding = graphed.io_binding()
        graph_binding.bind_ortvalue_input(INPUT_NAME, device_in)
        outputs = {}
        probe = session.run(None, {INPUT_NAME: batch})  # the output shapes, from the plain one
        for name, value in zip(OUTPUT_NAMES, probe, strict=True):
            outputs[name] = ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
            graph_binding.bind_ortvalue_output(name, outputs[name])

        def graph_step() -> None:
            device_in.update_inplace(batch)
            graphed.run_with_iobinding(graph_binding)
            for value in outputs.values():
                value.numpy()

        result["cuda_graph_b64"] = timed(graph_step)
    except Exception as exc:  # e.g. a node the graph cannot capture (on the CPU provider)
        result["cuda_graph_b64"] = {"error": str(exc)}
    return result


def parity(model: bytes, images: np.ndarray) -> dict[str, Any]:
    """CUDA against CPU on the same 64 digits: labels and `accepted` must agree."""
    cuda = create_session(model, "cuda", session_options(), cuda_options("EXHAUSTIVE"))
    cpu = create_session(model, "cpu", session_options(), {})
    got = dict(zip(OUTPUT_NAMES, cuda.run(None, {INPUT_NAME: images[:64]}), strict=True))
    ref = dict(zip(OUTPUT_NAMES, cpu.run(None, {INPUT_NAME: images[:64]}), strict=True))
    return {
        "images": 64,
        "labels_equal": bool((got["label"] == ref["label"]).all()),
        "accepted_equal": bool((got["accepted"] == ref["accepted"]).all()),
        "max_abs_diff": {
            name: float(np.abs(got[name].astype(np.float64) - ref[name]).max())
            for name in ("logits", "log_kd", "non_me", "confidence")
        },
    }


# The service --------------------------------------------------------------------------------


def give_up(problems: list[str]) -> None:
    if problems:
        message = "\n".join(f"  - {p}" for p in problems)
        raise SystemExit(f"FAIL: CUDA is not in use (it fell back to CPU):\n{message}")


def run_variant(
    variant: Variant,
    model_dir: Path,
    model: str,
    pngs: list[Path],
    args: argparse.Namespace,
    cuda: bool,
    check: Callable[[Server], None] | None = None,
) -> None:
    env = dict(os.environ)  # the operator's RCEGATE_* settings apply; these four are the check's
    env.update(
        RCEGATE_PROVIDERS="cuda" if cuda else "cpu",
        RCEGATE_BATCH_SHAPES=variant.shapes,
        RCEGATE_CUDA_CUDNN_CONV_ALGO_SEARCH=variant.search,
        RCEGATE_GRPC_PORT="0",
    )
    port = free_port()
    command = [args.rcegate, "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--model-dir", str(model_dir), "--default-model", model]
    began = time.perf_counter()
    with started(command, env, port) as server:
        try:
            wait_ready(server, "/health/ready", timeout=120)
        except SystemExit as exc:
            variant.error = str(exc)
            return
        variant.ready_s = time.perf_counter() - began
        if check is not None:
            check(server)
        info = httpx.get(f"{server.url}/v1/models/{model}", timeout=10).json()
        variant.providers = list(info["providers"])
        variant.provider_options = info.get("provider_options", {})
        variant.warmup_s = info.get("warmup_seconds")
        wrk_run(server.url, 16, 1, pngs, args.wrk_threads, None)  # unmeasured: connections up
        before = shape_runs(server, model)
        rounds: dict[int, list[Measured]] = {c: [] for c in CONNECTIONS}
        for r in range(args.rounds):
            for c in CONNECTIONS[r % len(CONNECTIONS) :] + CONNECTIONS[: r % len(CONNECTIONS)]:
                got = wrk_run(server.url, c, args.duration, pngs, args.wrk_threads, None)
                rounds[c].append(got)
                print(
                    f"  {variant.name:16s} @{c:<3d} {got.images_per_s:9.1f} images/s  "
                    f"p50 {got.p50_ms:8.2f} ms  p99 {got.p99_ms:8.2f} ms  503 {got.refused_503}",
                    flush=True,
                )
        seen = shapes_between(before, shape_runs(server, model))
        variant.shape_runs = {str(shape): runs for shape, runs in seen["runs"].items()}
        variant.padding_images = seen["padding_images"]
        variant.rows = {f"service @{c}": median_row(rounds[c]) for c in CONNECTIONS}


def judge(variant: Variant, raw_b1_p50: float, raw_b64: float, echo64: float) -> None:
    rows = variant.rows
    limit = 1 / (1 / raw_b64 + 1 / echo64)
    at64 = rows["service @64"]["images_per_s"]
    tax = rows["service @1"]["p50_ms"] - raw_b1_p50
    refused = rows["service @16"]["refused_503"] + rows["service @64"]["refused_503"]
    variant.targets = [
        {"what": "503 at 16 and 64 connections", "value": refused, "target": "0",
         "pass": refused == 0},
        {"what": "service@64 / serving limit", "value": at64 / limit, "target": ">= 0.5",
         "pass": at64 / limit >= 0.5, "note": f"limit {limit:.0f} images/s"},
        {"what": "p50@1 - raw b1 p50 (ms)", "value": tax, "target": "<= 1.5", "pass": tax <= 1.5},
    ]  # fmt: skip


def plan(args: argparse.Namespace, variants: int) -> float:
    """Seconds the check will take with these settings (start-ups and probes estimated)."""
    wrk = len(CONNECTIONS) * args.rounds * args.duration + 1
    echo = 2 * args.rounds * args.duration
    return RAW_S + echo + variants * (STARTUP_S + wrk + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="mnist-rce")
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run (>= 1)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per configuration")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds the check may take")
    parser.add_argument("--raw-seconds", type=float, default=1.5, help="per steady raw run")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument(
        "--variants", nargs="+", default=[f"{s}/{a}" for s, a in VARIANTS],
        help="SHAPES/SEARCH pairs, e.g. max/EXHAUSTIVE pow2/DEFAULT",
    )  # fmt: skip
    parser.add_argument("--allow-cpu", action="store_true", help="dry run on the CPU")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "gpu-check.json")
    args = parser.parse_args()
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be >= 1")
    variants = []
    for spec in args.variants:
        shapes, _, search = spec.partition("/")
        if search not in SEARCHES:
            parser.error(f"--variants: {spec!r} is not SHAPES/EXHAUSTIVE|HEURISTIC|DEFAULT")
        variants.append(Variant(shapes, search))
    while plan(args, len(variants)) > args.budget and (args.duration > 2 or args.rounds > 1):
        if args.rounds > 1:
            args.rounds -= 1
        else:
            args.duration -= 1
    args.rcegate = shutil.which("rcegate") or str(Path(sys.executable).with_name("rcegate"))
    cuda = not args.allow_cpu
    started_at = time.perf_counter()
    print(
        f"gpu check: {len(variants)} service variants x {len(CONNECTIONS)} connection counts x "
        f"{args.rounds} round(s) x {args.duration} s; planned {plan(args, len(variants)):.0f} s "
        f"(budget {args.budget:.0f} s)",
        flush=True,
    )

    # CUDA really in use, before anything is measured ----------------------------------------
    artifact = args.model_dir / args.model / str(args.version)
    model = (artifact / "model.onnx").read_bytes()
    problems = cuda_preflight() if cuda else []
    raw_providers: list[str] = []
    # Raw ORT asks for CUDA the way `auto` does (CUDA if it loads, else CPU), so a silent
    # fallback shows in get_providers(); the service's own check follows (every reason at once).
    try:
        probe = create_session(model, "auto", session_options(), cuda_options("DEFAULT"))
        raw_providers = list(probe.get_providers())
    except Exception as exc:  # ORT raises its own types
        problems.append(f"raw ONNX Runtime could not start: {exc}")
    if cuda and raw_providers[:1] != [CUDA]:
        problems.append(f"raw ONNX Runtime fell back to CPU: session providers {raw_providers}")

    digits = mnist_digits(64)
    images = digits.astype(np.float32)[:, None] / np.float32(255.0)
    report: dict[str, Any] = {
        "gpu_detail": gpu_detail(),
        "budget_s": args.budget,
        "planned_s": plan(args, len(variants)),
        "model": f"{args.model}/{args.version}",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "wrk_threads": args.wrk_threads,
        "dry_run_on_cpu": not cuda,
    }
    with tempfile.TemporaryDirectory(prefix="rcegate-gpu-") as tmp, png_files(digits) as pngs:
        # Only the model under test: every other version would warm up too.
        model_dir = Path(tmp) / "models"
        shutil.copytree(artifact, model_dir / args.model / str(args.version))
        # The first variant's service must come up on CUDA too, or nothing here is worth
        # measuring: checked as soon as it is ready, before its first measurement.
        service_providers: list[str] = []

        def check(server: Server) -> None:
            service_providers.extend(model_providers(server, args.model))
            if cuda and service_providers[:1] != [CUDA]:
                problems.append(f"the service fell back to CPU: its providers {service_providers}")
            print(f"raw ONNX Runtime providers: {raw_providers}")
            print(f"service providers (GET /v1/models/{args.model}): {service_providers}")
            give_up(problems)
            ensure_wrk()

        print("the service, one variant at a time (batch shapes / cudnn_conv_algo_search)")
        run_variant(variants[0], model_dir, args.model, pngs, args, cuda, check)
        if variants[0].error:
            problems.append(
                f"the service (RCEGATE_PROVIDERS=cuda) did not start on CUDA: {variants[0].error}"
            )
            give_up(problems)

        print("raw ONNX Runtime: shape-change costs and steady batches per cuDNN search")
        raw = []
        for search in SEARCHES if cuda else ("",):
            got = probe_search(model, search, images, args.raw_seconds)
            raw.append(got)
            print(
                f"  {search or 'CPU':10s} first run of a shape {got['first_run_ms']['min']:.1f}-"
                f"{got['first_run_ms']['max']:.1f} ms, seen before "
                f"{got['seen_before_ms']['min']:.1f}-{got['seen_before_ms']['max']:.1f} ms; "
                f"b1 {got['batch_1']['images_per_s']:.0f}/s p50 {got['batch_1']['p50_ms']:.2f} "
                f"ms, b64 {got['batch_64']['images_per_s']:.0f}/s p50 "
                f"{got['batch_64']['p50_ms']:.2f} ms",
                flush=True,
            )
        report["raw"] = raw
        report["binding"] = probe_binding(model, images, args.raw_seconds, cuda)
        print(f"  IO binding / CUDA graph at b64: {json.dumps(report['binding'])}", flush=True)
        if cuda:
            report["parity"] = parity(model, images)
            print(f"  parity CUDA vs CPU: {json.dumps(report['parity'])}", flush=True)

        echo_port = free_port()
        echo_command = [sys.executable, str(BENCH / "echo.py"), "--port", str(echo_port)]
        echo_rows: dict[str, Any] = {}
        with started(echo_command, dict(os.environ), echo_port) as echo:
            wait_ready(echo, "/")
            wrk_run(echo.url, 16, 1, pngs, args.wrk_threads, None)
            for c in (1, 64):
                rounds = [
                    wrk_run(echo.url, c, args.duration, pngs, args.wrk_threads, None)
                    for _ in range(args.rounds)
                ]
                echo_rows[f"echo @{c}"] = median_row(rounds)
                print(f"  echo @{c}: {echo_rows[f'echo @{c}']['images_per_s']:.0f} requests/s")
        report["echo"] = echo_rows

        print("the service, the other variants")
        for variant in variants[1:]:
            run_variant(variant, model_dir, args.model, pngs, args, cuda)

    by_search = {r["search"] or "EXHAUSTIVE": r for r in raw}
    echo64 = echo_rows["echo @64"]["images_per_s"]
    for variant in variants:
        if variant.rows:
            reference = by_search.get(variant.search, raw[0])
            judge(
                variant,
                reference["batch_1"]["p50_ms"],
                reference["batch_64"]["images_per_s"],
                echo64,
            )
    passing = [v for v in variants if v.targets and all(t["pass"] for t in v.targets)]
    measured = [v for v in variants if v.rows]
    best = max(
        passing or measured,
        key=lambda v: v.rows["service @64"]["images_per_s"],
        default=None,
    )
    report["variants"] = [asdict(v) | {"name": v.name} for v in variants]
    report["recommendation"] = (
        None
        if best is None
        else {
            "batch_shapes": best.shapes,
            "cudnn_conv_algo_search": best.search,
            "meets_every_target": best in passing,
            "where": "service/shapes.py AUTO[CUDA] (batch shapes) and "
            "service/detector.py CudaOptions.search_for (auto search)",
        }
    )
    report["elapsed_s"] = time.perf_counter() - started_at
    print_table(report, variants, raw, echo_rows)
    title = "The GPU check: raw ONNX Runtime per cuDNN search and the service per batch-shape "
    title += f"option ({report['model']}{', a dry run on the CPU' if not cuda else ''})"
    write_result(args.json, "gpu-check", title, report, result_tables(report, variants, raw))
    print(f"gpu check: every figure in {args.json} ({report['elapsed_s']:.0f} s)")
    if cuda:
        print(f"gpu check: OK, raw and service ran on {CUDA}")


def print_table(
    report: dict[str, Any], variants: list[Variant], raw: list[dict[str, Any]], echo: dict[str, Any]
) -> None:
    machine_line = report["gpu_detail"].get("gpu") or platform.platform()
    print()
    print(f"{report['model']} on {machine_line}; {report['rounds']} round(s) x "
          f"{report['duration_s']} s, medians")  # fmt: skip
    print(f"{'raw ORT':12s} {'first run ms':>16s} {'seen before ms':>16s} {'b1/s':>8s} "
          f"{'b1 p50':>7s} {'b64/s':>9s} {'b64 p50':>8s}")  # fmt: skip
    for r in raw:
        print(
            f"{r['search'] or 'CPU':12s} "
            f"{r['first_run_ms']['min']:7.1f}-{r['first_run_ms']['max']:<8.1f} "
            f"{r['seen_before_ms']['min']:7.1f}-{r['seen_before_ms']['max']:<8.1f} "
            f"{r['batch_1']['images_per_s']:8.0f} {r['batch_1']['p50_ms']:7.2f} "
            f"{r['batch_64']['images_per_s']:9.0f} {r['batch_64']['p50_ms']:8.2f}"
        )
    for name, got in report["binding"].items():
        shown = (
            got.get("error") or f"{got['images_per_s']:.0f} images/s, p50 {got['p50_ms']:.2f} ms"
        )
        print(f"{name:22s} {shown}")
    print("echo: " + ", ".join(f"{k} {v['images_per_s']:.0f}/s" for k, v in echo.items()))
    print(f"{'service':16s} {'ready s':>7s} {'warm-up':>7s} {'@1/s':>7s} {'p50@1':>6s} "
          f"{'@16/s':>7s} {'503':>5s} {'@64/s':>7s} {'p50@64':>7s} {'503':>5s}"
          "  targets")  # fmt: skip
    for v in variants:
        if not v.rows:
            print(f"{v.name:16s} failed: {v.error}")
            continue
        r1, r16, r64 = (v.rows[f"service @{c}"] for c in CONNECTIONS)
        verdict = " ".join("PASS" if t["pass"] else "FAIL" for t in v.targets)
        print(
            f"{v.name:16s} {v.ready_s or 0:7.1f} {v.warmup_s or 0:7.2f} "
            f"{r1['images_per_s']:7.0f} {r1['p50_ms']:6.2f} {r16['images_per_s']:7.0f} "
            f"{r16['refused_503']:5d} {r64['images_per_s']:7.0f} {r64['p50_ms']:7.2f} "
            f"{r64['refused_503']:5d}  {verdict}"
        )
    for v in variants:
        if v.rows:
            search = v.provider_options.get(CUDA, {}).get("cudnn_conv_algo_search", "-")
            shapes = ", ".join(f"{s}: {n:.0f}" for s, n in v.shape_runs.items())
            print(
                f"batch shapes seen by the session under load, {v.name}: "
                f"{len(v.shape_runs)} distinct ({shapes}); padding rows {v.padding_images:.0f}; "
                f"ORT's cudnn_conv_algo_search {search}"
            )
    rec = report["recommendation"]
    if rec:
        meets = "meets every target" if rec["meets_every_target"] else "meets NOT every target"
        print(
            f"recommendation: batch_shapes={rec['batch_shapes']} "
            f"cudnn_conv_algo_search={rec['cudnn_conv_algo_search']} ({meets}; the most "
            f"images/s at 64 connections); set in {rec['where']}"
        )


def result_tables(
    report: dict[str, Any], variants: list[Variant], raw: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What the docs' benchmarks page shows of a run (bench/results.py renders it)."""
    raw_rows = [
        [r["search"] or "CPU", r["first_run_ms"]["min"], r["first_run_ms"]["max"],
         r["seen_before_ms"]["min"], r["seen_before_ms"]["max"], r["batch_1"]["images_per_s"],
         r["batch_1"]["p50_ms"], r["batch_64"]["images_per_s"], r["batch_64"]["p50_ms"]]
        for r in raw
    ]  # fmt: skip
    for name, got in report["binding"].items():
        if "error" not in got:
            raw_rows.append([name, None, None, None, None, None, None, got["images_per_s"],
                             got["p50_ms"]])  # fmt: skip
    service_rows = []
    for v in variants:
        if not v.rows:
            continue
        r1, r16, r64 = (v.rows[f"service @{c}"] for c in CONNECTIONS)
        service_rows.append(
            [v.name, v.ready_s, v.warmup_s, r1["images_per_s"], r1["p50_ms"],
             r16["images_per_s"], r16["refused_503"], r64["images_per_s"], r64["p50_ms"],
             r64["refused_503"], len(v.shape_runs),
             " ".join("pass" if t["pass"] else "FAIL" for t in v.targets)]
        )  # fmt: skip
    echo = report["echo"]
    return [
        table(
            "Raw ONNX Runtime per cudnn_conv_algo_search: first run of a shape, a shape seen "
            "before after another ran, steady batches",
            [
                "search",
                "first min ms",
                "first max ms",
                "again min ms",
                "again max ms",
                "b1 images/s",
                "b1 p50 ms",
                "b64 images/s",
                "b64 p50 ms",
            ],
            raw_rows,
            ["", ".1f", ".1f", ".1f", ".1f", ".0f", ".2f", ".0f", ".2f"],
        ),  # fmt: skip
        table(
            f"The service per batch shapes / search (echo @1 {echo['echo @1']['images_per_s']:.0f}"
            f", @64 {echo['echo @64']['images_per_s']:.0f} requests/s; targets: no 503, "
            ">= 0.5x serving limit, p50@1 <= raw b1 + 1.5 ms)",
            [
                "variant",
                "ready s",
                "warm-up s",
                "@1/s",
                "p50@1 ms",
                "@16/s",
                "503 @16",
                "@64/s",
                "p50@64 ms",
                "503 @64",
                "shapes run",
                "targets",
            ],
            service_rows,
            ["", ".1f", ".2f", ".0f", ".2f", ".0f", "d", ".0f", ".2f", "d", "d", ""],
        ),  # fmt: skip
    ]


def gpu_detail() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total"
        done = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True
        )
        info["gpu"] = done.stdout.strip() or None
    return info


if __name__ == "__main__":
    main()
