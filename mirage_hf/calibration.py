"""Fitting the model's calibration on held-out training data: a temperature T and a decision threshold t.

The rule itself lives in one place, ``modeling_mirage.calibrate_logits``: the temperature-scaled probability
``sigmoid((logit_fake - logit_real) / T)`` calls an image fake from ``t``, and both are folded into the one score
every surface reports, ``p_fake = sigmoid(z / T - logit(t))`` (fake iff ``p_fake >= 0.5``). This module only
chooses T and t, and measures the reported score's calibration (ECE) on the held-out images it fitted them on.

How T is chosen (:func:`fit_temperature`): the cross-entropy of ``sigmoid(z / T)`` is minimised against Platt's
(1999) prior-corrected targets, ``(N_fake + 1) / (N_fake + 2)`` for fakes and ``1 / (N_real + 2)`` for reals,
instead of 1 and 0. These are the posterior means of a label under a uniform prior (Laplace's rule of
succession): ``N`` held-out images cannot show that the model is surer than that. Plain NLL has no minimum on
perfectly separated data (it keeps falling as T -> 0, and ``sigmoid(z / T)`` becomes exactly 0 or 1); with the
targets the fit stays finite and the calibrated scores keep the uncertainty the data cannot remove. On large,
overlapping data the targets are ~0 / 1 and the fit is ordinary temperature scaling.

How t is chosen (:func:`fit_threshold`): on the calibrated p(fake) of the same held-out images, by balanced
accuracy (the default 0.5 is kept unless the held-out data shows a strict gain) or for a target FPR. Never on
the test split (the "oracle threshold" cheat).

When the held-out data cannot support a fit - fewer than ``MIN_PER_CLASS`` images of a class, or a temperature at
a bound of the search (no ranking signal) - :func:`calibrate` warns and keeps T = 1, t = 0.5.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from .metrics import expected_calibration_error, to_numpy
from .modeling_mirage import calibrate_logits

TEMPERATURE_BOUNDS = (1e-2, 1e2)
MIN_PER_CLASS = 20
METHODS = ("balanced_accuracy", "target_fpr")
RULE = (
    "temperature: cross-entropy of sigmoid(z / T) against Platt's targets (N_fake + 1) / (N_fake + 2) and "
    "1 / (N_real + 2), fitted on held-out training images; threshold: {method} on their calibrated p(fake)"
)
FALLBACK = "defaults T = 1, t = 0.5: {why}"


def _labels(labels, n: int) -> np.ndarray:
    labels = to_numpy(labels).reshape(-1)
    if labels.size != n:
        raise ValueError(f"{labels.size} labels for {n} samples")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    return labels.astype(np.int64)


def _both_classes(labels) -> None:
    if np.unique(labels).size < 2:
        raise ValueError("calibration needs both real (0) and fake (1) samples; one class is missing")


def _logit_diff(logit_diff) -> np.ndarray:
    z = to_numpy(logit_diff).astype(np.float64)
    if z.ndim != 1:
        raise ValueError(f"expected an (N,) logit difference (logit_fake - logit_real), got shape {z.shape}")
    return z


def model_p_fake(logit_diff, temperature: float, threshold: float = 0.5) -> np.ndarray:
    """The p(fake) the model outputs for these logit differences at `temperature` and `threshold` (its own rule, in
    float32); at the default threshold, the temperature-scaled probability the threshold is chosen on."""
    z = torch.as_tensor(np.asarray(logit_diff), dtype=torch.float32)
    return calibrate_logits(torch.stack([torch.zeros_like(z), z], -1), temperature, threshold)["p_fake"].numpy()


def fit_temperature(logit_diff, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """T minimising the cross-entropy of ``sigmoid(z / T)`` against Platt's targets, searched on log T in `bounds`.

    The loss is convex in 1/T, hence unimodal in log T, so bounded Brent search finds its minimum (or a bound,
    when the scores carry no signal).
    """
    z = _logit_diff(logit_diff)
    labels = _labels(labels, z.size)
    _both_classes(labels)
    n_fake, n_real = int(labels.sum()), int((labels == 0).sum())
    target = np.where(labels == 1, (n_fake + 1) / (n_fake + 2), 1 / (n_real + 2))

    def cross_entropy(log_t: float) -> float:
        x = z / math.exp(log_t)
        return float((target * np.logaddexp(0.0, -x) + (1 - target) * np.logaddexp(0.0, x)).mean())

    log_bounds = (math.log(bounds[0]), math.log(bounds[1]))
    return math.exp(minimize_scalar(cross_entropy, bounds=log_bounds, method="bounded", options={"xatol": 1e-8}).x)


def _rates(p_fake: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) of the rule ``p_fake >= t`` for each threshold ``t``."""
    fakes = np.sort(p_fake[labels == 1])
    reals = np.sort(p_fake[labels == 0])
    # count / n, not 1 - below / n: the latter rounds 25/500 to 0.05000000000000004 > 0.05
    tpr = (fakes.size - np.searchsorted(fakes, thresholds, side="left")) / fakes.size
    fpr = (reals.size - np.searchsorted(reals, thresholds, side="left")) / reals.size
    return tpr, fpr


