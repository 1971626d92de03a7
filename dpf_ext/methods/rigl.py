"""RigL, "Rigging the Lottery" (Evci et al., ICML 2020; google-research/rigl,
``sparse_optimizers_base.py``): sparse from the start; every ``update_every`` steps each layer
drops its smallest active magnitudes and grows as many positions of largest dense-gradient
magnitude."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import (Method, Update, mask_of, random_masks, random_positions, require_optimizer,
                   select_top, top_k, write_masks)
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
      across ranks) among all positions not kept by the drop, the just-dropped included.

    A position dropped and grown in the same update keeps its value and optimizer state
    (counted as ``regrown``); a truly new one starts at 0 with its optimizer state (SGD
    momentum, Adam's moments) reset. Ties at either threshold are drawn at random, seeded by
    the pruner's seed, the step and the layer (RigL adds noise of standard deviation 1e-5 to
    the scores instead, which also reorders near-ties). The optimizer step of an update step
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

    def grow_scores(self, u: Update, i: int, generator: torch.Generator) -> torch.Tensor:
        """Non-negative growth scores of layer ``i``, a tensor the update may overwrite (RigL:
        the dense gradient's magnitude, in place of the gradient, which is the update's)."""
        return u.gradients[i].abs_()

    def initial_positions(self, u: Update) -> list[torch.Tensor]:
        return random_positions(u)

    def update(self, u: Update) -> torch.Tensor:
        if u.initial:
            return write_masks(u, random_masks(u))
        fraction = self.drop_fraction_at(u.step)
        before = [m.clone() for m in u.masks]
        stats = []
        for i, (w, m) in enumerate(zip(u.weights, u.masks)):
            generator = u.generator(i)
            active = m.reshape(-1).nonzero().view(-1)
            k = int(active.numel() * fraction)
            try:
                magnitudes = w.reshape(-1)[active].abs()
                if not bool(torch.isfinite(magnitudes).all()):
                    raise ValueError("non-finite weights")
                keep = active[top_k(magnitudes, active.numel() - k, generator)]
                scores = self.grow_scores(u, i, generator).reshape(-1)
                scores[keep] = 0
                (grow,) = select_top([scores], k, generator, excluded=[keep])
            except ValueError:
                raise_nonfinite(u)
            regrown = m.reshape(-1)[grow].sum()
            stats.append(torch.stack([regrown.new_tensor(active.numel()),
                                      grow.numel() - regrown, torch.zeros_like(regrown), regrown]))
            m.copy_(mask_of(m, keep, grow))
        u.start_from_zero(before)
        return torch.stack(stats).to(torch.int64)
