from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.manifest import METRICS
from training.scores import (
    SCORES,
    ScoreInputs,
    confidence,
    log_kernel_density,
    max_non_me,
    non_maximal_entropy,
    scores,
)


@given(
    st.integers(3, 12).flatmap(
        lambda classes: st.tuples(
            st.just(classes),
            st.floats(0.0, 20.0),
            st.floats(-5.0, 5.0),
        )
    )
)
def test_non_me_is_maximal_when_non_maximal_probabilities_are_equal(
    case: tuple[int, float, float],
) -> None:
    classes, margin, base = case
    logits = torch.full((1, classes), base, dtype=torch.float64)
    logits[0, 0] = base + margin
    assert math.isclose(float(non_maximal_entropy(logits)), max_non_me(classes), rel_tol=1e-9)


@given(
    arrays(np.float64, st.integers(3, 10), elements=st.floats(-10, 10)).filter(
        lambda z: np.ptp(np.delete(z, np.argmax(z))) > 1e-3
    )
)
@settings(max_examples=200)
def test_non_me_is_below_its_maximum_when_non_maximal_probabilities_differ(z: np.ndarray) -> None:
    logits = torch.from_numpy(z)[None]
    value = float(non_maximal_entropy(logits))
    assert value < max_non_me(len(z)) - 1e-9
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    rest = np.delete(probs, np.argmax(z))
    g = rest / rest.sum()
    g = g[g > 0]
    assert math.isclose(value, float(-(g * np.log(g)).sum()), rel_tol=1e-6, abs_tol=1e-9)


def test_non_me_is_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[1e4, -1e4, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    values = non_maximal_entropy(logits)
    assert torch.isfinite(values).all()
    assert math.isclose(float(values[1]), math.log(3), rel_tol=1e-6)


def test_confidence_is_the_largest_probability() -> None:
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    assert confidence(probs).tolist() == [0.699999988079071, 0.5]


@given(
    st.integers(1, 4),
    st.integers(2, 4),
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 2**31),
    st.sampled_from([0.1 / 0.26, 1 / 0.26, 2.0]),
)
@settings(max_examples=60, deadline=None)
def test_log_kd_matches_a_brute_force_numpy_computation(
    n: int, classes: int, bank_size: int, dim: int, seed: int, sigma2: float
) -> None:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim))
    labels = rng.integers(0, classes, size=n)
    bank = rng.normal(size=(classes, bank_size, dim))
    sizes = rng.integers(1, bank_size + 1, size=classes)
    mask = (np.arange(bank_size)[None, :] < sizes[:, None]).astype(np.float64)
    got = log_kernel_density(
        torch.from_numpy(features),
        torch.from_numpy(labels),
        torch.from_numpy(bank),
        torch.from_numpy(mask),
        sigma2,
    ).numpy()
    for i in range(n):
        members = bank[labels[i], : sizes[labels[i]]]
        kd = np.mean([math.exp(-np.sum((features[i] - b) ** 2) / sigma2) for b in members])
        if kd > 1e-300:
            assert math.isclose(got[i], math.log(kd), rel_tol=1e-6, abs_tol=1e-6)
        else:
            assert got[i] < -600


def test_every_metric_of_the_manifest_has_one_score_in_its_order() -> None:
    assert tuple(SCORES) == METRICS


@given(arrays(np.float64, (6, 5), elements=st.floats(-30.0, 30.0)), st.integers(0, 2**31))
def test_scores_of_the_predicted_class_are_the_deployed_scores(z: np.ndarray, seed: int) -> None:
    """The class-parameterised scores the adaptive attacks use equal the graph's at the
    prediction (one score maths for both), and `scores` scores the classes it is given."""
    logits = torch.from_numpy(z)
    probabilities = torch.softmax(logits, dim=1)
    predicted = logits.argmax(dim=1)
    assert torch.equal(confidence(probabilities, predicted), confidence(probabilities))
    assert torch.equal(non_maximal_entropy(logits, predicted), non_maximal_entropy(logits))
    rng = np.random.default_rng(seed)
    bank = torch.from_numpy(rng.normal(size=(5, 3, 4)))
    mask = torch.from_numpy((rng.random((5, 3)) < 0.7) | (np.arange(3) == 0)).double()
    features = torch.from_numpy(rng.normal(size=(6, 4)))
    sigma2 = 0.5
    for classes in (predicted, (predicted + 1) % 5):
        inputs = ScoreInputs(logits, probabilities, features, classes, bank, mask, sigma2)
        got = scores(inputs)
        assert list(got) == list(METRICS)
        expected = {
            "confidence": confidence(probabilities, classes),
            "non_me": non_maximal_entropy(logits, classes),
            "log_kd": log_kernel_density(features, classes, bank, mask, sigma2),
        }
        for metric, value in expected.items():
            assert torch.equal(got[metric], value), metric  # type: ignore[index]
