import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.evaluate import keep_pairs, roc_auc

scores = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=30)


def brute_force_auc(normal, adversarial):
    wins = sum((n > a) + 0.5 * (n == a) for n in normal for a in adversarial)
    return wins / (len(normal) * len(adversarial))


@settings(max_examples=200, deadline=None)
@given(scores, scores)
def test_roc_auc_equals_the_pairwise_rank_statistic(normal, adversarial):
    assert roc_auc(np.array(normal), np.array(adversarial)) == pytest.approx(
        brute_force_auc(normal, adversarial)
    )


def test_roc_auc_treats_normal_as_positive_and_higher_as_normal():
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5


def test_roc_auc_matches_sklearn_on_continuous_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    normal, adversarial = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    truth = np.r_[np.ones(300), np.zeros(200)]
    expected = roc_auc_score(truth, np.r_[normal, adversarial])
    assert roc_auc(normal, adversarial) == pytest.approx(expected)


def test_roc_auc_rejects_an_empty_class():
    with pytest.raises(ValueError, match="at least one"):
        roc_auc(np.array([1.0]), np.array([]))


def test_keep_pairs_needs_a_correct_clean_and_a_misclassified_adversarial_image():
    labels = np.array([0, 1, 2, 3])
    clean = np.array([0, 1, 9, 3])  # image 2 is wrong when clean
    adversarial = np.array([5, 1, 7, 2])  # image 1 survived the attack
    assert keep_pairs(labels, clean, adversarial).tolist() == [True, False, False, True]
