"""Every Prometheus metric of the service, defined here and nowhere else (prefix `rcegate_`).

Each app owns its own `CollectorRegistry`, so several apps in one process (tests) do not collide.
With worker processes (service/workers.py) the supervisor sets `PROMETHEUS_MULTIPROC_DIR` before
any worker starts: prometheus-client then keeps every value in a file per process, and /metrics
(`Metrics.exposition`) merges every worker's files, so one scrape of any worker sees them all.
Gauges say how workers combine (`multiprocess_mode`): sums of live workers for the in-flight and
queue gauges, the value of a live worker for the per-model constants. `Gauge.set_function` does
not reach other processes, so no gauge here uses it.
Labels are bounded: model names and versions come from the repository, `route` is the route
template (never the raw path), `method` one of the RFC 9110 methods or `other`,
`predicted_class` a class name from the manifest (empty when the answer withheld it).

Detection-score buckets: one histogram family needs one bucket list, shared by its metrics
(the paper's three, and `mahalanobis` and `combined` for models that compute them), so the
edges are the union of a coarse range per metric and, for every loaded model and each metric it
computes, the calibrated thresholds at the FPR levels in `BUCKET_FPR`. A bucket edge then sits on
each threshold an operator is likely to deploy, and `bucket{le=T}` / `count` reads as the
rejection rate at T (up to scores exactly equal to T).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # the worker supervisor imports this module and must not load ONNX Runtime
    from service.detector import Detector

BUCKET_FPR = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
COARSE_BUCKETS = (
    # confidence and combined in [0, 1] (combined < 0 below every clean calibration score);
    # non_me in [0, log(L - 1)]; log_kd <= 0, far below 0 off-manifold; mahalanobis a mean of
    # clean-standardised scores, around 0 on clean data, far below 0 off-manifold
    *(-1000.0, -300.0, -100.0, -30.0, -10.0, -3.0, -1.0),
    *(0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0, 1.5, 2.0, 2.5),
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REFUSAL_REASONS = ("queue_full", "deadline", "concurrency", "body_budget", "draining", "loop_lag")
# prometheus-client's switch for multi-process mode; read once per app, as prometheus-client does.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def score_buckets(detectors: Iterable[Detector]) -> list[float]:
    edges = set(COARSE_BUCKETS)
    for detector in detectors:
        table = detector.manifest.detection.calibration_table
        low, high = table.fpr_range
        edges.update(detector.thresholds().values())
        for metric in detector.metrics:
            for fpr in BUCKET_FPR:
                if low <= fpr <= high:
                    edges.add(table.threshold(metric, fpr))
    # Equal-looking edges render to the same `le` label; round to 6 significant digits first.
    return sorted({float(f"{edge:.6g}") for edge in edges})


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Set by the worker supervisor (service/workers.py); None: one process, one registry.
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        # Read at scrape time next to the merged files (the workers' own state, e.g.).
        self.scrape_collectors: list[Collector] = []
        r = self.registry
        self.images = Counter(
            "rcegate_images",
            "Images answered, by decision (accepted|rejected) and predicted class (empty when "
            "the answer withheld it: a rejected image in enforce mode).",
            ["model", "version", "decision", "predicted_class"],
            registry=r,
        )
        self.threshold = Gauge(
            "rcegate_threshold",
            "Served detection threshold per metric (accept iff score >= threshold).",
            ["model", "metric"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.target_fpr = Gauge(
            "rcegate_target_fpr",
            "Served target false-positive rate.",
            ["model"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.decode_duration = Histogram(
            "rcegate_decode_duration_seconds",
            "Time to decode and convert one image.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "rcegate_inference_duration_seconds",
            "Time of one ONNX Runtime run (one batch, possibly of several requests).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rcegate_batch_size",
            "Images per ONNX Runtime run (padding rows excluded).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "rcegate_model_info",
            "Loaded model versions (value 1) with their execution providers and default metric.",
            ["model", "version", "providers", "metric"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.http_requests = Counter(
            "rcegate_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "rcegate_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "rcegate_requests_in_flight",
            "HTTP requests being served.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_images = Gauge(
            "rcegate_queue_images",
            "Images admitted and not yet run (being decoded or queued), per model version.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "rcegate_queue_wait_seconds",
            "Time a request's images waited in the queue before their first batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "rcegate_requests_refused",
            "Requests refused without doing the work (503), by reason: queue_full, deadline, "
            "concurrency, body_budget, draining, loop_lag.",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)
        self.disconnects = Counter(
            "rcegate_client_disconnects",
            "Requests whose client went away before the answer (HTTP: status 499; gRPC: a "
            "cancelled call), never counted as server errors.",
            registry=r,
        )
        # -- Open Inference Protocol (service/oip): REST and gRPC ------------------------------
        self.inference_requests = Counter(
            "rcegate_inference_requests",
            "OIP inference requests by protocol (oip_rest, oip_grpc) and status (ok, or the "
            "error's code: invalid_input, model_not_found, overloaded, ...).",
            ["protocol", "status"],
            registry=r,
        )
        for protocol in ("oip_rest", "oip_grpc"):
            self.inference_requests.labels(protocol, "ok")
        self.grpc_requests = Counter(
            "rcegate_grpc_requests",
            "gRPC calls by method (inference.GRPCInferenceService RPC) and status code.",
            ["method", "code"],
            registry=r,
        )
        self.grpc_duration = Histogram(
            "rcegate_grpc_request_duration_seconds",
            "gRPC call latency by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.detection_score: Histogram | None = None
        # --- Trust and access (issue 12) ---
        self.flagged_clients = Gauge(
            "rcegate_flagged_clients",
            "Clients currently flagged as probing the detector (rejection rate far above "
            "target_fpr over the prober window).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.prober_flags = Counter(
            "rcegate_prober_flags",
            "Times a client was flagged as probing the detector.",
            registry=r,
        )
        self.access_log_dropped = Counter(
            "rcegate_access_log_dropped",
            "Access-log lines dropped because the writer fell behind (overload).",
            registry=r,
        )
        # --- end of trust and access ---
        # -- Batching shapes and warm-up (service/batching.py, service/detector.py) --
        self.batch_shape_runs = Counter(
            "rcegate_batch_shape_runs",
            "ONNX Runtime runs of the batcher per input batch shape (after padding); bounded by "
            "the batch shape set (at most max_batch_size shapes). Warm-up runs not included.",
            ["model", "shape"],
            registry=r,
        )
        self.batch_padding = Counter(
            "rcegate_batch_padding_images",
            "Padding rows run to reach a batch shape (their outputs are dropped).",
            ["model"],
            registry=r,
        )
        self.model_warmup = Gauge(
            "rcegate_model_warmup_seconds",
            "Seconds the warm-up of a loaded version took (every batch shape run once before "
            "the version took traffic).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",  # worker processes: the slowest live worker's
        )
        # -- end of batching shapes and warm-up --

    def describe_models(self, detectors: list[Detector]) -> None:
        """Set the per-model gauges and create the score histogram once the models are loaded."""
        self.detection_score = Histogram(
            "rcegate_detection_score",
            "Detection scores of answered images per metric (higher = more like clean data); "
            "scores an answer withheld (enforce mode) are not observed.",
            ["model", "metric"],
            buckets=score_buckets(detectors),
            registry=self.registry,
        )
        for d in detectors:
            self.model_info.labels(d.name, str(d.version), ",".join(d.providers), d.metric).set(1)
            self.target_fpr.labels(d.name).set(d.default_target_fpr)
            for metric, value in d.thresholds().items():
                self.threshold.labels(d.name, metric).set(value)
            self.model_warmup.labels(d.name, str(d.version)).set(d.warmup_seconds)

    def exposition(self) -> bytes:
        """The text /metrics answers: this app's registry, or with worker processes every
        worker's values merged from the multi-process directory (dead workers' counters and
        histograms included, their live-only gauges removed by the supervisor)."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        for collector in self.scrape_collectors:
            registry.register(collector)
        return generate_latest(registry)


class WorkerCollector(Collector):
    """The worker processes as the supervisor's shared state shows them at scrape time:
    `rcegate_workers{state}` (starting, ready, replacing) and `rcegate_worker_restarts_total`."""

    STATES = ("starting", "ready", "replacing")

    def __init__(self, read: Callable[[], tuple[dict[str, int], int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        states, restarts = self._read()
        workers = GaugeMetricFamily(
            "rcegate_workers",
            "Worker processes by state: starting (not ready yet), ready, replacing (a "
            "replacement loading its models, not yet taking connections).",
            labels=["state"],
        )
        for state in self.STATES:
            workers.add_metric([state], states.get(state, 0))
        yield workers
        yield CounterMetricFamily(
            "rcegate_worker_restarts",
            "Worker processes replaced after they died or hung.",
            value=restarts,
        )
