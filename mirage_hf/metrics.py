"""Detection metrics in the field's conventions (AIGI detection papers), in plain numpy / scikit-learn.

Conventions used everywhere in this module:

* ``labels``: 0 = real, 1 = fake; ``p_fake``: the model's calibrated probability of fake in [0, 1].
* A sample is predicted fake iff ``p_fake >= threshold``; the model folds its fitted threshold into ``p_fake``, so
  its verdict is ``p_fake >= 0.5`` (``modeling_mirage.calibrate_logits``).
* ``scores``: the ranking score for AP, ROC AUC and TPR@FPR (fake = positive). Pass the logit difference
  ``logit_fake - logit_real`` (``MiraGeOutput.logit_diff``): it cannot saturate and no temperature changes its
  order, whereas a confident temperature turns p(fake) into exact 0s and 1s that tie and pull AP and AUC to chance.
  Without ``scores``, ``p_fake`` ranks.
* Per-generator subsets are reported one by one and as their unweighted mean (the AIGI ACC/AP convention),
  because a pooled number hides a generator the detector misses.

Results are plain dicts of Python floats / ints; :func:`to_jsonable` turns ``nan`` into ``None`` for JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

ECE_BINS = 15
TARGET_FPR = 0.05
METRIC_KEYS = (
    "accuracy",
    "real_accuracy",
    "fake_accuracy",
    "average_precision",
    "roc_auc",
    "tpr_at_5_fpr",
    "ece",
)
COUNT_KEYS = ("n", "n_real", "n_fake")
RESERVED_SUBSETS = ("mean", "all")
DEFAULT_COLUMNS = METRIC_KEYS + ("n",)
COLUMN_LABELS = {
    "accuracy": "Acc",
    "real_accuracy": "Real",
    "fake_accuracy": "Fake",
    "average_precision": "AP",
    "roc_auc": "AUC",
    "tpr_at_5_fpr": "TPR@5%",
    "ece": "ECE",
    "n": "n",
    "n_real": "n_real",
    "n_fake": "n_fake",
}
EVALUATE_MODULE_DIR = Path(__file__).resolve().parent / "evaluate_modules" / "detection_metrics"


def to_numpy(x) -> np.ndarray:
    """Accept lists, numpy arrays and (CPU or GPU, any float dtype) torch tensors without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach()
        if x.is_floating_point():
            x = x.double()  # numpy has no bfloat16
        x = x.cpu().numpy()
    return np.asarray(x)


def _check_scores(scores, n: int) -> np.ndarray:
    scores = to_numpy(scores).astype(np.float64).reshape(-1)
    if scores.size != n:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {n}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores


def _check_labels(labels) -> np.ndarray:
    labels = to_numpy(labels).reshape(-1)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    return labels.astype(np.int64)


def _check_inputs(labels, p_fake) -> tuple[np.ndarray, np.ndarray]:
    labels = _check_labels(labels)
    p_fake = to_numpy(p_fake).astype(np.float64).reshape(-1)
    if labels.shape != p_fake.shape:
        raise ValueError(f"labels and p_fake differ in length: {labels.size} vs {p_fake.size}")
    if not (np.isfinite(p_fake).all() and (p_fake >= 0).all() and (p_fake <= 1).all()):
        raise ValueError("p_fake must be probabilities in [0, 1]")
    return labels, p_fake


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def tpr_at_fpr(labels, scores, target_fpr: float = TARGET_FPR) -> float:
    """Highest TPR over the ROC operating points whose FPR is <= ``target_fpr`` (conservative, no interpolation).

    Every point is achievable by an actual threshold, so the number is what a deployed detector gets; on p(fake)
    it equals the TPR at ``calibration.fit_threshold(method="target_fpr")`` fitted on the same data.
    ``drop_intermediate`` is off because dropping collinear ROC points can remove the best admissible one. nan with
    one class only.
    """
    labels = _check_labels(labels)
    scores = _check_scores(scores, labels.size)
    if np.unique(labels).size < 2:
        return float("nan")
    from sklearn.metrics import (
        roc_curve,  # lazy: scikit-learn adds ~2 s to every mirage-detect start
    )

    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= target_fpr].max())  # roc_curve starts at (0, 0), so the selection is never empty


