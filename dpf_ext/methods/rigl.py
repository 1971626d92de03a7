"""RigL, "Rigging the Lottery" (Evci et al., ICML 2020; google-research/rigl,
``sparse_optimizers_base.py``): sparse from the start; every ``update_every`` steps each layer
drops its smallest active magnitudes and grows as many positions of largest dense-gradient
magnitude."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import (Method, Update, random_masks, random_positions, require_optimizer, top_k,
                   top_positions, write_masks)
from .recipe import Recipe
from .magnitude import raise_nonfinite


@dataclass(eq=False)
class RigL(Method):
    """RigL's drop and growth, per layer, at constant sparsity.

    At construction, a random mask with the budget's per-layer counts (ERK by default). At
    each update of step ``t`` (every 100 steps by default, until ``end_step``: 75% of
    ``total_steps``), in each layer with ``n`` active weights, ``k = int(n * f(t))`` with
    ``f(t) = drop_fraction / 2 * (1 + cos(pi * min(t, T) / T))``, ``T = end_step``:

    - drop: the ``k`` active weights of smallest ``|w|``;
    - grow: the ``k`` positions of largest ``|g|`` (this step's dense gradient, all-reduced
      across ranks, read a block of rows at a time) among all positions not kept by the
      drop, the just-dropped included.

    A position dropped and grown in the same update keeps its value and optimizer state
    (counted as ``regrown``); a truly new one starts at 0 with its optimizer state (SGD
    momentum, Adam's moments) reset. Ties at either threshold are broken at random, seeded by
    the pruner's seed, the step and the layer (growth: by a hash of the position, so that a
    layer on values storage, which forms its gradient by blocks, chooses as a dense one;
    RigL adds noise of standard deviation 1e-5 to the scores instead, which also reorders
    near-ties). The optimizer step of an update step
    is applied, unlike RigL's own code, which skips it (the pruner runs after it).
    """

    name = "rigl"
    recipe = Recipe("constant", update_every=100, budget="erk", last_update=0.75)
    needs_gradient = True
    values_storage = True

    drop_fraction: float = 0.3

    def __post_init__(self):
        d = self.drop_fraction
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"drop_fraction must be in (0, 1], got {d!r}")
        self.drop_fraction = float(d)
        self._end: int | None = None

    def check(self, run) -> None:
        require_optimizer(run, self.name)  # new weights start with their state reset
        if run.end_step is None:
            raise ValueError(f"{self.name}'s drop fraction decays to its last update step: pass "
                             "total_steps= (the last update at 75% of it) or end_step=")
        self._end = max(run.end_step, 1)

    def drop_fraction_at(self, step: int) -> float:
        """The fraction of each layer's active weights replaced at ``step`` (cosine decay)."""
        return 0.5 * self.drop_fraction * (1 + math.cos(math.pi * min(step, self._end) / self._end))

    def grow(self, u: Update, i: int, k: int, keep: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """The ``k`` flat positions layer ``i`` grows, none of the sorted ``keep`` (RigL: the
        largest ``|g|`` of this step's dense gradient, read a block of rows at a time; ties
        by a hash of the position seeded by ``generator``)."""
        seed = int(torch.randint(2**31 - 1, (), generator=generator))
        return top_positions(((start, block.abs()) for start, block in u.gradient_blocks(i)),
                             k, keep, seed)

    def update(self, u: Update) -> torch.Tensor:
        if u.initial:
            return write_masks(u, random_masks(u))
        fraction = self.drop_fraction_at(u.step)
        stats = []
        for i in range(len(u.layers)):
            generator = u.generator(i)
            active, values = u.kept(i)
            k = int(active.numel() * fraction)
            try:
                magnitudes = values.abs()
                if not bool(torch.isfinite(magnitudes).all()):
                    raise ValueError("non-finite weights")
                keep = active[top_k(magnitudes, active.numel() - k, generator)].sort().values
                grow = self.grow(u, i, k, keep, generator)
            except ValueError:
                raise_nonfinite(u)
            regrown = torch.isin(grow, active).sum()
            stats.append(torch.stack([regrown.new_tensor(active.numel()),
                                      grow.numel() - regrown, torch.zeros_like(regrown), regrown]))
            u.set_kept(i, keep, grow)
        return torch.stack(stats).to(torch.int64)
