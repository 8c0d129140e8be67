"""A minute of mixed abuse against the real `rcegate serve` (issue 21): a well-behaved client
must still be served, and the server must stay answerable and bounded.

The abuse is bench/abuse.py's, run in a process of its own for `SOAK_SECONDS`, all at once and
bounded in rate: JSON bombs of every kind from two clients, gRPC messages with huge parameter
maps and unpacked shapes, rounds of 100 concurrent ~19 MiB gRPC calls with a wrong key, 2,000
idle sockets (reopened as the server closes them), and requests with random methods. Before
it, the same client measures itself alone for `BASELINE_SECONDS`: the figures are compared
side by side on one machine, never with a wall-clock constant, except the one the kubelet
applies to /health/live (a failed liveness probe restarts a healthy pod) and the memory limit
of the Kubernetes and compose deployments.

This is the one long test of the default run (about 80 s).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from bench import abuse
from tests.service.live import free_port, live_server

SOAK_SECONDS = 60.0
BASELINE_SECONDS = 10.0
OPTIONS = {
    "json_bomb_clients": 2,
    "grpc_calls": 100,  # concurrent ~19 MiB calls with a wrong key, per round
    "grpc_round_seconds": 2.0,
    "methods_rate": 100.0,  # random-method requests per second
    "idle_sockets": 2000,
}
ATTACKS = ["json-bomb", "grpc-params", "grpc-wrong-key", "idle", "methods"]


def test_a_well_behaved_client_is_served_through_a_minute_of_mixed_abuse(tmp_path: Path) -> None:
    grpc_port = free_port()
    keys = json.dumps({"bench": abuse.hashlib.sha256(abuse.KEY.encode()).hexdigest()})
    settings = {"api_keys": keys, "grpc_port": str(grpc_port), "access_log": "false"}
    # The client measures itself in this process, which holds everything the suite has loaded
    # so far: out of the collector's reach while it measures, or a full collection of it pauses
    # the client (100 ms and more) and is counted as the server's latency.
    gc.collect()
    gc.freeze()
    try:
        with live_server(tmp_path / "server.log", **settings) as live:
            report = abuse.measure(
                live.url,
                f"127.0.0.1:{grpc_port}",
                live.process.pid,
                ATTACKS,
                SOAK_SECONDS,
                BASELINE_SECONDS,
                OPTIONS,
            )
    finally:
        gc.unfreeze()
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=2))
    alone, attacked = report["unloaded"], report["under_attack"]
    summary = json.dumps(
        {k: attacked[k] for k in ("client", "health", "rss_max_bytes")}
        | {"alone": alone["client"], "ratio": report["p99_ratio"]}
    )
    # Every attack ran, and was refused for what it is.
    tallies = attacked["attacks"]
    assert set(tallies) == set(ATTACKS), tallies
    assert all(outcome.endswith((":400", ":413")) for outcome in tallies["json-bomb"]), tallies
    assert set(tallies["grpc-wrong-key"]) == {"UNAUTHENTICATED"}, tallies
    assert set(tallies["grpc-params"]) <= {
        "600k-parameters:RESOURCE_EXHAUSTED",
        "250k-parameters:INVALID_ARGUMENT",
        "2m-unpacked-shape:INVALID_ARGUMENT",
    }, tallies
    # The well-behaved client was answered, every time: its median within 5x its median alone,
    # its p99 within 25x its p99 alone. Issue 21 asks 10x, and bench/abuse.py's soak shows it
    # (4.1x in bench/results/abuse.json; 7.5x in a quiet rerun); here the attackers' own
    # processes share the two cores with the server and the client, and full test runs on a
    # busy machine measured 17.5x and 23.3x. Every regression this guards against was far past
    # 25x or had errors: before issue 21 the soak's p99 ratio was 153x, and idle sockets
    # turned requests into errors.
    assert attacked["client"]["errors"] == {}, summary
    assert attacked["client"]["requests"] > 0, summary
    assert attacked["client"]["p50_ms"] <= 5 * alone["client"]["p50_ms"], summary
    assert report["p99_ratio"] <= 25, summary
    # Liveness answered within a kubelet's patience, every 100 ms of the minute.
    assert attacked["health"]["max_ms"] < 1000, summary
    # Memory stayed far inside the deployments' 2 GiB, and /metrics did not grow with the
    # abuse (6,000 random methods would add megabytes; every series of this server: ~80 KB).
    assert attacked["rss_max_bytes"] < 1 << 30, summary
    assert report["rss_peak_bytes"] < 1 << 30, summary
    assert report["metrics_bytes_after"] < 512 * 1024, summary
