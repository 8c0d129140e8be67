"""The domain core: one exported model version behind an ONNX Runtime session. numpy in, numpy out.

A `Detector` runs the artifact's graph (which computes the prediction and the three scores of
Pang et al., NeurIPS 2018) and applies the thresholding test: an image is accepted iff the
chosen metric's score >= the threshold calibrated for the requested target FPR. The graph's own
`accepted` output uses the deployed threshold only; the detector recomputes the decision so any
calibrated target FPR can be served, and the self-test checks both agree at the deployed one.

Loading refuses a model unless its files are trusted (`service.trust`: regular files inside the
repository, bounded sizes, a valid signature when keys are configured), the sha256 of model.onnx
matches the manifest, the graph's inputs and outputs match the manifest, the graph's bound
decision constants equal the manifest's, and a self-test inference succeeds. Then every batch
shape the version will run (`service.shapes`) runs once (warm-up, timed) before `load_detector`
returns, so `/health/ready` (which waits for loading) never turns 200 on a cold session; each
worker process loads, and so warms up, its own. On CUDA the provider's options come from the
settings (`CudaOptions`) and ORT's own report of them is kept for GET /v1/models. No web imports.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from models.layout import identity_mismatch
from models.manifest import (
    INPUT_NAME,
    MANIFEST_FILE,
    METRICS,
    MODEL_FILE,
    OUTPUT_NAMES,
    Manifest,
    Metric,
)
from service.errors import InvalidParameter
from service.settings import Providers
from service.shapes import CPU, CUDA, BatchShapes
from service.trust import (
    ArtifactPolicy,
    ModelLoadError,
    check_binding,
    check_signature,
    inside,
    parse_manifest,
    read_regular,
)

logger = logging.getLogger(__name__)

# The graph's outputs and the numpy dtypes the service relies on.
OUTPUT_DTYPES: dict[str, str] = {
    "logits": "tensor(float)",
    "probabilities": "tensor(float)",
    "label": "tensor(int64)",
    "confidence": "tensor(float)",
    "non_me": "tensor(float)",
    "log_kd": "tensor(float)",
    "accepted": "tensor(bool)",
}


__all__ = [
    "CPU",
    "CUDA",
    "CudaOptions",
    "Decision",
    "Detector",
    "ModelLoadError",
    "Outputs",
    "load_detector",
]

ConvAlgoSearch = Literal["auto", "EXHAUSTIVE", "HEURISTIC", "DEFAULT"]
ArenaExtendStrategy = Literal["kNextPowerOfTwo", "kSameAsRequested"]


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA execution provider's options the service sets (ORT's names, from settings)."""

    device_id: int = 0
    cudnn_conv_algo_search: ConvAlgoSearch = "auto"
    gpu_mem_limit: int = 0  # bytes; 0 = ORT's default (no limit)
    arena_extend_strategy: ArenaExtendStrategy = "kNextPowerOfTwo"
    do_copy_in_default_stream: bool = True

    def search_for(self, shapes: BatchShapes) -> str:
        """`auto`: EXHAUSTIVE for one batch shape (searched once, at warm-up), DEFAULT for
        several: with EXHAUSTIVE a shape seen before was searched again after another shape ran
        (255-680 ms a change on an H200), with DEFAULT a change cost about 24 ms (issue 20)."""
        if self.cudnn_conv_algo_search != "auto":
            return self.cudnn_conv_algo_search
        return "EXHAUSTIVE" if shapes.sizes is not None and len(shapes.sizes) == 1 else "DEFAULT"

    def provider_options(self, shapes: BatchShapes) -> dict[str, str]:
        """The options as ORT's CUDAExecutionProvider takes them (strings)."""
        options = {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": self.search_for(shapes),
            "arena_extend_strategy": self.arena_extend_strategy,
            "do_copy_in_default_stream": "1" if self.do_copy_in_default_stream else "0",
        }
        if self.gpu_mem_limit:
            options["gpu_mem_limit"] = str(self.gpu_mem_limit)
        return options


