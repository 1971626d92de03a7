"""Target-sparsity schedules: pure values with ``sparsity_at(step)``.

A schedule holds no state; the same schedule gives the same target at the same step, which
is what makes a resumed run continue exactly where it stopped.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

RAMP_FRACTION = 0.75
"""The default cubic schedule reaches its final sparsity at this fraction of training (the
DPF paper's second learning-rate milestone)."""


def check_sparsity(value: float, name: str = "sparsity") -> float:
    """Return ``value`` as a float if it is a number in ``[0, 1)``, else raise
    ``TypeError`` (not a number) or ``ValueError`` (out of range)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return value


class Schedule:
    """Base class: override :meth:`sparsity_at`; ``final`` is the sparsity reached, from step
    :attr:`final_step` on (the pruner updates the masks at that step whatever its period,
    so that the target is met)."""

    final: float

    @property
    def final_step(self) -> int:
        """The first step at which the schedule gives ``final``."""
        return 0

    def sparsity_at(self, step: int) -> float:
        """Target sparsity (fraction of pruned weights) at optimizer step ``step``."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Ramp(Schedule):
    """A ramp from ``initial`` at ``begin_step`` to ``final`` at ``end_step``."""

    final: float
    begin_step: int
    end_step: int
    initial: float = 0.0

    def __post_init__(self):
        check_sparsity(self.final, "final sparsity")
        check_sparsity(self.initial, "initial sparsity")
        if self.begin_step < 0 or self.end_step <= self.begin_step:
            raise ValueError(
                f"need 0 <= begin_step < end_step, got {self.begin_step} and {self.end_step}"
            )

    @property
    def final_step(self) -> int:
        return self.end_step

    def _progress(self, step: int) -> float:
        """Fraction of the ramp done at ``step``, clamped to ``[0, 1]``."""
        return min(max((step - self.begin_step) / (self.end_step - self.begin_step), 0.0), 1.0)


@dataclass(frozen=True)
class Cubic(_Ramp):
    """Zhu & Gupta's gradual schedule: ``s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3`` on
    ``[t0, t1]``, ``s_i`` before, ``s_f`` after. Prunes fast early, gently near the end."""

    def sparsity_at(self, step: int) -> float:
        return self.final + (self.initial - self.final) * (1.0 - self._progress(step)) ** 3


@dataclass(frozen=True)
class Linear(_Ramp):
    """Linear ramp from ``initial`` at ``begin_step`` to ``final`` at ``end_step``."""

    def sparsity_at(self, step: int) -> float:
        return self.initial + (self.final - self.initial) * self._progress(step)


@dataclass(frozen=True)
class Constant(Schedule):
    """The same target at every step."""

    final: float

    def __post_init__(self):
        check_sparsity(self.final)

    def sparsity_at(self, step: int) -> float:
        return self.final


@dataclass(frozen=True)
class OneShot(Schedule):
    """Dense before ``at_step``, ``final`` from ``at_step`` on."""

    final: float
    at_step: int = 0

    def __post_init__(self):
        check_sparsity(self.final)
        if self.at_step < 0:
            raise ValueError(f"at_step must be >= 0, got {self.at_step}")

    @property
    def final_step(self) -> int:
        return self.at_step

    def sparsity_at(self, step: int) -> float:
        return self.final if step >= self.at_step else 0.0


def cycle_levels(final: float, cycles: int) -> list[float]:
    """The sparsity after each of ``cycles`` prune-retrain cycles at one constant rate: cycle
    ``c`` keeps ``(1 - final) ** (c / cycles)`` of the weights, the last exactly ``final``."""
    return [1.0 - (1.0 - final) ** (c / cycles) if c < cycles else final
            for c in range(1, cycles + 1)]


@dataclass(frozen=True)
class Cycles(Schedule):
    """The levels of a prune-retrain method: dense for the first ``first_steps`` steps, then
    cycle ``c`` (``1 .. cycles``) at its :func:`cycle_levels` level for ``cycle_steps`` steps
    each."""

    final: float
    cycles: int
    first_steps: int
    cycle_steps: int

    def __post_init__(self):
        check_sparsity(self.final)
        if self.cycles < 1 or self.first_steps < 1 or self.cycle_steps < 1:
            raise ValueError("cycles, first_steps and cycle_steps must be positive")

    @property
    def final_step(self) -> int:
        return self.first_steps + (self.cycles - 1) * self.cycle_steps

    def sparsity_at(self, step: int) -> float:
        if step < self.first_steps:
            return 0.0
        c = min(1 + (step - self.first_steps) // self.cycle_steps, self.cycles)
        return cycle_levels(self.final, self.cycles)[c - 1]


def resolve_schedule(sparsity, schedule: Schedule | None, total_steps: int | None) -> Schedule:
    """``schedule`` (checked against ``sparsity`` if both are given), else the default:
    ``Cubic(sparsity, 0, RAMP_FRACTION * total_steps)``."""
    if schedule is not None:
        if sparsity is not None and check_sparsity(sparsity) != schedule.final:
            raise ValueError(
                f"sparsity={sparsity} disagrees with the schedule's final sparsity "
                f"{schedule.final}; pass one of them"
            )
        return schedule
    if sparsity is None:
        raise ValueError("pass a target sparsity or a schedule")
    if total_steps is None:
        raise ValueError(
            "the default cubic schedule needs the length of training: pass total_steps= "
            "(optimizer steps) or a schedule= from dpf_ext.schedules"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int (optimizer steps), got {total_steps!r}")
    return Cubic(check_sparsity(sparsity), 0, max(1, round(RAMP_FRACTION * total_steps)))
