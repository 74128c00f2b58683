"""LiRA (Carlini et al., IEEE S&P 2022) adapted to brain-age regression.

Statistic
    The signed residual ``s = y - y_hat`` (years) of the model on one subject, optionally with
    ``y_hat`` averaged over the volume and its left-right mirror image (cheap test-time
    augmentation; axis 0 of the RAS+ (X, Y, Z) volumes is left-right). For a regression model the
    residual is already roughly Gaussian across models, so it replaces the paper's logit-scaled
    confidence.
Shadow models
    ``K`` models trained with the target's own recipe, through a caller-supplied
    ``train_fn(train_indices, seed) -> model`` (so a federated target is shadowed by the federated
    recipe), each on about half of a population pool. The membership matrix follows the paper's
    code: every example is IN for exactly ``K // 2`` shadows (``ceil(K / 2)`` for half the examples
    when K is odd), chosen at random, so each shadow trains on about half the pool.
Fits
    Per example, the IN and the OUT statistics are summarised by their median (location) and
    standard deviation (scale). With few shadows (``K < 64`` by default) the per-example scales are
    too noisy and one *global* scale is used instead: the standard deviation of every IN (resp.
    OUT) statistic about its example's median, pooled over examples (sum of squared deviations over
    ``#statistics - #examples``, which reduces to the usual ``ddof=1`` estimate for one example).
Scores (higher = more likely a member)
    online: ``log N(s; mu_in, sd_in) - log N(s; mu_out, sd_out)``.
    offline (OUT shadows only): one-sided, towards zero error. Training pulls a member's residual
    from the OUT location towards 0, so the score is ``-sign(mu_out) * (s - mu_out) / sd_out``,
    which ranks exactly as the one-sided p-value ``P_out(S is at least that far towards 0)``
    (``sign(0)`` counts as +1). ``one_sided=False`` gives the paper code's two-sided
    ``-log N(s; mu_out, sd_out)``.

The examples scored by the target must be part of the population pool (their shadow statistics
and IN/OUT columns are what the fits use).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

__all__ = [
    "GLOBAL_VARIANCE_BELOW",
    "lira_offline_scores",
    "lira_online_scores",
    "residual_statistic",
    "shadow_membership",
    "shadow_statistics",
]

logger = logging.getLogger(__name__)

GLOBAL_VARIANCE_BELOW = 64  # use a global scale when there are fewer shadows than this (the paper's advice)

TrainFn = Callable[[np.ndarray, int], nn.Module]


def shadow_membership(n_population: int, n_shadows: int, *, seed: int = 0) -> np.ndarray:
    """Which pool examples each shadow model trains on.

    Parameters
    ----------
    n_population : int
        Size of the population pool (>= 2).
    n_shadows : int
        Number of shadow models K (>= 2).
    seed : int
        Seed of the assignment.

    Returns
    -------
    numpy.ndarray of bool, shape (n_shadows, n_population)
        ``[k, i]`` is True iff example ``i`` is IN shadow ``k``. Every column has exactly
        ``K // 2`` (or, for odd K, ``K // 2 + 1`` in a random half of the columns) True entries;
        every row has about ``n_population / 2``.
    """
    for name, value in (("n_population", n_population), ("n_shadows", n_shadows)):
        if int(value) != value or value < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {value!r}")
    rng = np.random.default_rng(seed)
    n_in = np.full(int(n_population), int(n_shadows) // 2)
    if n_shadows % 2:
        n_in[rng.permutation(int(n_population))[: int(n_population) // 2]] += 1
    ranks = rng.random((int(n_shadows), int(n_population))).argsort(axis=0).argsort(axis=0)
    return ranks < n_in[None, :]


@torch.no_grad()
def residual_statistic(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                       flip_axis: int | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """The signed residual ``age - predicted`` (years) per example, optionally flip-averaged.

    Parameters
    ----------
    model : nn.Module
        Maps (batch, 1, X, Y, Z) volumes to (batch,) ages in years; put in ``eval()`` mode.
    batches : iterable of (inputs, ages)
        In a fixed order (a non-shuffling DataLoader).
    flip_axis : {None, 0, 1, 2}
        Spatial axis of the (X, Y, Z) volume to mirror; the prediction is then the mean over the
        original and the mirrored volume. 0 is left-right for RAS+ volumes.
    device : str or torch.device

    Returns
    -------
    numpy.ndarray of shape (n_examples,), float64
    """
    if flip_axis is not None and flip_axis not in (0, 1, 2):
        raise ValueError(f"flip_axis must be None or a spatial axis 0, 1, 2 of (X, Y, Z), got {flip_axis!r}")
    model.eval()
    out = []
    for x, y in batches:
        x = x.to(device)
        if x.ndim != 5:
            raise ValueError(f"expected inputs of shape (batch, 1, X, Y, Z), got {tuple(x.shape)}")
        pred = model(x).double()
        if flip_axis is not None:
            pred = (pred + model(torch.flip(x, dims=(2 + flip_axis,))).double()) / 2
        out.append(torch.as_tensor(y, dtype=torch.float64).reshape(-1) - pred.cpu())
    if not out:
        raise ValueError("no batches")
    stat = torch.cat(out).numpy()
    if not np.isfinite(stat).all():
        raise ValueError("the model predicts non-finite ages (diverged?)")
    return stat


def shadow_statistics(train_fn: TrainFn, membership: np.ndarray, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      *, seed: int = 0, flip_axis: int | None = None, device: str | torch.device = "cpu",
                      progress: bool = True) -> np.ndarray:
    """Train the shadow models one at a time and record their statistic on the whole pool.

    Parameters
    ----------
    train_fn : callable ``(train_indices, seed) -> nn.Module``
        The target's training recipe: trains a fresh model on the pool examples at
        ``train_indices`` (sorted int array of positions in ``batches``) with ``seed``.
    membership : numpy.ndarray of bool, shape (K, n_population)
        From :func:`shadow_membership`.
    batches : re-iterable of (inputs, ages)
        The population pool in a fixed order (a list or a non-shuffling DataLoader), ``n_population``
        examples.
    seed : int
        Shadow ``k`` is trained with a seed drawn from ``numpy.random.SeedSequence(seed)``'s k-th child.
    flip_axis, device
        As in :func:`residual_statistic`.
    progress : bool
        Show a progress bar.

    Returns
    -------
    numpy.ndarray of shape (K, n_population)
        Shadow statistics; models are not kept.
    """
    from tqdm.auto import tqdm

    keep = np.asarray(membership, dtype=bool)
    if keep.ndim != 2:
        raise ValueError(f"membership must be (n_shadows, n_population), got shape {keep.shape}")
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(keep.shape[0])]
    stats = []
    for k in tqdm(range(keep.shape[0]), desc="shadow models", disable=not progress):
        model = train_fn(np.flatnonzero(keep[k]), seeds[k])
        stat = residual_statistic(model, batches, flip_axis=flip_axis, device=device)
        if stat.size != keep.shape[1]:
            raise ValueError(f"the pool has {stat.size} examples but membership has {keep.shape[1]} columns")
        stats.append(stat)
        logger.debug("shadow %d: %d training examples, mean |residual| %.3f", k, keep[k].sum(), np.abs(stat).mean())
    return np.stack(stats)


def _check_lira(target_stat: np.ndarray, shadow_stats: np.ndarray,
                shadow_in: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(target_stat, dtype=np.float64)
    st = np.asarray(shadow_stats, dtype=np.float64)
    keep = np.asarray(shadow_in, dtype=bool)
    if s.ndim != 1 or st.ndim != 2 or st.shape != keep.shape or st.shape[1] != s.size:
        raise ValueError(f"expected target_stat (n,), shadow_stats and shadow_in (K, n); got {s.shape}, "
                         f"{st.shape} and {keep.shape}")
    if not (np.isfinite(s).all() and np.isfinite(st).all()):
        raise ValueError("statistics must be finite")
    return s, st, keep


def _fit(st: np.ndarray, sel: np.ndarray, global_variance: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example median and (per-example or global) std of the selected shadow statistics."""
    counts = sel.sum(axis=0)
    need = 1 if global_variance else 2
    if (counts < need).any():
        i = int(np.argmin(counts))
        raise ValueError(f"example {i} has {counts[i]} {what} shadows; need >= {need} for every example "
                         f"({'global' if global_variance else 'per-example'} variance): train more shadows")
    masked = np.where(sel, st, np.nan)
    loc = np.nanmedian(masked, axis=0)
    dev = masked - loc[None, :]
    if global_variance:
        dof = int(counts.sum()) - counts.size
        if dof < 1:
            raise ValueError(f"every example has a single {what} shadow: no spread to estimate; train more shadows")
        scale = np.full(loc.shape, np.sqrt(np.nansum(dev**2) / dof))
    else:
        scale = np.sqrt(np.nansum(dev**2, axis=0) / (counts - 1))
    return loc, np.maximum(scale, 1e-12)


