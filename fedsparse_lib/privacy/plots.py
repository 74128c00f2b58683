"""Figures of membership-inference results.

Each function takes a tidy DataFrame and an optional ``ax``, returns the Axes and never calls
``show()``. The inputs are the package's own tables: per-subject predictions
(:func:`~fedsparse_lib.privacy.experiment.pool_predictions`), ROC points
(:func:`~fedsparse_lib.privacy.experiment.roc_table`) and the tidy results table (columns
:data:`~fedsparse_lib.privacy.metrics.RESULT_COLUMNS`). Every metric panel draws its chance level
(:func:`chance_level`) as a dotted line, and every estimate its bootstrap confidence interval.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import matplotlib.pyplot as plt
from matplotlib import ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

from .experiment import ATTACK_NAMES

__all__ = [
    "attack_colors",
    "chance_level",
    "plot_attack_summary",
    "plot_attack_vs_round",
    "plot_attack_vs_sparsity",
    "plot_residuals",
    "plot_roc",
]

# one colour per attack in every figure (tab10); the quick profile's five come first
_ATTACK_COLORS = {"loss_threshold": "C0", "black_box_logistic": "C1", "white_box_logistic": "C2", "lira_online": "C3",
                  "lira_offline": "C4", "black_box_mlp": "C5", "black_box_gradient_boosting": "C6",
                  "white_box_mlp": "C8", "white_box_gradient_boosting": "C9"}
_SPARE_COLORS = ("C7", "C8", "C9", "C5", "C6")
_METRIC_LABELS = {"auc": "ROC AUC", "balanced_accuracy": "balanced accuracy", "advantage": "advantage (TPR - FPR)"}
_ROUND = re.compile(r"^server_round_(\d+)$")


def _ax(ax: Axes | None, figsize: tuple[float, float] = (6, 4)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing} (got {list(frame.columns)})")


def chance_level(metric: str) -> float:
    """What an attack that guesses at random scores on ``metric`` (in expectation).

    ``auc`` and ``balanced_accuracy``: 0.5; ``advantage``: 0; ``tpr_at_fpr_<f>``: ``f``.
    """
    if metric in ("auc", "balanced_accuracy"):
        return 0.5
    if metric == "advantage":
        return 0.0
    if metric.startswith("tpr_at_fpr_"):
        return float(metric[len("tpr_at_fpr_"):])
    raise ValueError(f"unknown metric {metric!r}; expected auc, balanced_accuracy, advantage or tpr_at_fpr_<f>")


def _metric_label(metric: str) -> str:
    if metric.startswith("tpr_at_fpr_"):
        return f"TPR at {float(metric[len('tpr_at_fpr_'):]):.1%} FPR"
    return _METRIC_LABELS.get(metric, metric)


def _order(values: Iterable[str]) -> list[str]:
    """Attack names in the package's order (others after, alphabetically)."""
    known = list(ATTACK_NAMES)
    return sorted(set(values), key=lambda v: (known.index(v) if v in known else len(known), str(v)))


def attack_colors(names: Iterable[str]) -> dict[str, str]:
    """A fixed colour per attack, the same in every figure; other names share a few spare colours.

    Returns
    -------
    dict of str to str
        Matplotlib colour names (``"C0"`` ...) for each distinct name, in the package's attack order.
    """
    ordered = _order(names)
    others = [n for n in ordered if n not in _ATTACK_COLORS]
    return {n: _ATTACK_COLORS.get(n) or _SPARE_COLORS[others.index(n) % len(_SPARE_COLORS)] for n in ordered}


def _one_metric(results: pd.DataFrame, metric: str, extra: Iterable[str], what: str) -> pd.DataFrame:
    _require(results, ["metric", "value", "ci_low", "ci_high", *extra], what)
    data = results[results["metric"] == metric]
    if data.empty:
        raise ValueError(f"{what}: no rows with metric {metric!r} (have {sorted(results['metric'].unique())})")
    return data