def expected_calibration_error(labels, p_fake, n_bins: int = ECE_BINS) -> float:
    """Standard ECE (Guo et al., 2017) of the argmax prediction: sum_b |B_b|/n * |acc(B_b) - conf(B_b)|.

    The predicted class is fake iff p_fake >= 0.5 and its confidence is max(p_fake, 1 - p_fake), binned in
    ``n_bins`` equal-width bins (lo, hi] over [0, 1] (only the upper half is populated for two classes).
    On the model's p_fake (the threshold folded in) the predicted class is the model's verdict. nan for empty input.
    """
    labels, p_fake = _check_inputs(labels, p_fake)
    if labels.size == 0:
        return float("nan")
    predicted = (p_fake >= 0.5).astype(np.int64)
    confidence = np.maximum(p_fake, 1.0 - p_fake)
    correct = (predicted == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    gap = np.bincount(bins, weights=correct - confidence, minlength=n_bins)  # per bin: n_b * (acc_b - conf_b)
    return float(np.abs(gap).sum() / labels.size)


def detection_metrics(labels, p_fake, threshold: float = 0.5, scores=None) -> dict:
    """Every per-set metric we report, for one set of images.

    Keys: ``accuracy``, ``real_accuracy`` (TNR), ``fake_accuracy`` (TPR) at ``threshold`` (fake iff
    p_fake >= threshold) and ``ece`` (see :func:`expected_calibration_error`), from ``p_fake``;
    ``average_precision`` and ``roc_auc`` with fake as positive and ``tpr_at_5_fpr`` (see :func:`tpr_at_fpr`),
    from ``scores`` (default ``p_fake``; see the module docstring); ``n``, ``n_real``, ``n_fake``.

    A set with a single class (e.g. a generator folder without reals) has no ranking metrics: AP, AUC and
    TPR@5%FPR are ``nan`` (no sklearn call, so no warnings), and the accuracy of the absent class is ``nan`` too.
    """
    from sklearn.metrics import (  # lazy: see tpr_at_fpr
        average_precision_score,
        roc_auc_score,
    )

    labels, p_fake = _check_inputs(labels, p_fake)
    scores = p_fake if scores is None else _check_scores(scores, labels.size)
    predicted = (p_fake >= threshold).astype(np.int64)
    correct = predicted == labels
    is_fake = labels == 1
    both_classes = 0 < is_fake.sum() < labels.size
    nan = float("nan")
    return {
        "accuracy": _mean_or_nan(correct),
        "real_accuracy": _mean_or_nan(correct[~is_fake]),
        "fake_accuracy": _mean_or_nan(correct[is_fake]),
        "average_precision": float(average_precision_score(labels, scores)) if both_classes else nan,
        "roc_auc": float(roc_auc_score(labels, scores)) if both_classes else nan,
        "tpr_at_5_fpr": tpr_at_fpr(labels, scores, TARGET_FPR),
        "ece": expected_calibration_error(labels, p_fake),
        "n": int(labels.size),
        "n_real": int((~is_fake).sum()),
        "n_fake": int(is_fake.sum()),
    }


def _nanmean(values: Iterable[float]) -> float:
    """Mean over the non-nan values, nan if none (no RuntimeWarning, unlike np.nanmean on all-nan input)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def mean_over_subsets(per_subset: Mapping[str, dict]) -> dict:
    """Unweighted, nan-aware mean of each metric over subsets; counts are summed (the images the mean covers)."""
    rows = list(per_subset.values())
    out = {key: _nanmean(row[key] for row in rows) for key in METRIC_KEYS}
    out.update({key: sum(row[key] for row in rows) for key in COUNT_KEYS})
    return out


def per_subset_metrics(labels, p_fake, subsets: Sequence[str], threshold: float = 0.5, scores=None) -> dict[str, dict]:
    """:func:`detection_metrics` per subset (first-appearance order), then ``"mean"`` and ``"all"`` (pooled).

    ``"mean"`` is what papers report as the per-generator average; ``"all"`` is the pooled set.
    """
    labels, p_fake = _check_inputs(labels, p_fake)
    scores = p_fake if scores is None else _check_scores(scores, labels.size)
    subsets = np.asarray([str(s) for s in subsets], dtype=str)
    if subsets.shape != labels.shape:
        raise ValueError(f"subsets has {subsets.size} entries for {labels.size} samples")
    _, first = np.unique(subsets, return_index=True)
    names = [str(subsets[i]) for i in sorted(first)]
    clash = set(names) & set(RESERVED_SUBSETS)
    if clash:
        raise ValueError(f"subset names {sorted(clash)} are reserved for the aggregate rows")
    results = {
        name: detection_metrics(labels[rows], p_fake[rows], threshold, scores[rows])
        for name in names
        for rows in [subsets == name]
    }
    results["mean"] = mean_over_subsets(results)
    results["all"] = detection_metrics(labels, p_fake, threshold, scores)
    return results


def to_jsonable(obj):
    """Recursively convert results to JSON-ready Python types; nan / inf become ``None`` (JSON ``null``)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _cell(value, key: str) -> str:
    if isinstance(value, list):  # [mean, standard deviation] over seeds
        return f"{100.0 * value[0]:.1f} ± {100.0 * value[1]:.1f}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in COUNT_KEYS:
        return str(int(value))
    return f"{100.0 * value:.1f}"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None) -> str:
    """Fixed-width table: first column left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(cells, widths))
        )

    lines = [title] if title else []
    lines += [line(header), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
    return "\n".join(lines)


def _row_order(names: Iterable[str]) -> list[str]:
    """Subsets in their order, then the aggregate rows ``mean`` and ``all`` last."""
    names = list(dict.fromkeys(names))
    return [n for n in names if n not in RESERVED_SUBSETS] + [n for n in RESERVED_SUBSETS if n in names]


def format_table(
    results: Mapping[str, dict], columns: Sequence[str] = DEFAULT_COLUMNS, title: str | None = None
) -> str:
    """Paper-style table of :func:`per_subset_metrics` output: rows = subsets then mean (and all),
    columns = metrics in percent with one decimal, counts as integers, ``-`` for nan / missing.

    Put the threshold and resize/crop policy in ``title``: a number is meaningless without them.
    """
    header = ["subset", *(COLUMN_LABELS.get(c, c) for c in columns)]
    rows = [[name, *(_cell(results[name].get(c), c) for c in columns)] for name in _row_order(results)]
    return _render(header, rows, title)


def format_comparison_table(
    results_by_setting: Mapping[str, Mapping[str, dict]], metric: str = "accuracy", title: str | None = None
) -> str:
    """One metric across several result sets: rows = subsets (then mean / all), columns = settings.

    For the robustness sweep (``{"clean": ..., "jpeg95": ..., "jpeg75": ...}``) and the ablation ladder
    (``{mode: per_subset_metrics(...)}``). A subset missing from a setting shows ``-``.
    """
    settings = list(results_by_setting)
    names = _row_order(name for res in results_by_setting.values() for name in res)
    header = [f"subset ({COLUMN_LABELS.get(metric, metric)})", *settings]
    rows = [
        [name, *(_cell(results_by_setting[s].get(name, {}).get(metric), metric) for s in settings)] for name in names
    ]
    return _render(header, rows, title)


BEFORE_AFTER_METRICS = ("accuracy", "real_accuracy", "fake_accuracy", "average_precision")
CHANGE_METRICS = ("accuracy", "real_accuracy", "fake_accuracy")


def format_before_after(before: Mapping[str, dict], after: Mapping[str, dict], title: str | None = None) -> str:
    """Two result sets of :func:`per_subset_metrics` side by side (an adaptation's before and after): per subset,
    accuracy, real accuracy and fake accuracy before, after and their change in points (what the forgetting guard
    reads, class by class), then AP before and after."""
    header = ["subset"]
    for key in BEFORE_AFTER_METRICS:
        header += [f"{COLUMN_LABELS[key]} before", f"{COLUMN_LABELS[key]} after"]
        if key in CHANGE_METRICS:
            header.append("change")
    rows = []
    for name in _row_order(before):
        b, a = before[name], after.get(name, {})
        row = [name]
        for key in BEFORE_AFTER_METRICS:
            row += [_cell(b.get(key), key), _cell(a.get(key), key)]
            if key in CHANGE_METRICS:
                known = [v for v in (b.get(key), a.get(key)) if v is not None and not math.isnan(v)]
                row.append(f"{100.0 * (known[1] - known[0]):+.1f}" if len(known) == 2 else "-")
        rows.append(row)
    return _render(header, rows, title)


def load_detection_metric(**load_kwargs):
    """The shipped local ``evaluate`` module, loaded from its folder so the Hub is never contacted.

    ``evaluate.load("accuracy")`` fetches from the Hub and fails offline (hf-notes.md section 6).
    """
    try:
        import evaluate  # optional (in [dev]), and deferred: it pulls in datasets, slow for callers of numpy only
    except ImportError as error:
        raise ImportError("load_detection_metric needs the evaluate package: pip install evaluate") from error
    return evaluate.load(str(EVALUATE_MODULE_DIR), **load_kwargs)
