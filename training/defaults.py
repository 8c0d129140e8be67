"""Defaults of the detection pipeline, defined once and free of torch.

The CLI shows them in `--help` without importing torch (a service-only install has none), and
calibration, the deployed detector and the ablation take the same values from here.
"""

from __future__ import annotations

from models.manifest import Metric

# The metric of the accept decision unless told otherwise: K-density, the paper's test.
DEFAULT_METRIC: Metric = "log_kd"
# The fraction of clean calibration inputs the threshold rejects (Pang et al. 2018: 5%).
TARGET_FPR = 0.05
# K-density bank entries per class: the official code's sample of 1000 training features.
BANK_PER_CLASS = 1000
