"""A method's published recipe, as data: the controller settings it uses where the user
gives none, and what it needs of the run. The controller (:class:`dpf_ext.Pruner`) and
``dpf-train`` read it; neither knows a method by its name."""

from __future__ import annotations

from dataclasses import dataclass

from ..schedules import Constant, Cycles, OneShot, Schedule, check_sparsity, resolve_schedule

SCHEDULES = ("ramp", "constant", "oneshot", "cycles")
"""``ramp``: cubic from 0 at step 0 to the target at 75% of ``total_steps``; ``constant``:
the target from step 0 (sparse from scratch); ``oneshot``: 0 until ``at_step``, then the
target; ``cycles``: a prune-retrain method's levels (:class:`~dpf_ext.schedules.Cycles`:
``phases`` phases of ``total_steps // phases`` steps, the last taking the remainder, the
level changing every ``phases_per_level`` after the first)."""


@dataclass(frozen=True)
class Recipe:
    """How a method trains in its publication.

    Args:
        schedule: one of :data:`SCHEDULES`.
        update_every: steps between mask updates; ``"epoch"``: one epoch's steps
            (``dpf-train`` passes them; the API asks for ``update_every=``).
        budget: the budget's name (see :func:`dpf_ext.budgets.make_budget`).
        last_update: the fraction of ``total_steps`` after which the masks stop changing
            (``None``: they may change until the end).
        fixed: the masks are chosen once (at construction, or at ``at_step`` and then
            frozen) and never updated: an end of updates (``--updates-until``) means nothing.
        at_step: the step of the ``oneshot`` schedule; with ``fixed``, the masks freeze there.
        takes_target: the method reaches a target sparsity (``False``: it emerges).
        sparsity: a sparsity the method fixes by itself (an N:M pattern's), else ``None``.
        phases: the training phases of a prune-retrain method (``cycles`` schedule); the
            training loop calls :meth:`dpf_ext.Pruner.end_phase` after each.
        phases_per_level: the phases at each level after the first (sparse model soups: one
            per ingredient).
    """

    schedule: str = "ramp"
    update_every: int | str = 16
    budget: str = "global"
    last_update: float | None = None
    fixed: bool = False
    at_step: int = 0
    takes_target: bool = True
    sparsity: float | None = None
    phases: int = 1
    phases_per_level: int = 1

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.update_every == "epoch" or (isinstance(self.update_every, int)
                                                 and self.update_every >= 1)):
            raise ValueError(f"update_every must be a positive int or 'epoch', got "
                             f"{self.update_every!r}")

    @property
    def ramps(self) -> bool:
        """Whether the sparsity ramps up over training (``--ramp-until`` sets where)."""
        return self.schedule == "ramp"

    def make_schedule(self, name: str, sparsity: float | None, total_steps: int | None) -> Schedule:
        """The schedule to ``sparsity`` (checked against what the method takes)."""
        if not self.takes_target:
            return Constant(0.0)
        if self.sparsity is not None:
            if sparsity is not None and abs(float(sparsity) - self.sparsity) > 1e-9:
                raise ValueError(f"sparsity={sparsity} disagrees with {name}'s own "
                                 f"{self.sparsity:.4g}; pass one of them")
            sparsity = self.sparsity
        if sparsity is None:
            raise ValueError(f"{name} needs the target sparsity: pass sparsity=")
        if self.schedule == "ramp":
            return resolve_schedule(sparsity, None, total_steps)
        if self.schedule == "constant":
            return Constant(check_sparsity(sparsity))
        if self.schedule == "cycles":
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) \
                    or total_steps < self.phases:
                raise ValueError(f"{name} trains in {self.phases} phases of equal length: pass "
                                 f"total_steps= (at least {self.phases}), got {total_steps!r}")
            phase = total_steps // self.phases
            return Cycles(check_sparsity(sparsity), (self.phases - 1) // self.phases_per_level,
                          phase, phase * self.phases_per_level)
        return OneShot(check_sparsity(sparsity), self.at_step)

    def end_step(self, total_steps: int | None) -> int | None:
        """The last step at which the masks may change (0 for masks chosen at
        construction), if the recipe and ``total_steps`` say."""
        if self.fixed and self.schedule != "oneshot":
            return 0
        if self.last_update is None or total_steps is None:
            return None
        return max(1, round(self.last_update * total_steps))

    def freeze_at(self) -> int | None:
        """The step at which the masks freeze, for a fixed mask chosen during training."""
        return self.at_step if self.fixed and self.schedule == "oneshot" else None
