"""The method interface: what a mask-choosing method gets at an update and gives back.

The controller (:class:`dpf_ext.DPF`) decides *when* masks change and over *which layers*;
a :class:`Method` decides *which weights* each mask keeps. A method declares what it needs
(:attr:`Method.needs_gradient`: this step's dense gradient), receives an :class:`Update`,
writes the masks it was given and returns their counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from .. import ops
from ..budgets import Budget, Groups
from ..estimators import Estimator, MaskedGradient
from ..first_pass import HistogramRequest

STATS = ("kept", "reactivated", "forced", "regrown")
"""The per-layer counts a method returns from :meth:`Method.update`, in this order: weights
kept, weights kept now and pruned before (grown; for DPF, the feedback's reactivations),
weights the channel floor forced, and weights dropped and grown again in the same update."""


@dataclass
class Update:
    """What a method gets at a mask update. ``weights``/``masks``/``gradients``: this
    process's part of each prunable layer (rows of a sharded weight), output channels first;
    the method writes ``masks`` in place."""

    step: int
    sparsity: float
    names: list[str]
    layers: list
    weights: list[torch.Tensor]
    masks: list[torch.Tensor]
    full_weights: list[torch.Tensor]
    budget: Budget
    reduce: Callable[[torch.Tensor], torch.Tensor] | None
    seed: int
    initial: bool
    """The update at construction (step 0): sparse-from-scratch methods draw their first
    masks here."""
    gradients: list[torch.Tensor] | None = None
    request: HistogramRequest | None = None
    end_step: int | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    """The whole weights' shapes, output channels first."""
    target_kept: int | None = None
    """What the update aims to keep, for the report; a method that counts otherwise than
    the budget's groups (filters, N:M groups) sets it."""

    def groups(self) -> Groups:
        """The budget's split of the layers at this update's sparsity."""
        if self._groups is None:
            self._groups = self.budget.split(self.names, self.shapes, self.sparsity)
        return self._groups

    def __post_init__(self):
        self._groups: Groups | None = None

    def generator(self, layer: int) -> torch.Generator:
        """A generator seeded by the pruner's seed, this step and ``layer``: the same draws
        on every rank and in a resumed run."""
        key = hashlib.blake2b(f"{self.seed}/{self.step}/{layer}".encode(), digest_size=8).digest()
        return torch.Generator(device=self.weights[layer].device).manual_seed(
            int.from_bytes(key, "little") & (2**63 - 1))


class Method:
    """Base class of the mask-choosing methods. Override :meth:`update`; set ``name``;
    override :meth:`estimator`, :meth:`defaults`, :meth:`check`, :meth:`config`,
    :meth:`state_dict` where the method needs to. Register it with
    :func:`dpf_ext.methods.register_method` to make it available by name."""

    name: ClassVar[str] = ""
    needs_gradient: ClassVar[bool] = False
    """Whether :meth:`update` needs the dense gradient of the update step (``Update.gradients``)."""
    grows_from_zero: ClassVar[bool] = False
    """Whether weights it grows (pruned before the update, kept after) start at 0 with their
    optimizer state reset (the controller does both)."""

    def estimator(self) -> Estimator:
        """The gradient estimator the layers use under this method."""
        return MaskedGradient()

    def defaults(self, sparsity: float | None, total_steps: int | None) -> dict:
        """Controller settings this method's published form uses where the user gives
        none: ``update_every``, ``end_step``, ``budget``, ``schedule``."""
        return {}

    def check(self, pruner) -> None:
        """Raise ``ValueError`` before training if this method cannot run on ``pruner``'s
        layers with its schedule and budget."""

    def update(self, u: Update) -> torch.Tensor:
        """Write the masks for ``u`` and return the ``(layers, 4)`` int64 counts of
        :data:`STATS` (this process's part)."""
        raise NotImplementedError

    def histogram_window(self, pruner) -> ops.Window | None | bool:
        """``False`` if a fused optimizer's first pass cannot serve this method's next update;
        else the window to count with it (or ``None``). Only magnitude thresholds use it."""
        return False

    def config(self) -> dict:
        """The settings a resumed run must share (compared by ``load_state_dict``)."""
        return {}

    def state_dict(self) -> dict:
        """State that continues across updates (none by default)."""
        return {}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore :meth:`state_dict`."""


def counts(kept: list[torch.Tensor], reactivated: list[torch.Tensor],
           regrown: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The :data:`STATS` table from per-layer 0-dim counts (no floor)."""
    kept_t, react_t = torch.stack(kept), torch.stack(reactivated)
    regrown_t = torch.stack(regrown) if regrown else torch.zeros_like(kept_t)
    return torch.stack([kept_t, react_t, torch.zeros_like(kept_t), regrown_t], dim=1).to(torch.int64)


def select_top(scores: list[torch.Tensor], k: int, eligible: list[torch.Tensor] | None,
               generator: torch.Generator) -> list[torch.Tensor]:
    """Exactly ``k`` (or every eligible, if fewer) positions of the largest non-negative
    ``scores`` among the ``eligible`` ones, over all tensors together, as bool masks.

    The threshold is the op contract's histogram threshold (no sort); the positions tied at
    it are drawn at random from ``generator``, so that the count is exact. Raises
    ``ValueError`` if a score is NaN or Inf."""
    if eligible is None:
        eligible = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    k = min(k, int(torch.stack([e.sum() for e in eligible]).sum()))
    if k == 0:
        return [torch.zeros_like(e) for e in eligible]
    candidates = [torch.where(e, s, 0).float() for s, e in zip(scores, eligible)]
    tau = ops.global_threshold(candidates, k, exact=True)
    if not torch.isfinite(tau):
        raise ValueError("non-finite (NaN or Inf) scores")
    chosen = [e & (c > tau) for c, e in zip(candidates, eligible)]
    need = k - int(torch.stack([c.sum() for c in chosen]).sum())
    if need > 0:  # draw the positions tied at the threshold
        ties = [(e & (c == tau)).view(-1).nonzero().view(-1) for c, e in zip(candidates, eligible)]
        sizes = [t.numel() for t in ties]
        order = torch.randperm(sum(sizes), generator=generator, device=generator.device)[:need]
        base = 0
        for c, t, size in zip(chosen, ties, sizes):
            mine = order[(order >= base) & (order < base + size)] - base
            c.view(-1)[t[mine.to(t.device)]] = True
            base += size
    return chosen


def write_masks(u: Update, new: list[torch.Tensor], regrown: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Write ``new`` into ``u.masks`` and return the :data:`STATS` counts."""
    kept = [n.sum() for n in new]
    reactivated = [(n & ~m).sum() for n, m in zip(new, u.masks)]
    regrown = [r.sum() for r in regrown] if regrown is not None else None
    for m, n in zip(u.masks, new):
        m.copy_(n)
    return counts(kept, reactivated, regrown)


def random_masks(u: Update) -> list[torch.Tensor]:
    """Masks drawn uniformly at random with the budget's counts: each group keeps exactly
    its count (seeded per layer, see :meth:`Update.generator`)."""
    new = []
    for idx, k in u.groups():
        scores = [torch.rand(u.weights[i].shape, generator=u.generator(i), device=u.weights[i].device)
                  for i in idx]
        new.append((idx, select_top(scores, k, None, u.generator(idx[0]))))
    out: list[torch.Tensor] = [None] * len(u.weights)
    for idx, masks in new:
        for i, m in zip(idx, masks):
            out[i] = m
    return out