def fit_threshold(p_fake, labels, method: str = "balanced_accuracy", target_fpr: float = 0.05) -> float:
    """Decision threshold ``t`` in (0, 1) (fake iff ``p_fake >= t``) fitted on held-out data.

    Candidates are 0.5 and the midpoints between consecutive distinct values of ``{0, p_fake..., 1}``, so every
    achievable split is tried.

    * ``"balanced_accuracy"``: maximise (TPR + TNR) / 2; ties go to the candidate closest to 0.5 (so 0.5 itself
      stays unless another threshold is strictly better), then to the smaller one.
    * ``"target_fpr"``: the smallest candidate whose FPR on reals is <= ``target_fpr`` (hence the highest TPR
      under that FPR). If none reaches it (reals at exactly p_fake = 1), warn and return the lowest-FPR one.
    """
    p_fake = to_numpy(p_fake).astype(np.float64).reshape(-1)
    labels = _labels(labels, p_fake.size)
    _both_classes(labels)
    values = np.unique(np.concatenate([[0.0, 1.0], p_fake]))
    candidates = np.union1d((values[:-1] + values[1:]) / 2.0, [0.5])
    tpr, fpr = _rates(p_fake, labels, candidates)
    if method == "balanced_accuracy":
        balanced = (tpr + 1.0 - fpr) / 2.0
        best = np.flatnonzero(balanced == balanced.max())
        # lexsort: last key is primary - distance to 0.5 first, then the threshold itself
        return float(candidates[best[np.lexsort((candidates[best], np.abs(candidates[best] - 0.5)))[0]]])
    if method == "target_fpr":
        ok = np.flatnonzero(fpr <= target_fpr)
        if ok.size:
            return float(candidates[ok[0]])
        warnings.warn(
            f"no threshold reaches FPR <= {target_fpr} (min {fpr[-1]:.4f}); returning the lowest-FPR threshold",
            stacklevel=2,
        )
        return float(candidates[-1])
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def calibrate(
    logit_diff, labels, method: str = "balanced_accuracy", target_fpr: float = 0.05, min_per_class: int = MIN_PER_CLASS
) -> dict:
    """T, then t on the model's calibrated p(fake), from held-out logit differences and labels (see module doc).

    Returns plain floats and strings, ready for JSON, the model config and the model card: ``temperature``,
    ``threshold``, ``rule`` (how both were chosen, in words), ``fitted`` (False for the T = 1, t = 0.5 fallback),
    ``method``, ``target_fpr`` (None unless method="target_fpr"), ``n_real``, ``n_fake``, ``separated`` (whether a
    threshold splits the held-out classes perfectly), ``fpr``, ``tpr``, ``balanced_accuracy`` (of the exported
    rule on the held-out data), ``ece`` (of the reported p(fake) on the same data) and ``warnings``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    z = _logit_diff(logit_diff)
    labels = _labels(labels, z.size)
    n_real, n_fake = int((labels == 0).sum()), int(labels.sum())
    notes = []

    def warn(message: str):
        notes.append(message)
        warnings.warn(message, stacklevel=3)

    separated = bool(n_real and n_fake and z[labels == 0].max() < z[labels == 1].min())
    temperature, threshold, why_not = 1.0, 0.5, None
    if min(n_real, n_fake) < min_per_class:
        why_not = f"{n_real} real and {n_fake} fake held-out images, fewer than {min_per_class} per class"
    else:
        temperature = fit_temperature(z, labels)
        if not TEMPERATURE_BOUNDS[0] * 1.01 < temperature < TEMPERATURE_BOUNDS[1] / 1.01:
            why_not = f"the fit ran to the bound T = {temperature:.3g} (the held-out scores carry no usable signal)"
            temperature = 1.0
    if why_not:
        rule = FALLBACK.format(why=why_not)
        warn(f"calibration: the held-out data cannot support a fit; keeping {rule}")
    else:
        rule = RULE.format(method="target FPR" if method == "target_fpr" else "balanced accuracy")
        if separated:
            warn(
                f"calibration: the {n_real + n_fake} held-out images are perfectly separated, so their likelihood "
                f"alone cannot determine T; T = {temperature:.3g} comes from Platt's prior targets (more held-out "
                "images, or harder ones, make it a measurement)"
            )
        threshold = fit_threshold(model_p_fake(z, temperature), labels, method=method, target_fpr=target_fpr)
    if n_real and n_fake:
        tpr, fpr = (float(r[0]) for r in _rates(model_p_fake(z, temperature), labels, np.array([threshold])))
    else:
        tpr = fpr = math.nan
    ece = expected_calibration_error(labels, model_p_fake(z, temperature, threshold)) if z.size else math.nan
    return {
        "temperature": temperature,
        "threshold": threshold,
        "rule": rule,
        "fitted": why_not is None,
        "method": method,
        "target_fpr": target_fpr if method == "target_fpr" else None,
        "n_real": n_real,
        "n_fake": n_fake,
        "separated": separated,
        "fpr": fpr,
        "tpr": tpr,
        "balanced_accuracy": (tpr + 1.0 - fpr) / 2.0,
        "ece": float(ece),
        "warnings": notes,
    }
