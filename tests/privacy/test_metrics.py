"""Attack metrics: hand-worked examples, scikit-learn as the independent reference, bootstrap, tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fedsparse_lib.privacy.metrics import (
    RESULT_COLUMNS,
    attack_metrics,
    attack_results,
    balanced_accuracy,
    bootstrap_metrics,
    membership_advantage,
    results_table,
    roc_auc,
    roc_points,
    tpr_at_fpr,
)

# members score 0.9, 0.8, 0.6; non-members 0.7, 0.5, 0.4
HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
HAND_LABELS = np.array([1, 1, 0, 1, 0, 0])


def brute_force(scores: np.ndarray, labels: np.ndarray, target_fpr: float) -> tuple[float, float]:
    """(advantage, TPR at FPR <= target) by trying every threshold directly."""
    m, n = scores[labels == 1], scores[labels == 0]
    best_adv, best_tpr = 0.0, 0.0
    for tau in [np.inf, *np.unique(scores)]:
        tpr, fpr = np.mean(m >= tau), np.mean(n >= tau)
        best_adv = max(best_adv, tpr - fpr)
        if fpr <= target_fpr:
            best_tpr = max(best_tpr, tpr)
    return best_adv, best_tpr


def random_case(seed: int, n_members: int, n_non_members: int, *, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.r_[rng.normal(0.7, 1, n_members), rng.normal(0, 1, n_non_members)]
    if decimals is not None:  # many ties
        scores = scores.round(decimals)
    labels = np.r_[np.ones(n_members, int), np.zeros(n_non_members, int)]
    order = rng.permutation(scores.size)
    return scores[order], labels[order]


def test_hand_worked_roc():
    # Prepare: thresholds inf, .9, .8, .7, .6, .5, .4 -> (fpr, tpr) worked out by hand
    expected_fpr = [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1]
    expected_tpr = [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1]
    # Execute
    roc = roc_points(HAND_SCORES, HAND_LABELS)
    # Assert
    np.testing.assert_allclose(roc["fpr"], expected_fpr)
    np.testing.assert_allclose(roc["tpr"], expected_tpr)
    np.testing.assert_array_equal(roc["threshold"], [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])


@pytest.mark.parametrize("metric, kwargs, expected", [
    (roc_auc, {}, 8 / 9),  # member > non-member in 3 + 3 + 2 of 9 pairs
    (membership_advantage, {}, 2 / 3),  # at tau = 0.8 (or 0.6): 2/3 - 0 (or 1 - 1/3)
    (balanced_accuracy, {}, 5 / 6),
    (tpr_at_fpr, {"fpr": 0.0}, 2 / 3),  # members above every non-member
    (tpr_at_fpr, {"fpr": 0.3}, 2 / 3),  # fpr steps are 1/3: 0.3 still allows none
    (tpr_at_fpr, {"fpr": 1 / 3}, 1.0),
    (tpr_at_fpr, {"fpr": 1.0}, 1.0),
])
def test_hand_worked_metrics(metric, kwargs, expected):
    assert metric(HAND_SCORES, HAND_LABELS, **kwargs) == pytest.approx(expected)


def test_ties_move_together():
    # Prepare: one member and one non-member tied at each of two scores
    scores, labels = [1.0, 1.0, 0.0, 0.0], [1, 0, 1, 0]
    # Execute
    roc = roc_points(scores, labels)
    # Assert: no threshold separates a tie, so the curve is the diagonal and AUC counts ties as 1/2
    np.testing.assert_allclose(roc[["fpr", "tpr"]].to_numpy(), [[0, 0], [0.5, 0.5], [1, 1]])
    assert roc_auc(scores, labels) == 0.5
    assert membership_advantage(scores, labels) == 0.0


@pytest.mark.parametrize("seed, n_members, n_non_members, decimals", [
    (0, 50, 50, None), (1, 200, 200, 1), (2, 37, 300, None), (3, 500, 120, 2), (4, 5, 7, 0),
])
def test_against_sklearn_and_brute_force(seed, n_members, n_non_members, decimals):
    # Prepare
    scores, labels = random_case(seed, n_members, n_non_members, decimals=decimals)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    # Execute
    roc = roc_points(scores, labels)
    got = attack_metrics(scores, labels, fprs=(0.01, 0.001, 0.1))
    # Assert
    np.testing.assert_allclose(roc["fpr"], ref_fpr)
    np.testing.assert_allclose(roc["tpr"], ref_tpr)
    np.testing.assert_allclose(roc["threshold"].to_numpy()[1:], ref_thr[1:])
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["advantage"] == pytest.approx(np.max(ref_tpr - ref_fpr))
    for target in (0.01, 0.001, 0.1):
        advantage, tpr = brute_force(scores, labels, target)
        assert got[f"tpr_at_fpr_{target:g}"] == pytest.approx(tpr)
        assert got["advantage"] == pytest.approx(advantage)
    assert got["balanced_accuracy"] == pytest.approx((1 + got["advantage"]) / 2)


def test_boolean_labels_and_lists_accepted():
    assert roc_auc(list(HAND_SCORES), HAND_LABELS.astype(bool)) == pytest.approx(8 / 9)


@pytest.mark.parametrize("scores, labels, message", [
    ([0.1, np.nan, 0.3], [1, 0, 1], "finite"),
    ([0.1, np.inf, 0.3], [1, 0, 1], "finite"),
    ([0.1, 0.2, 0.3], [1, 1, 1], "both members and non-members"),
    ([0.1, 0.2, 0.3], [0, 0, 0], "both members and non-members"),
    ([0.1, 0.2, 0.3], [1, 0], "differ in length"),
    ([0.1, 0.2, 0.3], [1, 0, 2], "0 \\(non-member\\) or 1"),
    ([[0.1, 0.2]], [[1, 0]], "1-D"),
])
def test_bad_input_is_rejected(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        attack_metrics(scores, labels)


def test_bad_fpr_target_is_rejected():
    with pytest.raises(ValueError, match="FPR targets must be in \\[0, 1\\], got 1.5"):
        tpr_at_fpr(HAND_SCORES, HAND_LABELS, fpr=1.5)


def test_bootstrap_is_seeded_and_brackets_the_value():
    # Prepare
    scores, labels = random_case(0, 80, 80, decimals=None)
    # Execute
    a = bootstrap_metrics(scores, labels, n_boot=200, seed=7)
    b = bootstrap_metrics(scores, labels, n_boot=200, seed=7)
    c = bootstrap_metrics(scores, labels, n_boot=200, seed=8)
    # Assert
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert list(a["metric"]) == ["auc", "balanced_accuracy", "advantage", "tpr_at_fpr_0.01", "tpr_at_fpr_0.001"]
    assert (a["ci_low"] <= a["value"] + 1e-12).all() and (a["value"] <= a["ci_high"] + 1e-12).all()
    auc = a.set_index("metric").loc["auc"]
    assert auc["value"] == pytest.approx(roc_auc_score(labels, scores))
    assert 0.05 < auc["ci_high"] - auc["ci_low"] < 0.3  # roughly 4 standard errors of an AUC on 80 + 80


def test_bootstrap_resamples_each_class_separately():
    # Prepare: only 2 members among 40; pooled resampling would often draw no member at all
    # (and fail), or move the TPR grid away from steps of 1/2
    scores = np.r_[[5.0, -5.0], np.linspace(-1, 1, 38)]
    labels = np.r_[[1, 1], np.zeros(38, int)]
    # Execute
    frame = bootstrap_metrics(scores, labels, n_boot=300, seed=0).set_index("metric")
    # Assert: every resample has 2 members, so TPR at FPR 0 is a multiple of 1/2 at both CI ends
    for end in ("ci_low", "ci_high"):
        assert (2 * frame.loc["tpr_at_fpr_0.001", end]) % 1 == 0


def test_perfect_separation_has_degenerate_interval():
    frame = bootstrap_metrics([3, 4, 5, 0, 1, 2], [1, 1, 1, 0, 0, 0], n_boot=100).set_index("metric")
    assert (frame.loc["auc", ["value", "ci_low", "ci_high"]] == 1.0).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"n_boot": 0}, "n_boot must be an integer >= 1, got 0"),
    ({"confidence": 1.0}, "confidence must be in \\(0, 1\\), got 1.0"),
])
def test_bootstrap_options_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_metrics(HAND_SCORES, HAND_LABELS, **kwargs)


def test_attack_results_is_a_tidy_table():
    # Execute
    table = attack_results(HAND_SCORES, HAND_LABELS, target="dense", sparsity=0.9, environment="centralized",
                           threat_model="outsider", attack="loss_threshold", n_boot=50)
    # Assert
    assert tuple(table.columns) == RESULT_COLUMNS
    assert len(table) == 5
    assert set(table["target"]) == {"dense"} and set(table["sparsity"]) == {0.9}
    assert table.set_index("metric").loc["auc", "value"] == pytest.approx(8 / 9)


def test_results_table_concatenates_frames_and_rows():
    # Prepare
    row = {"target": "t", "sparsity": 0.5, "environment": "federated_iid", "threat_model": "server_round_3",
           "attack": "lira_online", "metric": "auc", "value": 0.6, "ci_low": 0.5, "ci_high": 0.7}
    frame = pd.DataFrame([row, {**row, "metric": "advantage", "value": 0.2}])[list(reversed(RESULT_COLUMNS))]
    # Execute
    table = results_table([frame, row])
    # Assert
    assert tuple(table.columns) == RESULT_COLUMNS
    assert list(table["metric"]) == ["auc", "advantage", "auc"]
    assert results_table([]).columns.tolist() == list(RESULT_COLUMNS)


def test_results_table_rejects_wrong_columns():
    row = {"target": "t", "sparsity": 0.5, "environment": "c", "threat_model": "outsider", "attack": "a",
           "metric": "auc", "value": 0.6, "ci_low": 0.5}
    with pytest.raises(ValueError, match=r"missing columns \['ci_high'\]"):
        results_table([row])
    with pytest.raises(ValueError, match=r"unexpected columns \['model'\]"):
        results_table([{**row, "ci_high": 0.7, "model": "x"}])
