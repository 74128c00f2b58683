"""Figures. Each function takes a tidy DataFrame (or arrays) and an optional ``ax``, returns the Axes,
and never calls ``show()``."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes

__all__ = ["plot_age_by_site", "plot_volume_vs_age", "plot_gap_distribution", "plot_intensity_by_site",
           "plot_slices", "save_figure", "plot_learning_curves", "plot_metric_vs_sparsity", "plot_predicted_vs_true",
           "plot_layer_sparsity", "plot_weight_histograms"]


def _ax(ax: Axes | None, figsize: tuple[float, float] = (6, 4)) -> Axes:
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_age_by_site(participants: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Age distribution of each site (violin + points): who each site recruited."""
    ax = _ax(ax)
    order = sorted(participants["site"].unique(), key=str)
    sns.violinplot(data=participants, x="site", y="age", order=order, inner=None, cut=0, color="0.85", ax=ax)
    sns.stripplot(data=participants, x="site", y="age", order=order, hue="sex" if "sex" in participants else None,
                  size=3, alpha=0.7, ax=ax)
    ax.set(xlabel="site", ylabel="age (years)", title="Ages by site")
    return ax


def plot_volume_vs_age(truth: pd.DataFrame, column: str, *, age_column: str = "age", ax: Axes | None = None) -> Axes:
    """Scatter of one tissue volume (ml) against age, coloured by site, with a linear fit."""
    ax = _ax(ax)
    sns.regplot(data=truth, x=age_column, y=column, scatter=False, color="k", ax=ax)
    sns.scatterplot(data=truth, x=age_column, y=column, hue="site" if "site" in truth else None, s=14, ax=ax)
    ax.set(xlabel=f"{age_column.replace('_', ' ')} (years)", ylabel=column.replace("_ml", " (ml)").replace("_", " "))
    return ax


def plot_gap_distribution(truth: pd.DataFrame, *, sigma_gap: float, ax: Axes | None = None) -> Axes:
    """Histogram of the brain-age gap with the N(0, sigma_gap) density it was drawn from."""
    ax = _ax(ax)
    gap = truth["brain_age_gap"].to_numpy(dtype=float)
    sns.histplot(gap, stat="density", bins=30, color="C0", alpha=0.5, ax=ax)
    x = np.linspace(gap.min() - 1, gap.max() + 1, 200)
    if sigma_gap > 0:
        ax.plot(x, np.exp(-0.5 * (x / sigma_gap) ** 2) / (sigma_gap * math.sqrt(2 * math.pi)), "k-",
                label=f"N(0, {sigma_gap:g}²)")
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set(xlabel="brain-age gap = biological - chronological age (years)", ylabel="density")
    if sigma_gap > 0:
        ax.legend()
    return ax


def plot_intensity_by_site(frame: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Intensity distributions by site from a tidy frame (site, intensity)."""
    ax = _ax(ax)
    sns.kdeplot(data=frame, x="intensity", hue="site", common_norm=False, ax=ax)
    ax.set(xlabel="voxel intensity (scanner units)", ylabel="density", title="Scanner differences")
    return ax


def plot_slices(volume: np.ndarray, *, title: str = "", axes: np.ndarray | None = None,
                cmap: str = "gray") -> np.ndarray:
    """Three orthogonal mid-slices (sagittal, coronal, axial) of a RAS volume; returns the 3 Axes."""
    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(9, 3))
    v = np.asarray(volume)
    cx, cy, cz = (n // 2 for n in v.shape)
    vmax = np.percentile(v[v > 0], 99.5) if (v > 0).any() else 1.0
    for ax, img, name in zip(axes, (v[cx].T, v[:, cy].T, v[:, :, cz].T), ("sagittal", "coronal", "axial")):
        ax.imshow(img, origin="lower", cmap=cmap, vmin=0, vmax=vmax)
        ax.set_axis_off()
        ax.set_title(f"{title} {name}".strip(), fontsize=9)
    return axes


def save_figure(fig: plt.Figure, path: str | os.PathLike) -> None:
    """Save a figure atomically (PNG, 120 dpi), creating the folder."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_learning_curves(history: pd.DataFrame, *, metric: str = "mae", ax: Axes | None = None,
                         hue: str = "model", floor: float | None = None) -> Axes:
    """Test ``metric`` per epoch for each model (tidy history with columns epoch, split, metric, value, ``hue``)."""
    ax = _ax(ax)
    data = history[(history["split"] == "test") & (history["metric"] == metric)]
    sns.lineplot(data=data, x="epoch", y="value", hue=hue, marker="o", ax=ax)
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", label="floor (best achievable)")
        ax.legend()
    ax.set(xlabel="epoch", ylabel=f"test {metric.upper()} (years)" if metric in ("mae", "rmse") else metric)
    return ax


