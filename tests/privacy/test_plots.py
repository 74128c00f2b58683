"""Privacy figures: what each draws, chance levels, the ``ax`` contract, and never ``show()``."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from fedsparse_lib.privacy import plots  # noqa: E402
from fedsparse_lib.privacy.experiment import roc_table  # noqa: E402
from fedsparse_lib.privacy.metrics import results_table  # noqa: E402


@pytest.fixture(autouse=True)
def no_show_and_close(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("plotting must never call plt.show()")

    monkeypatch.setattr(plt, "show", forbidden)
    monkeypatch.setattr(plt.Figure, "show", forbidden)
    yield
    plt.close("all")


def row(target="dense", sparsity=0.0, environment="centralized", threat_model="outsider", attack="loss_threshold",
        metric="auc", value=0.6, ci_low=0.5, ci_high=0.7) -> dict:
    return dict(target=target, sparsity=sparsity, environment=environment, threat_model=threat_model, attack=attack,
                metric=metric, value=value, ci_low=ci_low, ci_high=ci_high)


def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


@pytest.mark.parametrize("metric, chance", [("auc", 0.5), ("balanced_accuracy", 0.5), ("advantage", 0.0),
                                            ("tpr_at_fpr_0.01", 0.01), ("tpr_at_fpr_0.001", 0.001)])
def test_chance_level(metric, chance):
    assert plots.chance_level(metric) == chance


def test_chance_level_rejects_an_unknown_metric():
    with pytest.raises(ValueError, match="unknown metric 'mae'"):
        plots.chance_level("mae")


def test_plot_residuals_draws_one_distribution_per_group_on_the_given_ax(rng):
    # Prepare: members fitted twice as well as non-members
    frame = pd.DataFrame({"residual": np.r_[rng.normal(0, 1, 50), rng.normal(0, 2, 50)],
                          "membership": ["member"] * 50 + ["non-member"] * 50})
    _, ax = plt.subplots()
    # Execute
    out = plots.plot_residuals(frame, ax=ax)
    # Assert
    assert out is ax
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(labels) == 2 and labels[0].startswith("member (n = 50") and labels[1].startswith("non-member (n = 50")
    means = [float(lbl.split("mean |residual| ")[1].split(" ")[0]) for lbl in labels]
    assert means[0] < means[1]


def test_plot_roc_clips_log_axes_at_one_non_member():
    # Prepare: 4 non-members, so the smallest measurable FPR is 1/4
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    roc = roc_table({"good": np.arange(8.0)[::-1], "bad": np.arange(8.0)}, labels)
    # Execute
    ax = plots.plot_roc(roc)
    # Assert
    assert ax.get_xscale() == "log" and ax.get_xlim()[0] == pytest.approx(0.25)
    assert line_labels(ax) == ["bad", "good", "chance"]  # names that are not attacks: alphabetically
    good = ax.get_lines()[1]
    assert np.min(good.get_xdata()) == pytest.approx(0.25)  # FPR 0 drawn at the floor
    assert np.max(good.get_ydata()) == 1.0


def test_plot_roc_linear():
    roc = roc_table({"loss_threshold": np.array([2.0, 1.0, 0.0])}, np.array([1, 0, 0]))
    ax = plots.plot_roc(roc.drop(columns="n_non_members"), log=False)
    assert ax.get_xscale() == "linear" and ax.get_xlim() == (0, 1)


def test_plot_attack_vs_sparsity_draws_bands_and_chance():
    # Prepare: two attacks x two environments x two sparsities, plus another metric to ignore
    results = results_table([row(sparsity=s, environment=e, attack=a, value=0.5 + s / 10)
                             for s in (0.0, 0.95) for e in ("centralized", "federated_iid")
                             for a in ("lira_online", "loss_threshold")] + [row(metric="advantage")])
    # Execute
    ax = plots.plot_attack_vs_sparsity(results)
    # Assert: attacks in the package order, one line per (attack, environment), dashed federated
    labels = line_labels(ax)
    assert labels == ["loss_threshold, centralized", "loss_threshold, federated_iid", "lira_online, centralized",
                      "lira_online, federated_iid", "chance"]
    assert ax.get_lines()[1].get_linestyle() == "--"
    assert ax.get_lines()[-1].get_ydata()[0] == 0.5
    assert len(ax.collections) == 4  # one CI band per line
    assert ax.get_ylabel() == "ROC AUC"


def test_plot_attack_vs_sparsity_tpr_at_low_fpr_chance_is_the_fpr():
    results = results_table([row(metric="tpr_at_fpr_0.01", value=0.02, ci_low=0.0, ci_high=0.05, sparsity=s)
                             for s in (0.0, 0.5)])
    ax = plots.plot_attack_vs_sparsity(results, metric="tpr_at_fpr_0.01", style=None)
    assert ax.get_lines()[-1].get_ydata()[0] == 0.01
    assert ax.get_ylabel() == "TPR at 1.0% FPR"


def test_plot_attack_vs_sparsity_rejects_a_missing_metric():
    with pytest.raises(ValueError, match="no rows with metric 'advantage'"):
        plots.plot_attack_vs_sparsity(results_table([row()]), metric="advantage")


def test_plot_attack_vs_round_draws_rounds_and_their_mean():
    # Prepare
    results = results_table([row(threat_model=f"server_round_{t}", value=0.5 + t / 100) for t in (1, 5, 10)]
                            + [row(threat_model="server_rounds_mean", value=0.58), row(threat_model="outsider")])
    # Execute
    ax = plots.plot_attack_vs_round(results)
    # Assert
    per_round = ax.get_lines()[0]
    np.testing.assert_array_equal(per_round.get_xdata(), [1, 5, 10])
    np.testing.assert_allclose(per_round.get_ydata(), [0.51, 0.55, 0.60])
    assert line_labels(ax) == ["loss_threshold, round t", "loss_threshold, mean over rounds", "chance"]
    assert ax.get_lines()[1].get_ydata()[0] == 0.58
    assert [t for t in ax.get_xticks()] == [1, 5, 10]


def test_plot_attack_vs_round_needs_server_rows():
    with pytest.raises(ValueError, match="no server_round_<t> or server_rounds_mean rows"):
        plots.plot_attack_vs_round(results_table([row()]))


def test_plot_attack_summary_one_errorbar_per_attack_and_rows_per_target():
    # Prepare
    results = results_table([row(target=t, attack=a, value=v, ci_low=v - 0.1, ci_high=v + 0.1)
                             for t, v in (("dense", 0.55), ("95% sparse", 0.52), ("overfitted", 0.9))
                             for a in ("loss_threshold", "black_box_logistic")])
    # Execute
    ax = plots.plot_attack_summary(results)
    # Assert
    assert [t.get_text() for t in ax.get_yticklabels()] == ["dense", "95% sparse", "overfitted"]
    assert len(ax.containers) == 2  # one errorbar container per attack
    points = ax.containers[0].lines[0]
    np.testing.assert_allclose(points.get_xdata(), [0.55, 0.52, 0.9])


def test_plot_attack_summary_rejects_duplicates():
    results = results_table([row(), row(threat_model="server_round_1")])
    with pytest.raises(ValueError, match="several rows per"):
        plots.plot_attack_summary(results)


def test_plot_functions_create_an_axes_when_none_is_given():
    results = results_table([row(), row(sparsity=0.9)])
    assert plots.plot_attack_vs_sparsity(results).figure is not None
    assert plots.plot_attack_summary(results.iloc[:1]).figure is not None


def test_plot_attack_summary_on_axes_sharing_y_keeps_the_first_row_on_top():
    results = results_table([row(target=t) for t in ("first", "second")])
    _, axes = plt.subplots(1, 2, sharey=True)
    plots.plot_attack_summary(results, ax=axes[0])
    plots.plot_attack_summary(results, ax=axes[1])
    assert axes[0].yaxis_inverted() and axes[1].yaxis_inverted()


def test_attack_colors_are_fixed_per_attack_whatever_else_is_drawn():
    alone = plots.attack_colors(["lira_online"])
    together = plots.attack_colors(["loss_threshold", "lira_online", "black_box_logistic"])
    assert alone["lira_online"] == together["lira_online"] == "C3"
    assert list(together) == ["loss_threshold", "black_box_logistic", "lira_online"]
    others = plots.attack_colors(["x", "y"])
    assert others["x"] != others["y"]


def test_plot_attack_vs_sparsity_colours_an_attack_the_same_in_every_panel():
    results = results_table([row(attack=a, sparsity=s) for a in ("loss_threshold", "lira_online") for s in (0.0, 0.9)])
    full = plots.plot_attack_vs_sparsity(results, style=None)
    part = plots.plot_attack_vs_sparsity(results[results["attack"] == "lira_online"], style=None)
    assert full.get_lines()[1].get_color() == part.get_lines()[0].get_color()
