"""DSR, dynamic sparse reparameterization (Mostafa & Wang, ICML 2019; the version carried in
TimDettmers/sparse_learning, ``imagenet/baseline/``): one adaptive magnitude threshold for
the whole model prunes, random positions regrow, shared among layers by what survived."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Update, mask_of, random_masks, select_top, write_masks
from .recipe import Recipe
from .sparse_momentum import redistribute


@dataclass(eq=False)
class DSR(Method):
    """At each rewire step, every active weight with ``|w| < H`` is pruned (one threshold
    ``H`` for all layers, so layers lose different shares); then ``H`` is halved if more
    than ``1.1 * prune_target`` were pruned, doubled if fewer than ``0.9 * prune_target``
    (the threshold that the next update uses). As many weights regrow at positions drawn at
    random among those empty before the update (never the just-pruned ones), shared among
    layers in proportion to their surviving weights (capped at their empty positions:
    :func:`~dpf_ext.methods.sparse_momentum.redistribute`); new weights are 0 and the
    gradient is masked.

    ``prune_target`` (N_p): weights to prune per update; default 10% of the kept weights
    (the paper: 20,000 for WRN-28-2, 400,000 for ResNet-50). ``periods``: the rewire period
    from a step on, ``{0: 100, 2000: 200, ...}`` (the paper doubles it at epochs 25, 80 and
    140 of 200); default ``{0: update_every}``. Stop rewiring with ``end_step`` (the paper:
    epoch 190 of 200). The first masks are random with uniform per-layer density."""

    name = "dsr"
    recipe = Recipe("constant", update_every=100, budget="uniform")

    initial_threshold: float = 1e-3
    prune_target: int | None = None
    periods: dict[int, int] | None = None

    def __post_init__(self):
        initial_threshold, prune_target, periods = (self.initial_threshold, self.prune_target,
                                                    self.periods)
        if isinstance(initial_threshold, bool) or not isinstance(initial_threshold, (int, float)) \
                or not initial_threshold > 0:
            raise ValueError(f"initial_threshold must be a positive number, got {initial_threshold!r}")
        if prune_target is not None and (isinstance(prune_target, bool)
                                         or not isinstance(prune_target, int) or prune_target < 1):
            raise ValueError(f"prune_target must be a positive int or None, got {prune_target!r}")
        if periods is not None:
            periods = {int(k): int(v) for k, v in dict(periods).items()}
            if 0 not in periods or any(v < 1 for v in periods.values()):
                raise ValueError(f"periods must map step 0 (and later steps) to positive periods, "
                                 f"got {periods!r}")
        self.initial_threshold = float(initial_threshold)
        self.threshold = float(initial_threshold)
        self.prune_target = prune_target
        self.periods = periods

    def due(self, step: int, every: int) -> bool:
        if self.periods is None:
            return step % every == 0
        start = max(s for s in self.periods if s <= step)
        return (step - start) % self.periods[start] == 0

    def update(self, u: Update) -> torch.Tensor:
        if u.initial:
            return write_masks(u, random_masks(u))
        pruned = [m & (w.abs() < self.threshold) for w, m in zip(u.weights, u.masks)]
        if not all(bool(torch.isfinite(w[m]).all()) for w, m in zip(u.weights, u.masks)):
            raise ValueError(f"non-finite (NaN or Inf) weights at step {u.step}; masks left unchanged")
        counts = torch.stack([torch.count_nonzero(p) for p in pruned]).tolist()
        actives = torch.stack([torch.count_nonzero(m) for m in u.masks]).tolist()
        total = sum(counts)
        target = self.prune_target or max(1, round(0.1 * sum(actives)))
        if total > 1.1 * target:
            self.threshold /= 2
        elif total < 0.9 * target:
            self.threshold *= 2
        survivors = [a - c for a, c in zip(actives, counts)]
        caps = [m.numel() - a for m, a in zip(u.masks, actives)]
        weight = max(sum(survivors), 1)
        regrowth = redistribute(total, [s / weight for s in survivors], caps)
        stats = []
        for i, (m, p, k) in enumerate(zip(u.masks, pruned, regrowth)):
            generator = u.generator(i)
            before = m.reshape(-1).nonzero().view(-1)
            scores = torch.rand(m.numel(), generator=generator, device=m.device)
            scores[before] = 0
            (grow,) = select_top([scores], k, generator, excluded=[before])
            keep = (m & ~p).reshape(-1).nonzero().view(-1)
            stats.append(torch.tensor([keep.numel() + grow.numel(), grow.numel(), 0, 0]))
            m.copy_(mask_of(m, keep, grow))
        return torch.stack(stats).to(device=u.masks[0].device, dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.threshold = float(state.get("threshold", self.initial_threshold))