def plot_residuals(predictions: pd.DataFrame, *, hue: str = "membership", ax: Axes | None = None,
                   bins: int = 20) -> Axes:
    """Distributions of the signed residual ``age - predicted`` of members and non-members.

    Parameters
    ----------
    predictions : pandas.DataFrame
        Columns ``residual`` (years) and ``hue``, e.g. from
        :func:`~fedsparse_lib.privacy.experiment.pool_predictions`.
    hue : str, default "membership"
    ax : Axes, optional
    bins : int
        Histogram bins (shared by the groups).

    Returns
    -------
    Axes
        Density histograms (step outlines) with each group's mean absolute residual in the legend;
        a member distribution narrower than the non-member one is what the attacks exploit.
    """
    _require(predictions, ["residual", hue], "plot_residuals")
    ax = _ax(ax)
    edges = np.histogram_bin_edges(predictions["residual"].to_numpy(dtype=float), bins=bins)
    for i, (name, group) in enumerate(sorted(predictions.groupby(hue), key=lambda kv: str(kv[0]))):
        values = group["residual"].to_numpy(dtype=float)
        ax.hist(values, bins=edges, density=True, histtype="step", lw=2, color=f"C{i}",
                label=f"{name} (n = {values.size}, mean |residual| {np.abs(values).mean():.2f} y)")
        ax.hist(values, bins=edges, density=True, alpha=0.15, color=f"C{i}")
    ax.axvline(0, color="k", ls=":", lw=1)
    ax.set(xlabel="residual: age - predicted (years)", ylabel="density")
    ax.legend(fontsize="small")
    return ax


def plot_roc(roc: pd.DataFrame, *, hue: str = "attack", log: bool = True, ax: Axes | None = None) -> Axes:
    """ROC curves, on log-log axes by default (what matters is the TPR at low FPR).

    Parameters
    ----------
    roc : pandas.DataFrame
        Columns ``fpr``, ``tpr`` and ``hue`` (one curve per value), and ``n_non_members`` for log
        axes, e.g. from :func:`~fedsparse_lib.privacy.experiment.roc_table`.
    hue : str, default "attack"
    log : bool, default True
        Log-log axes, clipped at ``1 / n_non_members``: no FPR below one non-member can be
        measured, so points at FPR 0 are drawn at that floor.
    ax : Axes, optional

    Returns
    -------
    Axes
        The curves and the chance diagonal (TPR = FPR).
    """
    _require(roc, ["fpr", "tpr", hue, *(["n_non_members"] if log else [])], "plot_roc")
    ax = _ax(ax, (5, 5))
    floor = 1.0 / float(roc["n_non_members"].max()) if log else 0.0
    for name, color in attack_colors(roc[hue]).items():
        curve = roc[roc[hue] == name]
        ax.plot(np.maximum(curve["fpr"], floor), np.maximum(curve["tpr"], floor), lw=1.8, color=color, label=name)
    ax.plot([floor, 1], [floor, 1], color="k", ls=":", lw=1, label="chance")
    if log:
        ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05))
        for axis in (ax.xaxis, ax.yaxis):  # plain labels at 1, 2, 5 x 10^k (mathtext minor labels clutter)
            axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(ticker.NullFormatter())
    else:
        ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.set(xlabel="false positive rate", ylabel="true positive rate", aspect="equal" if not log else "auto")
    ax.legend(fontsize="small", loc="lower right")
    return ax


def plot_attack_vs_sparsity(results: pd.DataFrame, *, metric: str = "auc", hue: str = "attack",
                            style: str | None = "environment", ax: Axes | None = None) -> Axes:
    """An attack metric against the target's sparsity, with bootstrap confidence bands.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table (``sparsity``, ``metric``, ``value``, ``ci_low``, ``ci_high`` and
        ``hue``; ``style`` if given), filtered to the rows to draw (e.g. one threat model).
    metric : str, default "auc"
    hue : str, default "attack"
        One colour per value.
    style : str or None, default "environment"
        One line style per value (solid, dashed, ...).
    ax : Axes, optional

    Returns
    -------
    Axes
        Lines through the point estimates, shaded CIs and the chance level.
    """
    data = _one_metric(results, metric, ["sparsity", hue, *([style] if style else [])], "plot_attack_vs_sparsity")
    ax = _ax(ax)
    styles = sorted(data[style].unique()) if style else [None]
    dashes = ["-", "--", "-.", ":"]
    for name, color in attack_colors(data[hue]).items():
        for j, kind in enumerate(styles):
            g = data[(data[hue] == name) & ((data[style] == kind) if style else True)].sort_values("sparsity")
            if g.empty:
                continue
            label = f"{name}, {kind}" if style and len(styles) > 1 else str(name)
            ax.plot(g["sparsity"], g["value"], marker="o", ls=dashes[j % len(dashes)], color=color, label=label)
            ax.fill_between(g["sparsity"], g["ci_low"], g["ci_high"], color=color, alpha=0.12)
    ax.axhline(chance_level(metric), color="k", ls=":", lw=1, label="chance")
    ax.set(xlabel="sparsity (fraction of zeroed weights)", ylabel=_metric_label(metric))
    ax.legend(fontsize="small")
    return ax