def plot_metric_vs_sparsity(summary: pd.DataFrame, *, metric: str = "mae", ax: Axes | None = None,
                            references: dict[str, float] | None = None) -> Axes:
    """Final test ``metric`` against sparsity (tidy summary with columns sparsity, ``metric``), with reference lines."""
    ax = _ax(ax)
    ax.plot(summary["sparsity"], summary[metric], "o-", color="C0", label="3D-CNN")
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{i + 1}", ls="--" if i else ":", label=name)
    ax.set(xlabel="sparsity (fraction of zeroed weights)", ylabel=f"test {metric.upper()} (years)")
    ax.legend()
    return ax


def plot_predicted_vs_true(predictions: pd.DataFrame, *, hue: str | None = None, ax: Axes | None = None) -> Axes:
    """Predicted against true age (columns age, predicted), with the identity line."""
    ax = _ax(ax, figsize=(4.5, 4.5))
    sns.scatterplot(data=predictions, x="age", y="predicted", hue=hue, s=18, alpha=0.8, ax=ax)
    lo = float(min(predictions["age"].min(), predictions["predicted"].min()))
    hi = float(max(predictions["age"].max(), predictions["predicted"].max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="age (years)", ylabel="predicted age (years)")
    return ax


def plot_layer_sparsity(layer_sparsity: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Heatmap of per-tensor sparsity over epochs (tidy: epoch, name, sparsity)."""
    ax = _ax(ax, figsize=(8, 4))
    table = layer_sparsity.pivot(index="name", columns="epoch", values="sparsity")
    table = table.loc[list(dict.fromkeys(layer_sparsity["name"]))]
    sns.heatmap(table, vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "sparsity"})
    ax.set(xlabel="epoch", ylabel="")
    return ax


def plot_weight_histograms(weights: dict[str, np.ndarray], *, ax: Axes | None = None) -> Axes:
    """Histograms of |w| (log scale) of the non-zero weights of several models ({label: flat weights})."""
    ax = _ax(ax)
    for label, w in weights.items():
        w = np.abs(np.asarray(w, dtype=np.float64))
        w = w[w > 0]
        if w.size:
            ax.hist(np.log10(w), bins=80, histtype="step", density=True, label=f"{label} ({w.size:,} non-zero)")
    ax.set(xlabel="log10 |w| of the non-zero weights", ylabel="density")
    ax.legend(fontsize=8)
    return ax


# --------------------------------------------------------------------------------------------
# Federated runs (notebook 03): tidy frames from fedsparse_lib.federated.simulation
# --------------------------------------------------------------------------------------------
__all__ += ["plot_client_sizes", "plot_client_ages", "plot_rounds", "plot_sparsity", "plot_cumulative_bytes",
            "plot_mae_vs_bytes", "plot_client_mae", "plot_jaccard", "plot_vote_histogram", "method_palette"]

#: Methods in a fixed order, so that a method has the same colour in every figure.
_METHOD_ORDER = ("fedavg", "fedprox", "fedsparsify_global", "fedsparsify_local", "omp", "random", "snip", "grasp",
                 "prunefl")
_METRIC_LABELS = {"mae": "test MAE (years)", "rmse": "test RMSE (years)", "r": "test correlation r",
                  "mean_gap": "mean predicted - true age (years)", "sparsity": "sparsity (fraction of zeroed weights)"}


def method_palette(values: Iterable[object]) -> dict[str, tuple[float, float, float]]:
    """A colour per method (or any label): known methods keep their colour whatever else is shown.

    Parameters
    ----------
    values : iterable
        Labels to colour (converted to str; duplicates ignored).

    Returns
    -------
    dict of str to RGB tuple
        The methods of :data:`~fedsparse_lib.federated.strategies.METHODS` take fixed colours of
        the ``tab10`` palette; other labels take the following colours, in order of appearance.
    """
    colors = sns.color_palette("tab10", 20)
    labels = list(dict.fromkeys(str(v) for v in values))
    others = [v for v in labels if v not in _METHOD_ORDER]
    return {v: colors[(_METHOD_ORDER.index(v) if v in _METHOD_ORDER else len(_METHOD_ORDER) + others.index(v))
                      % len(colors)] for v in labels}


def _hue_order(values: Iterable[object]) -> list[str]:
    labels = list(dict.fromkeys(str(v) for v in values))
    return sorted(labels, key=lambda v: (_METHOD_ORDER.index(v) if v in _METHOD_ORDER else len(_METHOD_ORDER),
                                         labels.index(v)))


def _require(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; got {list(frame.columns)}")


def _integer_rounds(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _one_row_per_round(rounds: pd.DataFrame, hue: str, what: str) -> pd.DataFrame:
    _require(rounds, ["server_round", hue], what)
    dup = rounds.duplicated(["server_round", hue])
    if dup.any():
        raise ValueError(f"{what}: several rows per ({hue}, server_round), e.g. {rounds.loc[dup, hue].iloc[0]!r} "
                         f"round {rounds.loc[dup, 'server_round'].iloc[0]}; select one run per {hue} first "
                         "(e.g. one environment)")
    return rounds.sort_values([hue, "server_round"])


def plot_client_sizes(assignment: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Participants per client, stacked by site: how big each client is and whom it recruited.

    Parameters
    ----------
    assignment : pandas.DataFrame
        One row per participant with ``client_id`` and, optionally, ``site``.
    ax : Axes, optional

    Returns
    -------
    Axes
        One bar segment per (client, site) with participants.
    """
    _require(assignment, ["client_id"], "plot_client_sizes")
    ax = _ax(ax)
    site = assignment["site"].astype(str) if "site" in assignment else pd.Series("all", index=assignment.index)
    table = pd.crosstab(assignment["client_id"], site).sort_index()
    bottom = np.zeros(len(table))
    x = np.arange(len(table))
    for i, name in enumerate(table.columns):
        counts = table[name].to_numpy()
        ax.bar(x[counts > 0], counts[counts > 0], bottom=bottom[counts > 0], color=f"C{i % 10}", label=name)
        bottom += counts
    ax.set_xticks(x, [str(c) for c in table.index])
    ax.set(xlabel="client", ylabel="participants")
    if "site" in assignment:
        ax.legend(title="site", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def plot_client_ages(assignment: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Age distribution of each client (violin + points): how non-IID the federation is.

    Parameters
    ----------
    assignment : pandas.DataFrame
        One row per participant with ``client_id`` and ``age`` (years).
    ax : Axes, optional

    Returns
    -------
    Axes
        One violin per client, one point per participant, a dotted line at the overall mean age.
    """
    _require(assignment, ["client_id", "age"], "plot_client_ages")
    ax = _ax(ax)
    data = assignment.assign(client=assignment["client_id"].astype(str))
    order = [str(c) for c in sorted(assignment["client_id"].unique())]
    sns.violinplot(data=data, x="client", y="age", order=order, inner=None, cut=0, color="0.85", ax=ax)
    sns.stripplot(data=data, x="client", y="age", order=order, size=2.5, color="C0", alpha=0.6, ax=ax)
    ax.axhline(float(assignment["age"].mean()), color="k", ls=":", lw=1)
    ax.set(xlabel="client", ylabel="age (years)")
    return ax


def plot_rounds(rounds: pd.DataFrame, *, metric: str = "mae", hue: str = "method", ax: Axes | None = None,
                references: dict[str, float] | None = None) -> Axes:
    """A metric of the global model after every round, one line per ``hue`` value.

    Parameters
    ----------
    rounds : pandas.DataFrame
        Tidy rounds table (``FederatedResult.rounds`` with a ``hue`` column): one row per
        (``hue``, ``server_round``); round 0 is the initial model.
    metric : str, default "mae"
        Column to plot (``mae``, ``rmse``, ``r``, ``sparsity``, ``train_seconds``...).
    hue : str, default "method"
    ax : Axes, optional
    references : dict of str to float, optional
        Horizontal reference lines (e.g. ``{"floor": 2.4}``).

    Returns
    -------
    Axes
        One line per ``hue`` value (then one per reference).
    """
    data = _one_row_per_round(rounds, hue, "plot_rounds")
    _require(data, [metric], "plot_rounds")
    ax = _ax(ax)
    order = _hue_order(data[hue])
    palette = method_palette(order)
    for name in order:
        g = data[data[hue].astype(str) == name]
        ax.plot(g["server_round"], g[metric], marker="o", ms=3, color=palette[name], label=name)
    for i, (name, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="k", ls=(":", "--", "-.")[i % 3], lw=1, label=name)
    ax.set(xlabel="round", ylabel=_METRIC_LABELS.get(metric, metric.replace("_", " ")))
    _integer_rounds(ax)
    ax.legend(fontsize=8)
    return ax


def plot_sparsity(rounds: pd.DataFrame, *, hue: str = "method", ax: Axes | None = None) -> Axes:
    """Sparsity of the global model per round, with the schedule's target and the majority vote.

    Solid lines: the global model's sparsity; dotted: the schedule's ``target_sparsity``; crosses:
    ``vote_sparsity`` (FedSparsify-Local: the sparsity the majority vote alone produced, before any
    re-prune to the target), where present.

    Parameters
    ----------
    rounds : pandas.DataFrame
        server_round, sparsity, ``hue``; optionally target_sparsity and vote_sparsity.
    hue : str, default "method"
    ax : Axes, optional

    Returns
    -------
    Axes
    """
    data = _one_row_per_round(rounds, hue, "plot_sparsity")
    _require(data, ["sparsity"], "plot_sparsity")
    ax = _ax(ax)
    order = _hue_order(data[hue])
    palette = method_palette(order)
    for name in order:
        g = data[data[hue].astype(str) == name]
        ax.plot(g["server_round"], g["sparsity"], marker="o", ms=3, color=palette[name], label=name)
        if "target_sparsity" in g and (g["target_sparsity"] > 0).any():
            ax.plot(g["server_round"], g["target_sparsity"], ls=":", color=palette[name], lw=1)
        if "vote_sparsity" in g and g["vote_sparsity"].notna().any():
            v = g[g["vote_sparsity"].notna()]
            ax.plot(v["server_round"], v["vote_sparsity"], ls="none", marker="x", color=palette[name],
                    label=f"{name}: after the vote")
    ax.set(xlabel="round", ylabel=_METRIC_LABELS["sparsity"], ylim=(-0.02, 1.02))
    _integer_rounds(ax)
    ax.legend(fontsize=8)
    return ax


def _cumulative_mb(g: pd.DataFrame, prefix: str = "") -> np.ndarray:
    per_round = g[f"{prefix}bytes_down"].to_numpy(dtype=float) + g[f"{prefix}bytes_up"].to_numpy(dtype=float)
    return np.cumsum(per_round) / 1e6


def plot_cumulative_bytes(rounds: pd.DataFrame, *, hue: str = "method", paper: bool = True, log: bool = False,
                          ax: Axes | None = None) -> Axes:
    """Communication so far: cumulative bytes sent and received (all clients) per round.

    Solid lines count the real encoded messages (``bytes_down + bytes_up``); dashed lines, with
    ``paper=True``, the original paper's formula (``paper_bytes_*``: 4 bytes per non-zero value,
    no mask or header cost).

    Parameters
    ----------
    rounds : pandas.DataFrame
        server_round, bytes_down, bytes_up, ``hue`` (and paper_bytes_down, paper_bytes_up).
    hue : str, default "method"
    paper : bool, default True
    log : bool, default False
        Logarithmic y axis.
    ax : Axes, optional

    Returns
    -------
    Axes
        One solid line per ``hue`` value (then one dashed line per value with ``paper``); y in MB
        (10^6 bytes).
    """
    data = _one_row_per_round(rounds, hue, "plot_cumulative_bytes")
    _require(data, ["bytes_down", "bytes_up"] + (["paper_bytes_down", "paper_bytes_up"] if paper else []),
             "plot_cumulative_bytes")
    ax = _ax(ax)
    order = _hue_order(data[hue])
    palette = method_palette(order)
    for name in order:
        g = data[data[hue].astype(str) == name]
        ax.plot(g["server_round"], _cumulative_mb(g), marker="o", ms=3, color=palette[name], label=name)
    if paper:
        for name in order:
            g = data[data[hue].astype(str) == name]
            ax.plot(g["server_round"], _cumulative_mb(g, "paper_"), ls="--", lw=1, color=palette[name],
                    label=f"{name} (paper's formula)")
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="cumulative communication (MB)")
    _integer_rounds(ax)
    ax.legend(fontsize=7)
    return ax


def plot_mae_vs_bytes(rounds: pd.DataFrame, *, hue: str = "method", metric: str = "mae",
                      ax: Axes | None = None) -> Axes:
    """Accuracy against communication so far (a Pareto view): lower-left is better.

    Each point is the global model after one round, at the cumulative real bytes exchanged up to
    then; the final model of each run is circled.

    Parameters
    ----------
    rounds : pandas.DataFrame
        server_round, bytes_down, bytes_up, ``metric``, ``hue``.
    hue : str, default "method"
    metric : str, default "mae"
    ax : Axes, optional

    Returns
    -------
    Axes
        One line per ``hue`` value (round 0, with no bytes, is left out); logarithmic x axis.
    """
    data = _one_row_per_round(rounds, hue, "plot_mae_vs_bytes")
    _require(data, ["bytes_down", "bytes_up", metric], "plot_mae_vs_bytes")
    ax = _ax(ax)
    order = _hue_order(data[hue])
    palette = method_palette(order)
    for name in order:
        g = data[data[hue].astype(str) == name]
        mb = _cumulative_mb(g)
        keep = mb > 0
        x, y = mb[keep], g[metric].to_numpy()[keep]
        ax.plot(x, y, marker="o", ms=3, color=palette[name], label=name)
        if len(x):
            ax.scatter(x[-1:], y[-1:], s=90, facecolors="none", edgecolors=palette[name], linewidths=1.5)
    ax.set_xscale("log")
    ax.set(xlabel="cumulative communication (MB, log scale)", ylabel=_METRIC_LABELS.get(metric, metric))
    ax.legend(fontsize=8)
    return ax


def plot_client_mae(client_mae: pd.DataFrame, *, hue: str = "method", ax: Axes | None = None) -> Axes:
    """MAE of the final global model on each client's own data: who pays for heterogeneity.

    Parameters
    ----------
    client_mae : pandas.DataFrame
        client_id, mae, ``hue``; num_examples and mean_age, when present, label the clients.
    hue : str, default "method"
    ax : Axes, optional

    Returns
    -------
    Axes
        One bar per (client, ``hue`` value); tick labels ``client (n, mean age)``.
    """
    _require(client_mae, ["client_id", "mae", hue], "plot_client_mae")
    if client_mae.duplicated(["client_id", hue]).any():
        raise ValueError(f"plot_client_mae: several rows per (client_id, {hue}); select one run per {hue} first")
    ax = _ax(ax, figsize=(8, 4))
    order = _hue_order(client_mae[hue])
    palette = method_palette(order)
    clients = sorted(client_mae["client_id"].unique())
    x = np.arange(len(clients))
    width = 0.8 / len(order)
    for i, name in enumerate(order):
        g = client_mae[client_mae[hue].astype(str) == name].set_index("client_id").reindex(clients)
        ax.bar(x - 0.4 + (i + 0.5) * width, g["mae"].to_numpy(), width=width, color=palette[name], label=name)
    first = client_mae.drop_duplicates("client_id").set_index("client_id").reindex(clients)
    labels = [str(c) for c in clients]
    if {"num_examples", "mean_age"} <= set(client_mae.columns):
        labels = [f"{c}\nn={int(n)}\n{a:.0f} y" for c, n, a in zip(clients, first["num_examples"], first["mean_age"])]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(xlabel="client (participants, mean age)", ylabel="MAE on the client's data (years)")
    ax.legend(fontsize=8)
    return ax


def _at_round(frame: pd.DataFrame, server_round: int | None, what: str) -> tuple[pd.DataFrame, int]:
    _require(frame, ["server_round"], what)
    if frame.empty:
        raise ValueError(f"{what}: the table is empty (no round in which clients sent their own masks)")
    rnd = int(frame["server_round"].max()) if server_round is None else int(server_round)
    data = frame[frame["server_round"] == rnd]
    if data.empty:
        raise ValueError(f"{what}: no rows for round {rnd}; rounds available: "
                         f"{sorted(frame['server_round'].unique().tolist())}")
    return data, rnd


def plot_jaccard(agreement: pd.DataFrame, *, server_round: int | None = None, ax: Axes | None = None) -> Axes:
    """Pairwise Jaccard index of the clients' masks in one round (FedSparsify-Local).

    Parameters
    ----------
    agreement : pandas.DataFrame
        server_round, client_a, client_b, jaccard (``FederatedResult.agreement``).
    server_round : int, optional
        Round to show; default the last one in the table.
    ax : Axes, optional

    Returns
    -------
    Axes
        A clients x clients heatmap, values in [0, 1].
    """
    data, rnd = _at_round(agreement, server_round, "plot_jaccard")
    _require(data, ["client_a", "client_b", "jaccard"], "plot_jaccard")
    ax = _ax(ax, figsize=(5, 4))
    table = data.pivot(index="client_a", columns="client_b", values="jaccard").sort_index().sort_index(axis=1)
    sns.heatmap(table, vmin=0, vmax=1, cmap="viridis", annot=len(table) <= 10, fmt=".2f", annot_kws={"fontsize": 7},
                square=True, ax=ax, cbar_kws={"label": "Jaccard index of kept weights"})
    ax.set(xlabel="client", ylabel="client", title=f"mask agreement, round {rnd}")
    return ax


def plot_vote_histogram(votes: pd.DataFrame, *, server_round: int | None = None, threshold: int | None = None,
                        log: bool = True, ax: Axes | None = None) -> Axes:
    """How many clients kept each weight, in one round (FedSparsify-Local's majority vote).

    Parameters
    ----------
    votes : pandas.DataFrame
        server_round, votes (0..K), count (weights kept by exactly that many clients).
    server_round : int, optional
        Round to show; default the last one in the table.
    threshold : int, optional
        Votes needed to keep a weight; default ``max(1, floor(K/2))`` (ties kept), K the largest
        number of votes in the table.
    log : bool, default True
        Logarithmic y axis (at high sparsity most weights get 0 votes and would hide the rest).
    ax : Axes, optional

    Returns
    -------
    Axes
        One bar per number of votes (0..K), as a percentage of all weights; bars at or above the
        threshold (kept by the vote) in colour, the others grey.
    """
    data, rnd = _at_round(votes, server_round, "plot_vote_histogram")
    _require(data, ["votes", "count"], "plot_vote_histogram")
    data = data.sort_values("votes")
    k = int(data["votes"].max())
    thr = max(1, k // 2) if threshold is None else int(threshold)
    ax = _ax(ax)
    pct = 100.0 * data["count"].to_numpy(dtype=float) / max(float(data["count"].sum()), 1.0)
    kept = data["votes"].to_numpy() >= thr
    ax.bar(data["votes"], pct, color=np.where(kept, "C0", "0.7").tolist())
    ax.axvline(thr - 0.5, color="k", ls="--", lw=1, label=f"kept: {thr} or more votes")
    ax.set_xticks(data["votes"].tolist())
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=f"clients keeping the weight (of {k})", ylabel="weights (%)" + (", log scale" if log else ""),
           title=f"majority vote, round {rnd}")
    ax.legend(fontsize=8)
    return ax
