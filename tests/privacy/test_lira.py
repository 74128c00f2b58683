"""LiRA pieces: shadow membership, the residual statistic with flips, Gaussian fits and scores by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsparse_lib.privacy.lira import (
    lira_offline_scores,
    lira_online_scores,
    residual_statistic,
    shadow_membership,
    shadow_statistics,
)


@pytest.mark.parametrize("n_population, n_shadows", [(10, 4), (11, 8), (40, 7), (3, 2)])
def test_shadow_membership_balances_every_example(n_population, n_shadows):
    # Execute
    keep = shadow_membership(n_population, n_shadows, seed=0)
    # Assert
    assert keep.shape == (n_shadows, n_population) and keep.dtype == bool
    per_example = keep.sum(axis=0)
    if n_shadows % 2 == 0:
        assert (per_example == n_shadows // 2).all()
    else:
        assert set(per_example) <= {n_shadows // 2, n_shadows // 2 + 1}
        assert (per_example == n_shadows // 2 + 1).sum() == n_population // 2
    assert abs(keep.sum() / n_shadows - n_population / 2) <= 1
    np.testing.assert_array_equal(keep, shadow_membership(n_population, n_shadows, seed=0))


def test_shadow_membership_is_random_across_seeds():
    a, b = shadow_membership(50, 8, seed=0), shadow_membership(50, 8, seed=1)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="n_shadows must be an integer >= 2, got 1"):
        shadow_membership(50, 1)


class Voxel(nn.Module):
    """Predicts 10 x the first voxel (0, 0, 0) of each volume."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * x[:, 0, 0, 0, 0]


@pytest.mark.parametrize("flip_axis, mirrored_voxel", [(None, None), (0, (-1, 0, 0)), (1, (0, -1, 0)),
                                                        (2, (0, 0, -1))])
def test_residual_statistic_flip_averages_the_mirrored_volume(flip_axis, mirrored_voxel):
    # Prepare
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    ages = torch.tensor([100.0, 1000.0])
    first = 10 * x[:, 0, 0, 0, 0]
    predicted = first if mirrored_voxel is None else (first + 10 * x[(slice(None), 0, *mirrored_voxel)]) / 2
    # Execute
    stat = residual_statistic(Voxel(), [(x, ages)], flip_axis=flip_axis)
    # Assert
    np.testing.assert_allclose(stat, (ages - predicted).numpy())


def test_residual_statistic_rejects_bad_axis():
    with pytest.raises(ValueError, match="flip_axis must be None or a spatial axis 0, 1, 2 of \\(X, Y, Z\\), got 3"):
        residual_statistic(Voxel(), [], flip_axis=3)


# Two examples, six shadows. Example 0: IN -2, -1, 0 (median -1, sd 1), OUT 0, 1, 2 (median 1, sd 1).
# Example 1: IN 5, 6, 7 (median 6, sd 1), OUT 8, 10, 12 (median 10, sd 2).
SHADOW_STATS = np.array([[-2, 8], [-1, 10], [0, 12], [0, 5], [1, 6], [2, 7]], dtype=float)
SHADOW_IN = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=bool)


def log_pdf(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def test_online_scores_per_example_variance_by_hand():
    # Prepare
    target = np.array([0.5, 7.0])
    # Execute
    scores = lira_online_scores(target, SHADOW_STATS, SHADOW_IN, global_variance=False)
    # Assert: example 0 reduces to -2 s; example 1 uses its own scales
    np.testing.assert_allclose(scores, [-2 * 0.5, log_pdf(7.0, 6, 1) - log_pdf(7.0, 10, 2)])


def test_online_scores_global_variance_by_hand():
    # Prepare: pooled squared deviations about the medians: IN 1+0+1 + 1+0+1 = 4 over 6 - 2 = 4 dof
    # -> sd_in 1; OUT 1+0+1 + 4+0+4 = 10 over 4 -> sd_out sqrt(2.5)
    target = np.array([0.5, 7.0])
    sd_out = np.sqrt(2.5)
    # Execute
    scores = lira_online_scores(target, SHADOW_STATS, SHADOW_IN)  # K = 6 < 64: global by default
    # Assert
    expected = [log_pdf(0.5, -1, 1) - log_pdf(0.5, 1, sd_out), log_pdf(7.0, 6, 1) - log_pdf(7.0, 10, sd_out)]
    np.testing.assert_allclose(scores, expected)


def test_offline_scores_one_sided_towards_zero_error():
    # Prepare: OUT medians 1 and 10 (positive residuals: the OUT models under-predict)
    target = np.array([0.0, 12.0])
    # Execute
    scores = lira_offline_scores(target, SHADOW_STATS, SHADOW_IN, global_variance=False)
    two_sided = lira_offline_scores(target, SHADOW_STATS, SHADOW_IN, global_variance=False, one_sided=False)
    # Assert: example 0 moved 1 sd towards 0 (a member's direction); example 1 moved 1 sd away
    np.testing.assert_allclose(scores, [1.0, -1.0])
    np.testing.assert_allclose(two_sided, [-log_pdf(0.0, 1, 1), -log_pdf(12.0, 10, 2)])


def test_offline_scores_direction_follows_the_sign_of_the_out_location():
    stats = -SHADOW_STATS  # OUT medians -1 and -10: the OUT models over-predict
    scores = lira_offline_scores(np.array([0.0, -12.0]), stats, SHADOW_IN, global_variance=False)
    np.testing.assert_allclose(scores, [1.0, -1.0])


def test_offline_without_membership_treats_every_shadow_as_out():
    scores = lira_offline_scores(np.array([0.0]), np.array([[1.0], [2.0], [3.0]]), global_variance=False)
    np.testing.assert_allclose(scores, [2.0])  # median 2, sd 1, moved 2 sd towards 0


@pytest.mark.parametrize("global_variance, out_rows, message", [
    (False, [0, 1], "example 0 has 1 IN shadows; need >= 2"),  # per-example scale needs 2
    (True, [0, 1, 2], "example 0 has 0 IN shadows; need >= 1"),
])
def test_missing_in_shadows_are_reported(global_variance, out_rows, message):
    # Prepare: turn some of example 0's IN shadows into OUT ones
    keep = SHADOW_IN.copy()
    keep[out_rows, 0] = False
    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        lira_online_scores(np.zeros(2), SHADOW_STATS, keep, global_variance=global_variance)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="expected target_stat \\(n,\\), shadow_stats and shadow_in \\(K, n\\)"):
        lira_online_scores(np.zeros(3), SHADOW_STATS, SHADOW_IN)


def test_shadow_statistics_trains_on_the_membership_rows():
    # Prepare: a "recipe" that predicts the mean age of its training subjects, and records its calls
    ages = torch.tensor([10.0, 20.0, 30.0, 40.0])
    batches = [(torch.zeros(2, 1, 2, 2, 2), ages[:2]), (torch.zeros(2, 1, 2, 2, 2), ages[2:])]
    keep = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=bool)
    calls = []

    class Constant(nn.Module):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0],), self.value)

    def train_fn(train_indices: np.ndarray, seed: int) -> nn.Module:
        calls.append((train_indices.tolist(), seed))
        return Constant(float(ages[train_indices].mean()))

    # Execute
    stats = shadow_statistics(train_fn, keep, batches, seed=0, progress=False)
    # Assert
    assert [c[0] for c in calls] == [[0, 1], [2, 3], [0, 2]]
    assert len({c[1] for c in calls}) == 3
    np.testing.assert_allclose(stats, [ages.numpy() - 15, ages.numpy() - 35, ages.numpy() - 20])
