"""Shared facts for the deployment tests: paths, the agreed metric names, tool lookup."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# The metrics rcegate exports (agreed with the service); dashboards and rules may use only these.
HISTOGRAMS = {
    "rcegate_detection_score",
    "rcegate_decode_duration_seconds",
    "rcegate_inference_duration_seconds",
    "rcegate_batch_size",
    "rcegate_http_request_duration_seconds",
    "rcegate_queue_wait_seconds",
    "rcegate_grpc_request_duration_seconds",
}
METRICS = HISTOGRAMS | {
    "rcegate_images_total",
    "rcegate_threshold",
    "rcegate_target_fpr",
    "rcegate_model_info",
    "rcegate_http_requests_total",
    "rcegate_requests_in_flight",
    "rcegate_queue_images",
    "rcegate_requests_refused_total",
    # trust and access (issue 12)
    "rcegate_flagged_clients",
    "rcegate_prober_flags_total",
    "rcegate_access_log_dropped_total",
    "rcegate_client_disconnects_total",
    "rcegate_inference_requests_total",
    "rcegate_grpc_requests_total",
    # batching shapes and warm-up (issue 20)
    "rcegate_batch_shape_runs_total",
    "rcegate_batch_padding_images_total",
    "rcegate_model_warmup_seconds",
}
# Series names that PromQL may use: histograms expose _bucket, _sum and _count.
SERIES = (METRICS - HISTOGRAMS) | {
    f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}

_METRIC_NAME = re.compile(r"(?<![\w:])(rcegate_[a-z0-9_]+)")


def metric_names(expr: str) -> set[str]:
    """The rcegate_* series an expression reads (recording-rule names `rcegate:...` excluded)."""
    return set(_METRIC_NAME.findall(expr))


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def load_yaml(path: Path) -> dict[str, Any]:
    (document,) = load_yaml_documents(path)
    return document


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' own checker (Debian package `prometheus`; scripts/test installs it). Never
    skipped: without it the alert rules would go untested while the run stays green."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (scripts/test installs Debian's `prometheus`)")
    return path
