"""Pruning schedules: reference values of the spec, update steps, validation, factory, table."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from fedsparse_lib.pruning.schedules import (
    ConstantSchedule,
    CubicSchedule,
    NNZSchedule,
    OneShotSchedule,
    Schedule,
    make_schedule,
    schedule_table,
)


# --------------------------------------------------------------------------------------------
# Cubic
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, 0.0), (2, 0.071), (5, 0.263), (10, 0.518), (20, 0.822), (30, 0.934), (38, 0.950), (39, 0.950),
     (40, 0.950)],
)
def test_cubic_reference_values(step: int, expected: float) -> None:
    # Prepare: the spec's reference (T = 40, s_f = 0.95, defaults s_i = 0, e = 3, t0 = 1, f = 1).
    schedule = CubicSchedule(0.95, 40)

    # Execute
    sparsity = schedule.sparsity_at(step)

    # Assert
    assert round(sparsity, 3) == pytest.approx(expected)


def test_cubic_matches_formula_by_hand() -> None:
    # s_10 = 0.95 * (1 - (1 - 9/39)^3), worked out independently of the implementation.
    schedule = CubicSchedule(0.95, 40)
    assert schedule.sparsity_at(10) == pytest.approx(0.95 * (1 - (30 / 39) ** 3), abs=1e-15)


def test_cubic_round_one_dense_first_prune_round_two_and_exact_end() -> None:
    schedule = CubicSchedule(0.95, 40)

    assert not schedule.is_update_step(0)
    assert not schedule.is_update_step(1)
    assert schedule.is_update_step(2)
    assert schedule.sparsity_at(40) == 0.95  # exactly, not approximately
    assert schedule.is_update_step(40)
    # after T: final sparsity, no more mask updates (fine-tuning rounds)
    assert schedule.sparsity_at(45) == 0.95
    assert not any(schedule.is_update_step(t) for t in range(41, 50))


def test_cubic_is_monotone_non_decreasing() -> None:
    schedule = CubicSchedule(0.99, 25, initial_sparsity=0.1, exponent=2, start_step=3, frequency=2)
    values = [schedule.sparsity_at(t) for t in range(0, 40)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[3] == pytest.approx(0.1)  # s_i at t0
    assert values[25] == 0.99


def test_cubic_frequency_updates_on_multiples_and_at_the_end() -> None:
    # T = 42 is not a multiple of f = 5: updates at 5, 10, ..., 40 and at T so that s_T = s_f.
    schedule = CubicSchedule(0.9, 42, frequency=5)

    updates = [t for t in range(0, 50) if schedule.is_update_step(t)]

    assert updates == [5, 10, 15, 20, 25, 30, 35, 40, 42]
    assert schedule.sparsity_at(41) == schedule.sparsity_at(40)  # held between updates
    assert schedule.sparsity_at(7) == pytest.approx(0.9 * (1 - (1 - 4 / 41) ** 3))
    assert schedule.sparsity_at(42) == 0.9


def test_cubic_zero_final_sparsity_never_updates() -> None:
    schedule = CubicSchedule(0.0, 10)
    assert not any(schedule.is_update_step(t) for t in range(0, 12))
    assert schedule.sparsity_at(10) == 0.0


# --------------------------------------------------------------------------------------------
# NNZ, one-shot, constant
# --------------------------------------------------------------------------------------------
def test_nnz_sparsity_after_n_events() -> None:
    # p = 0.2, events every 2 steps after t0 = 1: at the ends of steps 3, 5, 7, ...
    schedule = NNZSchedule(0.2, start_step=1, frequency=2)

    updates = [t for t in range(0, 10) if schedule.is_update_step(t)]

    assert updates == [3, 5, 7, 9]
    assert schedule.sparsity_at(2) == 0.0
    assert schedule.sparsity_at(3) == pytest.approx(0.2)
    assert schedule.sparsity_at(4) == pytest.approx(0.2)
    assert schedule.sparsity_at(5) == pytest.approx(0.36)  # 1 - 0.8^2
    assert schedule.sparsity_at(9) == pytest.approx(1 - 0.8**4)


def test_nnz_end_step_stops_events() -> None:
    schedule = NNZSchedule(0.5, start_step=0, frequency=1, end_step=3)
    assert [t for t in range(0, 8) if schedule.is_update_step(t)] == [1, 2, 3]
    assert schedule.sparsity_at(7) == pytest.approx(0.875)


def test_one_shot() -> None:
    schedule = OneShotSchedule(0.95, step=3)
    assert [schedule.sparsity_at(t) for t in range(0, 6)] == [0.0, 0.0, 0.0, 0.95, 0.95, 0.95]
    assert [t for t in range(0, 10) if schedule.is_update_step(t)] == [3]


def test_constant_updates_only_at_initialisation() -> None:
    schedule = ConstantSchedule(0.9)
    assert [schedule.sparsity_at(t) for t in (0, 1, 100)] == [0.9, 0.9, 0.9]
    assert [t for t in range(0, 10) if schedule.is_update_step(t)] == [0]
    assert not ConstantSchedule(0.0).is_update_step(0)


@pytest.mark.parametrize(
    "schedule",
    [CubicSchedule(0.9, 10), NNZSchedule(0.1), OneShotSchedule(0.5), ConstantSchedule(0.5)],
)
def test_schedules_are_frozen_and_follow_the_protocol(schedule: Schedule) -> None:
    assert isinstance(schedule, Schedule)
    field = dataclasses.fields(schedule)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(schedule, field, 0.1)
    # numpy integers are accepted as steps
    assert schedule.sparsity_at(np.int64(3)) == schedule.sparsity_at(3)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: CubicSchedule(1.0, 10), "final_sparsity"),
        (lambda: CubicSchedule(-0.1, 10), "final_sparsity"),
        (lambda: CubicSchedule(0.9, 1), "total_steps"),
        (lambda: CubicSchedule(0.9, 10, start_step=10), "total_steps"),
        (lambda: CubicSchedule(0.5, 10, initial_sparsity=0.6), "initial_sparsity"),
        (lambda: CubicSchedule(0.9, 10, exponent=0), "exponent"),
        (lambda: CubicSchedule(0.9, 10, frequency=0), "frequency"),
        (lambda: CubicSchedule(0.9, 10.0), "total_steps"),
        (lambda: NNZSchedule(0.0), "fraction"),
        (lambda: NNZSchedule(1.0), "fraction"),
        (lambda: NNZSchedule(0.2, end_step=1), "end_step"),
        (lambda: OneShotSchedule(0.9, step=-1), "step"),
        (lambda: ConstantSchedule(True), "sparsity"),
    ],
)
def test_invalid_schedules_raise_clear_errors(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize("step", [-1, 1.5, "3", True])
def test_invalid_steps_raise(step) -> None:
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        CubicSchedule(0.9, 10).sparsity_at(step)


# --------------------------------------------------------------------------------------------
# Factory and table
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("cubic", {"final_sparsity": 0.95, "total_steps": 40}, CubicSchedule(0.95, 40)),
        ("NNZ", {"fraction": 0.2, "frequency": 2}, NNZSchedule(0.2, frequency=2)),
        ("one-shot", {"final_sparsity": 0.9}, OneShotSchedule(0.9)),
        ("oneshot", {"final_sparsity": 0.9, "step": 0}, OneShotSchedule(0.9, step=0)),
        ("constant", {"sparsity": 0.5}, ConstantSchedule(0.5)),
    ],
)
def test_make_schedule(name: str, kwargs: dict, expected: Schedule) -> None:
    assert make_schedule(name, **kwargs) == expected


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("linear", {}, "unknown schedule 'linear'"),
        ("cubic", {"final_sparsity": 0.9, "total_steps": 10, "rounds": 3}, r"unknown option\(s\) \['rounds'\]"),
        ("cubic", {"final_sparsity": 0.9}, r"needs option\(s\) \['total_steps'\]"),
        (3, {}, "must be a string"),
    ],
)
def test_make_schedule_errors(name, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_schedule(name, **kwargs)


def test_schedule_table() -> None:
    table = schedule_table(CubicSchedule(0.95, 4), 5)

    assert list(table.columns) == ["step", "sparsity", "update"]
    assert table["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert table["update"].tolist() == [False, False, True, True, True, False]
    expected = [0, 0, 0.95 * (1 - (2 / 3) ** 3), 0.95 * (1 - (1 / 3) ** 3), 0.95, 0.95]
    np.testing.assert_allclose(table["sparsity"], expected, rtol=0, atol=1e-15)
    assert table["update"].dtype == bool and pd.api.types.is_integer_dtype(table["step"])


def test_schedule_table_explicit_steps_and_errors() -> None:
    table = schedule_table(NNZSchedule(0.5), [2, 4])
    assert table["sparsity"].tolist() == [0.5, 0.875]
    with pytest.raises(ValueError, match="sparsity_at"):
        schedule_table(object(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        schedule_table(NNZSchedule(0.5), [-1])
    assert math.isclose(schedule_table(ConstantSchedule(0.3), 0)["sparsity"].iloc[0], 0.3)
