"""Service settings: one pydantic-settings class, read from `RCEGATE_*` environment variables.

Built once (by the CLI or the uvicorn factory) and passed into `create_app(settings)`. Every
value is validated at start-up, so a typo in a deployment fails loudly instead of silently.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.layout import DEFAULT_MODEL_DIR

Providers = Literal["auto", "cpu", "cuda"]
Mode = Literal["annotate", "enforce"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]


def check_key_digests(keys: dict[str, str], what: str) -> dict[str, str]:
    """Key ids of 1-64 of A-Z a-z 0-9 . _ - mapping to a sha256 in hex (ValueError otherwise)."""
    for ident, digest in keys.items():
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", ident):
            raise ValueError(f"{what} id {ident!r}: use 1-64 of A-Z a-z 0-9 . _ -")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{what} {ident!r}: give the sha256 of the key (64 hex digits)")
    return keys


class ClientPolicy(BaseModel):
    """What one API key's client may ask for (`Settings.client_policies`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modes: list[Mode] = Field(
        min_length=1, description="Modes the client may ask for; its default is the first."
    )
    looser_target_fpr: bool = Field(
        False,
        description="Whether, when held to enforce, it may ask for a target_fpr whose "
        "threshold is below the served one.",
    )


MAX_WORKERS = 256

# The sample images of a source or editable install (`rcegate samples`); absent in a wheel.
DEFAULT_SAMPLES_DIR = DEFAULT_MODEL_DIR.parent / "samples"


