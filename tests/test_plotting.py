"""Tests of fedsparse_lib.plotting: what each figure draws, the ``ax`` contract, atomic saving.

Every test runs with the Agg backend, with ``plt.show`` replaced by a function that raises, and
closes its figures afterwards.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from fedsparse_lib import plotting  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_show_and_close(monkeypatch):
    """Fail on any show(); close every figure after the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("plotting must never call plt.show()")

    monkeypatch.setattr(plt, "show", forbidden)
    monkeypatch.setattr(plt.Figure, "show", forbidden)
    yield
    plt.close("all")


@pytest.fixture
def truth(rng) -> pd.DataFrame:
    """11 subjects on 3 sites with ages, biological ages, gaps and a grey-matter volume."""
    n = 11
    age = rng.uniform(45.0, 82.0, n)
    gap = rng.normal(0.0, 3.0, n)
    return pd.DataFrame({
        "participant_id": [f"sub-{i + 1:04d}" for i in range(n)],
        "age": age,
        "sex": ["F", "M"] * 5 + ["F"],
        "site": ["site1", "site2", "site3", "site1", "site2", "site1", "site3", "site1", "site2", "site1", "site1"],
        "biological_age": age + gap,
        "brain_age_gap": gap,
        "gm_ml": 800.0 - 2.0 * (age + gap) + rng.normal(0.0, 5.0, n),
    })


def points(ax) -> np.ndarray:
    """All scatter points of an Axes, (n, 2)."""
    offsets = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    return np.concatenate(offsets) if offsets else np.empty((0, 2))


def sorted_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return a[np.lexsort(a.T[::-1])]


