"""Figures. Each function takes a tidy DataFrame (or arrays) and an optional ``ax``, returns the Axes,
and never calls ``show()``."""

from __future__ import annotations

import math
import os
import tempfile
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