@dataclass(frozen=True)
class Outputs:
    """The graph's outputs for N images (one ORT run, or one request's rows of a batch)."""

    arrays: dict[str, np.ndarray]  # every graph output by name, N rows each

    @property
    def logits(self) -> np.ndarray:
        return self.arrays["logits"]  # float32 [N, L]: the deployed logits (-Z for RCE)

    @property
    def probabilities(self) -> np.ndarray:
        return self.arrays["probabilities"]  # float32 [N, L]

    @property
    def label(self) -> np.ndarray:
        return self.arrays["label"]  # int64 [N]

    @property
    def scores(self) -> dict[Metric, np.ndarray]:
        """float32 [N] per metric; higher = more like clean data."""
        return {m: self.arrays[m] for m in METRICS}

    @property
    def graph_accepted(self) -> np.ndarray:
        return self.arrays["accepted"]  # bool [N]: default metric vs the deployed threshold


@dataclass(frozen=True)
class Decision:
    """The thresholding test to apply: accept iff scores[metric] >= threshold."""

    metric: Metric
    threshold: float
    target_fpr: float


class Detector:
    """A loaded, verified model version. Thread-safe: ORT sessions allow concurrent runs."""

    def __init__(
        self,
        manifest: Manifest,
        session: ort.InferenceSession,
        directory: Path,
        default_target_fpr: float | None = None,
        shapes: BatchShapes | None = None,
    ) -> None:
        self.manifest = manifest
        self.session = session
        self.directory = directory
        self.default_target_fpr = (
            manifest.detection.target_fpr if default_target_fpr is None else default_target_fpr
        )
        self.providers: list[str] = list(session.get_providers())
        # The batch shapes this version runs (the batcher pads up to them); `any` up to 64 when
        # not given (tests, benchmarks).
        self.shapes = shapes or BatchShapes(64)
        self.warmup_seconds = 0.0  # set by warm_up()
        self.warmup_shapes: tuple[int, ...] = ()
        options = session.get_provider_options()
        # What ORT reports for each provider in use (e.g. CUDA's cudnn_conv_algo_search).
        self.provider_options: dict[str, dict[str, str]] = {
            p: dict(options.get(p, {})) for p in self.providers
        }

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def metric(self) -> Metric:
        return self.manifest.detection.default_metric

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.manifest.input.shape

    def decision(self, target_fpr: float | None = None) -> Decision:
        """The default metric's threshold at `target_fpr` (default: the served target FPR).

        Raises InvalidParameter when `target_fpr` lies outside the calibration table.
        """
        fpr = self.default_target_fpr if target_fpr is None else target_fpr
        try:
            threshold = self.manifest.threshold(self.metric, fpr)
        except ValueError as exc:
            raise InvalidParameter(f"target_fpr: {exc}") from None
        return Decision(self.metric, threshold, fpr)

    def thresholds(self) -> dict[Metric, float]:
        """Every metric's threshold at the served target FPR (for the threshold gauge)."""
        return {m: self.manifest.threshold(m, self.default_target_fpr) for m in METRICS}

    def run_arrays(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph on float32 [N, C, H, W] images in [0, 1]: every output by name."""
        raw = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        return dict(zip(OUTPUT_NAMES, raw, strict=True))

    def run(self, images: np.ndarray) -> Outputs:
        return Outputs(self.run_arrays(images))

    @staticmethod
    def accept(outputs: Outputs, decision: Decision) -> np.ndarray:
        """The thresholding test: bool [N], score >= threshold."""
        return np.asarray(outputs.scores[decision.metric] >= decision.threshold)


_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    intra_op_threads: int = 0, inter_op_threads: int = 0, graph_optimization: str = "all"
) -> ort.SessionOptions:
    """ORT session options from the service settings (also used by the benchmarks)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION[graph_optimization]
    options.log_severity_level = 3  # ORT's own errors still show; its info chatter does not
    # Idle ORT threads otherwise spin, taking CPU from the event loop and the decode threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


_preloaded = False


def preload_cuda() -> None:
    """Load the CUDA/cuDNN libraries that `onnxruntime-gpu[cuda,cudnn]` installed from PyPI
    (onnxruntime >= 1.21 has `preload_dlls`); without it ORT looks only on the system path."""
    global _preloaded
    preload = getattr(ort, "preload_dlls", None)
    if _preloaded or preload is None:
        return
    _preloaded = True
    try:
        preload()
    except Exception as exc:  # missing libraries: ORT then falls back to CPU, checked below
        logger.warning("onnxruntime.preload_dlls() failed: %s", exc)


def create_session(
    model: bytes,
    providers: Providers,
    options: ort.SessionOptions,
    cuda_options: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """An ORT session on the requested providers. `auto` takes CUDA only when it really loads:
    ORT silently falls back to CPU when the CUDA libraries are missing, so check what it uses."""
    available = ort.get_available_providers()
    if providers != "cpu" and CUDA in available:
        preload_cuda()
    if providers == "cuda" and CUDA not in available:
        raise ModelLoadError(f"providers=cuda but this onnxruntime offers only {available}")
    wanted = [CUDA, CPU] if providers != "cpu" and CUDA in available else [CPU]
    chain: list[str | tuple[str, dict[str, str]]] = [
        (p, cuda_options) if p == CUDA and cuda_options else p for p in wanted
    ]
    session = ort.InferenceSession(model, sess_options=options, providers=chain)
    if CUDA in wanted and CUDA not in session.get_providers():
        if providers == "cuda":
            raise ModelLoadError("providers=cuda but the CUDA execution provider failed to load")
        logger.warning("CUDA execution provider is available but did not load; using CPU")
    return session


def _check_io(session: ort.InferenceSession, manifest: Manifest) -> None:
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        names = [i.name for i in inputs]
        raise ModelLoadError(f"graph inputs are {names}, expected [{INPUT_NAME!r}]")
    spec = inputs[0]
    if spec.type != "tensor(float)":
        raise ModelLoadError(f"input {INPUT_NAME!r} has type {spec.type}, expected tensor(float)")
    expected = manifest.input.shape
    shape = list(spec.shape)
    if len(shape) != 4 or tuple(shape[1:]) != expected or isinstance(shape[0], int):
        dims = ", ".join(map(str, expected))
        raise ModelLoadError(
            f"input {INPUT_NAME!r} has shape {shape}, manifest says [batch, {dims}]"
        )
    outputs = {o.name: o.type for o in session.get_outputs()}
    if set(manifest.outputs) != set(OUTPUT_NAMES):
        raise ModelLoadError(f"manifest lists outputs {manifest.outputs}, expected {OUTPUT_NAMES}")
    for name, dtype in OUTPUT_DTYPES.items():
        if outputs.get(name) != dtype:
            raise ModelLoadError(f"output {name!r} is {outputs.get(name)}, expected {dtype}")


def self_test(detector: Detector) -> None:
    """Run a batch of 2 synthetic images and check shapes, ranges and the accept decision.
    The batch is padded up to one of the version's batch shapes like any other batch, so the
    session never sees a shape outside them."""
    channels, height, width = detector.input_shape
    images = np.zeros((detector.shapes.fit(2), channels, height, width), np.float32)
    images[1] = np.linspace(0, 1, channels * height * width, dtype=np.float32).reshape(
        channels, height, width
    )
    try:
        full = detector.run_arrays(images)
    except Exception as exc:  # ORT raises its own exception types
        raise ModelLoadError(f"self-test inference failed: {exc}") from exc
    out = Outputs({key: value[:2] for key, value in full.items()})
    classes = detector.manifest.num_classes
    if out.probabilities.shape != (2, classes):
        raise ModelLoadError(f"self-test: probabilities shape {out.probabilities.shape}")
    if not np.allclose(out.probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ModelLoadError("self-test: probabilities do not sum to 1")
    if out.label.shape != (2,) or not ((out.label >= 0) & (out.label < classes)).all():
        raise ModelLoadError(f"self-test: labels {out.label} outside [0, {classes})")
    for metric, values in out.scores.items():
        if values.shape != (2,) or np.isnan(values).any():
            raise ModelLoadError(f"self-test: {metric} scores {values} are not [2] numbers")
    deployed = detector.manifest.detection.thresholds[detector.metric]
    score = out.scores[detector.metric]
    # Both decide score >= threshold; they may only differ at float rounding of the threshold.
    disagree = (score >= deployed) != out.graph_accepted
    if (disagree & ~np.isclose(score, deployed, rtol=1e-5, atol=1e-6)).any():
        raise ModelLoadError(
            "self-test: the graph's `accepted` disagrees with the manifest threshold"
        )


def warm_up(detector: Detector) -> float:
    """Run every warm-up shape once (Triton's model warm-up): on CUDA the first run of a shape
    pays cuDNN's algorithm search, which must not land on a request. Returns the seconds taken
    (also kept on the detector)."""
    channels, height, width = detector.input_shape
    shapes = detector.shapes.warmup()
    start = time.perf_counter()
    for shape in shapes:
        try:
            detector.run_arrays(np.zeros((shape, channels, height, width), np.float32))
        except Exception as exc:  # ORT raises its own exception types
            raise ModelLoadError(f"warm-up at batch shape {shape} failed: {exc}") from exc
    detector.warmup_seconds = time.perf_counter() - start
    detector.warmup_shapes = shapes
    return detector.warmup_seconds


def load_detector(
    directory: Path,
    providers: Providers = "auto",
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
    target_fpr: float | None = None,
    graph_optimization: str = "all",
    policy: ArtifactPolicy | None = None,
    batch_shapes: str = "any",
    max_batch_size: int = 64,
    cuda: CudaOptions | None = None,
    warmup: bool = True,
) -> Detector:
    """Load and verify `<name>/<version>/`; raise ModelLoadError with the reason if refused.

    `batch_shapes` (see service.shapes; `auto` = the default of the provider really in use) and
    `max_batch_size` give the shapes the version runs; with `warmup` each runs once here."""
    policy = policy or ArtifactPolicy()
    root = policy.root or directory.parent.parent
    inside(directory, root, f"{directory.parent.name}/{directory.name}")
    try:
        raw = read_regular(directory / MANIFEST_FILE, root, policy.max_manifest_bytes)
    except FileNotFoundError:
        raise ModelLoadError("manifest.json is missing") from None
    if policy.trusted_keys:
        # The signature covers these exact bytes, before the JSON parser sees them.
        signer = check_signature(directory, root, raw, policy)
        logger.debug("%s: manifest signed by key %s", directory, signer)
    manifest = parse_manifest(raw)
    mismatch = identity_mismatch(manifest, directory)
    if mismatch is not None:
        raise ModelLoadError(mismatch)
    try:
        # Hash and load the same bytes, so the file cannot change between check and use.
        model = read_regular(directory / MODEL_FILE, root, policy.max_model_bytes)
    except OSError as exc:  # its text names the file's absolute path: say only what failed
        raise ModelLoadError(f"cannot read {MODEL_FILE}: {exc.strerror or 'error'}") from None
    digest = hashlib.sha256(model).hexdigest()
    if digest != manifest.sha256:
        raise ModelLoadError(
            f"sha256 mismatch: {MODEL_FILE} is {digest}, manifest says {manifest.sha256}"
        )
    cuda = cuda or CudaOptions()
    # The CUDA options depend on the shapes CUDA would run (see CudaOptions.search_for).
    cuda_options = cuda.provider_options(BatchShapes.resolve(batch_shapes, max_batch_size, CUDA))
    try:
        options = session_options(intra_op_threads, inter_op_threads, graph_optimization)
        session = create_session(model, providers, options, cuda_options)
    except ModelLoadError:
        raise
    except Exception as exc:  # ORT raises its own exception types for a corrupt graph
        raise ModelLoadError(f"ONNX Runtime cannot load {MODEL_FILE}: {exc}") from exc
    _check_io(session, manifest)
    check_binding(session.get_modelmeta().custom_metadata_map, manifest)
    shapes = BatchShapes.resolve(batch_shapes, max_batch_size, session.get_providers()[0])
    detector = Detector(manifest, session, directory, target_fpr, shapes)
    try:
        detector.decision()
    except InvalidParameter as exc:
        raise ModelLoadError(f"served {exc.message}") from None
    self_test(detector)
    if warmup:
        warm_up(detector)
    return detector
