"""The scores beyond the paper: Mahalanobis (Lee et al. 2018) and the combined decision.

The graph's scores are checked against numpy computed independently from the manifest's own
constants, and the joint calibration against its definition: the union of the combined metrics'
tests rejects the target fraction of clean data, not the sum of their fractions.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models.manifest import INPUT_NAME, Manifest
from tests.conftest import TinyArtifact
from training.calibrate import calibrated_threshold
from training.checkpoints import load_trained_model
from training.data import load_mnist_5k, to_tensor
from training.mahalanobis import class_gaussians, clean_cdf, fit_combined
from training.scores import clean_cdf as graph_clean_cdf


def _graph(tiny_artifact: TinyArtifact, images: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(
        str(tiny_artifact.path / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(
        zip(names, session.run(names, {INPUT_NAME: to_tensor(images).numpy()}), strict=True)
    )


def test_graph_mahalanobis_equals_numpy_from_the_manifest_means_and_precision(
    tiny_artifact: TinyArtifact,
) -> None:
    manifest = Manifest.load(tiny_artifact.path)
    info = manifest.detection.mahalanobis
    assert info is not None and [layer.name for layer in info.layers]
    images = load_mnist_5k().test.images[:24]
    got = _graph(tiny_artifact, images)
    network, _, _ = load_trained_model(tiny_artifact.checkpoint)
    with torch.no_grad():
        _, _, layers = network.forward_layers(to_tensor(images))
    standardised = []
    for layer in info.layers:
        features = layers[layer.name].numpy().astype(np.float64)
        means, precision = np.array(layer.means), np.array(layer.precision)
        distances = np.array(
            [[(f - mu) @ precision @ (f - mu) for mu in means] for f in features]
        )  # plain loops: independent of the graph's and the fit's vectorised maths
        standardised.append((-distances.min(axis=1) - layer.centre) / layer.scale)
    expected = np.mean(standardised, axis=0)
    np.testing.assert_allclose(got["mahalanobis"], expected, rtol=1e-4, atol=1e-3)
    assert np.ptp(expected) > 0.1, "the images must not all score alike"


def test_graph_combined_is_the_least_clean_cdf_value_of_its_metrics(
    tiny_artifact: TinyArtifact,
) -> None:
    manifest = Manifest.load(tiny_artifact.path)
    combined = manifest.detection.combined
    assert combined is not None and combined.metrics == ["log_kd", "mahalanobis"]
    got = _graph(tiny_artifact, load_mnist_5k().test.images[:24])
    values = []
    for metric in combined.metrics:
        knots = np.array(combined.knots[metric])
        levels = np.arange(len(knots)) / (len(knots) - 1)
        tail = np.minimum(got[metric] - knots[0], 0.0) / (knots[-1] - knots[0])
        values.append(np.interp(got[metric], knots, levels) + tail)
    np.testing.assert_allclose(got["combined"], np.min(values, axis=0), rtol=1e-5, atol=1e-5)


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=20), st.integers(0, 1000))
def test_clean_cdf_of_the_graph_equals_the_numpy_reference(values: list[float], seed: int) -> None:
    knots = np.sort(np.random.default_rng(seed).normal(0, 10, 41))
    ours = graph_clean_cdf(torch.tensor(values, dtype=torch.float64), torch.from_numpy(knots))
    np.testing.assert_allclose(ours.numpy(), clean_cdf(np.array(values), knots), atol=1e-9)


def test_clean_cdf_is_strictly_increasing_below_the_top_knot_and_one_above() -> None:
    knots = np.array([0.0, 1.0, 1.0, 3.0])  # a tie: a step at 1
    s = np.array([-10.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 9.0])
    ours = graph_clean_cdf(torch.from_numpy(s), torch.from_numpy(knots)).numpy()
    assert (np.diff(ours[:-1]) > 0).all() and ours[-2] == ours[-1] == 1.0
    np.testing.assert_allclose(ours[:4], [-10 / 3, -1 / 3, 0.0, 1 / 6])


def test_class_gaussians_recover_the_means_and_the_tied_precision() -> None:
    rng = np.random.default_rng(0)
    covariance = np.array([[2.0, 0.5], [0.5, 1.0]])
    means = np.array([[0.0, 0.0], [5.0, -3.0], [-4.0, 2.0]])
    labels = np.repeat(np.arange(3), 4000)
    features = means[labels] + rng.multivariate_normal([0, 0], covariance, len(labels))
    fitted_means, precision = class_gaussians(features, labels, 3)
    np.testing.assert_allclose(fitted_means, means, atol=0.1)
    np.testing.assert_allclose(precision, np.linalg.inv(covariance), atol=0.05)
    with pytest.raises(ValueError, match="class 3"):
        class_gaussians(features, labels, 4)


@given(
    st.integers(0, 2**16),
    st.sampled_from([0.01, 0.05, 0.1, 0.2]),
    st.floats(0.0, 0.95),
)
def test_joint_calibration_rejects_the_target_fraction_of_clean_data_not_the_sum(
    seed: int, target_fpr: float, correlation: float
) -> None:
    rng = np.random.default_rng(seed)

    def clean(n: int) -> dict[str, np.ndarray]:
        a = rng.normal(size=n)
        b = correlation * a + math.sqrt(1 - correlation**2) * rng.normal(size=n)
        return {"log_kd": a, "mahalanobis": np.exp(b)}  # different scales on purpose

    n = 2000
    calibration = clean(n)
    fit = fit_combined(calibration, ("log_kd", "mahalanobis"))
    threshold = calibrated_threshold(fit.score(calibration), target_fpr)
    union = (fit.score(calibration) < threshold).mean()
    assert target_fpr - 2 / n <= union <= target_fpr
    # The same test as the union of the metrics' tests at their own thresholds, each of which
    # rejects less than the target alone: the FPRs are not added.
    each = {m: fit.component_threshold(m, threshold) for m in fit.metrics}
    rejected = np.zeros(n, bool)
    for metric, bound in each.items():
        alone = (calibration[metric] < bound).mean()
        assert target_fpr / 2 - 2 / n <= alone <= target_fpr + 1 / n
        rejected |= calibration[metric] < bound
    assert abs(rejected.mean() - union) <= 2 / n
    # Fresh clean data from the same distribution: the union rejects the target fraction.
    fresh = clean(20_000)
    spread = 5 * math.sqrt(target_fpr * (1 - target_fpr)) * (1 / math.sqrt(n) + 1 / math.sqrt(2e4))
    assert abs((fit.score(fresh) < threshold).mean() - target_fpr) <= spread


@pytest.mark.parametrize(("source", "per_class"), [("bank", 4), ("train", 6)])
def test_mahalanobis_is_fitted_on_the_bank_images_or_the_whole_training_split(
    source: str, per_class: int
) -> None:
    from training.calibrate import calibrate
    from training.data import Dataset, Split
    from training.nets import ResNet

    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
        return Split(images, np.arange(n, dtype=np.int64) % 10)

    dataset = Dataset("random", [str(i) for i in range(10)], split(60), split(40), split(40), 0)
    torch.manual_seed(0)
    result = calibrate(
        ResNet(8, 1, 10).eval(), "rce", dataset, 0.1, bank_per_class=4,
        mahalanobis_source=source,  # type: ignore[arg-type]
    )  # fmt: skip
    assert result.mahalanobis is not None and result.mahalanobis.source == source
    assert result.mahalanobis.samples_per_class == [per_class] * 10


def test_the_default_models_thresholds_reject_about_the_target_fraction_of_clean_test_data() -> (
    None
):
    """alibi-detect's check, on data the calibration never saw: the committed default model's
    own test split (500 digits), every metric at its deployed threshold."""
    from tests.conftest import DEFAULT_MODEL_DIR

    manifest = Manifest.load(DEFAULT_MODEL_DIR)
    session = ort.InferenceSession(
        str(DEFAULT_MODEL_DIR / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    test = load_mnist_5k().test
    names = list(manifest.metrics)
    scores = dict(
        zip(names, session.run(names, {INPUT_NAME: to_tensor(test.images).numpy()}), strict=True)
    )
    target = manifest.detection.target_fpr
    spread = 3 * math.sqrt(target * (1 - target)) * (1 / math.sqrt(500) + 1 / math.sqrt(500))
    for metric in names:
        rejected = float((scores[metric] < manifest.detection.thresholds[metric]).mean())
        assert abs(rejected - target) <= spread, (metric, rejected)
        assert rejected == pytest.approx(1 - manifest.detection.clean_acceptance[metric])
