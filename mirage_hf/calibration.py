"""Post-hoc calibration of the two-logit (real, fake) detector: a temperature and a decision threshold.

Convention (the model applies exactly this; keep the two in sync):

* logit difference ``z = logit_fake - logit_real``;
* temperature ``T > 0``: calibrated ``p_fake = sigmoid(z / T)``;
* threshold ``t`` in (0, 1): predict fake iff calibrated ``p_fake >= t``.

:func:`apply_calibration` folds both into the logits (``logits / T``, fake logit shifted by ``-log(t / (1 - t))``)
so a plain argmax / softmax >= 0.5 reproduces the rule. Metrics (ECE in particular) must be computed on the
temperature-scaled ``p_fake`` together with ``threshold=t``, not on the shifted logits, whose probabilities are
moved on purpose.

The temperature is fitted first (by NLL, which the threshold does not change), then the threshold on the
calibrated probabilities of held-out validation data - never on the test set (the "oracle threshold" cheat).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .metrics import to_numpy
from .modeling_mirage import calibrate_logits

TEMPERATURE_BOUNDS = (1e-2, 1e2)
METHODS = ("balanced_accuracy", "target_fpr")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _check_labels(labels, n: int) -> np.ndarray:
    labels = to_numpy(labels).reshape(-1)
    if labels.size != n:
        raise ValueError(f"{labels.size} labels for {n} samples")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    if np.unique(labels).size < 2:
        raise ValueError("calibration needs both real (0) and fake (1) samples; one class is missing")
    return labels.astype(np.int64)


def logit_difference(logits_or_logit_diff) -> np.ndarray:
    """``logit_fake - logit_real`` as float64 from (N, 2) logits, or an (N,) difference passed through."""
    x = to_numpy(logits_or_logit_diff).astype(np.float64)
    if x.ndim == 2 and x.shape[1] == 2:
        return x[:, 1] - x[:, 0]
    if x.ndim == 1:
        return x
    raise ValueError(f"expected (N, 2) logits or an (N,) logit difference, got shape {x.shape}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))  # no overflow warning, full precision near 0 and 1


def calibrated_p_fake(logits_or_logit_diff, temperature: float = 1.0) -> np.ndarray:
    """``sigmoid((logit_fake - logit_real) / T)`` in float64."""
    return _sigmoid(logit_difference(logits_or_logit_diff) / temperature)


def fit_temperature(logits_or_logit_diff, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Temperature minimising the mean NLL of ``sigmoid(z / T)``, by golden-section search on log T in ``bounds``.

    The NLL is convex in 1/T, hence unimodal in log T, so golden section finds the optimum (or a bound, e.g.
    when scores anti-correlate with labels) without scipy.
    """
    z = logit_difference(logits_or_logit_diff)
    sign = 2.0 * _check_labels(labels, z.size) - 1.0  # +1 fake, -1 real
    margin = sign * z

    def nll(log_t: float) -> float:
        return float(np.logaddexp(0.0, -margin / math.exp(log_t)).mean())

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-7:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2.0)


def _rates(p_fake: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) of the rule ``p_fake >= t`` for each threshold ``t``."""
    fakes = np.sort(p_fake[labels == 1])
    reals = np.sort(p_fake[labels == 0])
    # count / n, not 1 - below / n: the latter rounds 25/500 to 0.05000000000000004 > 0.05
    tpr = (fakes.size - np.searchsorted(fakes, thresholds, side="left")) / fakes.size
    fpr = (reals.size - np.searchsorted(reals, thresholds, side="left")) / reals.size
    return tpr, fpr


def fit_threshold(p_fake, labels, method: str = "balanced_accuracy", target_fpr: float = 0.05) -> float:
    """Decision threshold ``t`` in (0, 1) (fake iff ``p_fake >= t``) fitted on validation data.

    Candidates are the midpoints between consecutive distinct values of ``{0, p_fake..., 1}``, so every
    achievable split is tried and no candidate sits on a sample.

    * ``"balanced_accuracy"``: maximise (TPR + TNR) / 2; ties go to the candidate closest to 0.5 (the least
      move from the default), then to the smaller one.
    * ``"target_fpr"``: the smallest candidate whose FPR on reals is <= ``target_fpr`` (hence the highest TPR
      under that FPR). If none reaches it (reals at exactly p_fake = 1), warn and return the lowest-FPR one.
    """
    p_fake = to_numpy(p_fake).astype(np.float64).reshape(-1)
    labels = _check_labels(labels, p_fake.size)
    values = np.unique(np.concatenate([[0.0, 1.0], p_fake]))
    candidates = (values[:-1] + values[1:]) / 2.0
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


def calibrate(logits, labels, method: str = "balanced_accuracy", target_fpr: float = 0.05) -> dict:
    """Fit T on validation logits, then t on the calibrated p_fake; report the operating point on that data.

    Returns ``{"temperature", "threshold", "method", "target_fpr" (None unless method="target_fpr"),
    "fpr", "tpr", "balanced_accuracy"}`` - plain floats, ready for JSON and the model config.
    """
    temperature = fit_temperature(logits, labels)
    p_fake = calibrated_p_fake(logits, temperature)
    threshold = fit_threshold(p_fake, labels, method=method, target_fpr=target_fpr)
    tpr, fpr = _rates(p_fake, to_numpy(labels).reshape(-1), np.array([threshold]))
    return {
        "temperature": temperature,
        "threshold": threshold,
        "method": method,
        "target_fpr": target_fpr if method == "target_fpr" else None,
        "fpr": float(fpr[0]),
        "tpr": float(tpr[0]),
        "balanced_accuracy": float((tpr[0] + 1.0 - fpr[0]) / 2.0),
    }


def apply_calibration(logits, temperature: float, threshold: float):
    """(..., 2) logits -> ``logits / T`` with the fake logit shifted by ``-log(t / (1 - t))``.

    softmax of the result gives p >= 0.5 for fake exactly when ``sigmoid((logit_fake - logit_real) / T) >= t``
    (mathematically; at a tie within float rounding either side may win). Works on numpy arrays and torch
    tensors (differentiable, same device / dtype); the input is not modified.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if logits.shape[-1] != 2:
        raise ValueError(f"expected (..., 2) logits (real, fake), got shape {tuple(logits.shape)}")
    if isinstance(logits, np.ndarray):
        return calibrate_logits(torch.from_numpy(logits), temperature, threshold).numpy()
    return calibrate_logits(logits, temperature, threshold)
