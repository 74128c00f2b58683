"""Membership-inference attacks on a regression model: loss threshold and trained classifiers.

loss threshold (Yeom et al., 2018)
    ``score = -(y_hat - y)^2``: members are fitted better. Needs no training; the threshold is swept
    by the ROC metrics.
black-box classifier (Gupta et al., MIDL 2021)
    Features ``(y, y_hat, y_hat - y, (y_hat - y)^2)`` into a scikit-learn classifier (logistic
    regression on standardised features, a small MLP, or gradient boosting), trained on
    attacker-known members and non-members and scored on *disjoint* ones.
white-box classifier
    The same classifiers on per-sample gradient features of the last layers
    (:mod:`fedsparse_lib.privacy.gradients`), on full tensors or on a sparse model's kept
    coordinates.

Every score is "higher = more likely a member" (see :mod:`fedsparse_lib.privacy.metrics`). The
attacker's knowledge is an :class:`AttackerSplit` of the evaluation set: balanced, seeded,
disjoint train and test parts.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..training import predict
from .gradients import white_box_features

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator

__all__ = [
    "ATTACKS",
    "ATTACK_CLASSIFIERS",
    "AttackerSplit",
    "attack_scores",
    "attacker_split",
    "black_box_features",
    "classifier_scores",
    "loss_threshold_scores",
    "make_attack_classifier",
]

logger = logging.getLogger(__name__)

ATTACK_CLASSIFIERS: tuple[str, ...] = ("logistic", "mlp", "gradient_boosting")
ATTACKS: tuple[str, ...] = ("loss_threshold", *(f"black_box_{c}" for c in ATTACK_CLASSIFIERS),
                            *(f"white_box_{c}" for c in ATTACK_CLASSIFIERS))
BLACK_BOX_FEATURES: tuple[str, ...] = ("age", "predicted", "gap", "squared_error")


@dataclass(frozen=True)
class AttackerSplit:
    """What the attacker knows: balanced, disjoint train and test parts of an evaluation set.

    Attributes
    ----------
    train_index, test_index : numpy.ndarray of int
        Sorted positions in the evaluation set; each part holds as many members as non-members.
    train_labels, test_labels : numpy.ndarray of int
        1 for members, 0 for non-members, aligned with the indices.
    """

    train_index: np.ndarray
    test_index: np.ndarray
    train_labels: np.ndarray
    test_labels: np.ndarray


def _labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be a 1-D array of 0 (non-member) / 1 (member), got shape {y.shape} "
                         f"and values {np.unique(y)[:5]}")
    return y.astype(bool)


def attacker_split(labels: Sequence[int] | np.ndarray, *, train_fraction: float = 0.5,
                   seed: int = 0) -> AttackerSplit:
    """Split an evaluation set into balanced, disjoint attacker-train and attacker-test parts.

    ``n = min(#members, #non_members)`` examples of each class are drawn at random (the surplus
    of the larger class is left out), then ``round(train_fraction * n)`` of each class go to the
    train part and the rest to the test part.

    Parameters
    ----------
    labels : array of shape (n_examples,)
        1 for members, 0 for non-members.
    train_fraction : float, default 0.5
        Fraction of each class for the attacker's training, in (0, 1).
    seed : int
        Seed of the draw.

    Returns
    -------
    AttackerSplit
    """
    y = _labels(labels)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    rng = np.random.default_rng(seed)
    members, non_members = rng.permutation(np.flatnonzero(y)), rng.permutation(np.flatnonzero(~y))
    n = min(members.size, non_members.size)
    n_train = round(train_fraction * n)
    if n_train < 1 or n - n_train < 1:
        raise ValueError(f"{members.size} members and {non_members.size} non-members are too few for a "
                         f"train/test split with train_fraction={train_fraction} (need >= 1 of each class in each part)")
    train = np.sort(np.r_[members[:n_train], non_members[:n_train]])
    test = np.sort(np.r_[members[n_train:n], non_members[n_train:n]])
    return AttackerSplit(train_index=train, test_index=test, train_labels=y[train].astype(int),
                         test_labels=y[test].astype(int))


def _pred_age(predicted: Sequence[float] | np.ndarray, ages: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, a = np.asarray(predicted, dtype=np.float64), np.asarray(ages, dtype=np.float64)
    if p.ndim != 1 or p.shape != a.shape:
        raise ValueError(f"predicted and ages must be 1-D of equal length, got shapes {p.shape} and {a.shape}")
    if not (np.isfinite(p).all() and np.isfinite(a).all()):
        raise ValueError("predicted and ages must be finite (a diverged model predicts NaN)")
    return p, a


def loss_threshold_scores(predicted: Sequence[float] | np.ndarray, ages: Sequence[float] | np.ndarray) -> np.ndarray:
    """Yeom et al.'s loss-threshold score ``-(predicted - age)^2`` (years^2), shape (n,)."""
    p, a = _pred_age(predicted, ages)
    return -((p - a) ** 2)


def black_box_features(predicted: Sequence[float] | np.ndarray, ages: Sequence[float] | np.ndarray) -> np.ndarray:
    """Gupta et al.'s black-box features, shape (n, 4): age, predicted, gap = predicted - age, gap^2."""
    p, a = _pred_age(predicted, ages)
    return np.column_stack([a, p, p - a, (p - a) ** 2])


