"""The loaded model repository: every version under `model_dir`, and readiness.

Loading runs once, in a worker thread started by the app's lifespan, so `/health/live` answers
at once and `/health/ready` turns true only after every loaded model passed its self-test. A
model that fails verification is refused with one clear log line and listed under `refused`;
the others keep serving. A name without a version resolves to its newest loaded version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.layout import misnamed_version_directories, version_directories
from service.detector import CudaOptions, Detector, ModelLoadError, load_detector
from service.errors import ModelNotFound, NotReady
from service.settings import Settings
from service.text import printable, shown
from service.trust import ArtifactPolicy

# The model POST /v1/predict answers with when RCEGATE_DEFAULT_MODEL is unset and it is loaded.
BUILTIN_DEFAULT_MODEL = "mnist-rce"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refused:
    name: str
    version: str
    reason: str


class ModelRepository:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._detectors: dict[str, dict[int, Detector]] = {}
        self.refused: list[Refused] = []
        self._loaded = threading.Event()
        self._stopping = threading.Event()
        self.error: str | None = None
        # The model POST /v1/predict answers with; settled once loading finished.
        self.default_name = settings.default_model or BUILTIN_DEFAULT_MODEL
        self.policy = ArtifactPolicy(
            root=settings.model_dir,
            max_model_bytes=settings.max_model_bytes,
            max_manifest_bytes=settings.max_manifest_bytes,
            trusted_keys=tuple(settings.trusted_keys),
        )
        self.cuda = CudaOptions(
            device_id=settings.cuda_device_id,
            cudnn_conv_algo_search=settings.cuda_cudnn_conv_algo_search,
            gpu_mem_limit=settings.cuda_gpu_mem_limit,
            arena_extend_strategy=settings.cuda_arena_extend_strategy,
            do_copy_in_default_stream=settings.cuda_do_copy_in_default_stream,
        )

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and bool(self._detectors) and self.error is None

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def stop(self) -> None:
        """Stop loading after the version being loaded: the service is shutting down (a port
        that could not be bound, a signal while loading), so nothing more is loaded or logged."""
        self._stopping.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (for tests and the CLI); True if it did in time."""
        return self._loaded.wait(timeout)

    def load(self, before_ready: Callable[[list[Detector]], None] | None = None) -> None:
        """Load every version under `model_dir`; never raises for a bad model.

        `before_ready` sees the loaded detectors before the repository reports loaded.
        """
        s = self.settings
        try:
            directories = version_directories(s.model_dir) if s.model_dir.is_dir() else []
            if not s.model_dir.is_dir():
                logger.error("model directory %s does not exist", s.model_dir)
            if not s.trusted_keys:
                logger.warning(
                    "no trusted keys: model versions are checked for consistency, not for "
                    "who made them (set RCEGATE_TRUSTED_KEYS to require signatures)"
                )
            if s.model_dir.is_dir():
                for directory in misnamed_version_directories(s.model_dir):
                    self._refuse(
                        directory,
                        "not a version: a version directory is named by 1-10 "
                        "ASCII digits without a leading zero (1, 2, 10)",
                    )
            for directory in directories:
                if self._stopping.is_set():
                    logger.info("model loading stopped: the service is shutting down")
                    self.error = "the service is shutting down"
                    return
                self._load_one(directory)
            if not self._detectors:
                # Said on the open readiness endpoints: no filesystem path (it is in the log).
                self.error = "no model could be loaded (see the server log)"
                logger.error(
                    "no model could be loaded from %s; the service stays unready", s.model_dir
                )
            elif s.default_model is None:
                self.default_name = (
                    BUILTIN_DEFAULT_MODEL
                    if BUILTIN_DEFAULT_MODEL in self._detectors
                    else min(self._detectors)
                )
                logger.info("default model: %s", self.default_name)
            elif s.default_model not in self._detectors:
                logger.warning(
                    "default model %r is not loaded; POST /v1/predict will answer 404",
                    s.default_model,
                )
            if before_ready is not None:
                before_ready(self.detectors())
        except Exception:
            self.error = "model loading crashed"
            logger.exception("model loading crashed")
        finally:
            self._loaded.set()

    def _load_one(self, directory: Path) -> None:
        s = self.settings
        try:
            detector = load_detector(
                directory,
                s.providers,
                s.intra_op_threads,
                s.inter_op_threads,
                s.target_fpr,
                s.graph_optimization,
                self.policy,
                batch_shapes=s.batch_shapes,
                max_batch_size=s.max_batch_size,
                cuda=self.cuda,
            )
        except ModelLoadError as exc:
            self._refuse(directory, str(exc))
            return
        except Exception as exc:  # a bug or an unforeseen entry: it refuses itself alone
            logger.exception("loading %s crashed", directory)
            self._refuse(directory, f"loading failed unexpectedly ({type(exc).__name__})")
            return
        if self._stopping.is_set():
            return  # shut down while this version loaded: it will never serve
        self._detectors.setdefault(detector.name, {})[detector.version] = detector
        logger.info(
            "loaded model %s/%s (metric %s, threshold %.6g at target_fpr %g) on %s; "
            "batch shapes %s, warm-up of %s in %.3f s",
            detector.name,
            detector.version,
            detector.metric,
            detector.decision().threshold,
            detector.default_target_fpr,
            _providers(detector),
            detector.shapes,
            ",".join(map(str, detector.warmup_shapes)),
            detector.warmup_seconds,
        )

    def _refuse(self, directory: Path, reason: str) -> None:
        """List a version under `refused` (GET /v1/models shows it) and log it once. The
        reason a client reads names no absolute path: the repository's own is replaced."""
        name, version = printable(directory.parent.name, 128), printable(directory.name, 64)
        for root in {str(self.settings.model_dir.resolve()), str(self.settings.model_dir)}:
            reason = reason.replace(root, "<model_dir>")
        self.refused.append(Refused(name, version, printable(reason)))
        logger.error("refused model %s/%s from %s: %s", name, version, directory, reason)

    def detectors(self) -> list[Detector]:
        """Every loaded version, sorted by name then version."""
        return [
            d for name in sorted(self._detectors) for _, d in sorted(self._detectors[name].items())
        ]

    def get(self, name: str, version: int | None = None) -> Detector:
        if not self.loaded:
            raise NotReady("models are still loading")
        versions = self._detectors.get(name)
        if not versions:
            raise ModelNotFound(
                f"model {shown(name)} is not loaded (loaded: {sorted(self._detectors)})"
            )
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(
                f"model {shown(name)} has no loaded version {version} (loaded: {sorted(versions)})"
            )
        return versions[version]

    def names(self) -> list[str]:
        return sorted(self._detectors)


# The CUDA provider's options that the service sets, as the startup log line shows them.
_LOGGED_OPTIONS = (
    "device_id",
    "cudnn_conv_algo_search",
    "gpu_mem_limit",
    "arena_extend_strategy",
    "do_copy_in_default_stream",
)


def _providers(detector: Detector) -> str:
    """`CUDAExecutionProvider(cudnn_conv_algo_search=..., ...),CPUExecutionProvider`."""
    parts = []
    for provider in detector.providers:
        options = detector.provider_options.get(provider, {})
        shown = [f"{k}={options[k]}" for k in _LOGGED_OPTIONS if k in options]
        parts.append(f"{provider}({', '.join(shown)})" if shown else provider)
    return ",".join(parts)