def _use_global(global_variance: bool | None, n_shadows: int) -> bool:
    return n_shadows < GLOBAL_VARIANCE_BELOW if global_variance is None else bool(global_variance)


def _log_normal_pdf(x: np.ndarray, loc: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)


def lira_online_scores(target_stat: np.ndarray, shadow_stats: np.ndarray, shadow_in: np.ndarray, *,
                       global_variance: bool | None = None) -> np.ndarray:
    """Online LiRA: Gaussian likelihood ratio of IN against OUT shadows, per example.

    Parameters
    ----------
    target_stat : array of shape (n,)
        The target model's statistic on the evaluated examples (:func:`residual_statistic`).
    shadow_stats : array of shape (K, n)
        The shadows' statistic on the same examples (columns of :func:`shadow_statistics`).
    shadow_in : bool array of shape (K, n)
        Whether each evaluated example was IN each shadow (columns of :func:`shadow_membership`).
    global_variance : bool, optional
        One pooled scale for all examples; default ``K < 64``.

    Returns
    -------
    numpy.ndarray of shape (n,)
        Log-likelihood ratio, higher = more likely a member.
    """
    s, st, keep = _check_lira(target_stat, shadow_stats, shadow_in)
    glob = _use_global(global_variance, st.shape[0])
    mu_in, sd_in = _fit(st, keep, glob, "IN")
    mu_out, sd_out = _fit(st, ~keep, glob, "OUT")
    return _log_normal_pdf(s, mu_in, sd_in) - _log_normal_pdf(s, mu_out, sd_out)


