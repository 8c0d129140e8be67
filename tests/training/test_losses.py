from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from training.losses import deployed_logits, reverse_cross_entropy, reverse_label_vectors


def logits_and_labels(max_abs: float) -> st.SearchStrategy[tuple[np.ndarray, np.ndarray]]:
    return st.integers(2, 12).flatmap(
        lambda classes: st.integers(1, 8).flatmap(
            lambda n: st.tuples(
                arrays(np.float32, (n, classes), elements=st.floats(-max_abs, max_abs, width=32)),
                arrays(np.int64, (n,), elements=st.integers(0, classes - 1)),
            )
        )
    )


@given(logits_and_labels(30.0))
@settings(max_examples=100, deadline=None)
def test_rce_equals_cross_entropy_against_the_reverse_label_vector(
    case: tuple[np.ndarray, np.ndarray],
) -> None:
    logits, labels = torch.from_numpy(case[0]), torch.from_numpy(case[1])
    reverse = reverse_label_vectors(labels, logits.shape[1])
    expected = F.cross_entropy(logits, reverse)
    assert torch.allclose(reverse_cross_entropy(logits, labels), expected, atol=1e-5)


@given(logits_and_labels(float(np.float32(1.0e38))))
@settings(max_examples=100, deadline=None)
def test_rce_is_finite_for_extreme_logits(case: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = torch.from_numpy(case[0]), torch.from_numpy(case[1])
    assert torch.isfinite(reverse_cross_entropy(logits, labels))


def test_reverse_label_vector_is_zero_at_the_true_class_and_uniform_elsewhere() -> None:
    reverse = reverse_label_vectors(torch.tensor([2, 0]), 5)
    assert reverse[0].tolist() == [0.25, 0.25, 0.0, 0.25, 0.25]
    assert reverse[1].tolist() == [0.0, 0.25, 0.25, 0.25, 0.25]


def test_rce_is_minimised_by_making_the_true_logit_the_smallest() -> None:
    labels = torch.tensor([1])
    low_true = torch.tensor([[5.0, -5.0, 5.0]])
    high_true = torch.tensor([[-5.0, 5.0, -5.0]])
    assert reverse_cross_entropy(low_true, labels) < reverse_cross_entropy(high_true, labels)
    assert deployed_logits("rce", low_true).argmax().item() == 1
    assert deployed_logits("ce", high_true).argmax().item() == 1
