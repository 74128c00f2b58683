"""Membership experiments: pools, shadows, the attack suite, the server threat, summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedsparse_lib.privacy.attacks import attacker_split
from fedsparse_lib.privacy.experiment import (
    ATTACK_NAMES,
    MembershipPool,
    Shadows,
    balanced_pool,
    membership_pool,
    pool_predictions,
    roc_table,
    run_attacks,
    server_threat_scores,
    summary_table,
    train_shadows,
)
from fedsparse_lib.privacy.lira import lira_offline_scores, lira_online_scores
from fedsparse_lib.privacy.metrics import results_table
from fedsparse_lib.privacy.recipes import TrainedModel
from recording import RecordingDataset  # tests/privacy/recording.py



class Constant(nn.Module):
    """Predicts ``value`` for every volume (a recipe's stand-in 'model')."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0]) + 0.0 * x.flatten(1).sum(1)


# ---------------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------------
def test_membership_pool_is_balanced_disjoint_sorted_and_seeded():
    # Execute
    pool = membership_pool(30, n_members=10, seed=3)
    again, other = membership_pool(30, n_members=10, seed=3), membership_pool(30, n_members=10, seed=4)
    # Assert
    assert len(pool) == 20 and pool.labels.sum() == 10
    assert np.all(np.diff(pool.index) > 0) and pool.index.max() < 30
    assert np.intersect1d(pool.members, pool.non_members).size == 0
    np.testing.assert_array_equal(pool.index, again.index)
    assert not np.array_equal(pool.index, other.index)


def test_balanced_pool_draws_as_many_non_members_from_the_candidates():
    pool = balanced_pool([7, 2, 9], [0, 1, 3, 4, 5], seed=0)
    np.testing.assert_array_equal(pool.members, [2, 7, 9])
    assert pool.non_members.size == 3 and set(pool.non_members) <= {0, 1, 3, 4, 5}
    np.testing.assert_array_equal(pool.labels, np.isin(pool.index, [2, 7, 9]).astype(int))


@pytest.mark.parametrize("members, candidates, message", [
    ([1, 2], [2, 3, 4], "overlap at positions \\[2\\]"),
    ([1, 2, 3], [4, 5], "3 members need at least as many held-out candidates, got 2"),
    ([], [1, 2], "members is empty"),
    ([1, 1], [2, 3], "repeated positions"),
])
def test_balanced_pool_rejects_bad_input(members, candidates, message):
    with pytest.raises(ValueError, match=message):
        balanced_pool(members, candidates)


def test_membership_pool_draws_from_the_candidates_only():
    pool = membership_pool(100, n_members=3, seed=0, candidates=np.arange(40, 50))
    assert len(pool) == 6 and set(pool.index) <= set(range(40, 50))


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_members=6), "n_members must be an integer in \\[1, 5\\] \\(half of the 11 candidates\\), got 6"),
    (dict(n_members=3, candidates=[1, 2, 3, 4, 5]), "in \\[1, 2\\] \\(half of the 5 candidates\\), got 3"),
    (dict(n_members=1, candidates=[3, 11]), "candidates must be positions below n_examples=11, got 11"),
])
def test_membership_pool_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        membership_pool(11, **kwargs)


# ---------------------------------------------------------------------------------------------
# Shadows and attacks (with a stand-in recipe: the mean age of the training subjects)
# ---------------------------------------------------------------------------------------------
def mean_recipe(data: RecordingDataset, calls: list[np.ndarray]):
    def recipe(train_index: np.ndarray, seed: int) -> TrainedModel:
        calls.append(np.asarray(train_index))
        model = Constant(float(data.ages[train_index].mean()))
        return TrainedModel(model=model, mask={}, sparsity=0.0, train_index=train_index, seconds=0.0)
    return recipe


def test_train_shadows_trains_on_random_halves_of_the_pool():
    # Prepare
    data = RecordingDataset(40)
    pool = membership_pool(40, n_members=8, seed=0)
    calls: list[np.ndarray] = []
    # Execute
    shadows = train_shadows(mean_recipe(data, calls), data, pool, n_shadows=4, seed=1, progress=False)
    # Assert: shadow k trained on the pool subjects IN it; its statistic is age - mean(its ages)
    assert shadows.statistics.shape == shadows.membership.shape == (4, 16)
    assert np.all(shadows.membership.sum(axis=0) == 2)
    for k, positions in enumerate(calls):
        np.testing.assert_array_equal(positions, pool.index[shadows.membership[k]])
        expected = data.ages[pool.index] - data.ages[positions].mean()
        np.testing.assert_allclose(shadows.statistics[k], expected, rtol=1e-6)


def test_run_attacks_scores_the_attacker_test_part_in_the_requested_order():
    # Prepare: the "target" predicts the mean age of the members
    data = RecordingDataset(40)
    pool = membership_pool(40, n_members=10, seed=0)
    split = attacker_split(pool.labels, seed=0)
    calls: list[np.ndarray] = []
    recipe = mean_recipe(data, calls)
    shadows = train_shadows(recipe, data, pool, n_shadows=4, seed=0, progress=False)
    target = recipe(pool.members, 0).model
    attacks = ["lira_offline", "loss_threshold", "black_box_logistic", "lira_online"]
    # Execute
    scores = run_attacks(target, data, pool, split, attacks=attacks, shadows=shadows)
    # Assert
    assert list(scores) == attacks
    assert all(s.shape == split.test_labels.shape for s in scores.values())
    ages = data.ages[pool.index].astype(np.float64)
    residual = ages - float(data.ages[pool.members].mean())
    np.testing.assert_allclose(scores["loss_threshold"], -(residual[split.test_index] ** 2), rtol=1e-5)
    np.testing.assert_allclose(scores["lira_online"], lira_online_scores(
        residual, shadows.statistics, shadows.membership)[split.test_index], rtol=1e-5)
    np.testing.assert_allclose(scores["lira_offline"], lira_offline_scores(
        residual, shadows.statistics, shadows.membership)[split.test_index], rtol=1e-5)


