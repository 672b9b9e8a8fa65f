"""Metrics against hand-computed values, the single-class / imbalance traps, and the offline evaluate module."""

import json
import math
import socket
import sys
import warnings

import numpy as np
import pytest

from mirage_hf.metrics import (
    METRIC_KEYS,
    detection_metrics,
    format_comparison_table,
    format_table,
    load_detection_metric,
    per_subset_metrics,
    to_jsonable,
    tpr_at_fpr,
)

# Hand example: reals 0.1, 0.42, 0.65; fakes 0.35, 0.82, 0.9.
LABELS = [0, 0, 0, 1, 1, 1]
P_FAKE = [0.1, 0.42, 0.65, 0.35, 0.82, 0.9]


def assert_same(a: dict, b: dict):
    """Equal dicts where nan == nan."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_hand_computed_example():
    m = detection_metrics(LABELS, P_FAKE)
    # at 0.5: real 0.65 and fake 0.35 are wrong
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["real_accuracy"] == pytest.approx(2 / 3)
    assert m["fake_accuracy"] == pytest.approx(2 / 3)
    # AUC: fake>real pairs: 0.35 beats 1 real, 0.82 and 0.9 beat 3 each -> 7/9
    assert m["roc_auc"] == pytest.approx(7 / 9)
    # AP: ranking F F R R F R -> precision at the fakes 1, 1, 3/5
    assert m["average_precision"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    # FPR <= 5% with 3 reals means FPR 0: threshold above 0.65 catches 0.82 and 0.9
    assert m["tpr_at_5_fpr"] == pytest.approx(2 / 3)
    # ECE bins (width 1/15): conf 0.58 ok | 0.65 wrong x2 | 0.82 ok | 0.9 ok x2
    # -> (|1-.58| + 2*.65 + |1-.82| + 2*|1-.9|) / 6 = 2.1 / 6
    assert m["ece"] == pytest.approx(0.35)
    assert (m["n"], m["n_real"], m["n_fake"]) == (6, 3, 3)


def test_threshold_moves_accuracies_but_not_ranking_or_ece():
    m = detection_metrics(LABELS, P_FAKE, threshold=0.3)
    assert m["real_accuracy"] == pytest.approx(1 / 3)  # only 0.1 stays real
    assert m["fake_accuracy"] == 1.0
    assert m["accuracy"] == pytest.approx(4 / 6)
    base = detection_metrics(LABELS, P_FAKE)
    for key in ("roc_auc", "average_precision", "tpr_at_5_fpr", "ece"):
        assert m[key] == base[key]
    # the rule is p_fake >= threshold: a score equal to the threshold is fake
    assert detection_metrics([1], [0.5], threshold=0.5)["fake_accuracy"] == 1.0


def test_ranking_metrics_come_from_scores_the_rest_from_p_fake():
    """Scores in the hand example's order, p(fake) saturated to 0 / 1 as a confident temperature makes it."""
    scores = [-30.0, 2.0, 25.0, -1.0, 40.0, 50.0]
    saturated = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    m, hand = detection_metrics(LABELS, saturated, scores=scores), detection_metrics(LABELS, P_FAKE)
    for key in ("roc_auc", "average_precision", "tpr_at_5_fpr"):
        assert m[key] == pytest.approx(hand[key], abs=1e-12), key
    assert m["accuracy"] == pytest.approx(3 / 6) and m["real_accuracy"] == pytest.approx(1 / 3)  # at p >= 0.5
    assert detection_metrics(LABELS, saturated)["roc_auc"] == pytest.approx(0.5)  # ranked by the ties instead
    res = per_subset_metrics(LABELS, saturated, ["x"] * 6, scores=scores)
    assert res["x"]["roc_auc"] == res["all"]["roc_auc"] == pytest.approx(7 / 9)
    with pytest.raises(ValueError, match="finite"):
        detection_metrics(LABELS, P_FAKE, scores=[float("inf")] * 6)
    with pytest.raises(ValueError, match="differ in length"):
        detection_metrics(LABELS, P_FAKE, scores=[0.0])


def test_tpr_at_fpr_is_conservative():
    reals = [0.01 * i for i in range(19)] + [0.95]  # 20 reals: one real allowed above threshold at 5% FPR
    fakes = [0.1, 0.3, 0.5, 0.9, 0.97]
    labels = [0] * 20 + [1] * 5
    # threshold in (0.18, 0.3]: FPR = 1/20, fakes caught 0.3 0.5 0.9 0.97
    assert tpr_at_fpr(labels, reals + fakes, 0.05) == pytest.approx(4 / 5)
    # FPR 0 needs threshold above 0.95: only 0.97 caught (interpolation would not give an achievable point)
    assert tpr_at_fpr(labels, reals + fakes, 0.0) == pytest.approx(1 / 5)


def test_imbalanced_accuracy_hides_missed_fakes():
    labels = [0] * 95 + [1] * 5
    m = detection_metrics(labels, [0.1] * 100)
    assert m["accuracy"] == pytest.approx(0.95)
    assert m["real_accuracy"] == 1.0
    assert m["fake_accuracy"] == 0.0
    assert m["roc_auc"] == pytest.approx(0.5)  # all tied
    assert m["average_precision"] == pytest.approx(0.05)  # = prevalence


