"""Tests of fedsparse_lib.data.ageing: the ageing model as pure functions of age.

Expected values are worked out by hand from the documented formulas (``u = (age - 20) / 60``).
The model's documented constants are gathered here: when the model is re-tuned, update them
together with the module docstring.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedsparse_lib.data.ageing import (
    ageing_progress,
    cortical_atrophy_mm,
    lesion_threshold_shift,
    ventricle_expansion_mm,
    wm_intensity_factor,
)

# documented rates: ventricle boundary shift A * u**p mm, cortical atrophy B * u**q mm
VENTRICLE_MM_AT_80, VENTRICLE_POWER = 3.0, 1.6
CORTEX_MM_AT_80, CORTEX_POWER = 2.4, 1.2

# (function, age in years, expected value worked out by hand)
REFERENCE_VALUES = [
    (ageing_progress, 0.0, 0.0),
    (ageing_progress, 20.0, 0.0),
    (ageing_progress, 50.0, 0.5),
    (ageing_progress, 80.0, 1.0),
    (ageing_progress, 110.0, 1.5),
    (ventricle_expansion_mm, 10.0, 0.0),
    (ventricle_expansion_mm, 20.0, 0.0),
    (ventricle_expansion_mm, 50.0, VENTRICLE_MM_AT_80 * 0.5**VENTRICLE_POWER),  # u = 0.5
    (ventricle_expansion_mm, 80.0, VENTRICLE_MM_AT_80),
    (cortical_atrophy_mm, 10.0, 0.0),
    (cortical_atrophy_mm, 20.0, 0.0),
    (cortical_atrophy_mm, 50.0, CORTEX_MM_AT_80 * 0.5**CORTEX_POWER),
    (cortical_atrophy_mm, 80.0, CORTEX_MM_AT_80),
    (wm_intensity_factor, 10.0, 1.0),
    (wm_intensity_factor, 20.0, 1.0),
    (wm_intensity_factor, 50.0, 1.0 - 0.0025 * 30.0),
    (wm_intensity_factor, 80.0, 1.0 - 0.0025 * 60.0),
    (lesion_threshold_shift, 20.0, 0.0),
    (lesion_threshold_shift, 50.0, 0.0),
    (lesion_threshold_shift, 67.5, 0.5656854249492381),  # 1.6 * 0.5 ** 1.5
    (lesion_threshold_shift, 85.0, 1.6),
]


@pytest.mark.parametrize(("fn", "age", "expected"), REFERENCE_VALUES,
                         ids=[f"{fn.__name__}({age:g})" for fn, age, _ in REFERENCE_VALUES])
def test_reference_values(fn, age, expected):
    # Execute
    value = fn(age)
    # Assert
    assert float(value) == pytest.approx(expected, abs=1e-12)


def test_wm_intensity_falls_by_a_quarter_percent_per_year():
    # Execute
    step = wm_intensity_factor(61.0) - wm_intensity_factor(60.0)
    # Assert: 0.25 % of the white-matter intensity per year (Salat et al. 2009)
    assert float(step) == pytest.approx(-0.0025, abs=1e-12)


# (function, direction of change with age, age from which it changes)
MONOTONE = [
    (ventricle_expansion_mm, +1, 20.0),
    (cortical_atrophy_mm, +1, 20.0),
    (wm_intensity_factor, -1, 20.0),
    (lesion_threshold_shift, +1, 50.0),
    (ageing_progress, +1, 20.0),
]


@pytest.mark.parametrize(("fn", "sign", "onset"), MONOTONE, ids=[fn.__name__ for fn, _, _ in MONOTONE])
def test_monotone_in_age_and_flat_before_onset(fn, sign, onset):
    # Prepare
    ages = np.linspace(0.0, 110.0, 441)  # 0.25-year steps
    # Execute
    values = np.asarray(fn(ages), dtype=float)
    # Assert: flat before the onset, strictly monotone after it
    steps = sign * np.diff(values)
    before = ages[1:] <= onset
    assert np.all(steps[before] == 0.0)
    assert np.all(steps[~before] > 0.0)


@pytest.mark.parametrize("fn", [ageing_progress, ventricle_expansion_mm, cortical_atrophy_mm,
                                wm_intensity_factor, lesion_threshold_shift])
def test_vectorised_call_equals_scalar_calls(fn):
    # Prepare
    ages = np.array([[18.0, 45.5], [63.2, 91.0]])
    # Execute
    values = np.asarray(fn(ages))
    # Assert
    assert values.shape == ages.shape
    expected = np.array([[float(fn(a)) for a in row] for row in ages])
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-15)
