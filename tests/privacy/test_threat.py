"""Federated threat models over plain client states: loading, per-round scores, averaging, tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse_lib.privacy.metrics import RESULT_COLUMNS
from fedsparse_lib.privacy.threat import (
    OUTSIDER,
    SERVER_ROUNDS_MEAN,
    average_round_scores,
    load_state,
    outsider_scores,
    server_round_scores,
    server_threat_model,
    threat_results,
)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 1), nn.Flatten(0))


def state_with_weight(value: float) -> dict[str, torch.Tensor]:
    return {"1.weight": torch.full((1, 4), value), "1.bias": torch.zeros(1)}


def test_threat_model_names():
    assert server_threat_model(3) == "server_round_3"
    assert server_threat_model() == SERVER_ROUNDS_MEAN == "server_rounds_mean"
    with pytest.raises(ValueError, match="server_round must be an integer >= 0, got -1"):
        server_threat_model(-1)


def test_load_state_applies_the_mask_and_rejects_a_wrong_state():
    mask = {"1.weight": torch.tensor([[True, False, True, False]])}
    model = load_state(state_with_weight(2.0), make_model, mask=mask)
    np.testing.assert_array_equal(model[1].weight.detach().numpy(), [[2, 0, 2, 0]])
    with pytest.raises(ValueError, match="state does not match the model"):
        load_state({"1.weight": torch.zeros(1, 4)}, make_model)


def test_server_round_scores_attacks_each_upload_with_its_mask():
    # Prepare: uploads of rounds 1, 2, 5; the attack "scores" the sum of the weights, per example
    states = {5: state_with_weight(3.0), 1: state_with_weight(1.0), 2: state_with_weight(2.0)}
    masks = {2: {"1.weight": torch.tensor([[True, True, False, False]])}}
    seen_masks = []

    def attack_fn(model, mask):
        seen_masks.append(mask)
        total = float(model[1].weight.detach().sum())
        return {"sum": np.full(3, total), "neg": -np.full(3, total)}

    # Execute
    scores = server_round_scores(states, make_model, attack_fn, masks=masks)
    some = server_round_scores(states, make_model, attack_fn, rounds=[5])
    # Assert
    assert list(scores) == [1, 2, 5] and list(some) == [5]
    np.testing.assert_allclose(scores[1]["sum"], 4.0)
    np.testing.assert_allclose(scores[2]["sum"], 4.0)  # 2 kept weights of 2.0
    np.testing.assert_allclose(scores[5]["neg"], -12.0)
    assert seen_masks[0] is None and seen_masks[1] is masks[2]
    with pytest.raises(KeyError, match="no uploaded state for rounds \\[3\\]"):
        server_round_scores(states, make_model, attack_fn, rounds=[3])


def test_rounds_must_score_the_same_examples():
    states = {1: state_with_weight(1.0), 2: state_with_weight(2.0)}

    def attack_fn(model, mask):
        return {"sum": np.zeros(int(model[1].weight.detach().sum()))}  # 4 examples, then 8

    with pytest.raises(ValueError, match="rounds score different numbers of examples"):
        server_round_scores(states, make_model, attack_fn)


def test_average_round_scores_by_hand():
    # Prepare
    round_scores = {1: {"a": np.array([0.0, 2.0, 4.0])}, 2: {"a": np.array([10.0, 10.0, 40.0])}}
    # Execute
    plain = average_round_scores(round_scores)
    only_first = average_round_scores(round_scores, rounds=[1])
    standardized = average_round_scores(round_scores, standardize=True)
    # Assert: z-scores are [-1.22, 0, 1.22] and [-0.71, -0.71, 1.41]
    np.testing.assert_allclose(plain["a"], [5.0, 6.0, 22.0])
    np.testing.assert_allclose(only_first["a"], [0.0, 2.0, 4.0])
    z1 = np.array([-1, 0, 1]) * np.sqrt(1.5)
    z2 = np.array([-1, -1, 2]) / np.sqrt(2)
    np.testing.assert_allclose(standardized["a"], (z1 + z2) / 2)


def test_outsider_and_threat_results_table():
    # Prepare
    labels = np.array([1, 1, 0, 0])
    outsider = outsider_scores(make_model(), lambda model, mask: {"loss_threshold": np.array([4, 3, 2, 1])})
    scores = {OUTSIDER: outsider, "server_round_1": {"loss_threshold": np.array([1, 2, 3, 4])}}
    # Execute
    table = threat_results(scores, labels, target="fedavg", sparsity={OUTSIDER: 0.9, "server_round_1": 0.5},
                           environment="federated_iid", n_boot=20)
    # Assert
    assert tuple(table.columns) == RESULT_COLUMNS
    auc = table[table["metric"] == "auc"].set_index("threat_model")
    assert auc.loc[OUTSIDER, "value"] == 1.0 and auc.loc["server_round_1", "value"] == 0.0
    assert auc.loc[OUTSIDER, "sparsity"] == 0.9 and auc.loc["server_round_1", "sparsity"] == 0.5
    with pytest.raises(KeyError, match="no sparsity given for threat model 'server_round_1'"):
        threat_results(scores, labels, target="t", sparsity={OUTSIDER: 0.9}, environment="e", n_boot=5)
