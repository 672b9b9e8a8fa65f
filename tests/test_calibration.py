"""Calibration: the temperature rule (recovery, separated data, too little data, no signal), the threshold rules,
the one calibration rule of the model, and ranking metrics that no temperature can move."""

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from mirage_hf.calibration import MIN_PER_CLASS, calibrate, fit_temperature, fit_threshold, model_p_fake
from mirage_hf.evaluation import evaluate
from mirage_hf.metrics import detection_metrics, tpr_at_fpr
from mirage_hf.modeling_mirage import calibrate_logits
from mirage_hf.transforms import Preprocessor


def synthetic_logit_diff(true_temperature: float, n: int = 20000, seed: int = 0):
    """Labels drawn from sigmoid(d); the "model" reports d * T, i.e. it is miscalibrated by exactly T."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 3.0, n)
    labels = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-d))).astype(int)
    return true_temperature * d, labels


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(true_temperature):
    z, labels = synthetic_logit_diff(true_temperature)
    assert fit_temperature(z, labels) == pytest.approx(true_temperature, rel=0.05)


def test_separated_data_gives_a_finite_temperature_from_platts_targets():
    """Plain NLL runs to T -> 0 here. With Platt's targets the optimum is closed-form: sigmoid(m / T) must equal
    (N + 1) / (N + 2), so T = m / log(N + 1); a warning says the data alone could not determine T."""
    n, margin = 50, 20.0
    z, labels = np.r_[np.full(n, -margin), np.full(n, margin)], np.repeat([0, 1], n)
    assert fit_temperature(z, labels) == pytest.approx(margin / math.log(n + 1), rel=1e-5)
    with pytest.warns(UserWarning, match="perfectly separated"):
        out = calibrate(z, labels)
    assert out["fitted"] and out["separated"] and out["threshold"] == 0.5  # no gain over 0.5: it stays
    assert "Platt" in out["rule"] and "perfectly separated" in out["warnings"][0]
    p = model_p_fake(np.linspace(-40, 40, 101), out["temperature"])
    assert np.all((p > 0) & (p < 1))  # even twice the held-out margins stay uncertain


def test_too_few_held_out_images_fall_back_to_the_defaults_with_a_warning():
    """The ViT-L/14 failure: 4 held-out images once fitted T = 100 and t = 0.25, and the model called all fake."""
    z, labels = np.array([-3.0, 4.0, 5.0, 6.0]), np.array([0, 0, 1, 1])
    with pytest.warns(UserWarning, match="cannot support a fit"):
        out = calibrate(z, labels)
    assert (out["temperature"], out["threshold"], out["fitted"]) == (1.0, 0.5, False)
    assert f"fewer than {MIN_PER_CLASS}" in out["rule"]
    z, labels = np.linspace(-1, 1, 2 * MIN_PER_CLASS), np.tile([0, 1], MIN_PER_CLASS)  # overlapping
    assert calibrate(z, labels)["fitted"]  # exactly the minimum is enough


def test_scores_without_signal_do_not_export_a_bound_temperature():
    """Scores that anti-correlate with the labels drive T to the upper bound (p = 0.5 everywhere): fall back."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    z = -3.0 * (labels - 0.5) + rng.normal(0, 0.5, 200)
    with pytest.warns(UserWarning, match="ran to the bound"):
        out = calibrate(z, labels)
    assert (out["temperature"], out["threshold"], out["fitted"]) == (1.0, 0.5, False)


def test_calibrate_composes_temperature_then_threshold_on_the_models_p_fake():
    z, labels = synthetic_logit_diff(2.5, n=5000, seed=1)
    out = calibrate(z, labels, method="target_fpr", target_fpr=0.1)
    assert out["temperature"] == pytest.approx(2.5, rel=0.1) and out["fitted"] and not out["warnings"]
    assert out["method"] == "target_fpr" and out["target_fpr"] == 0.1
    assert (out["n_real"], out["n_fake"]) == (int((labels == 0).sum()), int(labels.sum()))
    p = model_p_fake(z, out["temperature"])
    assert out["threshold"] == fit_threshold(p, labels, method="target_fpr", target_fpr=0.1)
    m = detection_metrics(labels, p, out["threshold"])
    assert out["fpr"] == pytest.approx(1 - m["real_accuracy"]) and out["fpr"] <= 0.1
    assert out["tpr"] == pytest.approx(m["fake_accuracy"])
    assert out["balanced_accuracy"] == pytest.approx((m["real_accuracy"] + m["fake_accuracy"]) / 2)
    assert calibrate(z, labels)["target_fpr"] is None
    with pytest.raises(ValueError, match="method"):
        calibrate(z, labels, method="youden")


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
    # candidates 0.05 0.2 0.45 0.5 0.75 0.95 -> balanced accuracy .5 .75 .5 .5 .75 .5; 0.75 is nearer 0.5 than 0.2
    assert fit_threshold([0.1, 0.6, 0.3, 0.9], [0, 0, 1, 1]) == pytest.approx(0.75)
    # separated around 0.5: no other threshold does better, so 0.5 itself stays (not the midpoint 0.45)
    assert fit_threshold([0.1, 0.4, 0.6, 0.9], [0, 0, 1, 1]) == 0.5


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
        fit_temperature([1.0, 2.0], [0, 0])
    with pytest.raises(ValueError, match="method"):
        fit_threshold([0.2, 0.7], [0, 1], method="youden")
    with pytest.raises(ValueError, match=r"\(N,\) logit difference"):
        fit_temperature([[0.0, 1.0], [0.0, 2.0]], [0, 1])


