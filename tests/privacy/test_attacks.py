"""Attack building blocks: the attacker's split, loss threshold, black-box features, classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedsparse_lib.models import BrainAgeCNN
from fedsparse_lib.privacy.attacks import (
    ATTACK_CLASSIFIERS,
    ATTACKS,
    attack_scores,
    attacker_split,
    black_box_features,
    classifier_scores,
    loss_threshold_scores,
)
from fedsparse_lib.pruning import apply_mask, global_magnitude_mask


def test_attacker_split_is_balanced_disjoint_and_seeded():
    # Prepare: 30 members, 50 non-members
    labels = np.r_[np.ones(30, int), np.zeros(50, int)]
    np.random.default_rng(0).shuffle(labels)
    # Execute
    split = attacker_split(labels, train_fraction=0.4, seed=3)
    again = attacker_split(labels, train_fraction=0.4, seed=3)
    other = attacker_split(labels, train_fraction=0.4, seed=4)
    # Assert: 30 of each class used, 12 + 12 to train, 18 + 18 to test
    assert len(split.train_index) == 24 and len(split.test_index) == 36
    assert split.train_labels.sum() == 12 and split.test_labels.sum() == 18
    np.testing.assert_array_equal(split.train_labels, labels[split.train_index])
    np.testing.assert_array_equal(split.test_labels, labels[split.test_index])
    assert not set(split.train_index) & set(split.test_index)
    np.testing.assert_array_equal(split.test_index, again.test_index)
    assert not np.array_equal(split.test_index, other.test_index)


@pytest.mark.parametrize("labels, fraction, message", [
    ([1, 0, 1, 0], 1.0, "train_fraction must be in \\(0, 1\\), got 1.0"),
    ([1, 0, 0, 0], 0.5, "1 members and 3 non-members are too few"),
    ([1, 0, 2], 0.5, "0 \\(non-member\\) / 1 \\(member\\)"),
])
def test_attacker_split_validation(labels, fraction, message):
    with pytest.raises(ValueError, match=message):
        attacker_split(labels, train_fraction=fraction)


def test_loss_threshold_and_black_box_features_by_hand():
    predicted, ages = [50.0, 62.0], [52.0, 60.0]
    np.testing.assert_allclose(loss_threshold_scores(predicted, ages), [-4.0, -4.0])
    np.testing.assert_allclose(black_box_features(predicted, ages), [[52, 50, -2, 4], [60, 62, 2, 4]])
    with pytest.raises(ValueError, match="equal length"):
        loss_threshold_scores([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        black_box_features([np.nan], [1.0])


@pytest.mark.parametrize("classifier", ATTACK_CLASSIFIERS)
def test_classifiers_learn_a_separable_signal_and_are_seeded(classifier):
    # Prepare: members have a smaller |error|; train and test parts are disjoint draws
    rng = np.random.default_rng(0)

    def draw(n):
        labels = np.r_[np.ones(n, int), np.zeros(n, int)]
        error = rng.normal(0, np.where(labels == 1, 1.0, 8.0))  # Bayes AUC 2/pi atan(8) = 0.92
        ages = rng.uniform(40, 80, 2 * n)
        return black_box_features(ages + error, ages), labels

    (x_train, y_train), (x_test, y_test) = draw(60), draw(60)
    # Execute
    scores = classifier_scores(x_train, y_train, x_test, classifier=classifier, seed=1)
    again = classifier_scores(x_train, y_train, x_test, classifier=classifier, seed=1)
    # Assert
    assert scores.shape == (120,) and ((0 <= scores) & (scores <= 1)).all()
    np.testing.assert_array_equal(scores, again)
    assert roc_auc_score(y_test, scores) > 0.8


def test_classifier_validation():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="classifier must be one of"):
        classifier_scores(x, [1, 0, 1, 0], x, classifier="svm")
    with pytest.raises(ValueError, match="need both classes"):
        classifier_scores(x, [1, 1, 1, 1], x)
    with pytest.raises(ValueError, match="expected train features"):
        classifier_scores(x, [1, 0, 1, 0], np.zeros((4, 3)))


@pytest.fixture(scope="module")
def tiny_setup() -> tuple[BrainAgeCNN, list[tuple[torch.Tensor, torch.Tensor]], np.ndarray]:
    torch.manual_seed(0)
    model = BrainAgeCNN((12, 12, 12), width=0.125, mean_age=60.0, output_scale=10.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 12, 12, 12, generator=g), 60 + 10 * torch.randn(24, generator=g)
    labels = np.r_[np.ones(12, int), np.zeros(12, int)]
    return model, [(x[i:i + 10], y[i:i + 10]) for i in range(0, 24, 10)], labels


def test_attack_scores_runs_every_attack(tiny_setup):
    # Prepare
    model, batches, labels = tiny_setup
    split = attacker_split(labels, seed=0)
    # Execute
    scores = attack_scores(model, batches, split, batch_size=5)
    # Assert
    assert list(scores) == list(ATTACKS)
    for name, s in scores.items():
        assert s.shape == (12,) and np.isfinite(s).all(), name
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])[split.test_index]
        y = torch.cat([b[1] for b in batches])[split.test_index]
        expected = -((model.eval()(x) - y) ** 2).double().numpy()
    np.testing.assert_allclose(scores["loss_threshold"], expected, rtol=1e-5)


def test_attack_scores_kept_only_on_a_sparse_model(tiny_setup):
    # Prepare
    model, batches, labels = tiny_setup
    mask = global_magnitude_mask(model, 0.9)
    apply_mask(model, mask)
    split = attacker_split(labels, seed=0)
    # Execute
    scores = attack_scores(model, batches, split, attacks=["white_box_logistic"], mask=mask, kept_only=True)
    # Assert
    assert scores["white_box_logistic"].shape == (12,)
    with pytest.raises(ValueError, match="unknown attacks \\['lira'\\]"):
        attack_scores(model, batches, split, attacks=["lira"])
