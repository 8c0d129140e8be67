from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.manifest import METRICS, CalibrationTable, Objective
from training.calibrate import (
    TABLE_FPR,
    calibrate,
    calibrated_threshold,
    feature_bank,
)
from training.data import Dataset, Split
from training.deployed import detector_outputs, predict
from training.nets import ResNet
from training.scores import SIGMA2


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


def _three_splits() -> Dataset:
    """Random 28x28 digits-to-be: train, calibration and test drawn separately, so a bank or
    a threshold taken from the wrong split shows."""
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
        return Split(images, np.arange(n, dtype=np.int64) % 10)

    return Dataset("random", [str(i) for i in range(10)], split(60), split(40), split(40), 0)


@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_calibration_builds_the_bank_from_train_and_thresholds_from_calibration(
    objective: Objective,
) -> None:
    torch.manual_seed(0)
    network = ResNet(8, 1, 10).eval()
    dataset = _three_splits()
    result = calibrate(network, objective, dataset, target_fpr=0.1, bank_per_class=4, seed=0)
    # The bank: per class, 4 training features of images whose TRUE label is that class.
    _, train_features = predict(network, objective, dataset.train.images)
    assert result.bank.shape == (10, 4, 64) and result.bank_mask.all()
    for label in range(10):
        candidates = train_features[dataset.train.labels == label]
        for row in result.bank[label]:
            assert np.isclose(candidates, row, rtol=0, atol=1e-6).all(axis=1).any()
    # The thresholds: the floor(0.1 * 40)-th smallest calibration score of each metric.
    detector = result.deployed(network)
    calibration_scores = detector_outputs(detector, dataset.calibration.images)
    test_scores = detector_outputs(detector, dataset.test.images)
    for metric in METRICS:
        assert result.thresholds[metric] == calibrated_threshold(calibration_scores[metric], 0.1)
    assert any(
        result.thresholds[m] != calibrated_threshold(test_scores[m], 0.1) for m in METRICS
    ), "the calibration and test splits do not tell the thresholds apart"
    assert result.calibration_size == 40
    # The bandwidth defaults to the objective's (DESIGN.md section 1); an explicit one wins.
    assert result.sigma2 == SIGMA2[objective] and detector.sigma2 == SIGMA2[objective]
    explicit = calibrate(network, objective, dataset, 0.1, bank_per_class=4, sigma2=0.5)
    assert explicit.sigma2 == 0.5


# Pang et al. 2018 (the official code's bandwidths), written out here rather than imported:
# sigma^2 = 0.1/0.26 for the features of RCE-trained models, 1/0.26 for CE-trained ones.
PAPER_SIGMA2 = {"rce": 0.1 / 0.26, "ce": 1.0 / 0.26}


def numpy_log_kd(
    features: np.ndarray, labels: np.ndarray, bank: np.ndarray, mask: np.ndarray, sigma2: float
) -> np.ndarray:
    """log mean_i exp(-||z - z_i||^2 / sigma^2) over the bank entries of each label, in float64."""
    values = []
    for z, label in zip(features.astype(np.float64), labels, strict=True):
        members = bank[label][mask[label] > 0].astype(np.float64)
        exponents = -((members - z) ** 2).sum(axis=1) / sigma2
        top = exponents.max()
        values.append(top + math.log(np.exp(exponents - top).mean()))
    return np.array(values)


@pytest.mark.parametrize("objective", ["rce", "ce"])
def test_deployed_log_kd_is_the_kernel_density_of_the_bank_at_the_papers_bandwidth(
    objective: Objective,
) -> None:
    """The log K-density of the detector as calibrate builds it (the torch graph that export
    traces) equals one computed here in numpy from the bank, the network's features and the
    paper's bandwidth for the objective."""
    torch.manual_seed(0)
    network = ResNet(8, 1, 10).eval()
    dataset = _three_splits()
    result = calibrate(network, objective, dataset, target_fpr=0.1, bank_per_class=4, seed=0)
    images = dataset.test.images[:16]
    outputs = detector_outputs(result.deployed(network), images)
    labels, features = predict(network, objective, images)
    assert np.array_equal(outputs["label"], labels)
    bank, mask = result.bank, result.bank_mask
    expected = numpy_log_kd(features, labels, bank, mask, PAPER_SIGMA2[objective])
    # float32 in the graph: about 2e-7 absolute on scores near -1e-3 for this untrained net.
    np.testing.assert_allclose(outputs["log_kd"], expected, rtol=1e-3, atol=1e-6)
    # These features tell the bandwidths apart: another one would give other scores.
    for sigma2 in (1.0, *PAPER_SIGMA2.values()):
        if sigma2 != PAPER_SIGMA2[objective]:
            other = numpy_log_kd(features, labels, bank, mask, sigma2)
            assert not np.allclose(other, expected, rtol=0.1, atol=0), sigma2