def test_run_attacks_rejects_lira_without_shadows_unknown_attacks_and_mismatched_shadows():
    data = RecordingDataset(20)
    pool = membership_pool(20, n_members=5, seed=0)
    split = attacker_split(pool.labels, seed=0)
    model = Constant(50.0)
    assert set(ATTACK_NAMES) >= {"loss_threshold", "white_box_logistic", "lira_online", "lira_offline"}
    with pytest.raises(ValueError, match="need shadows"):
        run_attacks(model, data, pool, split, attacks=["lira_online"])
    with pytest.raises(ValueError, match="unknown attacks \\['lira'\\]"):
        run_attacks(model, data, pool, split, attacks=["lira"])
    wrong = Shadows(statistics=np.zeros((4, 6)), membership=np.zeros((4, 6), bool), seconds=0.0)
    with pytest.raises(ValueError, match="shadows were evaluated on 6 subjects, the pool has 10"):
        run_attacks(model, data, pool, split, attacks=["lira_online"], shadows=wrong)


def test_pool_predictions_by_hand():
    data = RecordingDataset(10)
    pool = MembershipPool(index=np.array([1, 3, 4, 8]), labels=np.array([1, 0, 0, 1]))
    table = pool_predictions(Constant(45.0), data, pool)
    assert table["membership"].tolist() == ["member", "non-member", "non-member", "member"]
    np.testing.assert_allclose(table["residual"], [41 - 45, 43 - 45, 44 - 45, 48 - 45])
    np.testing.assert_allclose(table["abs_error"], [4, 2, 1, 3])
    assert table["index"].tolist() == [1, 3, 4, 8]


# ---------------------------------------------------------------------------------------------
# Server threat and ROC table
# ---------------------------------------------------------------------------------------------
def linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(2, 1), nn.Flatten(0))


def test_server_threat_scores_attack_each_upload_and_average_them():
    # Prepare: uploads whose weights are r * [1, 1], pruned to [1, 0] at round 3; the attack
    # returns the weight sum per example, scaled by the example's position
    uploads = {r: ({"1.weight": torch.full((1, 2), float(r)), "1.bias": torch.zeros(1)},
                   {"1.weight": torch.tensor([[True, r < 3]])}) for r in (1, 2, 3)}
    target = TrainedModel(model=linear(), mask={}, sparsity=0.5, train_index=np.arange(4), seconds=0.0,
                          uploads=uploads, client_index=np.arange(2))

    def attack_fn(model, mask):
        return {"sum": float(model[1].weight.detach().sum()) * np.array([1.0, 2.0, 3.0])}

    # Execute
    scores, sparsity = server_threat_scores(target, linear, attack_fn, rounds=[1, 3], standardize=False)
    # Assert
    assert list(scores) == ["server_round_1", "server_round_3", "server_rounds_mean"]
    np.testing.assert_allclose(scores["server_round_1"]["sum"], [2, 4, 6])
    np.testing.assert_allclose(scores["server_round_3"]["sum"], [3, 6, 9])  # 3 * [1, 0]: the mask applied
    np.testing.assert_allclose(scores["server_rounds_mean"]["sum"], [2.5, 5, 7.5])
    assert sparsity == {"server_round_1": 0.0, "server_round_3": 0.5, "server_rounds_mean": 0.5}


def test_server_threat_scores_needs_uploads():
    target = TrainedModel(model=linear(), mask={}, sparsity=0.0, train_index=np.arange(2), seconds=0.0)
    with pytest.raises(ValueError, match="no uploads"):
        server_threat_scores(target, linear, lambda m, k: {})


def test_roc_table_stacks_one_curve_per_attack():
    labels = np.array([1, 1, 0, 0, 0])
    table = roc_table({"a": np.array([5.0, 4, 3, 2, 1]), "b": np.array([1.0, 2, 3, 4, 5])}, labels)
    a = table[table["attack"] == "a"]
    assert list(table.columns) == ["attack", "threshold", "fpr", "tpr", "n_non_members"]
    np.testing.assert_allclose(a["tpr"], [0, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(a["fpr"], [0, 0, 0, 1 / 3, 2 / 3, 1])
    assert set(table["n_non_members"]) == {3}
    assert isinstance(table, pd.DataFrame)


def test_summary_table_formats_estimates_with_their_intervals_in_order_of_appearance():
    # Prepare
    def row(target, attack, metric, value):
        return dict(target=target, sparsity=0.0, environment="centralized", threat_model="outsider", attack=attack,
                    metric=metric, value=value, ci_low=value - 0.1, ci_high=value + 0.05)
    cases = (("sparse", "lira_online", 0.6), ("dense", "loss_threshold", 0.7))
    results = results_table([row(t, a, m, v) for t, a, v in cases for m in ("advantage", "auc", "tpr_at_fpr_0.01")])
    # Execute
    table = summary_table(results, index=("target", "attack"))
    # Assert
    assert list(table.columns) == ["auc", "tpr_at_fpr_0.01"]
    assert list(table.index) == [("sparse", "lira_online"), ("dense", "loss_threshold")]
    assert table.loc[("dense", "loss_threshold"), "auc"] == "0.70 [0.60, 0.75]"
    with pytest.raises(ValueError, match="several rows per \\(target, attack, metric\\)"):
        summary_table(pd.concat([results, results]), index=("target", "attack"))