def lira_offline_scores(target_stat: np.ndarray, shadow_stats: np.ndarray, shadow_in: np.ndarray | None = None, *,
                        global_variance: bool | None = None, one_sided: bool = True) -> np.ndarray:
    """Offline LiRA: how far the target's statistic sits from the OUT shadows, per example.

    Parameters
    ----------
    target_stat, shadow_stats, global_variance
        As in :func:`lira_online_scores` (the default global variance depends on the number of
        OUT shadows per example being below 64, judged by K).
    shadow_in : bool array of shape (K, n), optional
        IN entries are ignored; ``None`` means every shadow is OUT (shadows trained on a pool that
        excludes the evaluated examples).
    one_sided : bool, default True
        Standardised shift towards zero error, ``-sign(mu_out) (s - mu_out) / sd_out`` (see the
        module notes); ``False``: the two-sided ``-log N(s; mu_out, sd_out)``.

    Returns
    -------
    numpy.ndarray of shape (n,)
        Higher = more likely a member.
    """
    st_raw = np.asarray(shadow_stats)
    keep = np.zeros(st_raw.shape, bool) if shadow_in is None else shadow_in
    s, st, keep = _check_lira(target_stat, st_raw, keep)
    n_out = int((~keep).sum(axis=0).min())
    mu_out, sd_out = _fit(st, ~keep, _use_global(global_variance, st.shape[0]), "OUT")
    if not one_sided:
        return -_log_normal_pdf(s, mu_out, sd_out)
    logger.debug("offline LiRA with >= %d OUT shadows per example", n_out)
    direction = np.where(mu_out >= 0, -1.0, 1.0)
    return direction * (s - mu_out) / sd_out
