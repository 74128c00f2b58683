"""Pruning schedules: *when* to prune and *to which* (cumulative) sparsity.

A schedule is a frozen dataclass with two pure methods, following jaxpruner:

- ``sparsity_at(step)``: the target cumulative sparsity (fraction of zeroed prunable weights, in
  [0, 1)) once step ``step`` has ended, i.e. the sparsity the mask maker is asked for;
- ``is_update_step(step)``: whether the mask is recomputed at the end of step ``step``.

Steps are federated rounds (or epochs in centralized training), counted from 1; step 0 stands for
initialisation, before any training (pruning at initialisation: SNIP, GraSP, SynFlow, random). A
training loop does, at the end of step ``t``::

    if schedule.is_update_step(t):
        mask = global_magnitude_mask(weights, schedule.sparsity_at(t), previous=mask)

Schedules (FedSparsify spec, section 2):

- :class:`CubicSchedule`: Zhu & Gupta (2017) gradual pruning, the FedSparsify default.
- :class:`NNZSchedule`: prune a fixed fraction of the still-alive weights every few steps
  ("Purge, Merge, Tune").
- :class:`OneShotSchedule`: dense until one step, then a single prune (OMP).
- :class:`ConstantSchedule`: a fixed sparsity from initialisation on (pruning at initialisation).

:func:`make_schedule` builds one by name (for notebook parameters), :func:`schedule_table`
tabulates one for plotting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

__all__ = [
    "SCHEDULES",
    "ConstantSchedule",
    "CubicSchedule",
    "NNZSchedule",
    "OneShotSchedule",
    "Schedule",
    "make_schedule",
    "schedule_table",
]


@runtime_checkable
class Schedule(Protocol):
    """What every pruning schedule offers (see the module docstring)."""

    def sparsity_at(self, step: int) -> float:
        """Target cumulative sparsity in [0, 1) after step ``step`` (>= 0)."""

    def is_update_step(self, step: int) -> bool:
        """Whether the mask is recomputed at the end of step ``step`` (>= 0)."""


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_sparsity(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a fraction of zeroed weights in [0, 1), got {value!r}")


def _check_step(step: Any) -> int:
    if isinstance(step, np.integer):
        step = int(step)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    return step


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CubicSchedule:
    """Gradual (polynomial) pruning of Zhu & Gupta (2017), the FedSparsify default.

    ``s_t = s_f + (s_i - s_f) * (1 - (t' - t0) / (T - t0)) ** e`` with ``t' = f * floor(t / f)``
    clipped to ``[t0, T]``; ``s_t = s_i`` for ``t <= t0`` and ``s_t = s_f`` exactly for ``t >= T``.
    The mask is updated at the end of step ``t`` when ``t0 < t <= T``, ``s_t > 0`` and ``t`` is a
    multiple of ``f`` (or ``t == T``, so the schedule always ends on ``s_f``). With the defaults
    round 1 is dense and the first prune ends round 2. Steps after ``T`` keep ``s_f`` without
    updates (fine-tuning under the final mask).

    Parameters
    ----------
    final_sparsity : float
        ``s_f``, target sparsity in [0, 1) reached at step ``total_steps``.
    total_steps : int
        ``T``, the last pruning step (number of rounds), > ``start_step``.
    initial_sparsity : float, default 0.0
        ``s_i`` in [0, ``final_sparsity``].
    exponent : float, default 3.0
        ``e`` > 0 (3 = cubic: fast pruning early, slow near the end).
    start_step : int, default 1
        ``t0`` >= 0; nothing is pruned at or before it.
    frequency : int, default 1
        ``f`` >= 1, steps between mask updates.

    Examples
    --------
    >>> s = CubicSchedule(0.95, 40)
    >>> round(s.sparsity_at(10), 3), s.is_update_step(1), s.is_update_step(2)
    (0.518, False, True)
    """

    final_sparsity: float
    total_steps: int
    initial_sparsity: float = 0.0
    exponent: float = 3.0
    start_step: int = 1
    frequency: int = 1

    def __post_init__(self) -> None:
        _check_sparsity("final_sparsity", self.final_sparsity)
        _check_sparsity("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity ({self.initial_sparsity}) must not exceed "
                             f"final_sparsity ({self.final_sparsity})")
        _check_int("start_step", self.start_step, minimum=0)
        _check_int("total_steps", self.total_steps, minimum=self.start_step + 1)
        _check_int("frequency", self.frequency, minimum=1)
        if isinstance(self.exponent, bool) or not isinstance(self.exponent, (int, float)) \
                or not (math.isfinite(self.exponent) and self.exponent > 0):
            raise ValueError(f"exponent must be a finite number > 0, got {self.exponent!r}")

    def sparsity_at(self, step: int) -> float:
        """Target cumulative sparsity ``s_t`` in [0, 1) after step ``step`` (>= 0)."""
        t = _check_step(step)
        t0, total = self.start_step, self.total_steps
        if t >= total:
            return float(self.final_sparsity)
        t_prime = min(max(self.frequency * (t // self.frequency), t0), total)
        progress = (t_prime - t0) / (total - t0)
        return float(self.final_sparsity
                     + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** self.exponent)

    def is_update_step(self, step: int) -> bool:
        """True when the mask is recomputed at the end of step ``step`` (see the class docstring)."""
        t = _check_step(step)
        if not self.start_step < t <= self.total_steps:
            return False
        if t % self.frequency != 0 and t != self.total_steps:
            return False
        return self.sparsity_at(t) > 0.0


@dataclass(frozen=True)
class NNZSchedule:
    """Prune a fraction of the still-alive weights every ``frequency`` steps ("Purge, Merge, Tune").

    Pruning events happen at the end of steps ``start_step + k * frequency`` for ``k = 1, 2, ...``
    (up to ``end_step`` when given); after ``n`` events the sparsity is ``1 - (1 - p) ** n``.

    Parameters
    ----------
    fraction : float
        ``p`` in (0, 1), fraction of the remaining (non-zero) weights removed per event.
    start_step : int, default 1
        ``t0`` >= 0; the first event ends step ``t0 + frequency``.
    frequency : int, default 1
        Steps between events, >= 1.
    end_step : int or None, default None
        Last step at which an event may happen (None: no end).
    """

    fraction: float
    start_step: int = 1
    frequency: int = 1
    end_step: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 < self.fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction!r}")
        _check_int("start_step", self.start_step, minimum=0)
        _check_int("frequency", self.frequency, minimum=1)
        if self.end_step is not None:
            _check_int("end_step", self.end_step, minimum=self.start_step + self.frequency)

    def num_events(self, step: int) -> int:
        """Number of pruning events that have happened by the end of step ``step``."""
        t = _check_step(step)
        if self.end_step is not None:
            t = min(t, self.end_step)
        return max(0, (t - self.start_step) // self.frequency)

    def sparsity_at(self, step: int) -> float:
        """Cumulative sparsity ``1 - (1 - p) ** n`` after ``n`` = :meth:`num_events` events."""
        return float(1.0 - (1.0 - self.fraction) ** self.num_events(step))

    def is_update_step(self, step: int) -> bool:
        """True when a pruning event ends step ``step``."""
        t = _check_step(step)
        if t <= self.start_step or (self.end_step is not None and t > self.end_step):
            return False
        return (t - self.start_step) % self.frequency == 0


@dataclass(frozen=True)
class OneShotSchedule:
    """Dense until ``step``, pruned once to ``final_sparsity`` at its end, then fixed (OMP).

    Parameters
    ----------
    final_sparsity : float
        Sparsity in [0, 1) from step ``step`` on.
    step : int, default 1
        Step (>= 0) at whose end the single prune happens (0: at initialisation).
    """

    final_sparsity: float
    step: int = 1

    def __post_init__(self) -> None:
        _check_sparsity("final_sparsity", self.final_sparsity)
        _check_int("step", self.step, minimum=0)

    def sparsity_at(self, step: int) -> float:
        """``final_sparsity`` from ``self.step`` on, 0 before."""
        return float(self.final_sparsity) if _check_step(step) >= self.step else 0.0

    def is_update_step(self, step: int) -> bool:
        """True only at ``self.step`` (and only when ``final_sparsity > 0``)."""
        return _check_step(step) == self.step and self.final_sparsity > 0.0


@dataclass(frozen=True)
class ConstantSchedule:
    """A fixed sparsity from initialisation on: the mask is made once, at step 0, and kept.

    This is the schedule of pruning at initialisation (SNIP, GraSP, SynFlow, random) and of
    sparse-from-scratch training.

    Parameters
    ----------
    sparsity : float
        Sparsity in [0, 1) at every step.
    """

    sparsity: float

    def __post_init__(self) -> None:
        _check_sparsity("sparsity", self.sparsity)

    def sparsity_at(self, step: int) -> float:
        """``sparsity`` at every step."""
        _check_step(step)
        return float(self.sparsity)

    def is_update_step(self, step: int) -> bool:
        """True only at step 0 (initialisation), when ``sparsity > 0``."""
        return _check_step(step) == 0 and self.sparsity > 0.0


#: Schedule classes by name, for :func:`make_schedule`.
SCHEDULES: dict[str, type] = {
    "cubic": CubicSchedule,
    "nnz": NNZSchedule,
    "one_shot": OneShotSchedule,
    "constant": ConstantSchedule,
}


def make_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name.

    Parameters
    ----------
    name : {"cubic", "nnz", "one_shot", "constant"}
        Case-insensitive; "-" and "oneshot" are accepted for "one_shot".
    **kwargs
        The chosen class's fields (e.g. ``final_sparsity=0.95, total_steps=40`` for "cubic").

    Returns
    -------
    Schedule

    Raises
    ------
    ValueError
        For an unknown name, unknown or missing fields, or invalid values.
    """
    if not isinstance(name, str):
        raise ValueError(f"schedule name must be a string, one of {sorted(SCHEDULES)}, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    key = "one_shot" if key == "oneshot" else key
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    cls = SCHEDULES[key]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"schedule {key!r} got unknown option(s) {unknown}; its options are {fields}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in kwargs]
    if missing:
        raise ValueError(f"schedule {key!r} needs option(s) {missing}; its options are {fields}")
    return cls(**kwargs)


def schedule_table(schedule: Schedule, steps: int | Iterable[int]) -> pd.DataFrame:
    """Tabulate a schedule for plotting.

    Parameters
    ----------
    schedule : Schedule
    steps : int or iterable of int
        An int ``n`` means steps ``0 .. n`` (initialisation, then ``n`` rounds); otherwise the
        steps to tabulate, each >= 0.

    Returns
    -------
    pandas.DataFrame
        One row per step with columns ``step`` (int), ``sparsity`` (float, target after the step)
        and ``update`` (bool, whether the mask is recomputed at the end of the step).
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must have sparsity_at and is_update_step, got {type(schedule).__name__}")
    if isinstance(steps, bool):
        raise ValueError(f"steps must be an int or an iterable of ints, got {steps!r}")
    if isinstance(steps, int):
        _check_step(steps)
        step_list = list(range(steps + 1))
    else:
        step_list = [_check_step(s) for s in steps]
    return pd.DataFrame({
        "step": pd.Series(step_list, dtype="int64"),
        "sparsity": pd.Series([schedule.sparsity_at(s) for s in step_list], dtype="float64"),
        "update": pd.Series([schedule.is_update_step(s) for s in step_list], dtype="bool"),
    })
