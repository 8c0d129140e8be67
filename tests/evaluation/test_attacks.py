"""Every attack against real small models: within budget, and the adaptive ones really adapt."""

import numpy as np
import pytest
import torch

from training.attacks import ATTACKS, AttackSettings, run_attack
from training.data import to_tensor
from training.deployed import detector_outputs
from training.evaluate import attack_result, load_model_under_test

SETTINGS = AttackSettings(
    eps=0.2, cw_binary_steps=2, cw_max_iter=15, pgd_eps=0.2, pgd_step=0.02, pgd_steps=20,
    jsma_gamma=0.05, batch_size=16,
)  # fmt: skip


@pytest.fixture(scope="module")
def models(small_models):
    return {
        objective: load_model_under_test(m.artifact, m.checkpoint)
        for objective, m in small_models.items()
    }


def _correct_images(model, count):
    test = model.dataset.test
    images = to_tensor(test.images[:200]).numpy()
    clean = detector_outputs(model.detector, images)
    index = np.flatnonzero(clean["label"] == test.labels[:200])[:count]
    return images[index], test.labels[index], {k: v[index] for k, v in clean.items()}


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_perturbs_within_its_budget(models, attack):
    model = models["ce"]
    images, labels, clean = _correct_images(model, 6)
    threshold = model.manifest.detection.thresholds["log_kd"]
    output = run_attack(
        attack, model.detector, images, labels, clean["label"], clean["probabilities"],
        threshold, SETTINGS, seed=0,
    )  # fmt: skip
    adversarial = output.adversarial
    assert adversarial.shape == images.shape and adversarial.dtype == np.float32
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    delta = np.abs(adversarial - images).reshape(len(images), -1)
    if attack in ("fgsm", "bim", "illcm"):
        assert delta.max() <= SETTINGS.eps + 1e-5
    if attack in ("pgd", "pgd-adaptive"):
        assert delta.max() <= SETTINGS.pgd_eps + 1e-5
    if attack == "jsma":
        changed = (delta > 1e-6).mean(axis=1)
        assert changed.max() <= SETTINGS.jsma_gamma + 2 / delta.shape[1]
    adv_labels = detector_outputs(model.detector, adversarial)["label"]
    # kappa 10 needs more than this test's 2 x 15 C&W iterations on a barely trained model.
    if attack != "cw-hc":
        assert (adv_labels != labels).any(), f"{attack} fooled no image"
    # The budget recorded in results.json is the one the attack was given.
    budget = {
        "fgsm": {"eps": SETTINGS.eps},
        "bim": {"eps": SETTINGS.eps, "steps": SETTINGS.bim_steps},
        "illcm": {"eps": SETTINGS.eps, "steps": SETTINGS.bim_steps},
        "jsma": {"gamma": SETTINGS.jsma_gamma, "theta": SETTINGS.jsma_theta},
        "pgd": {
            "eps": SETTINGS.pgd_eps,
            "eps_step": SETTINGS.pgd_step,
            "steps": SETTINGS.pgd_steps,
        },
        "pgd-adaptive": {"eps": SETTINGS.pgd_eps, "steps": SETTINGS.pgd_steps},
    }.get(
        attack, {"binary_search_steps": SETTINGS.cw_binary_steps, "max_iter": SETTINGS.cw_max_iter}
    )
    assert {k: output.params[k] for k in budget} == budget


