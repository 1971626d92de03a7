"""Structured magnitude pruning: whole output filters (rows of a Linear) by their L2 norm,
one threshold over the filters of a budget group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..nn.estimators import MaskedGradient, StraightThrough
from .base import Method, Update
from .magnitude import THRESHOLDS, check_positive, raise_nonfinite


def filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter (row of a linear layer) in float32."""
    return weight.detach().float().flatten(1).norm(dim=1)


@dataclass(eq=False)
class FilterMagnitude(Method):
    """Keep the filters of largest L2 norm; the sparsity counts filters. ``feedback`` and
    ``threshold``, ``feedback_clip``, ``pruned_decay`` as in
    :class:`~dpf_ext.methods.magnitude.Magnitude` (no channel floor: this method prunes
    whole channels by design)."""

    name = "filter"
    sharded = True

    feedback: bool = True
    threshold: str = "exact"
    feedback_clip: float | None = None
    pruned_decay: float | None = None

    def __post_init__(self):
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {self.threshold!r}")
        self.feedback = bool(self.feedback)
        self.feedback_clip = check_positive(self.feedback_clip, "feedback_clip")
        self.pruned_decay = check_positive(self.pruned_decay, "pruned_decay", strict=False)

    def estimator(self):
        if not self.feedback:
            return MaskedGradient()
        return StraightThrough(self.feedback_clip, self.pruned_decay)

    def update(self, u: Update) -> torch.Tensor:
        scores = [filter_scores(w) for w in u.weights]
        groups = u.budget.split(u.names, [s[:1] for s in u.shapes], u.sparsity)
        u.target_kept = sum(k for _, k in groups)
        taus = torch.zeros(len(scores), device=scores[0].device)
        for idx, k in groups:
            tau = ops.global_threshold([scores[i] for i in idx], k, self.threshold == "exact",
                                       reduce=u.reduce)
            taus[idx] = tau
        if bool(torch.isnan(taus).any()):
            raise_nonfinite(u)
        expanded = [s.view(-1, *[1] * (w.dim() - 1)).expand_as(w) for s, w in zip(scores, u.weights)]
        stats = ops.update_masks(expanded, taus, u.masks, shrink_only=not self.feedback)
        return torch.cat([stats, torch.zeros_like(stats)], dim=1)