def plot_attack_vs_round(results: pd.DataFrame, *, metric: str = "auc", hue: str = "attack",
                         ax: Axes | None = None) -> Axes:
    """The honest-but-curious server's attack on one client's uploads, round by round.

    Parameters
    ----------
    results : pandas.DataFrame
        Tidy results whose ``threat_model`` is ``server_round_<t>`` (drawn against ``t`` with
        CI bands) or ``server_rounds_mean`` (drawn as a dashed horizontal line per ``hue``).
    metric : str, default "auc"
    hue : str, default "attack"
    ax : Axes, optional

    Returns
    -------
    Axes
    """
    data = _one_metric(results, metric, ["threat_model", hue], "plot_attack_vs_round")
    rounds = data["threat_model"].str.extract(_ROUND, expand=False)
    per_round = data[rounds.notna()].assign(server_round=rounds.dropna().astype(int))
    mean = data[data["threat_model"] == "server_rounds_mean"]
    if per_round.empty and mean.empty:
        raise ValueError("plot_attack_vs_round: no server_round_<t> or server_rounds_mean rows")
    ax = _ax(ax)
    for name, color in attack_colors(data[hue]).items():
        g = per_round[per_round[hue] == name].sort_values("server_round")
        if not g.empty:
            ax.plot(g["server_round"], g["value"], marker="o", color=color, label=f"{name}, round t")
            ax.fill_between(g["server_round"], g["ci_low"], g["ci_high"], color=color, alpha=0.12)
        m = mean[mean[hue] == name]
        if not m.empty:
            ax.axhline(float(m["value"].iloc[0]), color=color, ls="--", lw=1.2, label=f"{name}, mean over rounds")
    ax.axhline(chance_level(metric), color="k", ls=":", lw=1, label="chance")
    if not per_round.empty:
        ax.set_xticks(sorted(per_round["server_round"].unique()))
    ax.set(xlabel="server round of the attacked upload", ylabel=_metric_label(metric))
    ax.legend(fontsize="small")
    return ax


def plot_attack_summary(results: pd.DataFrame, *, metric: str = "auc", y: str = "target", hue: str = "attack",
                        ax: Axes | None = None) -> Axes:
    """Forest plot: every (``y``, ``hue``) estimate with its confidence interval, against chance.

    Parameters
    ----------
    results : pandas.DataFrame
        Tidy results (``metric``, ``value``, ``ci_low``, ``ci_high``, ``y``, ``hue``) with one row
        per (``y``, ``hue``) for ``metric``.
    metric : str, default "auc"
    y : str, default "target"
        One row of the plot per value, in order of appearance.
    hue : str, default "attack"
    ax : Axes, optional

    Returns
    -------
    Axes
    """
    data = _one_metric(results, metric, [y, hue], "plot_attack_summary")
    if data.duplicated([y, hue]).any():
        raise ValueError(f"plot_attack_summary: several rows per ({y}, {hue}) for {metric!r}; filter the table first")
    rows = list(dict.fromkeys(data[y]))
    colors = attack_colors(data[hue])
    names = list(colors)
    ax = _ax(ax, (7, 0.45 * len(rows) * max(len(names), 1) ** 0.5 + 1.5))
    offsets = np.linspace(-0.3, 0.3, len(names)) if len(names) > 1 else np.zeros(1)
    for i, name in enumerate(names):
        g = data[data[hue] == name]
        pos = np.array([rows.index(v) for v in g[y]]) + offsets[i]
        value, low, high = (g[c].to_numpy(dtype=float) for c in ("value", "ci_low", "ci_high"))
        ax.errorbar(value, pos, xerr=[value - low, high - value], fmt="o",
                    color=colors[name], capsize=2, ms=4, label=name)
    ax.axvline(chance_level(metric), color="k", ls=":", lw=1, label="chance")
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    if not ax.yaxis_inverted():  # axes sharing y are inverted once
        ax.invert_yaxis()
    ax.set(xlabel=f"{_metric_label(metric)} (95 % bootstrap CI)")
    ax.legend(fontsize="small", loc="best")
    sns.despine(ax=ax)
    return ax