def test_unreachable_target_fpr_warns_and_returns_lowest_fpr_threshold():
    # a real at exactly p_fake = 1 is fake under every threshold in (0, 1)
    with pytest.warns(UserWarning, match="no threshold reaches"):
        t = fit_threshold([0.2, 1.0, 1.0], [0, 0, 1], method="target_fpr", target_fpr=0.0)
    assert t == pytest.approx(0.6)  # candidates 0.1, 0.5, 0.6: FPR 1, 1/2, 1/2


# ------------------------------------------------------------------------------- the model's one rule


def test_calibrate_logits_is_the_rule_exactly():
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(0.0, 4.0, (2000, 2)))
    z = (logits[:, 1] - logits[:, 0]).numpy()
    for temperature in (0.3, 1.0, 2.7):
        for threshold in (0.05, 0.3, 0.5, 0.77, 0.99):
            out = calibrate_logits(logits, temperature, threshold)
            np.testing.assert_allclose(out["logit_diff"].numpy(), z, rtol=1e-6, atol=1e-6)
            shift = math.log(threshold / (1 - threshold))
            np.testing.assert_allclose(out["p_fake"].numpy(), 1 / (1 + np.exp(shift - z / temperature)), atol=1e-6)
            np.testing.assert_allclose(out["p_fake"], torch.softmax(out["logits"], -1)[:, 1], atol=1e-6)
            scaled = torch.from_numpy(1 / (1 + np.exp(-z / temperature)))
            assert torch.equal(out["p_fake"] >= 0.5, scaled >= threshold), (temperature, threshold)
    identity = calibrate_logits(logits.float(), 1.0, 0.5)["logits"]
    assert torch.equal(identity, logits.float())


def test_calibration_is_differentiable_and_leaves_the_input_alone():
    x = torch.tensor([[0.3, -1.2], [2.0, 2.5]], requires_grad=True)
    before = x.detach().clone()
    out = calibrate_logits(x, 2.0, 0.8)["logits"]
    assert torch.allclose(out, torch.tensor([[0.15, -0.6 - math.log(4.0)], [1.0, 1.25 - math.log(4.0)]]))
    assert torch.equal(x.detach(), before)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.5))


# --------------------------------------------------------------------- ranking metrics vs the temperature


@pytest.fixture
def saturating_detector(make_model, clip_dir):
    """A linear-probe detector whose logit differences are around +-20, with labels that overlap its scores
    (AUC well away from 0 and 1), as the demo's unseen generators did; 96 images of two subsets."""
    model = make_model("linear_probe").eval()
    processor = AutoImageProcessor.from_pretrained(clip_dir)
    preprocess = Preprocessor(processor, "resize")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)) for _ in range(96)]
    with torch.no_grad():
        features = model.encode_image(preprocess(images), []).pooler_output
        direction = torch.randn(features.shape[1], generator=torch.Generator().manual_seed(1))
        z = features @ direction
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[1] = direction * 20.0 / z.std()
        model.classifier.bias[1] = -20.0 * z.mean() / z.std()
        z = model(pixel_values=preprocess(images)).logit_diff.double().numpy()  # reference: the model's scores
    labels = (z + rng.normal(0, 20.0, z.size) > 0).astype(int)
    subsets = ["a", "b"] * 48
    data = Dataset.from_dict({"image": images, "label": labels.tolist(), "subset": subsets})
    return model, data, preprocess, z, labels, np.array(subsets)


def test_ranking_metrics_equal_sklearn_on_the_logit_difference_at_any_temperature(saturating_detector):
    """The demo's failure: T = 0.01 made p(fake) exactly 0 or 1, every score tied and AP / AUC fell to 0.5."""
    model, data, preprocess, z, labels, subsets = saturating_detector
    assert np.abs(z).mean() > 10
    model.config.calibration_temperature = 0.01
    with torch.no_grad():
        p = model(pixel_values=preprocess(list(data["image"]))).p_fake.numpy()
    assert np.mean((p == 0) | (p == 1)) > 0.9  # the saturated case is reproduced
    naive = average_precision_score(labels, p)
    for temperature in (0.01, 1.0, 100.0):
        model.config.calibration_temperature = temperature
        results, _ = evaluate(model, data, preprocess, Accelerator(cpu=True), batch_size=32)
        for name, rows in (("a", subsets == "a"), ("b", subsets == "b"), ("all", slice(None))):
            got, y, s = results["clean"][name], labels[rows], z[rows]
            assert got["average_precision"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
            assert got["roc_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)
            fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
            assert got["tpr_at_5_fpr"] == pytest.approx(tpr[fpr <= 0.05].max(), abs=1e-9)
    assert 0.6 < roc_auc_score(labels, z) < 0.95
    assert abs(naive - average_precision_score(labels, z)) > 0.05  # ranking on p(fake) would have been wrong
