"""Tests of fedsparse_lib.data.partition: federated splits of a participants table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsparse_lib.data.partition import (
    PARTITIONS,
    client_indices,
    make_partition,
    partition_by_age,
    partition_by_site,
    partition_dirichlet,
    partition_iid,
    partition_skewed_by_age,
    partition_summary,
    skewed_sizes,
)

PAPER_UKBB_SIZES = np.array([2401, 1765, 1303, 964, 714, 528, 391, 290])


@pytest.fixture
def cohort(rng):
    """400 participants aged 45-82 (uniform) over three sites, with a non-default index."""
    n = 400
    return pd.DataFrame(
        {
            "participant_id": [f"sub-{i:04d}" for i in range(n)],
            "age": rng.uniform(45.0, 82.0, n).round(1),
            "site": rng.choice(["site1", "site2", "site10"], n),
        },
        index=pd.Index(np.arange(n)[::-1] * 3, name="row"),
    )


# Random partitions: (name, options) for make_partition
RANDOM_CASES = [
    ("iid", {"num_clients": 5}),
    ("noniid_age", {"num_clients": 4}),
    ("noniid_age", {"num_clients": 8, "age_sd": 5.0}),
    ("skewed_noniid", {"num_clients": 8}),
    ("dirichlet", {"num_clients": 4, "alpha": 0.5}),
]
CASE_IDS = [
    f"{name}-{options['num_clients']}" + ("-sd5" if "age_sd" in options else "") for name, options in RANDOM_CASES
]


# --------------------------------------------------------------------------------------------
# Properties shared by every partition
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options"), RANDOM_CASES, ids=CASE_IDS)
def test_partition_covers_every_participant_once(cohort, name, options):
    # Prepare
    before = cohort.copy()
    # Execute
    client_ids = make_partition(name, cohort, seed=0, **options)
    # Assert: one client per row (disjoint and covering), ids 0..K-1, none empty, input untouched
    assert isinstance(client_ids, pd.Series) and client_ids.name == "client_id"
    assert client_ids.index.equals(cohort.index)
    assert client_ids.dtype == np.int64
    assert set(client_ids) == set(range(options["num_clients"]))
    indices = client_indices(client_ids, num_clients=options["num_clients"])
    assert sorted(np.concatenate(indices).tolist()) == list(range(len(cohort)))
    pd.testing.assert_frame_equal(cohort, before)


@pytest.mark.parametrize(("name", "options"), RANDOM_CASES, ids=CASE_IDS)
def test_partition_is_deterministic_per_seed(cohort, name, options):
    first = make_partition(name, cohort, seed=7, **options)
    again = make_partition(name, cohort, seed=7, **options)
    other = make_partition(name, cohort, seed=8, **options)
    pd.testing.assert_series_equal(first, again)
    assert not first.equals(other)


# --------------------------------------------------------------------------------------------
# IID
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "num_clients", "sizes"), [(10, 3, [4, 3, 3]), (12, 4, [3, 3, 3, 3]), (5, 5, [1] * 5), (7, 1, [7])]
)
def test_partition_iid_sizes(n, num_clients, sizes):
    table = pd.DataFrame({"age": np.linspace(40, 80, n)})
    client_ids = partition_iid(table, num_clients=num_clients, seed=0)
    assert np.bincount(client_ids, minlength=num_clients).tolist() == sizes


def test_partition_iid_mixes_ages(cohort):
    summary = partition_summary(cohort, partition_iid(cohort, num_clients=4, seed=0))
    assert summary["age_mean"].max() - summary["age_mean"].min() < 5.0


# --------------------------------------------------------------------------------------------
# Non-IID by age
# --------------------------------------------------------------------------------------------
def test_partition_by_age_client_means_follow_targets(cohort):
    # Execute: default targets (50, 60, 70, 80)
    client_ids = partition_by_age(cohort, num_clients=4, seed=0)
    summary = partition_summary(cohort, client_ids)
    # Assert: equal sizes and realised means in the order of the targets
    assert summary["num_examples"].tolist() == [100, 100, 100, 100]
    assert summary["age_mean"].is_monotonic_increasing
    assert summary["age_mean"].iloc[-1] - summary["age_mean"].iloc[0] > 8.0


def test_partition_by_age_default_targets_cycle(cohort):
    summary = partition_summary(cohort, partition_by_age(cohort, num_clients=8, seed=0))
    means = summary["age_mean"].to_numpy()
    assert np.all(np.diff(means[:4]) > 0) and np.all(np.diff(means[4:]) > 0)
    np.testing.assert_allclose(means[:4], means[4:], atol=3.0)  # same targets, similar means


def test_partition_by_age_custom_targets_and_sizes(cohort):
    client_ids = partition_by_age(cohort, num_clients=3, seed=1, target_means=(75.0, 65.0, 50.0), sizes=[50, 150, 200])
    summary = partition_summary(cohort, client_ids)
    assert summary["num_examples"].tolist() == [50, 150, 200]
    assert summary["age_mean"].is_monotonic_decreasing


def test_partition_by_age_takes_the_drawn_integer_age():
    """With sd tiny, a client targeting 60.5 only takes subjects of integer age 60."""
    table = pd.DataFrame({"age": [60.2, 70.9, 60.9, 70.1]})
    client_ids = partition_by_age(table, num_clients=2, seed=0, target_means=(60.5, 70.5), age_sd=0.01)
    assert client_ids.tolist() == [0, 1, 0, 1]


def test_partition_by_age_falls_back_to_the_nearest_age():
    """No subject near the target: after max_redraws the nearest remaining age is taken."""
    table = pd.DataFrame({"age": [20.0, 21.0, 30.0, 31.0, 45.0, 46.0]})
    client_ids = partition_by_age(table, num_clients=2, seed=0, target_means=(90.0, 0.0), age_sd=0.5, max_redraws=5)
    assert client_ids.tolist() == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"target_means": (50.0, 60.0)}, "target_means"),
        ({"target_means": (50.0, np.nan, 60.0)}, "target_means"),
        ({"sizes": [100, 100, 100]}, "sizes"),
        ({"sizes": [400, 0, 0]}, "sizes"),
        ({"age_sd": 0.0}, "age_sd"),
        ({"max_redraws": 0}, "max_redraws"),
    ],
)
def test_partition_by_age_rejects_bad_options(cohort, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        partition_by_age(cohort, num_clients=3, seed=0, **options)


# --------------------------------------------------------------------------------------------
# Skewed sizes
# --------------------------------------------------------------------------------------------
def test_skewed_sizes_against_the_paper():
    # Execute
    sizes = skewed_sizes(8356, 8)
    # Assert: exact sum; each within 1% of n of the paper's counts (no rounding reproduces them)
    assert sizes.sum() == 8356
    assert np.all(np.abs(sizes - PAPER_UKBB_SIZES) <= 0.01 * 8356)
    assert np.all(np.abs(sizes - PAPER_UKBB_SIZES) <= 19)
    # ratio 1.35 between consecutive clients within rounding (each size within 1 of its exact value)
    assert np.all(np.abs(sizes[:-1] - 1.35 * sizes[1:]) < 1.0 + 1.35)
    assert sizes.tolist() == [2382, 1765, 1307, 968, 717, 531, 394, 292]


def test_skewed_sizes_exact_proportions_by_hand():
    # base 2, 3 clients, n 70: shares 4:2:1 -> 40, 20, 10
    assert skewed_sizes(70, 3, base=2.0).tolist() == [40, 20, 10]
    # base 1: equal split with the remainder to the first clients
    assert skewed_sizes(10, 4, base=1.0).tolist() == [3, 3, 2, 2]


@pytest.mark.parametrize(("n", "num_clients"), [(8, 8), (10, 8), (9, 3), (1000, 8), (8356, 8)])
def test_skewed_sizes_are_positive_non_increasing_and_sum_to_n(n, num_clients):
    sizes = skewed_sizes(n, num_clients)
    assert sizes.sum() == n and sizes.min() >= 1
    assert np.all(np.diff(sizes) <= 0)


@pytest.mark.parametrize(
    ("n", "num_clients", "base"), [(0, 1, 1.35), (5, 6, 1.35), (10, 0, 1.35), (10, 2, 0.5), (10, 2, np.inf)]
)
def test_skewed_sizes_rejects_bad_input(n, num_clients, base):
    with pytest.raises(ValueError):
        skewed_sizes(n, num_clients, base=base)


def test_partition_skewed_by_age_sizes_and_age_order(cohort):
    # Execute: default targets (80, 70, 60, 50, 80, 70, 60, 50)
    client_ids = partition_skewed_by_age(cohort, num_clients=8, seed=0)
    summary = partition_summary(cohort, client_ids)
    # Assert
    assert summary["num_examples"].tolist() == skewed_sizes(400, 8).tolist()
    targets = np.array([80, 70, 60, 50, 80, 70, 60, 50])
    means = summary["age_mean"].to_numpy()
    # Realised means follow the targets, though not strictly: the largest clients (targets 80, 70)
    # keep drawing after the small ones are full and end up with what remains.
    assert means[targets == 50].max() < means[targets == 80].min()
    assert means[targets == 60].max() < means[targets == 80].max()
    assert np.corrcoef(pd.Series(targets).rank(), pd.Series(means).rank())[0, 1] > 0.7


# --------------------------------------------------------------------------------------------
# Site and Dirichlet
# --------------------------------------------------------------------------------------------
def test_partition_by_site_matches_sites_in_natural_order(cohort):
    client_ids = partition_by_site(cohort)
    expected = cohort["site"].map({"site1": 0, "site2": 1, "site10": 2})
    assert client_ids.tolist() == expected.tolist()


def test_partition_by_site_errors():
    with pytest.raises(ValueError, match="site column"):
        partition_by_site(pd.DataFrame({"age": [50.0]}))
    with pytest.raises(ValueError, match="missing values"):
        partition_by_site(pd.DataFrame({"age": [50.0, 60.0], "site": ["a", None]}))


def test_partition_dirichlet_small_alpha_is_more_heterogeneous(cohort):
    spread = {
        alpha: partition_summary(cohort, partition_dirichlet(cohort, num_clients=4, alpha=alpha, seed=0))[
            "age_mean"
        ].std()
        for alpha in (0.1, 1000.0)
    }
    assert spread[0.1] > 3.0 * spread[1000.0]


def test_partition_dirichlet_respects_min_size(cohort):
    sizes = np.bincount(partition_dirichlet(cohort, num_clients=4, alpha=0.3, seed=2, min_size=40), minlength=4)
    assert sizes.min() >= 40 and sizes.sum() == 400


def test_partition_dirichlet_gives_up_with_a_clear_error(cohort):
    with pytest.raises(ValueError, match="larger alpha"):
        partition_dirichlet(cohort, num_clients=4, alpha=0.01, seed=0, min_size=100, max_attempts=3)


# --------------------------------------------------------------------------------------------
# make_partition
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "direct", "options"),
    [
        ("iid", partition_iid, {"num_clients": 3, "seed": 4}),
        ("noniid_age", partition_by_age, {"num_clients": 4, "seed": 4, "age_sd": 7.0}),
        ("skewed_noniid", partition_skewed_by_age, {"num_clients": 8, "seed": 4}),
        ("dirichlet", partition_dirichlet, {"num_clients": 3, "seed": 4, "alpha": 1.0}),
        ("site", partition_by_site, {}),
    ],
)
def test_make_partition_dispatches(cohort, name, direct, options):
    pd.testing.assert_series_equal(make_partition(name, cohort, **options), direct(cohort, **options))


def test_partitions_lists_every_name():
    assert PARTITIONS == ("iid", "noniid_age", "skewed_noniid", "site", "dirichlet")


@pytest.mark.parametrize(
    ("name", "options", "fragment"),
    [
        ("random", {"num_clients": 2, "seed": 0}, "unknown partition 'random'"),
        ("iid", {"num_clients": 0, "seed": 0}, r"num_clients must be in \[1, 400\]"),
        ("iid", {"num_clients": 401, "seed": 0}, r"num_clients must be in \[1, 400\]"),
        ("iid", {"num_clients": 2.5, "seed": 0}, "num_clients must be an integer"),
        ("iid", {"seed": 0}, "needs num_clients"),
        ("noniid_age", {"num_clients": 2}, "needs a seed"),
        ("iid", {"num_clients": 2, "seed": 0, "alpha": 1.0}, r"does not take option\(s\) \['alpha'\]"),
        ("dirichlet", {"num_clients": 2, "seed": 0, "alpha": -1.0}, "alpha must be a positive"),
        ("site", {"num_clients": 4}, "3 sites, but num_clients=4"),
    ],
)
def test_make_partition_rejects_bad_requests(cohort, name, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        make_partition(name, cohort, **options)


# --------------------------------------------------------------------------------------------
# Summary and indices
# --------------------------------------------------------------------------------------------
def test_partition_summary_by_hand():
    # Prepare
    table = pd.DataFrame(
        {"age": [40.0, 50.0, 60.0, 20.0, 30.0], "site": ["site2", "site1", "site10", "site2", "site10"]},
        index=[10, 11, 12, 13, 14],
    )
    client_ids = pd.Series([1, 1, 0, 0, 0], index=[14, 13, 12, 11, 10])  # aligned on the index
    # Execute
    summary = partition_summary(table, client_ids)
    # Assert: client 0 = rows 10, 11, 12 (ages 40, 50, 60); client 1 = rows 13, 14 (ages 20, 30)
    expected = pd.DataFrame(
        {
            "client_id": [0, 1],
            "num_examples": [3, 2],
            "age_mean": [50.0, 25.0],
            "age_sd": [10.0, np.sqrt(50.0)],  # sample sd: sqrt((100 + 0 + 100) / 2), sqrt((25 + 25) / 1)
            "age_min": [40.0, 20.0],
            "age_max": [60.0, 30.0],
            "sites": ["site1:1,site2:1,site10:1", "site2:1,site10:1"],
        }
    )
    pd.testing.assert_frame_equal(summary, expected)


def test_partition_summary_without_sites_and_a_single_member():
    summary = partition_summary(pd.DataFrame({"age": [40.0, 50.0, 60.0]}), [0, 0, 1])
    assert summary["sites"].tolist() == ["", ""]
    assert np.isnan(summary["age_sd"].iloc[1])


@pytest.mark.parametrize(
    ("client_ids", "fragment"),
    [
        ([0, 1], "one entry per participant"),
        ([0, -1, 1], "non-negative"),
        (pd.Series([0, 1, 0], index=[5, 6, 7]), "index mismatch"),
    ],
)
def test_partition_summary_rejects_bad_client_ids(client_ids, fragment):
    with pytest.raises(ValueError, match=fragment):
        partition_summary(pd.DataFrame({"age": [40.0, 50.0, 60.0]}), client_ids)


def test_client_indices_by_hand():
    indices = client_indices(pd.Series([2, 0, 2, 1], index=[9, 8, 7, 6]), num_clients=4)
    assert [i.tolist() for i in indices] == [[1], [3], [0, 2], []]
    with pytest.raises(ValueError, match="client ids must be in"):
        client_indices([0, 3], num_clients=3)