# --------------------------------------------------------------------------------------------
# plot_age_by_site
# --------------------------------------------------------------------------------------------
def test_age_by_site_draws_one_point_per_subject_on_labelled_axes(truth):
    # Execute
    ax = plotting.plot_age_by_site(truth)
    # Assert
    drawn = points(ax)
    assert len(drawn) == len(truth)
    np.testing.assert_allclose(np.sort(drawn[:, 1]), np.sort(truth["age"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["site1", "site2", "site3"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("site", "age (years)", "Ages by site")
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["F", "M"]


def test_age_by_site_places_points_at_their_site(truth):
    ax = plotting.plot_age_by_site(truth)
    drawn = points(ax)
    site_of_point = np.rint(drawn[:, 0]).astype(int)  # categories at x = 0, 1, 2 (plus jitter)
    assert np.bincount(site_of_point, minlength=3).tolist() == truth["site"].value_counts().sort_index().tolist()


def test_age_by_site_without_sex_has_no_legend(truth):
    ax = plotting.plot_age_by_site(truth.drop(columns="sex"))
    assert len(points(ax)) == len(truth)
    assert ax.get_legend() is None


# --------------------------------------------------------------------------------------------
# plot_volume_vs_age
# --------------------------------------------------------------------------------------------
def test_volume_vs_age_scatters_every_subject_with_a_fit_line(truth):
    # Execute
    ax = plotting.plot_volume_vs_age(truth, "gm_ml", age_column="biological_age")
    # Assert
    np.testing.assert_allclose(sorted_rows(points(ax)), sorted_rows(truth[["biological_age", "gm_ml"]].to_numpy()))
    fits = [line for line in ax.lines if len(line.get_xdata()) > 2]
    assert len(fits) == 1
    x, y = fits[0].get_xdata(), fits[0].get_ydata()
    slope = np.polyfit(truth["biological_age"], truth["gm_ml"], 1)[0]
    assert (y[-1] - y[0]) / (x[-1] - x[0]) == pytest.approx(slope, rel=1e-6)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("biological age (years)", "gm (ml)")
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["site1", "site2", "site3"]


def test_volume_vs_age_defaults_to_chronological_age(truth):
    ax = plotting.plot_volume_vs_age(truth.rename(columns={"gm_ml": "ventricle_ml"}), "ventricle_ml")
    np.testing.assert_allclose(np.sort(points(ax)[:, 0]), np.sort(truth["age"]))
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("age (years)", "ventricle (ml)")


# --------------------------------------------------------------------------------------------
# plot_gap_distribution
# --------------------------------------------------------------------------------------------
def test_gap_distribution_draws_the_normal_density(truth):
    # Execute
    ax = plotting.plot_gap_distribution(truth, sigma_gap=3.0)
    # Assert
    (density,) = [line for line in ax.lines if line.get_label() == "N(0, 3²)"]
    x, y = density.get_xdata(), density.get_ydata()
    np.testing.assert_allclose(y, np.exp(-0.5 * (x / 3.0) ** 2) / (3.0 * math.sqrt(2.0 * math.pi)), rtol=1e-12)
    gap = truth["brain_age_gap"]
    assert (x[0], x[-1]) == pytest.approx((gap.min() - 1.0, gap.max() + 1.0))
    assert len(ax.patches) == 30  # histogram bars
    heights = np.array([p.get_height() for p in ax.patches])
    widths = np.array([p.get_width() for p in ax.patches])
    assert (heights * widths).sum() == pytest.approx(1.0)  # a density
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["N(0, 3²)"]
    assert ax.get_ylabel() == "density" and ax.get_xlabel().startswith("brain-age gap")


def test_gap_distribution_without_spread_has_no_density_line(truth):
    ax = plotting.plot_gap_distribution(truth.assign(brain_age_gap=0.0), sigma_gap=0.0)
    assert [line.get_label() for line in ax.lines if not line.get_label().startswith("_")] == []


def test_gap_distribution_without_spread_does_not_warn(truth, recwarn):
    plotting.plot_gap_distribution(truth.assign(brain_age_gap=0.0), sigma_gap=0.0)
    assert [str(w.message) for w in recwarn] == []


# --------------------------------------------------------------------------------------------
# plot_intensity_by_site
# --------------------------------------------------------------------------------------------
def test_intensity_by_site_draws_one_density_per_site(rng):
    # Prepare
    frame = pd.DataFrame({"site": np.repeat(["b", "a", "c"], 40), "intensity": rng.normal(500.0, 50.0, 120)})
    # Execute
    ax = plotting.plot_intensity_by_site(frame)
    # Assert
    assert len(ax.lines) == 3
    for line in ax.lines:  # each curve is a normalised density (common_norm=False)
        assert np.trapezoid(line.get_ydata(), line.get_xdata()) == pytest.approx(1.0, abs=0.05)
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["a", "b", "c"]
    assert ax.get_xlabel() == "voxel intensity (scanner units)" and ax.get_ylabel() == "density"


# --------------------------------------------------------------------------------------------
# plot_slices
# --------------------------------------------------------------------------------------------
def test_slices_draws_three_orthogonal_mid_slices(rng):
    # Prepare: distinct sizes per axis so each slice's shape tells which plane it is
    volume = rng.uniform(1.0, 100.0, (5, 6, 7))
    # Execute
    axes = plotting.plot_slices(volume, title="sub-0001")
    # Assert
    assert len(axes) == 3
    assert [len(ax.images) for ax in axes] == [1, 1, 1]
    arrays = [ax.images[0].get_array() for ax in axes]
    np.testing.assert_array_equal(arrays[0], volume[2].T)  # sagittal (y, z) -> shown (z, y)
    np.testing.assert_array_equal(arrays[1], volume[:, 3].T)  # coronal
    np.testing.assert_array_equal(arrays[2], volume[:, :, 3].T)  # axial
    assert [ax.get_title() for ax in axes] == ["sub-0001 sagittal", "sub-0001 coronal", "sub-0001 axial"]
    assert all(ax.images[0].origin == "lower" and not ax.axison for ax in axes)
    assert axes[0].images[0].get_clim() == pytest.approx((0.0, np.percentile(volume, 99.5)))


def test_slices_of_an_empty_volume_still_draw(rng):
    axes = plotting.plot_slices(np.zeros((4, 4, 4)))
    assert [ax.get_title() for ax in axes] == ["sagittal", "coronal", "axial"]
    assert axes[0].images[0].get_clim() == (0.0, 1.0)


# --------------------------------------------------------------------------------------------
# the ax contract
# --------------------------------------------------------------------------------------------
PLOTS = {
    "age_by_site": lambda t, ax: plotting.plot_age_by_site(t, ax=ax),
    "volume_vs_age": lambda t, ax: plotting.plot_volume_vs_age(t, "gm_ml", ax=ax),
    "gap_distribution": lambda t, ax: plotting.plot_gap_distribution(t, sigma_gap=3.0, ax=ax),
    "intensity_by_site": lambda t, ax: plotting.plot_intensity_by_site(t.rename(columns={"gm_ml": "intensity"}),
                                                                      ax=ax),
}


@pytest.mark.parametrize("name", list(PLOTS))
def test_plots_draw_on_the_given_ax_and_return_it(truth, name):
    # Prepare
    fig, (left, right) = plt.subplots(1, 2)
    # Execute
    ax = PLOTS[name](truth, right)
    # Assert
    assert ax is right
    assert ax.has_data() and not left.has_data()
    assert plt.get_fignums() == [fig.number]


@pytest.mark.parametrize("name", list(PLOTS))
def test_plots_without_ax_make_one_new_figure(truth, name):
    ax = PLOTS[name](truth, None)
    assert plt.get_fignums() == [ax.figure.number]


def test_slices_draw_on_the_given_axes(rng):
    # Prepare
    fig, axes = plt.subplots(2, 3)
    # Execute
    returned = plotting.plot_slices(rng.uniform(size=(4, 5, 6)), axes=axes[1])
    # Assert
    assert list(returned) == list(axes[1])
    assert [len(ax.images) for ax in axes.ravel()] == [0, 0, 0, 1, 1, 1]
    assert plt.get_fignums() == [fig.number]


# --------------------------------------------------------------------------------------------
# save_figure
# --------------------------------------------------------------------------------------------
def test_save_figure_writes_a_png_creating_the_folder(tmp_path, truth):
    # Prepare
    ax = plotting.plot_age_by_site(truth)
    target = tmp_path / "new" / "deeper" / "ages.png"
    # Execute
    plotting.save_figure(ax.figure, str(target))
    # Assert
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in target.parent.iterdir()] == ["ages.png"]  # no temporary file left


def test_save_figure_replaces_an_existing_file(tmp_path, truth):
    # Prepare
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    # Execute
    plotting.save_figure(plotting.plot_age_by_site(truth).figure, target)
    # Assert
    assert target.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_save_figure_that_fails_leaves_no_partial_file(tmp_path, monkeypatch, truth):
    # Prepare
    fig = plotting.plot_age_by_site(truth).figure
    target = tmp_path / "fig.png"
    target.write_bytes(b"previous")

    def broken_savefig(fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(PNG_MAGIC)  # a partial file
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    # Execute
    with pytest.raises(OSError, match="disk full"):
        plotting.save_figure(fig, target)
    # Assert
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


# --------------------------------------------------------------------------------------------
# Federated runs (notebook 03)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def fed_rounds() -> pd.DataFrame:
    """Rounds 0-3 of two methods, bytes chosen so cumulative sums are easy to check by hand."""
    rows = []
    for method, mb_per_round, sparsity in (("fedsparsify_local", 1.0, [0.0, 0.0, 0.5, 0.9]),
                                           ("fedavg", 4.0, [0.0] * 4)):
        for t in range(4):
            down = 0 if t == 0 else int(mb_per_round * 1e6 / 2)
            rows.append({"method": method, "server_round": t, "mae": 8.0 - t, "sparsity": sparsity[t],
                         "target_sparsity": sparsity[t], "vote_sparsity": 0.4 if method == "fedsparsify_local"
                         and t == 2 else math.nan, "bytes_down": down, "bytes_up": down,
                         "paper_bytes_down": down // 2, "paper_bytes_up": down // 2})
    return pd.DataFrame(rows)


def visible_lines(ax):
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def test_method_palette_gives_a_method_the_same_colour_whatever_else_is_shown():
    alone = plotting.method_palette(["omp"])
    together = plotting.method_palette(["fedavg", "omp", "my_method"])
    assert alone["omp"] == together["omp"]
    assert len(set(together.values())) == 3


def test_plot_rounds_draws_one_line_per_method_in_method_order(fed_rounds):
    # Execute
    ax = plotting.plot_rounds(fed_rounds, references={"floor": 2.0})
    # Assert
    lines = visible_lines(ax)
    assert [line.get_label() for line in lines] == ["fedavg", "fedsparsify_local", "floor"]
    np.testing.assert_array_equal(lines[0].get_xdata(), [0, 1, 2, 3])
    np.testing.assert_array_equal(lines[0].get_ydata(), [8.0, 7.0, 6.0, 5.0])
    assert lines[2].get_ydata()[0] == 2.0
    assert ax.get_ylabel() == "test MAE (years)"


def test_plot_rounds_refuses_several_runs_of_one_method(fed_rounds):
    twice = pd.concat([fed_rounds.assign(environment="iid"), fed_rounds.assign(environment="skewed_noniid")])
    with pytest.raises(ValueError, match="several rows per"):
        plotting.plot_rounds(twice)
    ax = plotting.plot_rounds(twice.query("environment == 'iid'"))  # one environment at a time works
    assert len(visible_lines(ax)) == 2


def test_plot_sparsity_shows_the_vote_only_where_recorded(fed_rounds):
    ax = plotting.plot_sparsity(fed_rounds)
    labels = [line.get_label() for line in visible_lines(ax)]
    assert labels == ["fedavg", "fedsparsify_local", "fedsparsify_local: after the vote"]
    vote = visible_lines(ax)[2]
    assert (list(vote.get_xdata()), list(vote.get_ydata())) == ([2], [0.4])
    targets = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert len(targets) == 1  # fedavg has no schedule


def test_plot_cumulative_bytes_sums_down_and_up_in_megabytes(fed_rounds):
    # Execute
    ax = plotting.plot_cumulative_bytes(fed_rounds)
    # Assert: fedavg sends 4 MB a round (2 down + 2 up), the paper's formula counts half of it
    lines = {line.get_label(): line for line in visible_lines(ax)}
    assert len(lines) == 4
    np.testing.assert_allclose(lines["fedavg"].get_ydata(), [0, 4, 8, 12])
    np.testing.assert_allclose(lines["fedavg (paper's formula)"].get_ydata(), [0, 2, 4, 6])
    np.testing.assert_allclose(lines["fedsparsify_local"].get_ydata(), [0, 1, 2, 3])
    assert len(visible_lines(plotting.plot_cumulative_bytes(fed_rounds, paper=False))) == 2


def test_plot_mae_vs_bytes_pairs_mae_with_bytes_so_far(fed_rounds):
    ax = plotting.plot_mae_vs_bytes(fed_rounds)
    lines = {line.get_label(): line for line in visible_lines(ax)}
    np.testing.assert_allclose(lines["fedavg"].get_xdata(), [4, 8, 12])  # round 0 (no bytes) left out
    np.testing.assert_allclose(lines["fedavg"].get_ydata(), [7, 6, 5])
    assert ax.get_xscale() == "log"
    finals = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(sorted_rows(finals), [[3, 5], [12, 5]])


def test_plot_client_mae_draws_a_bar_per_client_and_method():
    # Prepare
    frame = pd.DataFrame({"method": ["fedavg"] * 3 + ["omp"] * 3, "client_id": [0, 1, 2] * 2,
                          "num_examples": [30, 20, 10] * 2, "mean_age": [60.0, 70.0, 50.0] * 2,
                          "mae": [3.0, 4.0, 5.0, 3.5, 4.5, 9.0]})
    # Execute
    ax = plotting.plot_client_mae(frame)
    # Assert
    heights = [p.get_height() for p in ax.patches]
    assert heights == [3.0, 4.0, 5.0, 3.5, 4.5, 9.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0\nn=30\n60 y", "1\nn=20\n70 y", "2\nn=10\n50 y"]


def test_plot_client_sizes_stacks_sites():
    frame = pd.DataFrame({"client_id": [0, 0, 0, 1, 1], "site": ["a", "b", "b", "b", "b"]})
    ax = plotting.plot_client_sizes(frame)
    bars = sorted((p.get_x() + p.get_width() / 2, p.get_y(), p.get_height()) for p in ax.patches)
    assert bars == [(0.0, 0.0, 1.0), (0.0, 1.0, 2.0), (1.0, 0.0, 2.0)]  # client 1 has no site-a bar


def test_plot_client_ages_draws_every_participant():
    frame = pd.DataFrame({"client_id": [1, 0, 0, 1, 1], "age": [50.0, 60.0, 62.0, 55.0, 80.0]})
    ax = plotting.plot_client_ages(frame)
    assert len(points(ax)) == 5
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]


def test_plot_jaccard_shows_the_requested_round():
    # Prepare: round 2 all agree; round 3 clients 0 and 1 share a third of their weights
    rows = [{"server_round": 2, "client_a": a, "client_b": b, "jaccard": 1.0} for a in (0, 1) for b in (0, 1)]
    rows += [{"server_round": 3, "client_a": a, "client_b": b, "jaccard": 1.0 if a == b else 1 / 3}
             for a in (0, 1) for b in (0, 1)]
    frame = pd.DataFrame(rows)
    # Execute
    last = plotting.plot_jaccard(frame)
    # Assert
    np.testing.assert_allclose(np.asarray(last.collections[0].get_array()).reshape(2, 2), [[1, 1 / 3], [1 / 3, 1]])
    assert last.get_title() == "mask agreement, round 3"
    earlier = plotting.plot_jaccard(frame, server_round=2)
    np.testing.assert_allclose(np.asarray(earlier.collections[0].get_array()), 1.0)
    with pytest.raises(ValueError, match="no rows for round 7"):
        plotting.plot_jaccard(frame, server_round=7)
    with pytest.raises(ValueError, match="empty"):
        plotting.plot_jaccard(frame.iloc[:0])


def test_plot_vote_histogram_colours_what_the_majority_keeps():
    # Prepare: 4 clients, 100 weights; threshold floor(4/2) = 2 votes
    frame = pd.DataFrame({"server_round": 5, "votes": [0, 1, 2, 3, 4], "count": [50, 10, 5, 5, 30]})
    # Execute
    ax = plotting.plot_vote_histogram(frame)
    # Assert
    assert [p.get_height() for p in ax.patches] == pytest.approx([50, 10, 5, 5, 30])
    grey = matplotlib.colors.to_rgba("0.7")
    assert [p.get_facecolor() == grey for p in ax.patches] == [True, True, False, False, False]
    assert ax.get_legend().get_texts()[0].get_text() == "kept: 2 or more votes"
    assert ax.get_yscale() == "log"
    strict = plotting.plot_vote_histogram(frame, threshold=3, log=False)
    assert [p.get_facecolor() == grey for p in strict.patches] == [True, True, True, False, False]
    assert strict.get_yscale() == "linear"


FED_PLOTS = {
    "rounds": lambda r, ax: plotting.plot_rounds(r, ax=ax),
    "sparsity": lambda r, ax: plotting.plot_sparsity(r, ax=ax),
    "cumulative_bytes": lambda r, ax: plotting.plot_cumulative_bytes(r, ax=ax),
    "mae_vs_bytes": lambda r, ax: plotting.plot_mae_vs_bytes(r, ax=ax),
    "client_mae": lambda r, ax: plotting.plot_client_mae(
        r.rename(columns={"server_round": "client_id"}), ax=ax),
    "jaccard": lambda r, ax: plotting.plot_jaccard(pd.DataFrame({"server_round": [1] * 4, "client_a": [0, 0, 1, 1],
                                                                 "client_b": [0, 1, 0, 1], "jaccard": 0.5}), ax=ax),
    "votes": lambda r, ax: plotting.plot_vote_histogram(pd.DataFrame({"server_round": 1, "votes": [0, 1, 2],
                                                                      "count": [3, 2, 1]}), ax=ax),
    "client_sizes": lambda r, ax: plotting.plot_client_sizes(pd.DataFrame({"client_id": [0, 1, 1]}), ax=ax),
    "client_ages": lambda r, ax: plotting.plot_client_ages(pd.DataFrame({"client_id": [0, 1, 1],
                                                                         "age": [50.0, 60.0, 70.0]}), ax=ax),
}


@pytest.mark.parametrize("name", list(FED_PLOTS))
def test_federated_plots_draw_on_the_given_ax_and_return_it(fed_rounds, name):
    fig, (left, right) = plt.subplots(1, 2)
    ax = FED_PLOTS[name](fed_rounds, right)
    assert ax is right
    assert ax.has_data() and not left.has_data()
    assert fig.number in plt.get_fignums()
    assert len(plt.get_fignums()) == 1  # no extra figure