def make_attack_classifier(classifier: str = "logistic", *, seed: int = 0) -> BaseEstimator:
    """A fresh, seeded scikit-learn classifier for membership.

    Parameters
    ----------
    classifier : {"logistic", "mlp", "gradient_boosting"}
        ``logistic``: standard scaling + ``LogisticRegression(C=1)``; ``mlp``: standard scaling +
        ``MLPClassifier((32,), alpha=1e-3, max_iter=2000)``; ``gradient_boosting``:
        ``GradientBoostingClassifier(n_estimators=100, max_depth=2, subsample=0.8)``.
    seed : int
        ``random_state`` of the estimator.

    Returns
    -------
    sklearn.base.BaseEstimator
        Unfitted; ``fit(features, labels)`` then ``predict_proba(features)[:, 1]``.
    """
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if classifier == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000, random_state=seed))
    if classifier == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-3, max_iter=2000,
                                                             random_state=seed))
    if classifier == "gradient_boosting":
        return GradientBoostingClassifier(n_estimators=100, max_depth=2, subsample=0.8, random_state=seed)
    raise ValueError(f"classifier must be one of {ATTACK_CLASSIFIERS}, got {classifier!r}")


def classifier_scores(train_features: np.ndarray, train_labels: Sequence[int] | np.ndarray,
                      test_features: np.ndarray, *, classifier: str = "logistic", seed: int = 0) -> np.ndarray:
    """Train a membership classifier on known examples and score others.

    Parameters
    ----------
    train_features : array of shape (n_train, n_features)
        Features of the attacker's known members and non-members.
    train_labels : array of shape (n_train,)
        1 for members, 0 for non-members; both must occur.
    test_features : array of shape (n_test, n_features)
        Features of the examples to score (disjoint from the train ones).
    classifier, seed
        As in :func:`make_attack_classifier`.

    Returns
    -------
    numpy.ndarray of shape (n_test,)
        Predicted membership probability in [0, 1].
    """
    x_train = np.asarray(train_features, dtype=np.float64)
    x_test = np.asarray(test_features, dtype=np.float64)
    y = _labels(train_labels)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1] or len(y) != len(x_train):
        raise ValueError(f"expected train features (n, d), {len(y)} labels and test features (m, d); got "
                         f"{x_train.shape}, {len(y)} labels and {x_test.shape}")
    if y.all() or not y.any():
        raise ValueError(f"train_labels need both classes, got {int(y.sum())} members of {y.size}")
    if not (np.isfinite(x_train).all() and np.isfinite(x_test).all()):
        raise ValueError("features must be finite")
    model = make_attack_classifier(classifier, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x_train, y.astype(int))
    for w in caught:
        logger.warning("%s attack classifier: %s", classifier, w.message)
    return model.predict_proba(x_test)[:, 1]


def _batches_at(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                index: np.ndarray, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs, ys = [], []
    for x, y in batches:
        xs.append(x)
        ys.append(torch.as_tensor(y).reshape(-1))
    x, y = torch.cat(xs)[torch.as_tensor(index)], torch.cat(ys)[torch.as_tensor(index)]
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def attack_scores(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  split: AttackerSplit, *, attacks: Sequence[str] = ATTACKS,
                  mask: Mapping[str, torch.Tensor] | None = None, kept_only: bool = False,
                  grad_names: Sequence[str] | None = None, batch_size: int = 16, seed: int = 0,
                  device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Run several attacks on one model; score the attacker-test part of the evaluation set.

    Parameters
    ----------
    model : nn.Module
        The target (any module mapping (batch, 1, X, Y, Z) volumes to (batch,) ages in years).
    batches : iterable of (inputs, ages)
        The whole evaluation set (members and non-members) in a fixed order, the order of the
        labels behind ``split``; e.g. a non-shuffling DataLoader. Held in memory for white-box attacks.
    split : AttackerSplit
        From :func:`attacker_split` on the evaluation labels.
    attacks : sequence of str
        Any of :data:`ATTACKS`: ``loss_threshold``, ``black_box_<classifier>``,
        ``white_box_<classifier>`` with a classifier of :data:`ATTACK_CLASSIFIERS`.
    mask : dict of str to bool tensor, optional
        The model's mask, for white-box features on the kept coordinates (``kept_only``).
    kept_only : bool, default False
        See :func:`~fedsparse_lib.privacy.gradients.gradient_features`.
    grad_names : sequence of str, optional
        Parameters of the white-box gradients; default the last two layers.
    batch_size : int
        Batch size of the per-sample gradient computation.
    seed : int
        Seed of the classifiers.
    device : str or torch.device

    Returns
    -------
    dict of str to numpy.ndarray
        For each attack, scores of shape (len(split.test_index),) aligned with ``split.test_labels``.
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; choose from {ATTACKS}")
    batches = list(batches)
    predicted, ages = predict(model, batches, device=device)
    n = predicted.size
    if n <= max(split.train_index.max(initial=0), split.test_index.max(initial=0)):
        raise ValueError(f"split indexes up to {max(split.train_index.max(), split.test_index.max())} but the "
                         f"evaluation set has {n} examples")
    train, test = split.train_index, split.test_index
    out: dict[str, np.ndarray] = {}
    black = black_box_features(predicted, ages)
    white = None
    for attack in attacks:
        if attack == "loss_threshold":
            out[attack] = loss_threshold_scores(predicted[test], ages[test])
            continue
        kind, classifier = ("black_box", attack[len("black_box_"):]) if attack.startswith("black_box_") else \
            ("white_box", attack[len("white_box_"):])
        if kind == "white_box" and white is None:
            subset = np.r_[train, test]
            feats, _ = white_box_features(model, _batches_at(batches, subset, batch_size), names=grad_names,
                                          mask=mask, kept_only=kept_only, device=device)
            white = np.empty((n, feats.shape[1]))
            white[subset] = feats
        features = black if kind == "black_box" else white
        out[attack] = classifier_scores(features[train], split.train_labels, features[test],  # type: ignore[index]
                                        classifier=classifier, seed=seed)
    return out