class Settings(BaseSettings):
    """Every knob of the service; the README's configuration table documents each one."""

    model_config = SettingsConfigDict(env_prefix="RCEGATE_", frozen=True, extra="ignore")

    model_dir: Path = Field(
        DEFAULT_MODEL_DIR, description="Model repository: <model_dir>/<name>/<version>/."
    )
    default_model: str | None = Field(
        None,
        description="Model served by POST /v1/predict; unset: mnist-rce when it is loaded, else "
        "the first loaded name (so a model directory alone is enough).",
    )
    host: str = Field("127.0.0.1", description="Bind address of `rcegate serve`.")
    port: int = Field(8000, ge=0, le=65535, description="Port of `rcegate serve`.")
    providers: Providers = Field(
        "auto", description="ONNX Runtime providers: auto (CUDA if it loads, else CPU), cpu, cuda."
    )
    intra_op_threads: int = Field(0, ge=0, description="ORT intra-op threads (0 = ORT default).")
    inter_op_threads: int = Field(0, ge=0, description="ORT inter-op threads (0 = ORT default).")
    graph_optimization: GraphOptimization = Field(
        "all", description="ORT graph optimisation level: disable, basic, extended, all."
    )
    # Dynamic batching and admission control (one batcher per model version).
    max_batch_size: int = Field(
        64, gt=0, description="Most images in one ONNX Runtime run (batches span requests)."
    )
    max_queue_delay: float = Field(
        0.002,
        ge=0,
        le=1,
        description="Seconds a batch may wait for more images while other requests are still "
        "being decoded (never when nothing else is coming).",
    )
    max_queue_images: int = Field(
        512,
        gt=0,
        description="Images admitted per model (being decoded or queued); beyond that, 503.",
    )
    max_queue_wait: float = Field(
        0.1,
        ge=0,
        description="Seconds of model work that may be queued per model (queued images / "
        "measured images per second); a request beyond it gets 503. 0 = no such bound.",
    )
    request_timeout: float = Field(
        10.0, gt=0, description="Deadline of one request in seconds, from its arrival."
    )
    inline_decode_pixels: int = Field(
        4096,
        ge=0,
        description="Images declaring at most this many pixels (and of at most 16 KiB, at "
        "most 4 per request) decode on the event loop instead of the pool; 0 = never.",
    )
    decode_workers: int = Field(
        2, gt=0, le=64, description="Threads that decode images (bounds decode CPU and memory)."
    )
    # Connections and bodies.
    max_concurrent_requests: int = Field(
        256,
        gt=0,
        description="Requests handled at once (health and metrics excluded); above it, 503 as "
        "soon as the request head arrives.",
    )
    max_connections: int = Field(
        1024,
        gt=0,
        description="Open connections; over it, the connection that has waited longest for a "
        "request head is closed (never one whose request is being served).",
    )
    max_inflight_body_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Bytes of request bodies held at once across all requests; 503 above.",
    )
    body_timeout: float = Field(
        10.0, gt=0, description="Seconds to receive a whole request body; 408 after that."
    )
    keep_alive_timeout: int = Field(
        5, gt=0, description="Seconds an idle keep-alive connection stays open."
    )
    header_timeout: float = Field(
        5.0, gt=0, description="Seconds a connection may take to send a complete request head."
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="Largest request head (request line and headers)."
    )
    drain_seconds: float = Field(
        20.0,
        ge=0,
        description="On SIGTERM: seconds to finish accepted requests before exiting (keep it "
        "below the orchestrator's grace period).",
    )
    max_body_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest accepted request body, in bytes."
    )
    max_images: int = Field(64, gt=0, description="Most images in one request.")
    # Decoding limits, all judged from image headers before any pixel is decoded. Defaults sized
    # for a classifier whose inputs are at most a few hundred pixels a side: 2048 x 2048 is a
    # 1080p or 1440p frame with room to spare, and its decoded samples take at most 16 MiB
    # (RGBA/CMYK, 4 bytes a pixel). The request budget is four such images (64 MiB of samples if
    # a pool held them all at once; ours decodes one image at a time per worker).
    max_pixels: int = Field(
        2048 * 2048,
        gt=0,
        description="Most pixels (width x height) one image may declare; also Pillow's limit.",
    )
    max_image_side: int = Field(
        4096, gt=0, description="Most pixels one image may declare in width or in height."
    )
    max_request_pixels: int = Field(
        4 * 2048 * 2048,
        gt=0,
        description="Most pixels all images of one request may declare together.",
    )
    target_fpr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Default target FPR; unset = each manifest's calibrated target_fpr.",
    )
    mode: Mode = Field("annotate", description="Default mode: annotate or enforce.")
    log_level: LogLevel = Field("info", description="Log level of the rcegate loggers.")
    # --- Trust and access (issue 12; service/trust.py, service/access.py, service/probers.py) ---
    max_model_bytes: int = Field(
        1 << 30, gt=0, description="Largest model.onnx loaded, in bytes; larger is refused."
    )
    max_manifest_bytes: int = Field(
        1 << 20, gt=0, description="Largest manifest.json loaded, in bytes; larger is refused."
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Base64 Ed25519 public keys (`rcegate keygen`); when set, only versions "
        "whose manifest.json.sig one of them signed are loaded. JSON list in the environment.",
    )
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        max_length=1024,
        description="Client id -> sha256 (hex) of its API key (`rcegate api-key`); when set, v1, "
        "v2 and the docs need `Authorization: Bearer <key>` or `x-api-key`. JSON object.",
    )
    metrics_require_key: bool = Field(
        False, description="Also require an API key on /metrics (health stays open)."
    )
    withhold_rejected: bool = Field(
        True,
        description="Enforce mode: withhold the scores, threshold and probabilities of rejected "
        "images too (no score oracle); annotate mode keeps full detail.",
    )
    docs: bool = Field(True, description="Serve /docs and /openapi.json (assets served locally).")
    demo: bool = Field(
        True, description="Serve the demo page /demo (it posts to /v1/predict); false: 404."
    )
    demo_samples_dir: Path = Field(
        DEFAULT_SAMPLES_DIR,
        description="Sample images the demo page offers: the PNGs its samples.json lists.",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty: no CORS headers."
    )
    access_log: bool = Field(
        True, description="One JSON line per request on stderr (logger rcegate.access)."
    )
    prober_window: float = Field(
        300.0, gt=0, description="Seconds over which each client's rejection rate is measured."
    )
    prober_min_images: int = Field(
        50, gt=0, description="Images a client must send in the window before it can be flagged."
    )
    prober_rejection_rate: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Rejection rate over the window that flags a client as probing (far above "
        "target_fpr).",
    )
    prober_clients: int = Field(
        10_000, gt=0, description="Clients tracked at once (least recently seen dropped first)."
    )
    prober_throttle: bool = Field(
        False, description="Answer 429 to a flagged client until its rejection rate falls."
    )

    @field_validator("trusted_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        from service.trust import decode_key

        for key in keys:
            decode_key(key)  # ValueError -> a validation error at start-up
        return keys

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        return check_key_digests(keys, "api key")

    # --- end of trust and access ---
    # -- Open Inference Protocol (service/oip) -------------------------------------------------
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the OIP gRPC service (inference.GRPCInferenceService) started by "
        "`rcegate serve` on `host`; 0 turns gRPC off. REST OIP (/v2) is always on `port`.",
    )

    # -- Hardening: parsing budgets, enforce policy, forwarded headers --
    grpc_max_message_bytes: int | None = Field(
        None,
        gt=0,
        description="Largest gRPC request message (RESOURCE_EXHAUSTED above); unset: 4 MiB, or "
        "half of max_inflight_body_bytes when smaller. A call reserves twice this much of "
        "max_inflight_body_bytes while its message arrives (after its API key was checked), "
        "then twice the message's own size (its bytes and the parsed message) until it is "
        "answered.",
    )
    parse_workers: int = Field(
        1,
        gt=0,
        le=16,
        description="Threads that inflate and parse large OIP requests (over 64 KiB); smaller "
        "ones are parsed on the event loop.",
    )
    client_modes: list[Mode] | None = Field(
        None,
        description="Modes a request may ask for (the `mode` query or parameter); unset: "
        "enforce always, annotate only when RCEGATE_MODE is annotate. A request held to "
        "enforce that asks for annotate gets 403. JSON list.",
    )
    client_looser_target_fpr: bool = Field(
        False,
        description="Whether a request held to enforce (annotate not allowed) may ask for a "
        "target_fpr whose threshold is below the served one (a looser decision, and a way to "
        "bisect a withheld score) or for a metric other than the model's default (possibly a "
        "weaker test). Off: 403.",
    )
    client_policies: dict[str, ClientPolicy] = Field(
        default_factory=dict,
        max_length=1024,
        description='Per API key id, {"modes": [...], "looser_target_fpr": false}: replaces '
        "client_modes and client_looser_target_fpr for that client. JSON object.",
    )
    metrics_keys: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Id -> sha256 (hex) of the keys that may read /metrics when "
        "metrics_require_key is on; client API keys do not open /metrics. JSON object.",
    )
    forwarded_allow_ips: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For "
        "and X-Forwarded-Proto are trusted (HTTP, and x-forwarded-for metadata on gRPC); "
        'empty: forwarded headers are ignored. "*" trusts every peer. JSON list.',
    )

    @field_validator("metrics_keys")
    @classmethod
    def _check_metrics_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        return check_key_digests(keys, "metrics key")

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_proxies(cls, entries: list[str]) -> list[str]:
        import ipaddress

        for entry in entries:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"forwarded_allow_ips: {entry!r} is not an address or network"
                ) from None
        return entries

    @model_validator(mode="after")
    def _check_hardening(self) -> Settings:
        if 2 * (self.grpc_max_message_bytes or 0) > self.max_inflight_body_bytes:
            raise ValueError(
                f"grpc_max_message_bytes ({self.grpc_max_message_bytes}) must be at most half "
                f"of max_inflight_body_bytes ({self.max_inflight_body_bytes})"
            )
        if self.metrics_require_key and not self.metrics_keys:
            raise ValueError(
                "metrics_require_key needs metrics_keys (RCEGATE_METRICS_KEYS): client API keys "
                "do not open /metrics"
            )
        unknown = sorted(set(self.client_policies) - set(self.api_keys))
        if unknown:
            raise ValueError(f"client_policies name clients without an API key: {unknown}")
        return self

    @property
    def grpc_message_limit(self) -> int:
        """The largest gRPC request message (`grpc_max_message_bytes` or its default)."""
        if self.grpc_max_message_bytes is not None:
            return self.grpc_max_message_bytes
        return min(4 * 1024 * 1024, self.max_inflight_body_bytes // 2)

    # -- end of hardening --

    # -- Batching shapes, warm-up and CUDA (service/batching.py, service/detector.py) --------
    batch_shapes: str = Field(
        "auto",
        description="Batch sizes the model runs, a batch padded up to the next (the padded rows' "
        "outputs dropped): any (no padding), pow2 (1, 2, 4, ... max_batch_size), max (one "
        "shape), a list such as 1,8,64 (largest = max_batch_size), or auto: the default of the "
        "provider in use (CPU: any, measured; CUDA: max, provisional until measured on the "
        "GPU). Every shape runs once (warm-up) before the service is ready.",
    )
    cuda_device_id: int = Field(0, ge=0, description="CUDA device the CUDA provider runs on.")
    cuda_cudnn_conv_algo_search: Literal["auto", "EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "auto",
        description="cuDNN convolution algorithm search of the CUDA provider; auto: EXHAUSTIVE "
        "with one batch shape (searched once, at warm-up), DEFAULT with several (EXHAUSTIVE "
        "searched again on every change of shape: 255-680 ms each on an H200).",
    )
    cuda_gpu_mem_limit: int = Field(
        0, ge=0, description="Bytes the CUDA provider's memory arena may hold; 0 = no limit."
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        "kNextPowerOfTwo", description="How the CUDA provider's memory arena grows."
    )
    cuda_do_copy_in_default_stream: bool = Field(
        True,
        description="CUDA provider: copy inputs and outputs on the compute stream (ORT's "
        "default); false uses separate streams, which ORT warns may race for some models.",
    )

    @field_validator("batch_shapes")
    @classmethod
    def _check_batch_shapes_spelling(cls, spec: str) -> str:
        spec = "".join(spec.split()).lower()
        if spec not in ("auto", "any", "pow2", "max") and not re.fullmatch(r"\d+(,\d+)*", spec):
            raise ValueError(f"use auto, any, pow2, max or a list like 1,8,64; got {spec!r}")
        return spec

    @model_validator(mode="after")
    def _batch_shapes_fit_the_batch(self) -> Settings:
        from service.shapes import BatchShapes

        if self.batch_shapes != "auto":
            BatchShapes.parse(self.batch_shapes, self.max_batch_size)  # ValueError: refused
        return self

    # -- end of batching shapes, warm-up and CUDA --

    # -- HTTP protocol and the request path (service/protocol.py) --------------------------------
    max_loop_lag: float = Field(
        0.0,
        ge=0,
        description="Seconds the event loop may run behind before requests are refused (503 "
        "loop_lag) as their head arrives; health and metrics always pass. 0 = no such bound.",
    )
    # -- end of HTTP protocol --

    # -- Worker processes (service/workers.py) --
    workers: int | Literal["auto"] = Field(
        1,
        description="Server processes (1 to 256) behind the one HTTP port and the one gRPC port "
        "of `rcegate serve` (a supervisor shares the sockets, replaces a worker that dies, "
        "drains them all on SIGTERM and aggregates /metrics); auto: chosen from the cores and "
        "the provider (docs/serving.md, Worker processes).",
    )
    worker_timeout: float = Field(
        60.0,
        ge=0,
        description="With several workers: seconds a ready worker's event loop may stay "
        "unresponsive before the supervisor kills and replaces it; 0 = never.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, value: object) -> object:
        # One clear message instead of one per member of the union.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            count = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            count = 0
        if not 1 <= count <= MAX_WORKERS or isinstance(value, bool | float):
            raise ValueError(f"give a number of workers from 1 to {MAX_WORKERS}, or auto")
        return count

    # -- end of worker processes --

    @model_validator(mode="after")
    def _request_fits_the_queue(self) -> Settings:
        # A request larger than the queue could never be admitted: refuse such a setup.
        if self.max_images > self.max_queue_images:
            raise ValueError(
                f"max_images ({self.max_images}) must not exceed max_queue_images "
                f"({self.max_queue_images})"
            )
        return self
