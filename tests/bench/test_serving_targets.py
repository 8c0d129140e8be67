"""bench/serving.py's verdicts: every service's overload runs are summarised alike, and each
variant is judged against its own unloaded p99, not the base service's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def serving() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "bench" / "serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_serving", module)
    spec.loader.exec_module(module)
    return module


def run(ok_p99: float, refused_p50: float, refused_p99: float, ok: int) -> dict[str, Any]:
    return {
        "accepted_images_per_s": ok / 5,
        "ok_p50_ms": ok_p99 / 2,
        "ok_p99_ms": ok_p99,
        "refused_p50_ms": refused_p50,
        "refused_p99_ms": refused_p99,
        "lag_p99_ms": 1.0,
        "offered": 1000,
        "sent": 1000,
        "unsent": 0,
        "unanswered": 0,
        "ok": ok,
        "refused_503": 1000 - ok,
        "non_2xx": 1000 - ok,
        "errors": 0,
    }


def test_overload_rounds_give_medians_of_latencies_and_sums_of_counts() -> None:
    bench = serving()
    runs = [run(30.0, 1.0, 9.0, 400), run(10.0, 3.0, 7.0, 500), run(20.0, 2.0, 8.0, 600)]
    got = bench.summarize_overload(runs, rate=2000.0, saturation=1000.0, unloaded_p99=2.0)
    assert got["ok_p99_ms"] == 20.0 and got["refused_p50_ms"] == 2.0
    assert got["refused_p99_ms"] == 8.0 and got["accepted_images_per_s"] == 100.0
    assert got["ok"] == 1500 and got["refused_503"] == 1500 and got["offered"] == 3000
    assert got["unloaded_p99_ms"] == 2.0 and got["rate"] == 2000.0


def test_each_variant_is_judged_against_its_own_unloaded_p99() -> None:
    bench = serving()
    rows = {
        "raw ORT batch 1": bench.Measured(1000.0, 0.8, 1.0),
        "raw ORT batch 64": bench.Measured(3000.0, 20.0, 25.0),
        "echo @64": bench.Measured(30000.0, 1.5, 3.0),
        "service @1": bench.Measured(600.0, 1.5, 2.0),
        "service @64": bench.Measured(1400.0, 45.0, 60.0),
    }
    # Both accepted p99s are 12 ms: 6x the base's unloaded 2 ms, 4x the variant's 3 ms.
    overloads = {
        "service": bench.summarize_overload([run(12.0, 1.0, 9.0, 500)], 2800.0, 1400.0, 2.0),
        "service[latency]": bench.summarize_overload(
            [run(12.0, 30.0, 9.0, 500)], 2800.0, 1400.0, 3.0
        ),
    }
    verdicts = {t["what"]: t for t in bench.verdicts(rows, overloads)}
    base = verdicts["2x overload: accepted p99 / unloaded p99"]
    variant = verdicts["2x overload [latency]: accepted p99 / unloaded p99"]
    assert base["value"] == 6.0 and not base["pass"]
    assert variant["value"] == 4.0 and variant["pass"]
    assert verdicts["2x overload: refusal p50/p99 (ms)"]["pass"]
    assert not verdicts["2x overload [latency]: refusal p50/p99 (ms)"]["pass"]  # p50 30 > 20
    assert verdicts["service@64 / raw b64 images/s"]["pass"]  # 1400 / 3000 >= 0.45
