"""The spec's sanity checks (issue 6, definition of done).

1. An attack on a model that never saw the evaluated subjects (members drawn at random) sits at
   chance: 0.5 lies inside the bootstrap CI of its AUC.
2. An attack on a deliberately overfitted model is clearly above chance.
3. LiRA beats the loss threshold at low FPR on the same model.
(4. The metrics agree with scikit-learn: tests/privacy/test_metrics.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.privacy import (
    attack_metrics,
    attack_scores,
    attacker_split,
    bootstrap_metrics,
    lira_offline_scores,
    lira_online_scores,
    loss_threshold_scores,
    residual_statistic,
    shadow_membership,
    shadow_statistics,
)
from fedsparse_lib.training import TrainConfig, make_optimizer, predict, train_epoch

SHAPE = (12, 12, 12)
ATTACKS = ("loss_threshold", "black_box_logistic", "white_box_logistic")


def random_subjects(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random volumes (n, 1, 12, 12, 12) and random ages in [20, 80) years: nothing to learn but memorise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, *SHAPE, generator=g), 20 + 60 * torch.rand(n, generator=g)


def batched(x: torch.Tensor, y: torch.Tensor, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


@pytest.fixture(scope="module")
def overfitted() -> BrainAgeCNN:
    """A tiny BrainAgeCNN trained for 100 epochs on 32 subjects with random ages (seed 0)."""
    x, y = random_subjects(32, seed=0)
    torch.manual_seed(0)
    model = BrainAgeCNN(SHAPE, width=0.25, mean_age=50.0, output_scale=10.0)
    optimizer = make_optimizer(model, TrainConfig(lr=3e-3, optimizer="adam"))
    for _ in range(100):
        train_epoch(model, batched(x, y, 8), optimizer)
    return model


def auc_row(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    frame = bootstrap_metrics(scores, labels, n_boot=500, seed=0).set_index("metric")
    return frame.loc["auc"].to_dict()


def test_attacks_on_unseen_subjects_sit_at_chance(overfitted):
    # Prepare: 96 subjects the model never saw, half of them called "members" at random
    x, y = random_subjects(96, seed=1)
    labels = np.zeros(96, int)
    labels[np.random.default_rng(1).permutation(96)[:48]] = 1
    split = attacker_split(labels, seed=0)
    # Execute
    scores = attack_scores(overfitted, batched(x, y), split, attacks=ATTACKS, seed=0)
    # Assert
    for attack in ATTACKS:
        auc = auc_row(scores[attack], split.test_labels)
        assert auc["ci_low"] <= 0.5 <= auc["ci_high"], (attack, auc)
        assert auc["ci_high"] - auc["ci_low"] < 0.45, (attack, auc)  # a CI that could exclude 0.5


def test_attacks_on_an_overfitted_model_are_above_chance(overfitted):
    # Prepare: its 32 training subjects and 32 fresh ones
    members, non_members = random_subjects(32, seed=0), random_subjects(32, seed=2)
    x, y = torch.cat([members[0], non_members[0]]), torch.cat([members[1], non_members[1]])
    labels = np.r_[np.ones(32, int), np.zeros(32, int)]
    predicted, ages = predict(overfitted, batched(x, y))
    split = attacker_split(labels, seed=0)
    # Execute
    scores = attack_scores(overfitted, batched(x, y), split, attacks=ATTACKS, seed=0)
    # Assert: it did overfit, and every attack's AUC CI lies clearly above 0.5
    mae = np.abs(predicted - ages)
    assert mae[labels == 1].mean() < 0.5 * mae[labels == 0].mean()
    for attack in ATTACKS:
        auc = auc_row(scores[attack], split.test_labels)
        assert auc["ci_low"] > 0.6, (attack, auc)


def test_lira_beats_the_loss_threshold_at_low_fpr():
    # Prepare: a population of 400 "subjects" with 512 random features and random ages whose
    # spread differs per subject (log-uniform 1..20 years), so that a small error says little
    # about membership unless it is compared with the subject's own OUT errors. The recipe: a
    # linear model from the mean age, 50 full-batch SGD steps (partial memorisation).
    n, shape = 400, (8, 8, 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, *shape, generator=g)
    spread = torch.exp(torch.empty(n).uniform_(0.0, float(np.log(20)), generator=g))
    y = 50 + spread * torch.randn(n, generator=g)
    pool = batched(x, y, 100)

    def train_fn(train_indices: np.ndarray, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 1), nn.Flatten(0))
        with torch.no_grad():
            model[1].weight.zero_()
            model[1].bias.fill_(50.0)
        optimizer = make_optimizer(model, TrainConfig(lr=2e-3))
        for _ in range(50):
            train_epoch(model, [(x[train_indices], y[train_indices])], optimizer)
        return model

    labels = np.zeros(n, int)
    labels[np.random.default_rng(0).permutation(n)[: n // 2]] = 1
    target = train_fn(np.flatnonzero(labels), 10_000)
    keep = shadow_membership(n, 16, seed=1)
    shadows = shadow_statistics(train_fn, keep, pool, seed=2, progress=False)
    # Execute
    stat = residual_statistic(target, pool)
    scores = {"loss_threshold": loss_threshold_scores(y.numpy() - stat, y.numpy()),
              "lira_online": lira_online_scores(stat, shadows, keep),
              "lira_offline": lira_offline_scores(stat, shadows, keep)}
    metrics = {name: attack_metrics(s, labels, fprs=(0.01,)) for name, s in scores.items()}
    # Assert
    loss = metrics["loss_threshold"]
    for name in ("lira_online", "lira_offline"):
        assert metrics[name]["tpr_at_fpr_0.01"] >= loss["tpr_at_fpr_0.01"] + 0.05, (name, metrics)
        assert metrics[name]["auc"] > loss["auc"], (name, metrics)
    assert metrics["lira_online"]["tpr_at_fpr_0.01"] > 0.1