def test_single_class_subset_is_nan_without_warnings_and_mean_skips_it():
    labels = LABELS + [1, 1]
    p_fake = P_FAKE + [0.7, 0.2]
    subsets = ["sd14"] * 6 + ["onlyfake"] * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = per_subset_metrics(labels, p_fake, subsets)
    only = res["onlyfake"]
    for key in ("average_precision", "roc_auc", "tpr_at_5_fpr", "real_accuracy"):
        assert math.isnan(only[key]), key
    assert only["fake_accuracy"] == pytest.approx(0.5)
    assert res["mean"]["roc_auc"] == pytest.approx(7 / 9)  # nan ignored, not propagated
    assert res["mean"]["real_accuracy"] == pytest.approx(2 / 3)
    assert res["mean"]["fake_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_per_subset_and_unweighted_mean():
    # subset "a": the hand example; subset "b": 2 reals, 2 fakes, perfectly separated except real 0.6
    labels = LABELS + [0, 0, 1, 1]
    p_fake = P_FAKE + [0.2, 0.6, 0.7, 0.8]
    subsets = ["a"] * 6 + ["b"] * 4
    res = per_subset_metrics(labels, p_fake, subsets)
    assert list(res) == ["a", "b", "mean", "all"]
    assert_same(res["a"], detection_metrics(LABELS, P_FAKE))
    b = res["b"]
    assert (b["accuracy"], b["real_accuracy"], b["fake_accuracy"], b["roc_auc"]) == (0.75, 0.5, 1.0, 1.0)
    assert res["mean"]["accuracy"] == pytest.approx((4 / 6 + 0.75) / 2)  # unweighted, not 7/10
    assert res["all"]["accuracy"] == pytest.approx(7 / 10)
    assert res["mean"]["roc_auc"] == pytest.approx((7 / 9 + 1.0) / 2)
    assert (res["mean"]["n"], res["mean"]["n_real"], res["mean"]["n_fake"]) == (10, 5, 5)
    with pytest.raises(ValueError, match="reserved"):
        per_subset_metrics([0, 1], [0.2, 0.8], ["mean", "mean"])


def test_to_jsonable_writes_nan_as_null():
    res = per_subset_metrics([1, 1], [0.7, 0.2], ["x", "x"])
    text = json.dumps(to_jsonable(res), allow_nan=False)
    back = json.loads(text)
    assert back["x"]["roc_auc"] is None
    assert back["x"]["fake_accuracy"] == 0.5 and back["x"]["n"] == 2
    assert to_jsonable({"a": np.float32(0.25), "b": [np.int64(3), float("inf")]}) == {"a": 0.25, "b": [3, None]}


def test_format_table_and_comparison():
    res = per_subset_metrics(LABELS + [1, 1], P_FAKE + [0.7, 0.2], ["sd14"] * 6 + ["onlyfake"] * 2)
    table = format_table(res, title="threshold 0.5, resize 224 center crop")
    lines = table.splitlines()
    assert lines[0] == "threshold 0.5, resize 224 center crop"
    assert lines[1].split() == ["subset", "Acc", "Real", "Fake", "AP", "AUC", "TPR@5%", "ECE", "n"]
    assert [line.split()[0] for line in lines[3:]] == ["sd14", "onlyfake", "mean", "all"]
    assert lines[3].split() == ["sd14", "66.7", "66.7", "66.7", "86.7", "77.8", "66.7", "35.0", "6"]
    assert lines[4].split()[2] == "-"  # nan real accuracy of the fake-only subset
    assert len({len(line) for line in lines[1:]}) == 1  # fixed width

    clean = per_subset_metrics(LABELS, P_FAKE, ["sd14"] * 6)
    jpeg = per_subset_metrics(LABELS, [0.1, 0.42, 0.45, 0.35, 0.82, 0.9], ["sd14"] * 6)
    comp = format_comparison_table({"clean": clean, "jpeg75": jpeg}, metric="accuracy").splitlines()
    assert comp[0].split() == ["subset", "(Acc)", "clean", "jpeg75"]
    assert comp[2].split() == ["sd14", "66.7", "83.3"]
    assert [line.split()[0] for line in comp[2:]] == ["sd14", "mean", "all"]


def test_local_evaluate_module_offline_matches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    metric = load_detection_metric()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    p_fake = rng.uniform(0, 1, 50)
    for lo in range(0, 50, 20):  # streamed through evaluate's own add_batch
        metric.add_batch(predictions=p_fake[lo : lo + 20], references=labels[lo : lo + 20])
    got = metric.compute(threshold=0.3)
    assert_same(got, detection_metrics(labels, p_fake, 0.3))
    assert set(METRIC_KEYS) <= set(got)


def test_without_evaluate_the_local_module_says_what_to_install(monkeypatch):
    """`evaluate` is optional: without it, `load_detection_metric` says which package to install."""
    monkeypatch.setitem(sys.modules, "evaluate", None)  # what an environment without evaluate gives
    with pytest.raises(ImportError, match="pip install evaluate"):
        load_detection_metric()
