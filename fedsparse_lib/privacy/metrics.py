"""Membership-inference metrics: ROC, AUC, advantage, TPR at low FPR, bootstrap CIs, tidy tables.

Conventions (every attack in :mod:`fedsparse_lib.privacy` follows them):

- ``scores``: one float per example, **higher = more likely a member**.
- ``labels``: 1 (or True) for members, 0 (or False) for non-members.
- A threshold ``tau`` predicts "member" iff ``score >= tau``. The ROC is swept over every distinct
  score, from ``+inf`` (nobody predicted member: FPR = TPR = 0) down to the smallest score
  (everybody: FPR = TPR = 1); tied scores move together. These are the points of
  ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.
- **TPR at FPR = f**: the largest TPR among the ROC points whose FPR <= f, i.e. the TPR at the
  *lowest* threshold that still keeps the FPR at or below f. No interpolation between points: the
  value is achievable by a real threshold and is conservative. With ``n`` non-members the FPR moves
  in steps of ``1 / n``, so TPR at 0.1 % FPR needs 1,000 non-members to mean more than "TPR at FPR
  0" (the fraction of members scoring above every non-member).
- **Advantage**: ``max_tau (TPR - FPR)`` (Yeom et al.); **balanced accuracy**: ``max_tau (TPR + 1 -
  FPR) / 2 = (1 + advantage) / 2``. Both choose the threshold on the evaluation set itself, so they
  are optimistic (about ``0.5 + c / sqrt(n)`` for an attack at chance); AUC and TPR at low FPR are
  not.
- **AUC**: area under the ROC (trapezoidal, ties count one half), equal to the probability that a
  random member scores above a random non-member.
- **Bootstrap CIs**: percentile intervals over ``n_boot`` resamples that draw members and
  non-members *separately* with replacement (the class balance of the evaluation set is kept).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "RESULT_COLUMNS",
    "attack_metrics",
    "attack_results",
    "balanced_accuracy",
    "bootstrap_metrics",
    "membership_advantage",
    "results_table",
    "roc_auc",
    "roc_points",
    "tpr_at_fpr",
]

RESULT_COLUMNS: tuple[str, ...] = ("target", "sparsity", "environment", "threat_model", "attack", "metric", "value",
                                   "ci_low", "ci_high")
DEFAULT_FPRS: tuple[float, ...] = (0.01, 0.001)


def _check(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated (scores float64, labels bool), both 1-D and of equal length, with both classes present."""
    s = np.asarray(scores, dtype=np.float64)
    raw = np.asarray(labels)
    if s.ndim != 1 or raw.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {s.shape} and {raw.shape}")
    if s.shape != raw.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} scores, {raw.size} labels")
    bad = np.flatnonzero(~np.isfinite(s))
    if bad.size:
        raise ValueError(f"scores must be finite; {bad.size} are not, e.g. index {bad[0]}: {s[bad[0]]}")
    values = set(np.unique(raw).tolist())
    if not values <= {0, 1}:
        raise ValueError(f"labels must be 0 (non-member) or 1 (member), got values {sorted(values)[:5]}")
    y = raw.astype(bool)
    if y.all() or not y.any():
        raise ValueError(f"labels need both members and non-members, got {int(y.sum())} members "
                         f"of {y.size} examples")
    return s, y


