"""Membership-inference experiments: targets trained with the package's own recipes, the attack suite.

Protocol (spec: privacy.md, evaluation protocol)
    A *pool* of subjects is drawn from the dataset (:func:`membership_pool`): ``n_members``
    members, the target's training subjects, and as many non-members, held-out subjects of the
    same distribution. The attack classifiers learn on one half of each class and every attack is
    scored on the other half (:func:`~fedsparse_lib.privacy.attacks.attacker_split`), so the
    attacker's training and test subjects are disjoint. LiRA shadows are trained with the target's
    own recipe on random halves of the whole pool (members and non-members alike,
    :func:`train_shadows`).
Recipes
    :mod:`fedsparse_lib.privacy.recipes` trains targets and shadows with the package's own training
    code (``recipe(train_index, seed) -> TrainedModel``).
Attacks
    :func:`run_attacks` runs any of :data:`ATTACK_NAMES` (the classifier attacks of
    :mod:`~fedsparse_lib.privacy.attacks` plus ``lira_online`` and ``lira_offline``) on one model
    and returns scores aligned with the attacker-test labels; :func:`server_threat_scores` runs an
    attack function on a federated client's uploads, round by round and averaged over rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..pruning import mask_sparsity
from ..training import predict
from .attacks import ATTACKS, AttackerSplit, attack_scores
from .lira import lira_offline_scores, lira_online_scores, residual_statistic, shadow_membership, shadow_statistics
from .metrics import roc_points
from .recipes import Recipe, TrainedModel, _positions
from .threat import SERVER_ROUNDS_MEAN, average_round_scores, server_round_scores, server_threat_model

__all__ = [
    "ATTACK_NAMES",
    "LIRA_ATTACKS",
    "MembershipPool",
    "Shadows",
    "balanced_pool",
    "membership_pool",
    "pool_predictions",
    "roc_table",
    "run_attacks",
    "server_threat_scores",
    "summary_table",
    "train_shadows",
]

logger = logging.getLogger(__name__)

LIRA_ATTACKS: tuple[str, ...] = ("lira_online", "lira_offline")
ATTACK_NAMES: tuple[str, ...] = (*ATTACKS, *LIRA_ATTACKS)



@dataclass(frozen=True)
class MembershipPool:
    """Subjects of a membership experiment: members and as many non-members.

    Attributes
    ----------
    index : numpy.ndarray of int, shape (2 n,)
        Positions in the dataset, ascending.
    labels : numpy.ndarray of int, shape (2 n,)
        1 for members, 0 for non-members, aligned with ``index``; as many of each.
    """

    index: np.ndarray
    labels: np.ndarray

    @property
    def members(self) -> np.ndarray:
        """Dataset positions of the members, ascending."""
        return self.index[self.labels == 1]

    @property
    def non_members(self) -> np.ndarray:
        """Dataset positions of the non-members, ascending."""
        return self.index[self.labels == 0]

    def __len__(self) -> int:
        return int(self.index.size)


def balanced_pool(members: Sequence[int] | np.ndarray, candidates: Sequence[int] | np.ndarray, *,
                  seed: int = 0) -> MembershipPool:
    """``members`` and as many non-members drawn at random from ``candidates``.

    Parameters
    ----------
    members : array of int
        Dataset positions of the training subjects (at least 1).
    candidates : array of int
        Dataset positions of held-out subjects; disjoint from ``members`` and at least as many.
    seed : int
        Seed of the draw.

    Returns
    -------
    MembershipPool
    """
    m, c = _positions(members, "members"), _positions(candidates, "candidates")
    if m.size < 1:
        raise ValueError("members is empty")
    overlap = np.intersect1d(m, c)
    if overlap.size:
        raise ValueError(f"members and candidates overlap at positions {overlap[:5].tolist()}: non-members must be "
                         "held out")
    if c.size < m.size:
        raise ValueError(f"{m.size} members need at least as many held-out candidates, got {c.size}")
    non_members = np.random.default_rng(seed).choice(c, size=m.size, replace=False)
    index = np.r_[m, non_members]
    order = np.argsort(index)
    labels = np.r_[np.ones(m.size, np.int64), np.zeros(m.size, np.int64)]
    return MembershipPool(index=index[order], labels=labels[order])


def membership_pool(n_examples: int, *, n_members: int, seed: int = 0,
                    candidates: Sequence[int] | np.ndarray | None = None) -> MembershipPool:
    """Draw ``n_members`` members and as many non-members at random.

    Parameters
    ----------
    n_examples : int
        Size of the dataset (positions ``0 .. n_examples - 1``).
    n_members : int
        Members (the target's training subjects), at least 1 and at most half the candidates.
    seed : int
        Seed of the draw.
    candidates : array of int, optional
        Positions to draw from (e.g. those a pretrained model never saw); default all.

    Returns
    -------
    MembershipPool
    """
    population = np.arange(int(n_examples)) if candidates is None else _positions(candidates, "candidates")
    if population.size and population.max() >= n_examples:
        raise ValueError(f"candidates must be positions below n_examples={n_examples}, got {population.max()}")
    if int(n_members) != n_members or not 1 <= n_members <= population.size // 2:
        raise ValueError(f"n_members must be an integer in [1, {population.size // 2}] (half of the "
                         f"{population.size} candidates), got {n_members!r}")
    order = np.random.default_rng(seed).permutation(population)
    return balanced_pool(order[: int(n_members)], order[int(n_members):], seed=seed)


def _pool_batches(dataset: Dataset, pool: MembershipPool | np.ndarray,
                  batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    index = pool.index if isinstance(pool, MembershipPool) else _positions(pool, "pool")
    return list(DataLoader(Subset(dataset, index.tolist()), batch_size=batch_size))


@dataclass(frozen=True)
class Shadows:
    """LiRA shadow models' statistics on a pool.

    Attributes
    ----------
    statistics : numpy.ndarray of shape (K, n_pool)
        Signed residual ``age - predicted`` (years) of every shadow on every pool subject.
    membership : numpy.ndarray of bool, shape (K, n_pool)
        Whether each pool subject was IN each shadow's training set.
    seconds : float
        Training and evaluation wall time of all shadows.
    """

    statistics: np.ndarray
    membership: np.ndarray
    seconds: float


def train_shadows(recipe: Recipe, dataset: Dataset, pool: MembershipPool, *, n_shadows: int, seed: int = 0,
                  flip_axis: int | None = None, batch_size: int = 32, device: str | torch.device = "cpu",
                  progress: bool = True) -> Shadows:
    """Train ``n_shadows`` shadow models with the target's recipe on random halves of the pool.

    Parameters
    ----------
    recipe : callable ``(train_index, seed) -> TrainedModel``
        The target's recipe (:func:`~fedsparse_lib.privacy.recipes.centralized_recipe`,
        :func:`~fedsparse_lib.privacy.recipes.federated_recipe`).
    dataset : torch Dataset
    pool : MembershipPool
        The population pool (members and non-members; labels are not used).
    n_shadows : int
        K (>= 2; LiRA's online fit needs >= 3, and K < 64 uses a global variance).
    seed : int
        Seed of the halves and of the shadows' training
        (:func:`~fedsparse_lib.privacy.lira.shadow_statistics`).
    flip_axis, device
        As in :func:`~fedsparse_lib.privacy.lira.residual_statistic`.
    batch_size : int
        Batch size of the evaluation.
    progress : bool

    Returns
    -------
    Shadows
    """
    start = time.perf_counter()
    membership = shadow_membership(len(pool), n_shadows, seed=seed)
    statistics = shadow_statistics(lambda positions, s: recipe(pool.index[positions], s).model, membership,
                                   _pool_batches(dataset, pool, batch_size), seed=seed, flip_axis=flip_axis,
                                   device=device, progress=progress)
    return Shadows(statistics=statistics, membership=membership, seconds=time.perf_counter() - start)


def run_attacks(model: nn.Module, dataset: Dataset, pool: MembershipPool, split: AttackerSplit, *,
                attacks: Sequence[str] = ATTACKS, mask: Mapping[str, torch.Tensor] | None = None,
                kept_only: bool = False, shadows: Shadows | None = None, flip_axis: int | None = None,
                batch_size: int = 32, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Run several attacks on one model; scores of the attacker-test part of the pool.

    Parameters
    ----------
    model : nn.Module
        The attacked model.
    dataset : torch Dataset
    pool : MembershipPool
        Its members and non-members.
    split : AttackerSplit
        :func:`~fedsparse_lib.privacy.attacks.attacker_split` of ``pool.labels``.
    attacks : sequence of str
        Any of :data:`ATTACK_NAMES`.
    mask, kept_only
        The model's mask and whether white-box features use its kept coordinates only.
    shadows : Shadows, optional
        Required for ``lira_online`` / ``lira_offline``: shadows trained on this pool with the
        model's recipe. The fits use every pool subject's shadow statistics (the attacker knows
        them all); the scores are those of the attacker-test part.
    flip_axis : int, optional
        LiRA's flip augmentation; use the value the shadows were evaluated with.
    batch_size, seed, device
        Evaluation batch size, seed of the classifiers, device.

    Returns
    -------
    dict of str to numpy.ndarray
        ``{attack: scores}`` in the order of ``attacks``, each of shape ``(len(split.test_index),)``
        aligned with ``split.test_labels``; higher = more likely a member.
    """
    unknown = [a for a in attacks if a not in ATTACK_NAMES]
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; choose from {ATTACK_NAMES}")
    if max(split.train_index.max(initial=0), split.test_index.max(initial=0)) >= len(pool):
        raise ValueError(f"split indexes positions beyond the pool of {len(pool)} subjects")
    lira = [a for a in attacks if a in LIRA_ATTACKS]
    if lira and shadows is None:
        raise ValueError(f"{lira} need shadows trained with the target's recipe (train_shadows)")
    if shadows is not None and shadows.statistics.shape[1] != len(pool):
        raise ValueError(f"shadows were evaluated on {shadows.statistics.shape[1]} subjects, the pool has {len(pool)}")
    batches = _pool_batches(dataset, pool, batch_size)
    classic = [a for a in attacks if a in ATTACKS]
    out = attack_scores(model, batches, split, attacks=classic, mask=mask, kept_only=kept_only, seed=seed,
                        device=device) if classic else {}
    if lira:
        assert shadows is not None
        stat = residual_statistic(model, batches, flip_axis=flip_axis, device=device)
        if "lira_online" in lira:
            out["lira_online"] = lira_online_scores(stat, shadows.statistics, shadows.membership)[split.test_index]
        if "lira_offline" in lira:
            out["lira_offline"] = lira_offline_scores(stat, shadows.statistics, shadows.membership)[split.test_index]
    return {a: out[a] for a in attacks}


def pool_predictions(model: nn.Module, dataset: Dataset, pool: MembershipPool, *, batch_size: int = 32,
                     device: str | torch.device = "cpu") -> pd.DataFrame:
    """Per-subject predictions of a model on a pool, for residual plots and the generalisation gap.

    Returns
    -------
    pandas.DataFrame
        One row per pool subject: ``index`` (dataset position), ``membership`` (``member`` /
        ``non-member``), ``age``, ``predicted`` (years), ``residual`` (``age - predicted``, the
        LiRA statistic) and ``abs_error``.
    """
    predicted, ages = predict(model, _pool_batches(dataset, pool, batch_size), device=device)
    return pd.DataFrame({"index": pool.index, "membership": np.where(pool.labels == 1, "member", "non-member"),
                         "age": ages, "predicted": predicted, "residual": ages - predicted,
                         "abs_error": np.abs(ages - predicted)})


def server_threat_scores(target: TrainedModel, model_fn: Callable[[], nn.Module],
                         attack_fn: Callable[[nn.Module, Mapping[str, torch.Tensor] | None], Mapping[str, np.ndarray]],
                         *, rounds: Sequence[int] | None = None,
                         standardize: bool = True) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """The honest-but-curious server attacks the watched client's uploads.

    Parameters
    ----------
    target : TrainedModel
        From :func:`~fedsparse_lib.privacy.recipes.federated_recipe` (it carries the watched client's uploads).
    model_fn : callable ``() -> nn.Module``
        Builds the architecture of the uploads.
    attack_fn : callable ``(model, mask) -> {attack: scores}``
        Scores the watched client's members and non-members, e.g. :func:`run_attacks` on
        :func:`balanced_pool` ``(target.client_index, ...)``; the same examples every round.
    rounds : sequence of int, optional
        Server rounds to attack; default every upload.
    standardize : bool, default True
        Z-score each round's scores before averaging them (see
        :func:`~fedsparse_lib.privacy.threat.average_round_scores`).

    Returns
    -------
    scores : dict
        ``{threat_model: {attack: scores}}`` with ``server_round_<t>`` for each attacked round and
        ``server_rounds_mean`` for the per-subject mean over them.
    sparsity : dict
        ``{threat_model: sparsity}`` of the attacked upload (for the mean: the sparsest, i.e. the
        latest, upload it averages).
    """
    if not target.uploads:
        raise ValueError("the target has no uploads: train it with federated_recipe")
    states = {r: w for r, (w, _) in target.uploads.items()}
    masks = {r: m for r, (_, m) in target.uploads.items()}
    per_round = server_round_scores(states, model_fn, attack_fn, masks=masks, rounds=rounds)
    scores: dict[str, dict[str, np.ndarray]] = {server_threat_model(r): s for r, s in per_round.items()}
    sparsity = {server_threat_model(r): mask_sparsity(masks[r]) for r in per_round}
    scores[SERVER_ROUNDS_MEAN] = average_round_scores(per_round, standardize=standardize)
    sparsity[SERVER_ROUNDS_MEAN] = max(sparsity.values())
    return scores, sparsity


def roc_table(scores: Mapping[str, np.ndarray], labels: Sequence[int] | np.ndarray, *,
              name: str = "attack") -> pd.DataFrame:
    """ROC points of several score arrays on the same labels, stacked into one tidy frame.

    Returns
    -------
    pandas.DataFrame
        Columns ``name``, ``threshold``, ``fpr``, ``tpr`` and ``n_non_members`` (the FPR step is
        ``1 / n_non_members``; plots clip log axes there).
    """
    n_non = int(np.sum(np.asarray(labels) == 0))
    frames = [roc_points(s, labels).assign(**{name: key}, n_non_members=n_non) for key, s in scores.items()]
    if not frames:
        raise ValueError("no scores")
    return pd.concat(frames, ignore_index=True)[[name, "threshold", "fpr", "tpr", "n_non_members"]]


def summary_table(results: pd.DataFrame, *, metrics: Sequence[str] = ("auc", "tpr_at_fpr_0.01"),
                  index: Sequence[str] = ("target", "threat_model", "attack"), digits: int = 2) -> pd.DataFrame:
    """The tidy results as a readable wide table: ``value [ci_low, ci_high]`` per metric.

    Parameters
    ----------
    results : pandas.DataFrame
        Tidy results (:data:`~fedsparse_lib.privacy.metrics.RESULT_COLUMNS`), one row per
        (``index``, metric).
    metrics : sequence of str
        Columns of the table, in this order.
    index : sequence of str
        Row keys, in order of appearance.
    digits : int
        Decimals.

    Returns
    -------
    pandas.DataFrame
        Strings such as ``"0.69 [0.54, 0.84]"``, indexed by ``index``, one column per metric.
    """
    keys = list(index)
    rows = results[results["metric"].isin(metrics)]
    if rows.duplicated([*keys, "metric"]).any():
        raise ValueError(f"several rows per ({', '.join(keys)}, metric): add keys to index")
    text = [f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
            for v, lo, hi in zip(rows["value"], rows["ci_low"], rows["ci_high"])]
    table = rows.assign(estimate=text).pivot(index=keys, columns="metric", values="estimate")
    order = list(dict.fromkeys(map(tuple, rows[keys].to_numpy().tolist())))
    table = table.reindex(pd.MultiIndex.from_tuples(order, names=keys) if len(keys) > 1 else [o[0] for o in order])
    return table[[m for m in metrics if m in table.columns]].rename_axis(columns=None)
