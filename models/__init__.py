"""The model repository: versioned artifacts (`<name>/<version>/`) and the shared manifest."""

from models.manifest import (
    INPUT_NAME,
    MANIFEST_FILE,
    METRICS,
    MODEL_FILE,
    OUTPUT_NAMES,
    Manifest,
    Metric,
    sha256_file,
)

__all__ = [
    "INPUT_NAME",
    "MANIFEST_FILE",
    "METRICS",
    "MODEL_FILE",
    "OUTPUT_NAMES",
    "Manifest",
    "Metric",
    "sha256_file",
]
