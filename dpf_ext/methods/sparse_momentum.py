"""Sparse momentum, SNFS (Dettmers & Zettlemoyer 2019; TimDettmers/sparse_learning,
``sparselearning/core.py``): the dense gradient trains a momentum for every position, and at
each update the layers that the momentum says are most useful regrow the weights that the
smallest magnitudes gave up."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..nn.estimators import StraightThrough
from .optimizer_state import check_momentum, momentum
from .base import (Method, Update, mask_of, random_masks, require_optimizer, select_top, top_k,
                   write_masks, zero_pruned_weights)
from .recipe import Recipe
from .magnitude import raise_nonfinite


def redistribute(total: int, shares: list[float], caps: list[int]) -> list[int]:
    """``total`` split in proportion to ``shares``, no part above its cap; what a capped part
    cannot take is re-spread over the others in proportion to their shares; whole numbers
    (largest remainders) summing to ``min(total, sum(caps))``."""
    total = min(total, sum(caps))
    out = [0.0] * len(shares)
    open_ = [i for i, c in enumerate(caps) if c > 0]
    left = float(total)
    while left > 1e-9 and open_:
        weight = sum(shares[i] for i in open_)
        if weight <= 0:  # no share left: spread evenly
            portion = {i: left / len(open_) for i in open_}
        else:
            portion = {i: left * shares[i] / weight for i in open_}
        left = 0.0
        for i in list(open_):
            room = caps[i] - out[i]
            take = min(portion[i], room)
            out[i] += take
            left += portion[i] - take
            if out[i] >= caps[i] - 1e-9:
                open_.remove(i)
    whole = [min(int(math.floor(v)), c) for v, c in zip(out, caps)]
    order = sorted(range(len(out)), key=lambda i: out[i] - whole[i], reverse=True)
    for i in order:
        if sum(whole) >= total:
            break
        if whole[i] < caps[i]:
            whole[i] += 1
    return whole


@dataclass(eq=False)
class SparseMomentum(Method):
    """SNFS: gradients are not masked (the straight-through estimator) and pruned weights are
    set to 0 after every step, so the optimizer's momentum at a pruned position is the
    running mean of its dense gradient. At each update (every ``update_every`` steps, which
    has no default: one epoch in the paper), with the prune rate ``p`` cosine-decayed from
    ``prune_rate`` to ``final_prune_rate`` over ``total_steps``:

    - each layer drops its ``ceil(p * n)`` smallest active magnitudes;
    - the dropped total is regrown, shared among layers in proportion to the mean
      momentum magnitude over each layer's active weights (capped at a layer's empty
      positions, the excess re-spread: :func:`redistribute`);
    - each layer grows at the largest momentum magnitudes among its positions not kept
      (SGD's buffer; Adam's ``exp_avg / (sqrt(exp_avg_sq) + 1e-8)``); new weights are 0,
      their momentum is kept (as in sparse_learning 1.0).

    The first masks are random with uniform per-layer density (the budget), as the original
    code's default initialisation."""

    name = "snfs"
    recipe = Recipe("constant", update_every="epoch", budget="uniform")

    prune_rate: float = 0.5
    final_prune_rate: float = 0.005

    def __post_init__(self):
        for name in ("prune_rate", "final_prune_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        self._total: int | None = None

    def estimator(self):
        return StraightThrough()

    def check(self, run) -> None:
        require_optimizer(run, self.name)  # growth reads its momentum
        if run.end_step is None and run.total_steps is None:
            raise ValueError("snfs decays its prune rate over training: pass total_steps=")
        self._total = run.total_steps or run.end_step
        check_momentum(run.optimizer, self.name)

    def after_step(self, run) -> None:
        zero_pruned_weights(run.layers)  # the gradient is dense; pruned weights stay 0

    def prune_rate_at(self, step: int) -> float:
        """The fraction of each layer's active weights dropped at ``step`` (cosine decay)."""
        progress = min(step, self._total) / self._total
        return self.final_prune_rate + 0.5 * (self.prune_rate - self.final_prune_rate) * (
            1 + math.cos(math.pi * progress))

    def update(self, u: Update) -> torch.Tensor:
        if u.initial:
            return write_masks(u, random_masks(u))
        rate = self.prune_rate_at(u.step)
        momenta = [momentum(u.optimizer, layer.dense_weight) for layer in u.layers]
        momenta = [m.movedim(layer.channel_dim, 0) if layer.channel_dim else m
                   for m, layer in zip(momenta, u.layers)]
        actives = [m.reshape(-1).nonzero().view(-1) for m in u.masks]
        shares = torch.stack([mo.reshape(-1)[a].abs().mean() if a.numel() else mo.new_zeros(())
                              for mo, a in zip(momenta, actives)])
        if not bool(torch.isfinite(shares).all()):
            raise ValueError(f"non-finite momentum at step {u.step}; masks left unchanged")
        keeps = []
        for i, (w, a) in enumerate(zip(u.weights, actives)):
            magnitudes = w.reshape(-1)[a].abs()
            if not bool(torch.isfinite(magnitudes).all()):
                raise_nonfinite(u)
            keeps.append(a[top_k(magnitudes, a.numel() - math.ceil(rate * a.numel()), u.generator(i))])
        removed = sum(a.numel() - k.numel() for a, k in zip(actives, keeps))
        caps = [w.numel() - k.numel() for w, k in zip(u.weights, keeps)]
        regrowth = redistribute(removed, (shares / shares.sum().clamp(min=1e-30)).tolist(), caps)
        stats = []
        for i, (m, mo, keep, k) in enumerate(zip(u.masks, momenta, keeps, regrowth)):
            scores = mo.reshape(-1).abs()
            scores[keep] = 0
            (grow,) = select_top([scores], k, u.generator(i), excluded=[keep])
            regrown = m.reshape(-1)[grow].sum()
            stats.append(torch.stack([regrown.new_tensor(keep.numel() + grow.numel()),
                                      grow.numel() - regrown, torch.zeros_like(regrown), regrown]))
            m.copy_(mask_of(m, keep, grow))
        return torch.stack(stats).to(torch.int64)
