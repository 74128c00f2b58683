"""Tests of fedsparse_lib.data.learnability: single-feature correlations, global statistics, the report.

Correlations are checked against scipy.stats.pearsonr and numpy.corrcoef, global statistics
against hand values on an 8-voxel array. The report runs once on a 16-subject synthetic cohort
(fields consistent) and on tiny 8 mm cohorts built here with age planted in a known place: in one
block of voxels (the best-voxel detector must find it), in the global intensity scale (the
global-statistic detector must find it, while z-scoring hides it from the ridge model), or nowhere.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedsparse_lib.data.datasets import build_manifest
from fedsparse_lib.data.learnability import (
    LearnabilityReport,
    global_statistics,
    learnability_report,
    single_feature_correlations,
)
from fedsparse_lib.data.synthetic import synthesize_cohort

GLOBAL_NAMES = ["mean", "std", "nonzero_fraction", "nonzero_mean", "nonzero_median", "nonzero_p90"]
# A coarse 8 mm RAS+ grid over the MNI field of view (as in conftest): fast to load and resample.
SHAPE = (23, 28, 23)
AFFINE = np.array([[8.0, 0, 0, -90.0], [0, 8.0, 0, -126.0], [0, 0, 8.0, -72.0], [0, 0, 0, 1.0]])
BRAIN = (slice(5, 18), slice(5, 23), slice(5, 18))
BLOCK = (slice(9, 13), slice(12, 16), slice(9, 13))  # 32 mm cube inside BRAIN: pure voxels survive 6 mm resampling
N_TINY, N_TRAIN, N_TEST = 24, 18, 6


# --------------------------------------------------------------------------------------------
# single_feature_correlations
# --------------------------------------------------------------------------------------------
def test_correlations_match_pearsonr_and_corrcoef(rng):
    # Prepare: 12 samples, columns with positive, negative and no relation to the target
    y = rng.normal(60.0, 10.0, 12)
    x = np.column_stack([2.0 * y + rng.normal(0, 5, 12), -y + rng.normal(0, 20, 12), rng.normal(0, 1, 12),
                         1e3 * rng.normal(0, 1, 12)])
    # Execute
    r = single_feature_correlations(x, y)
    # Assert
    assert r.shape == (4,)
    expected = [stats.pearsonr(x[:, j], y).statistic for j in range(4)]
    np.testing.assert_allclose(r, expected, rtol=1e-10)
    np.testing.assert_allclose(r, np.corrcoef(x.T, y)[-1, :-1], rtol=1e-10)
    assert r[0] > 0.8 and r[1] < 0


def test_constant_columns_have_zero_correlation(rng):
    # Prepare
    y = rng.normal(60.0, 10.0, 8)
    x = np.column_stack([np.full(8, 3.7), y, np.zeros(8), np.full(8, -1e4)])
    # Execute
    with np.errstate(all="raise"):
        r = single_feature_correlations(x, y)
    # Assert
    np.testing.assert_allclose(r, [0.0, 1.0, 0.0, 0.0], atol=1e-12)


def test_correlations_are_invariant_to_affine_rescaling(rng):
    x = rng.normal(size=(10, 3))
    y = rng.normal(size=10)
    np.testing.assert_allclose(single_feature_correlations(5.0 * x - 7.0, 0.1 * y + 3.0),
                               single_feature_correlations(x, y), rtol=1e-10)


# --------------------------------------------------------------------------------------------
# global_statistics
# --------------------------------------------------------------------------------------------
def test_global_statistics_hand_values():
    # Prepare: 8 voxels, 0 2 4 0 6 0 0 8
    volume = np.array([[[0, 2], [4, 0]], [[6, 0], [0, 8]]], dtype=np.int16)
    # Execute
    result = global_statistics(volume)
    # Assert: mean 20/8; var 120/8 - 2.5^2 = 8.75; non-zero 2 4 6 8: mean 5, median 5,
    # p90 at position 0.9 * 3 = 2.7 -> 6 + 0.7 * 2 = 7.4
    assert list(result) == GLOBAL_NAMES
    assert result == pytest.approx({"mean": 2.5, "std": math.sqrt(8.75), "nonzero_fraction": 0.5,
                                    "nonzero_mean": 5.0, "nonzero_median": 5.0, "nonzero_p90": 7.4})
    assert all(type(v) is float for v in result.values())


def test_global_statistics_of_an_empty_volume_are_zero():
    assert global_statistics(np.zeros((3, 4, 5))) == dict.fromkeys(GLOBAL_NAMES, 0.0)


def test_global_statistics_count_negative_voxels_as_non_zero():
    result = global_statistics(np.array([-4.0, 0.0, 2.0, 6.0]))
    assert result["nonzero_fraction"] == 0.75
    assert result["nonzero_mean"] == pytest.approx(4.0 / 3.0)


# --------------------------------------------------------------------------------------------
# learnability_report on a synthetic cohort
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_manifest(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("learn") / "cohort"
    synthesize_cohort(root, n_subjects=16, seed=2, n_jobs=1, progress=False)
    return build_manifest(root, check_images=False)


@pytest.fixture(scope="module")
def synthetic_report(synthetic_manifest) -> LearnabilityReport:
    return learnability_report(synthetic_manifest, n_train=12, n_test=4, seed=0, sigma_gap=3.0, progress=False)


@pytest.mark.slow
def test_report_fields_are_consistent(synthetic_report):
    # Prepare
    report = synthetic_report
    # Assert
    assert (report.n_train, report.n_test, report.resolution_mm) == (12, 4, 6.0)
    assert report.ratio == pytest.approx(report.ridge_mae / report.mean_predictor_mae, rel=1e-12)
    assert report.floor_mae == pytest.approx(3.0 * math.sqrt(2.0 / math.pi))  # 2.39 years
    assert report.best_global_statistic in GLOBAL_NAMES
    assert 0.0 <= report.best_voxel_abs_r <= 1.0 + 1e-9
    assert 0.0 <= report.best_global_abs_r <= 1.0 + 1e-9
    for mae in (report.ridge_mae, report.mean_predictor_mae, report.best_voxel_test_mae, report.best_global_test_mae):
        assert 0.0 < mae < 37.0  # at most the age range of the cohort
    assert 0.1 <= report.ridge_alpha <= 1e5


@pytest.mark.slow
def test_report_to_frame_lists_every_field(synthetic_report):
    frame = synthetic_report.to_frame()
    assert frame.columns.tolist() == ["measure", "value"]
    assert frame["measure"].tolist() == [f.name for f in dataclasses.fields(LearnabilityReport)]
    assert dict(zip(frame["measure"], frame["value"], strict=True)) == dataclasses.asdict(synthetic_report)


@pytest.mark.parametrize(("n_train", "n_test"), [(1, 4), (0, 4), (12, 0), (12, 5), (16, 1)],
                         ids=["one train", "no train", "no test", "one too many", "train is everything"])
def test_report_rejects_impossible_splits(synthetic_manifest, n_train, n_test):
    with pytest.raises(ValueError, match=rf"<= 16 subjects, got n_train={n_train}, n_test={n_test}"):
        learnability_report(synthetic_manifest, n_train=n_train, n_test=n_test, seed=0, progress=False)


# --------------------------------------------------------------------------------------------
# learnability_report on cohorts with a planted age signal
# --------------------------------------------------------------------------------------------
def write_cohort(root: Path, ages: np.ndarray, plant: str, *, seed: int = 0) -> pd.DataFrame:
    """A tiny float32 cohort; ``plant`` is "voxel" (BLOCK = age), "global" (BRAIN = 10 * age) or "none".

    Outside the planted signal the brain is N(800, 50) noise, independent of age.
    """
    rng = np.random.default_rng(seed)
    ids = [f"sub-{i + 1:04d}" for i in range(len(ages))]
    root.mkdir(parents=True)
    pd.DataFrame({"participant_id": ids, "age": ages}).to_csv(root / "participants.tsv", sep="\t", index=False)
    for pid, age in zip(ids, ages, strict=True):
        volume = np.zeros(SHAPE, dtype=np.float32)
        if plant == "global":
            volume[BRAIN] = 10.0 * age
        else:
            volume[BRAIN] = rng.normal(800.0, 50.0, volume[BRAIN].shape)
            if plant == "voxel":
                volume[BLOCK] = age
        (root / pid / "anat").mkdir(parents=True)
        nib.save(nib.Nifti1Image(volume, AFFINE), root / pid / "anat" / f"{pid}_T1w.nii.gz")
    return build_manifest(root)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, LearnabilityReport]:
    """Reports of three tiny cohorts with the same ages: age planted in one block, globally, or nowhere."""
    ages = np.round(np.random.default_rng(1).uniform(45.0, 82.0, N_TINY), 1)
    base = tmp_path_factory.mktemp("planted")
    return {plant: learnability_report(write_cohort(base / plant, ages, plant), n_train=N_TRAIN, n_test=N_TEST,
                                       seed=0, progress=False)
            for plant in ("voxel", "global", "none")}


def test_a_voxel_that_is_the_age_is_found(planted):
    report = planted["voxel"]
    assert report.best_voxel_abs_r > 0.999
    assert report.best_voxel_test_mae < 0.2  # years, against about 8.6 for predicting the mean
    assert report.mean_predictor_mae > 5.0
    assert report.best_global_abs_r < 0.9  # the block barely moves the global statistics


def test_a_global_intensity_leak_is_found_and_hidden_from_ridge_by_zscoring(planted):
    report = planted["global"]
    assert report.best_global_statistic in ("mean", "std", "nonzero_mean", "nonzero_median", "nonzero_p90")
    assert report.best_global_abs_r == pytest.approx(1.0, abs=1e-6)
    assert report.best_global_test_mae < 1e-3
    assert report.ratio == pytest.approx(1.0, abs=1e-3)  # z-scored volumes are identical: ridge predicts the mean
    assert report.best_voxel_abs_r < 0.5


def test_without_a_leak_no_single_feature_predicts_age(planted):
    report = planted["none"]
    assert report.best_voxel_test_mae > 0.8 * report.mean_predictor_mae
    assert report.best_global_test_mae > 0.8 * report.mean_predictor_mae


def test_same_ages_and_seed_give_the_same_split(planted):
    means = {plant: report.mean_predictor_mae for plant, report in planted.items()}
    assert means["voxel"] == means["global"] == means["none"]


def test_report_is_deterministic_and_floor_is_none_without_sigma_gap(tmp_path):
    # Prepare
    ages = np.linspace(45.0, 80.0, 8)
    manifest = write_cohort(tmp_path / "small", ages, "none")
    # Execute
    first = learnability_report(manifest, n_train=5, n_test=3, seed=4, progress=False)
    again = learnability_report(manifest, n_train=5, n_test=3, seed=4, progress=False)
    other = learnability_report(manifest, n_train=5, n_test=3, seed=5, progress=False)
    # Assert
    assert first == again
    assert first.floor_mae is None
    assert other.mean_predictor_mae != first.mean_predictor_mae