@pytest.mark.parametrize("attack", ["cw-l2", "cw-hc", "cw-wb"])
def test_cw_attacks_stay_within_their_iteration_budget_and_record_their_distortion(models, attack):
    model = models["ce"]
    images, labels, clean = _correct_images(model, 6)
    thresholds = dict(model.manifest.detection.thresholds)
    inputs = []
    hook = model.detector.network.register_forward_hook(
        lambda module, args, output: inputs.append(args[0].detach().clone())
    )
    try:
        output = run_attack(
            attack, model.detector, images, labels, clean["label"], clean["probabilities"],
            thresholds["log_kd"], SETTINGS, seed=0,
        )  # fmt: skip
    finally:
        hook.remove()
    # Each binary-search round restarts Adam from the clean images ((tanh(atanh(2x-1))+1)/2 = x
    # up to the 1e-6 clamp), so the forward passes split into rounds at those restarts:
    # exactly cw_binary_steps rounds, none longer than cw_max_iter iterations.
    start = torch.from_numpy(images)
    restarts = [
        i for i, x in enumerate(inputs) if x.shape == start.shape and (x - start).abs().max() < 1e-5
    ]
    assert len(restarts) == SETTINGS.cw_binary_steps
    assert max(np.diff([*restarts, len(inputs)])) <= SETTINGS.cw_max_iter
    kappa = SETTINGS.cw_hc_kappa if attack == "cw-hc" else 0.0
    assert output.params["kappa"] == kappa
    adversarial = output.adversarial
    assert adversarial.dtype == np.float32 and 0.0 <= adversarial.min() <= adversarial.max() <= 1.0
    # An image the attack changed is one it sent to its target (by kappa for C&W-hc); the others
    # are returned untouched.
    adv = detector_outputs(model.detector, adversarial)
    changed = (adversarial != images).reshape(len(images), -1).any(axis=1)
    assert (adv["label"][changed] == output.targets[changed]).all()
    logits = adv["logits"][changed]
    target_logit = logits[np.arange(len(logits)), output.targets[changed]]
    others = np.where(
        np.eye(logits.shape[1], dtype=bool)[output.targets[changed]], -np.inf, logits
    ).max(axis=1)
    assert (target_logit - others >= kappa - 1e-4).all()
    # What results.json records: kept pairs by the paper's rule, distortion of those pairs.
    result, _ = attack_result(
        attack, labels, images, adversarial, clean, adv, thresholds, "log_kd", output.seconds,
        output.targets, output.params,
    )  # fmt: skip
    kept = (clean["label"] == labels) & (adv["label"] != labels)
    assert result.kept == int(kept.sum()) and result.clean_correct == len(labels)
    delta = (adversarial - images).reshape(len(images), -1).astype(np.float64)
    l2, linf = np.sqrt((delta**2).sum(axis=1)), np.abs(delta).max(axis=1)
    assert result.distortion.l2_max == pytest.approx(l2.max(), rel=1e-6)
    assert result.distortion.linf_max == pytest.approx(linf.max(), rel=1e-6)
    if kept.any():
        assert result.distortion.l2 == pytest.approx(l2[kept].mean(), rel=1e-6)
        assert result.distortion.linf == pytest.approx(linf[kept].mean(), rel=1e-6)


def test_cw_targets_differ_from_the_true_label(models):
    model = models["ce"]
    images, labels, clean = _correct_images(model, 6)
    output = run_attack(
        "cw-l2", model.detector, images, labels, clean["label"], clean["probabilities"], 0.0,
        SETTINGS, seed=0,
    )  # fmt: skip
    assert output.targets is not None and (output.targets != labels).all()


def test_unknown_attack_is_refused(models):
    model = models["ce"]
    images, labels, clean = _correct_images(model, 2)
    with pytest.raises(ValueError, match="unknown attack"):
        run_attack("deepfool", model.detector, images, labels, clean["label"],
                   clean["probabilities"], 0.0, SETTINGS, seed=0)  # fmt: skip


def _rejection(model, attack, images, labels, clean):
    threshold = model.manifest.detection.thresholds["log_kd"]
    output = run_attack(
        attack, model.detector, images, labels, clean["label"], clean["probabilities"],
        threshold, SETTINGS, seed=0,
    )  # fmt: skip
    adv = detector_outputs(model.detector, output.adversarial)
    missed = adv["label"] != labels
    rejected = adv["log_kd"] < threshold
    return missed, rejected


@pytest.mark.parametrize("objective", ["ce", "rce"])
def test_adaptive_pgd_lowers_rejection_compared_with_plain_pgd(models, objective):
    model = models[objective]
    images, labels, clean = _correct_images(model, 24)
    plain_missed, plain_rejected = _rejection(model, "pgd", images, labels, clean)
    adaptive_missed, adaptive_rejected = _rejection(model, "pgd-adaptive", images, labels, clean)
    # Same L-inf budget and steps: the adaptive attack leaves more misclassified images that
    # the detector accepts, and fewer of its misclassified images are rejected.
    assert (adaptive_missed & ~adaptive_rejected).sum() > (plain_missed & ~plain_rejected).sum()
    assert adaptive_rejected[adaptive_missed].mean() < plain_rejected[plain_missed].mean()


@pytest.mark.parametrize("objective", ["ce", "rce"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_the_classifier_art_attacks_outputs_the_deployed_logits(models, objective, loss):
    """What every ART attack differentiates is the deployed classifier (Pang et al. 2018,
    section 3.2): -Z of the RCE-trained network, Z of the CE-trained one."""
    from training.attacks import art_classifier

    model = models[objective]
    images = to_tensor(model.dataset.test.images[:8])
    with torch.no_grad():
        raw, _ = model.detector.network(images)
    deployed = -raw if objective == "rce" else raw
    classifier = art_classifier(
        model.detector, tuple(images.shape[1:]), model.detector.num_classes, loss
    )
    np.testing.assert_allclose(classifier.predict(images.numpy()), deployed.numpy(), atol=1e-5)
