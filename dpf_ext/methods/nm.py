"""N:M structured sparsity with feedback: every update keeps the N largest of each M
consecutive weights along a layer's reduction dimension (see :mod:`dpf_ext.methods.patterns`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.estimators import DecayRamp, MaskedGradient, StraightThrough
from .patterns import NMPattern
from .base import Method, Update
from .recipe import Recipe
from .magnitude import check_positive


@dataclass(eq=False)
class NM(Method):
    """The N:M pattern where the schedule's target is not 0, dense where it is; with the
    straight-through estimator (``pruned_decay``: SR-STE's decay of the pruned weights), or
    the masked gradient with ``feedback=False`` (one-shot N:M pruning and retraining).

    ``decay_ramp``: AST's schedule of that decay (Huang et al. 2024, the official code's
    ``get_decay``): it grows linearly from 0 at step 0 to ``pruned_decay`` at step
    ``decay_ramp`` and stays there. The decay enters the pruned weights' gradient as
    SR-STE's does (AST adds it to AdamW's update after the moment estimates)."""

    name = "nm"
    sharded = True

    pattern: str | NMPattern = "2:4"
    pruned_decay: float | None = None
    feedback: bool = True
    decay_ramp: int | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, NMPattern):
            self.pattern = NMPattern.parse(self.pattern)
        self.pruned_decay = check_positive(self.pruned_decay, "pruned_decay", strict=False)
        self.feedback = bool(self.feedback)
        self.recipe = Recipe("oneshot", sparsity=self.pattern.sparsity)
        self._ramp = None
        if self.decay_ramp is not None:
            if isinstance(self.decay_ramp, bool) or not isinstance(self.decay_ramp, int) \
                    or self.decay_ramp < 1:
                raise ValueError(f"decay_ramp must be a positive int (steps), got {self.decay_ramp!r}")
            if not self.pruned_decay or not self.feedback:
                raise ValueError("decay_ramp ramps pruned_decay: pass pruned_decay= (with feedback)")
            self._ramp = DecayRamp(self.pruned_decay, self.decay_ramp)

    def estimator(self):
        if not self.feedback:
            return MaskedGradient()
        return StraightThrough(decay=self._ramp if self._ramp is not None else self.pruned_decay)

    def after_step(self, run) -> None:
        if self._ramp is not None:
            self._ramp.step += 1

    def state_dict(self) -> dict:
        return {} if self._ramp is None else {"decay_step": self._ramp.step}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if self._ramp is not None:
            self._ramp.step = int(state.get("decay_step", 0))

    def check(self, run) -> None:
        self.pattern.check(run.layers)
        if abs(run.schedule.final - self.pattern.sparsity) > 1e-9:
            raise ValueError(f"the schedule's final sparsity {run.schedule.final} is not pattern "
                             f"{self.pattern}'s {self.pattern.sparsity:.4g}")

    def update(self, u: Update) -> torch.Tensor:
        numels = [w.numel() for w in u.full_weights]
        if u.sparsity == 0:
            reactivated = torch.stack([(~m).sum() for m in u.masks])
            kept = torch.tensor([m.numel() for m in u.masks], device=reactivated.device)
            stats = torch.stack([kept, reactivated], dim=1)
            for m in u.masks:
                m.fill_(True)
            u.target_kept = sum(numels)
        else:
            layers = [(name, layer) for name, layer in zip(u.names, u.layers)]
            weights = [w.movedim(0, layer.channel_dim) if layer.channel_dim else w
                       for w, layer in zip(u.weights, u.layers)]
            masks = [m.movedim(0, layer.channel_dim) if layer.channel_dim else m
                     for m, layer in zip(u.masks, u.layers)]
            stats = self.pattern.update(weights, masks, layers)
            if not bool((stats[:, 2] == 0).all()):
                bad = [name for name, s in zip(u.names, stats[:, 2].tolist()) if s]
                raise ValueError(f"non-finite (NaN or Inf) weights in {bad} at step "
                                 f"{u.step}; masks left unchanged")
            stats = stats[:, :2]
            u.target_kept = sum(k // self.pattern.m * self.pattern.n for k in numels)
        return torch.cat([stats, torch.zeros_like(stats)], dim=1)

    def config(self) -> dict:
        return {**super().config(), "pattern": str(self.pattern)}