def _roc(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, descending, starting at (0, 0, +inf)."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    n_pos, n_neg = y_sorted.sum(), y_sorted.size - y_sorted.sum()
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    return fpr, tpr, np.r_[np.inf, s_sorted[last_of_tie]]


def _auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    # the ROC is monotone, so the last point with fpr <= target has the largest such tpr
    return float(tpr[np.searchsorted(fpr, target, side="right") - 1])


def _check_fprs(fprs: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(f) for f in fprs)
    for f in out:
        if not 0 <= f <= 1:
            raise ValueError(f"FPR targets must be in [0, 1], got {f!r}")
    return out


def _metric_values(fpr: np.ndarray, tpr: np.ndarray, fprs: tuple[float, ...]) -> dict[str, float]:
    advantage = float(np.max(tpr - fpr))
    out = {"auc": _auc(fpr, tpr), "balanced_accuracy": (1 + advantage) / 2, "advantage": advantage}
    for f in fprs:
        out[f"tpr_at_fpr_{f:g}"] = _tpr_at(fpr, tpr, f)
    return out


def roc_points(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> pd.DataFrame:
    """The full ROC curve as a tidy frame, for (log-log) plots.

    Parameters
    ----------
    scores : array of shape (n,)
        Membership scores, higher = more likely a member; finite.
    labels : array of shape (n,)
        1 for members, 0 for non-members; both must occur.

    Returns
    -------
    pandas.DataFrame
        Columns ``threshold`` (``+inf`` first, then every distinct score, descending), ``fpr`` and
        ``tpr`` (both non-decreasing in [0, 1]). On log axes the first point (0, 0) and any point with
        ``fpr == 0`` cannot be drawn; clip the axes at ``1 / n_non_members``.
    """
    fpr, tpr, thresholds = _roc(*_check(scores, labels))
    return pd.DataFrame({"threshold": thresholds, "fpr": fpr, "tpr": tpr})


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve in [0, 1] (0.5 = chance); ties count one half."""
    return _auc(*_roc(*_check(scores, labels))[:2])


def membership_advantage(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """``max_tau (TPR - FPR)`` in [0, 1]; optimistic (threshold chosen on the same examples)."""
    fpr, tpr, _ = _roc(*_check(scores, labels))
    return float(np.max(tpr - fpr))


def balanced_accuracy(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """``max_tau (TPR + TNR) / 2`` in [0.5, 1]: the best accuracy of one threshold on a balanced set."""
    return (1 + membership_advantage(scores, labels)) / 2


def tpr_at_fpr(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *,
               fpr: float = 0.01) -> float:
    """TPR of the lowest threshold whose FPR is <= ``fpr`` (no interpolation; see module notes).

    Parameters
    ----------
    scores, labels : arrays of shape (n,)
        As in :func:`roc_points`.
    fpr : float, default 0.01
        Target false-positive rate in [0, 1].

    Returns
    -------
    float
        True-positive rate in [0, 1].
    """
    (target,) = _check_fprs([fpr])
    f, t, _ = _roc(*_check(scores, labels))
    return _tpr_at(f, t, target)


def attack_metrics(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *,
                   fprs: Iterable[float] = DEFAULT_FPRS) -> dict[str, float]:
    """All point metrics at once.

    Returns
    -------
    dict of str to float
        ``auc``, ``balanced_accuracy``, ``advantage`` and ``tpr_at_fpr_<f>`` for each ``f`` in
        ``fprs`` (``tpr_at_fpr_0.01``, ``tpr_at_fpr_0.001`` by default).
    """
    return _metric_values(*_roc(*_check(scores, labels))[:2], _check_fprs(fprs))


def bootstrap_metrics(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *,
                      fprs: Iterable[float] = DEFAULT_FPRS, n_boot: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> pd.DataFrame:
    """Point metrics with percentile bootstrap confidence intervals.

    Members and non-members are resampled separately, with replacement, each to its own count, so
    every resample keeps the evaluation set's balance.

    Parameters
    ----------
    scores, labels : arrays of shape (n,)
        As in :func:`roc_points`.
    fprs : iterable of float
        FPR targets for the ``tpr_at_fpr_<f>`` metrics.
    n_boot : int, default 1000
        Number of bootstrap resamples (>= 1).
    confidence : float, default 0.95
        Coverage of the interval, in (0, 1).
    seed : int
        Seed of the resampling.

    Returns
    -------
    pandas.DataFrame
        One row per metric: ``metric``, ``value`` (on the full set), ``ci_low``, ``ci_high``.
    """
    s, y = _check(scores, labels)
    targets = _check_fprs(fprs)
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    point = _metric_values(*_roc(s, y)[:2], targets)
    members, non_members = s[y], s[~y]
    labels_boot = np.r_[np.ones(members.size, bool), np.zeros(non_members.size, bool)]
    rng = np.random.default_rng(seed)
    draws = {name: np.empty(int(n_boot)) for name in point}
    for b in range(int(n_boot)):
        sample = np.r_[rng.choice(members, members.size), rng.choice(non_members, non_members.size)]
        for name, value in _metric_values(*_roc(sample, labels_boot)[:2], targets).items():
            draws[name][b] = value
    alpha = (1 - confidence) / 2
    rows = [{"metric": name, "value": value, "ci_low": float(np.quantile(draws[name], alpha)),
             "ci_high": float(np.quantile(draws[name], 1 - alpha))} for name, value in point.items()]
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high"])


def attack_results(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *, target: str,
                   sparsity: float, environment: str, threat_model: str, attack: str,
                   fprs: Iterable[float] = DEFAULT_FPRS, n_boot: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> pd.DataFrame:
    """Bootstrap metrics of one attack on one target, as rows of the tidy results table.

    Parameters
    ----------
    scores, labels : arrays of shape (n,)
        As in :func:`roc_points`.
    target : str
        Name of the attacked model (e.g. ``"centralized_magnitude"``).
    sparsity : float
        Fraction of zeroed weights of the attacked model, in [0, 1].
    environment : str
        E.g. ``"centralized"``, ``"federated_iid"``.
    threat_model : str
        E.g. ``"outsider"``, ``"server_round_10"`` (see :mod:`fedsparse_lib.privacy.threat`).
    attack : str
        E.g. ``"loss_threshold"``, ``"black_box_logistic"``, ``"lira_online"``.
    fprs, n_boot, confidence, seed
        As in :func:`bootstrap_metrics`.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`RESULT_COLUMNS`, one row per metric.
    """
    frame = bootstrap_metrics(scores, labels, fprs=fprs, n_boot=n_boot, confidence=confidence, seed=seed)
    ids = {"target": target, "sparsity": float(sparsity), "environment": environment, "threat_model": threat_model,
           "attack": attack}
    for column, value in ids.items():
        frame[column] = value
    return results_table([frame])


def results_table(parts: Iterable[pd.DataFrame | Mapping[str, object]]) -> pd.DataFrame:
    """Concatenate result frames and/or single-row mappings into the tidy results table.

    Parameters
    ----------
    parts : iterable of DataFrame or mapping
        Each holds (at least) the columns :data:`RESULT_COLUMNS`; other columns are an error.

    Returns
    -------
    pandas.DataFrame
        Exactly the columns :data:`RESULT_COLUMNS`, in that order, with a fresh index.
    """
    frames = [p if isinstance(p, pd.DataFrame) else pd.DataFrame([dict(p)]) for p in parts]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("sparsity", "value", "ci_low", "ci_high") else object)
                             for c in RESULT_COLUMNS})
    for i, frame in enumerate(frames):
        missing = [c for c in RESULT_COLUMNS if c not in frame.columns]
        extra = [c for c in frame.columns if c not in RESULT_COLUMNS]
        if missing or extra:
            raise ValueError(f"results part {i}: missing columns {missing}, unexpected columns {extra}; "
                             f"expected exactly {list(RESULT_COLUMNS)}")
    table = pd.concat([f[list(RESULT_COLUMNS)] for f in frames], ignore_index=True)
    for column in ("sparsity", "value", "ci_low", "ci_high"):
        table[column] = table[column].astype(np.float64)
    return table
