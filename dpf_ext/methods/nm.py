"""N:M structured sparsity with feedback: every update keeps the N largest of each M
consecutive weights along a layer's reduction dimension (see :mod:`dpf_ext.methods.patterns`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.estimators import MaskedGradient, StraightThrough
from .patterns import NMPattern
from .base import Method, Update
from .recipe import Recipe
from .magnitude import check_positive


@dataclass(eq=False)
class NM(Method):
    """The N:M pattern where the schedule's target is not 0, dense where it is; with the
    straight-through estimator (``pruned_decay``: SR-STE's decay of the pruned weights), or
    the masked gradient with ``feedback=False`` (one-shot N:M pruning and retraining)."""

    name = "nm"
    sharded = True

    pattern: str | NMPattern = "2:4"
    pruned_decay: float | None = None
    feedback: bool = True

    def __post_init__(self):
        if not isinstance(self.pattern, NMPattern):
            self.pattern = NMPattern.parse(self.pattern)
        self.pruned_decay = check_positive(self.pruned_decay, "pruned_decay", strict=False)
        self.feedback = bool(self.feedback)
        self.recipe = Recipe("oneshot", sparsity=self.pattern.sparsity)

    def estimator(self):
        return StraightThrough(decay=self.pruned_decay) if self.feedback else MaskedGradient()

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
