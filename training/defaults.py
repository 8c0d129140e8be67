"""Defaults of the detection pipeline, defined once and free of torch.

The CLI shows them in `--help` without importing torch (a service-only install has none), and
calibration, the deployed detector and the ablation take the same values from here.
"""

from __future__ import annotations

from typing import Literal

from models.manifest import Metric

# The metric of the accept decision unless told otherwise, chosen by the evaluation
# (docs/evaluation.md): reject when K-density (the paper's test) OR Mahalanobis rejects,
# calibrated jointly.
DEFAULT_METRIC: Metric = "combined"
# The fraction of clean calibration inputs the threshold rejects (Pang et al. 2018: 5%).
TARGET_FPR = 0.05
# K-density bank entries per class: the official code's sample of 1000 training features.
BANK_PER_CLASS = 1000
# The Mahalanobis score's layers and where its class means and tied covariance come from: the
# measured choice (docs/evaluation.md): every stage plus the final features, the training split.
MAHALANOBIS_LAYERS: tuple[str, ...] = ("stage1", "stage2", "stage3", "features")
MAHALANOBIS_SOURCE: Literal["bank", "train"] = "train"
# The metrics of the combined score: reject when K-density or Mahalanobis rejects.
COMBINED_METRICS: tuple[Metric, ...] = ("log_kd", "mahalanobis")
