"""Tests of fedsparse_lib.data.summary: per-site cohort summaries and volume trends.

Expected values are worked out by hand on 5-row tables (sample sd with ddof=1) or come from
scipy.stats.linregress.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedsparse_lib.data.summary import cohort_summary, volume_trends

COLUMNS = ["site", "num_subjects", "num_female", "age_mean", "age_sd", "age_min", "age_max"]


@pytest.fixture
def participants() -> pd.DataFrame:
    """Site a: ages 60, 40 (one F); site b: ages 50, 70, 45 (two F); listed b before a."""
    return pd.DataFrame({
        "participant_id": [f"sub-{i}" for i in range(1, 6)],
        "age": [50.0, 60.0, 70.0, 40.0, 45.0],
        "sex": ["F", "M", "F", "F", "M"],
        "site": ["b", "a", "b", "a", "b"],
    })


# By hand. a: mean 50, sd sqrt((10^2 + 10^2) / 1) = sqrt(200).
# b: mean 55, deviations -5, 15, -10: sd sqrt(350 / 2) = sqrt(175).
# all: mean 265 / 5 = 53, deviations -3, 7, 17, -13, -8: sd sqrt(580 / 4) = sqrt(145).
EXPECTED = pd.DataFrame(
    [
        ["a", 2, 1, 50.0, math.sqrt(200.0), 40.0, 60.0],
        ["b", 3, 2, 55.0, math.sqrt(175.0), 45.0, 70.0],
        ["all", 5, 3, 53.0, math.sqrt(145.0), 40.0, 70.0],
    ],
    columns=COLUMNS,
)


# --------------------------------------------------------------------------------------------
# cohort_summary
# --------------------------------------------------------------------------------------------
def test_cohort_summary_matches_hand_values(participants):
    # Execute
    summary = cohort_summary(participants)
    # Assert
    pd.testing.assert_frame_equal(summary, EXPECTED, check_dtype=False)


def test_cohort_summary_counts_are_integers(participants):
    summary = cohort_summary(participants)
    assert pd.api.types.is_integer_dtype(summary["num_subjects"])
    assert pd.api.types.is_integer_dtype(summary["num_female"])


def test_cohort_summary_without_site_has_one_na_group_and_all(participants):
    # Execute
    summary = cohort_summary(participants.drop(columns="site"))
    # Assert
    assert summary["site"].tolist() == ["n/a", "all"]
    for row in summary.itertuples():
        assert (row.num_subjects, row.num_female, row.age_mean) == (5, 3, 53.0)
        assert row.age_sd == pytest.approx(math.sqrt(145.0))


def test_cohort_summary_without_sex_counts_no_female(participants):
    summary = cohort_summary(participants.drop(columns="sex"))
    assert summary["num_female"].tolist() == [0, 0, 0]
    assert summary["num_subjects"].tolist() == [2, 3, 5]


def test_cohort_summary_sd_of_a_single_subject_site_is_nan(participants):
    # Prepare
    table = participants.assign(site=["b", "a", "b", "c", "b"])  # site c: one subject aged 40
    # Execute
    summary = cohort_summary(table).set_index("site")
    # Assert
    assert summary.loc["a", "num_subjects"] == 1 and math.isnan(summary.loc["a", "age_sd"])
    assert summary.loc["c", ["age_mean", "age_min", "age_max"]].tolist() == [40.0, 40.0, 40.0]
    assert math.isnan(summary.loc["c", "age_sd"])


def test_cohort_summary_sorts_sites_and_writes_them_as_strings():
    # Prepare
    table = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3"], "age": [50, 60, 70], "site": [2, 10, 2]})
    # Execute
    summary = cohort_summary(table)
    # Assert
    assert summary["site"].tolist() == ["2", "10", "all"]
    assert summary["age_mean"].tolist() == [60.0, 60.0, 60.0]


def test_cohort_summary_does_not_modify_its_input(participants):
    before = participants.copy()
    cohort_summary(participants.drop(columns=["site", "sex"]))
    cohort_summary(participants)
    pd.testing.assert_frame_equal(participants, before)


@pytest.mark.parametrize(
    "table",
    [
        pd.DataFrame(columns=["participant_id", "age", "site"]),
        pd.DataFrame({"participant_id": ["sub-1"], "site": ["a"]}),
    ],
    ids=["empty", "no age column"],
)
def test_cohort_summary_rejects_empty_or_ageless_tables(table):
    with pytest.raises(ValueError, match="non-empty table with an 'age' column"):
        cohort_summary(table)


# --------------------------------------------------------------------------------------------
# volume_trends
# --------------------------------------------------------------------------------------------
def test_volume_trends_of_an_exact_line_matches_hand_values():
    # Prepare: vol = 1000 - 2 age over ages 40..80, mean volume 880
    truth = pd.DataFrame({"biological_age": [40.0, 50.0, 60.0, 70.0, 80.0]})
    truth["gm_ml"] = 1000.0 - 2.0 * truth["biological_age"]
    # Execute
    trends = volume_trends(truth, columns=("gm_ml",))
    # Assert
    assert trends.columns.tolist() == ["measure", "slope_ml_per_year", "percent_per_year", "r"]
    row = trends.iloc[0]
    assert row["measure"] == "gm_ml"
    assert row["slope_ml_per_year"] == pytest.approx(-2.0)
    assert row["percent_per_year"] == pytest.approx(-200.0 / 880.0)
    assert row["r"] == pytest.approx(-1.0)


def test_volume_trends_match_linregress_on_noisy_lines(rng):
    # Prepare: known slopes of 4 tissues, plus noise
    n = 30
    age = rng.uniform(45.0, 82.0, n)
    slopes = {"gm_ml": -2.5, "wm_ml": -1.0, "ventricle_ml": 0.6, "lesion_ml": 0.05}
    truth = pd.DataFrame({"biological_age": age, "age": age + rng.normal(0, 3, n)})
    for (col, slope), base in zip(slopes.items(), (800.0, 500.0, 20.0, 1.0), strict=True):
        truth[col] = base + slope * age + rng.normal(0.0, 0.5 * abs(slope) * 5, n)
    # Execute
    trends = volume_trends(truth).set_index("measure")
    # Assert
    assert trends.index.tolist() == list(slopes)
    for col, slope in slopes.items():
        fit = stats.linregress(age, truth[col])
        assert trends.loc[col, "slope_ml_per_year"] == pytest.approx(fit.slope, rel=1e-9)
        assert trends.loc[col, "r"] == pytest.approx(fit.rvalue, rel=1e-9)
        assert trends.loc[col, "percent_per_year"] == pytest.approx(100.0 * fit.slope / truth[col].mean(), rel=1e-9)
        assert trends.loc[col, "slope_ml_per_year"] == pytest.approx(slope, rel=0.3)  # sanity: near the truth


def test_volume_trends_against_another_age_column(rng):
    # Prepare: volume follows chronological age exactly, biological age only roughly
    truth = pd.DataFrame({"age": np.arange(40.0, 80.0, 4.0)})
    truth["biological_age"] = truth["age"] + rng.normal(0.0, 3.0, len(truth))
    truth["wm_ml"] = 300.0 + 1.5 * truth["age"]
    # Execute
    by_age = volume_trends(truth, columns=("wm_ml",), age_column="age").iloc[0]
    by_bio = volume_trends(truth, columns=("wm_ml",)).iloc[0]
    # Assert
    assert by_age["slope_ml_per_year"] == pytest.approx(1.5) and by_age["r"] == pytest.approx(1.0)
    assert by_bio["r"] < 0.999
