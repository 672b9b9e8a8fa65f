"""Calibration: temperature recovery, threshold rules, and the decision shift folded into the logits."""

import math

import numpy as np
import pytest
import torch

from mirage_hf.calibration import (
    apply_calibration,
    calibrate,
    calibrated_p_fake,
    fit_temperature,
    fit_threshold,
)
from mirage_hf.metrics import detection_metrics, tpr_at_fpr


def synthetic_logits(true_temperature: float, n: int = 20000, seed: int = 0):
    """Labels drawn from sigmoid(d); the "model" reports d * T, i.e. it is miscalibrated by exactly T."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 3.0, n)
    labels = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-d))).astype(int)
    real_logit = rng.normal(0.0, 1.0, n)  # arbitrary: only the difference matters
    logits = np.stack([real_logit, real_logit + true_temperature * d], axis=1)
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(true_temperature):
    logits, labels = synthetic_logits(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # the (N,) logit difference is the same input
    assert fit_temperature(logits[:, 1] - logits[:, 0], labels) == pytest.approx(fitted, rel=1e-6)


def test_balanced_accuracy_threshold_beats_default_on_shifted_scores():
    # every score is above 0.5, so the default 0.5 calls everything fake
    p_fake = [0.55, 0.6, 0.65, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 1, 1, 1]
    t = fit_threshold(p_fake, labels)
    assert t == pytest.approx(0.675)  # midpoint between the top real and the bottom fake
    default, fitted = detection_metrics(labels, p_fake, 0.5), detection_metrics(labels, p_fake, t)
    assert (default["real_accuracy"] + default["fake_accuracy"]) / 2 == 0.5
    assert (fitted["real_accuracy"] + fitted["fake_accuracy"]) / 2 == 1.0


def test_balanced_accuracy_ties_go_to_the_candidate_closest_to_half():
    # candidates 0.05 0.2 0.45 0.75 0.95 -> balanced accuracy .5 .75 .5 .75 .5; 0.75 is nearer 0.5 than 0.2
    assert fit_threshold([0.1, 0.6, 0.3, 0.9], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_target_fpr_threshold_on_validation_data():
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 500)
    p_fake = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    t = fit_threshold(p_fake, labels, method="target_fpr", target_fpr=0.05)
    reals = p_fake[labels == 0]
    assert np.mean(reals >= t) <= 0.05
    # smallest such threshold: one more real above it would break the target
    assert np.mean(reals >= np.max(reals[reals < t])) > 0.05
    # and its TPR is the conservative TPR@5%FPR of the metrics module
    assert np.mean(p_fake[labels == 1] >= t) == pytest.approx(tpr_at_fpr(labels, p_fake, 0.05))


def test_missing_class_and_bad_method_raise():
    with pytest.raises(ValueError, match="one class is missing"):
        fit_threshold([0.2, 0.7], [1, 1])
    with pytest.raises(ValueError, match="one class is missing"):
        fit_temperature([[0.0, 1.0], [0.0, 2.0]], [0, 0])
    with pytest.raises(ValueError, match="method"):
        fit_threshold([0.2, 0.7], [0, 1], method="youden")


def test_calibrate_composes_temperature_then_threshold():
    logits, labels = synthetic_logits(2.5, n=5000, seed=1)
    out = calibrate(logits, labels, method="target_fpr", target_fpr=0.1)
    assert out["temperature"] == pytest.approx(2.5, rel=0.1)
    assert out["method"] == "target_fpr" and out["target_fpr"] == 0.1
    assert out["fpr"] <= 0.1
    p = calibrated_p_fake(logits, out["temperature"])
    assert out["threshold"] == fit_threshold(p, labels, method="target_fpr", target_fpr=0.1)
    m = detection_metrics(labels, p, out["threshold"])
    assert out["fpr"] == pytest.approx(1 - m["real_accuracy"])
    assert out["tpr"] == pytest.approx(m["fake_accuracy"])
    assert out["balanced_accuracy"] == pytest.approx((m["real_accuracy"] + m["fake_accuracy"]) / 2)
    assert calibrate(logits, labels)["target_fpr"] is None


def test_calibration_moves_the_decision_as_configured():
    # logit differences -2, -0.5, 0.5, 2
    logits = np.array([[1.0, -1.0], [0.25, -0.25], [-0.25, 0.25], [-1.0, 1.0]])
    # T=1: p_fake = .119 .378 .622 .881 ; T=4: p_fake = .378 .469 .531 .622
    expected = {
        (1.0, 0.2): [0, 1, 1, 1],
        (1.0, 0.5): [0, 0, 1, 1],
        (1.0, 0.8): [0, 0, 0, 1],
        (4.0, 0.4): [0, 1, 1, 1],
        (4.0, 0.6): [0, 0, 0, 1],
    }
    for (temperature, threshold), labels in expected.items():
        out = apply_calibration(logits, temperature, threshold)
        assert (out.argmax(axis=1) == labels).all(), (temperature, threshold)


def test_apply_calibration_matches_rule_exactly_numpy_and_torch():
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 4.0, (2000, 2))
    for temperature in (0.3, 1.0, 2.7):
        for threshold in (0.05, 0.3, 0.5, 0.77, 0.99):
            rule = calibrated_p_fake(logits, temperature) >= threshold
            out = apply_calibration(logits, temperature, threshold)
            softmax_fake = np.exp(out[:, 1]) / np.exp(out).sum(axis=1)
            assert np.array_equal(softmax_fake >= 0.5, rule)
            tensor_out = apply_calibration(torch.from_numpy(logits), temperature, threshold)
            assert np.array_equal(torch.softmax(tensor_out, dim=-1)[:, 1].numpy() >= 0.5, rule)


def test_apply_calibration_identity_and_torch_behaviour():
    logits = np.array([[0.3, -1.2], [2.0, 2.5]])
    assert np.array_equal(apply_calibration(logits, 1.0, 0.5), logits)
    x = torch.tensor([[0.3, -1.2], [2.0, 2.5]], requires_grad=True)
    before = x.detach().clone()
    out = apply_calibration(x, 2.0, 0.8)
    assert torch.allclose(out, torch.tensor([[0.15, -0.6 - math.log(4.0)], [1.0, 1.25 - math.log(4.0)]]))
    assert out.dtype == torch.float32
    assert torch.equal(x.detach(), before)  # input untouched
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.5))
    with pytest.raises(ValueError):
        apply_calibration(logits, 0.0, 0.5)
    with pytest.raises(ValueError):
        apply_calibration(logits, 1.0, 1.0)


def test_unreachable_target_fpr_warns_and_returns_lowest_fpr_threshold():
    # a real at exactly p_fake = 1 is fake under every threshold in (0, 1)
    with pytest.warns(UserWarning, match="no threshold reaches"):
        t = fit_threshold([0.2, 1.0, 1.0], [0, 0, 1], method="target_fpr", target_fpr=0.0)
    assert t == pytest.approx(0.6)  # candidates 0.1, 0.6: FPR 1, 1/2
