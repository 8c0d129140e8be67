from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.manifest import CalibrationTable
from training.calibrate import TABLE_FPR, calibrated_threshold, feature_bank


@given(
    arrays(np.float64, st.integers(1, 400), elements=st.floats(-1e6, 1e6)),
    st.floats(0.001, 0.5),
)
def test_calibrated_threshold_is_the_largest_that_rejects_at_most_floor_fpr_n_scores(
    scores: np.ndarray, target_fpr: float
) -> None:
    # The documented rule, exactly: T is a calibration score, at most k = floor(target_fpr * n)
    # scores lie below it, and any higher T would reject more than k (ties included).
    k = math.floor(target_fpr * len(scores))
    threshold = calibrated_threshold(scores, target_fpr)
    assert threshold in scores
    assert int((scores < threshold).sum()) <= k
    assert int((scores <= threshold).sum()) >= k + 1


@pytest.mark.parametrize(
    ("n", "target_fpr", "rejected"),
    [(10, 0.15, 1), (10, 0.05, 0), (100, 0.05, 5), (7, 0.5, 3), (3, 0.999, 2)],
)
def test_calibrated_threshold_rejects_floor_of_target_fpr_times_n_distinct_scores(
    n: int, target_fpr: float, rejected: int
) -> None:
    scores = np.arange(n, dtype=np.float64)[::-1].copy()
    threshold = calibrated_threshold(scores, target_fpr)
    assert threshold == float(rejected)
    assert int((scores < threshold).sum()) == rejected


def test_calibrated_threshold_rejects_the_target_fraction_of_distinct_scores() -> None:
    scores = np.arange(1000, dtype=np.float64)
    assert (scores < calibrated_threshold(scores, 0.05)).sum() == 50


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, math.nan])
def test_calibrated_threshold_refuses_an_invalid_target_fpr(bad: float) -> None:
    with pytest.raises(ValueError, match="target_fpr"):
        calibrated_threshold(np.ones(10), bad)


def test_feature_bank_samples_by_true_label_and_pads_small_classes() -> None:
    features = np.arange(14, dtype=np.float32).reshape(7, 2)
    labels = np.array([0, 1, 0, 0, 1, 0, 0])
    bank, mask = feature_bank(features, labels, 2, per_class=3, seed=0)
    assert bank.shape == (2, 3, 2)
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    class0 = {tuple(row) for row in features[labels == 0]}
    assert all(tuple(row) in class0 for row in bank[0])
    assert {tuple(row) for row in bank[1, :2]} == {tuple(r) for r in features[labels == 1]}
    again, _ = feature_bank(features, labels, 2, per_class=3, seed=0)
    assert np.array_equal(bank, again)


def test_feature_bank_refuses_a_class_without_examples() -> None:
    with pytest.raises(ValueError, match="class 2"):
        feature_bank(np.zeros((3, 2), np.float32), np.array([0, 1, 1]), 3, 10, 0)


def test_calibration_table_interpolates_and_refuses_out_of_range_fpr() -> None:
    table = CalibrationTable(fpr=[0.01, 0.05, 0.1], thresholds={"log_kd": [-3.0, -2.0, -1.0]})
    assert table.threshold("log_kd", 0.05) == -2.0
    assert table.threshold("log_kd", 0.075) == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="target_fpr must lie in"):
        table.threshold("log_kd", 0.2)


def test_table_levels_cover_the_usual_operating_points() -> None:
    assert {0.001, 0.01, 0.05, 0.1, 0.5} <= set(TABLE_FPR)
    assert list(TABLE_FPR) == sorted(set(TABLE_FPR))
