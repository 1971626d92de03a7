"""Training in phases: the prune-retrain methods (iterative magnitude pruning, sparse model
soups) train the model several times, and between two phases prune it further, rewind its
weights or average copies of it. The training loop calls :meth:`dpf_ext.Pruner.end_phase`
after each phase; these helpers hold and move the model's weights for the methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Method, Update, require_optimizer
from .magnitude import Magnitude


@dataclass(frozen=True)
class PhaseEnd:
    """What a method decided at the end of a training phase: the sparsity to prune to now
    (``None``: the masks stay) and whether the model is now a soup (an average of copies)."""

    level: float | None = None
    soup: bool = False


def check_count(value, name: str, least: int = 1) -> int:
    """``value`` if it is an int of at least ``least``, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating-point parameters and buffers of ``model`` by name (what a rewind or a
    soup moves; masks and counters stay), as views."""
    state = {f"p:{n}": p for n, p in model.named_parameters()}
    state.update({f"b:{n}": b for n, b in model.named_buffers() if b.is_floating_point()})
    return state


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of :func:`trained_state`."""
    return {k: v.detach().clone() for k, v in trained_state(model).items()}


@torch.no_grad()
def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` (a :func:`snapshot`) back into ``model``."""
    for key, value in trained_state(model).items():
        value.copy_(saved[key])


@torch.no_grad()
def accumulate(total: dict[str, torch.Tensor] | None, model: nn.Module) -> dict[str, torch.Tensor]:
    """``total`` plus ``model``'s :func:`trained_state` (a new sum when ``total`` is None)."""
    if total is None:
        return snapshot(model)
    for key, value in trained_state(model).items():
        total[key].add_(value)
    return total


def fresh_optimizer(optimizer: torch.optim.Optimizer | None) -> None:
    """Forget ``optimizer``'s per-parameter state (momentum, Adam's moments and step), as
    for a new training."""
    if optimizer is not None:
        optimizer.state.clear()


@dataclass(eq=False)
class PruneRetrain(Method):
    """Base of the methods that train in phases and prune between them by magnitude (the
    gradient masked, one global threshold by default, no channel floor unless asked): each
    prune goes to the level of the pruner's :class:`~dpf_ext.schedules.Cycles` schedule at
    the step where the next phase begins. A subclass sets its ``recipe`` (phases, phases per
    level) in ``__post_init__`` after calling this one's, and overrides
    :meth:`~Method.phase_end`, :meth:`~Method.phase_start` and :meth:`~Method.phase_of`."""

    cycles: int = 2
    threshold: str = "exact"
    channel_floor: bool = False

    def __post_init__(self):
        check_count(self.cycles, "cycles")
        self._magnitude = Magnitude(False, self.threshold, self.channel_floor)

    def estimator(self):
        return self._magnitude.estimator()

    def check(self, run) -> None:
        require_optimizer(run, self.name)  # each phase starts with fresh optimizer state
        self._magnitude.check(run)

    def update(self, u: Update) -> torch.Tensor:
        return self._magnitude.update(u)

    @staticmethod
    def next_level(run) -> float:
        """The sparsity the next phase trains at (the schedule's, where it begins)."""
        return run.schedule.sparsity_at(run.step)
