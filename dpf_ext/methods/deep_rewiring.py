"""DeepR, deep rewiring (Bellec et al., ICLR 2018; guillaumeBellec/deep_rewiring): each
connection has a fixed sign and a parameter ``θ = sign · w``; active ones (``θ > 0``) follow
SGD plus noise and an L1 shrinkage, those that reach ``θ <= 0`` go dormant, and as many
dormant ones wake at random, so every layer keeps its count."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .base import Method, Update, mask_of, random_masks, require_optimizer, select_top, write_masks
from .recipe import Recipe

WAKE = 1e-12
"""The parameter ``θ`` a connection wakes with."""


@dataclass(eq=False)
class DeepR(Method):
    """After every optimizer step (``update_every=1``), for each layer's active weights:
    ``θ ← θ - lr · l1 + lr · N(0, noise²)`` (the gradient step is the optimizer's, with the
    masked gradient), connections with ``θ <= 0`` go dormant (weight 0), and as many dormant
    connections, drawn at random, wake with ``θ = 1e-12``. ``lr`` is the optimizer's current
    learning rate (first parameter group). Each connection's sign is fixed, drawn from the
    pruner's seed and the layer (not part of the state); the first masks are random with
    uniform density and the active weights take those signs (``|w| · sign``)."""

    name = "deepr"
    recipe = Recipe("constant", update_every=1, budget="uniform")

    l1: float = 1e-5
    noise: float = 1e-5

    def __post_init__(self):
        for name, value in (("l1", self.l1), ("noise", self.noise)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        self.l1, self.noise = float(self.l1), float(self.noise)
        self._signs: dict[int, torch.Tensor] = {}

    def check(self, run) -> None:
        require_optimizer(run, self.name)  # the learning rate of the rewiring step

    def signs(self, u: Update, i: int) -> torch.Tensor:
        """The fixed signs (+1/-1) of layer ``i``'s connections."""
        if i not in self._signs:
            key = hashlib.blake2b(f"{u.seed}/signs/{i}".encode(), digest_size=8).digest()
            g = torch.Generator(device=u.weights[i].device).manual_seed(
                int.from_bytes(key, "little") & (2**63 - 1))
            coin = torch.rand(u.weights[i].shape, generator=g, device=u.weights[i].device) < 0.5
            self._signs[i] = torch.where(coin, 1.0, -1.0).to(u.weights[i].dtype)
        return self._signs[i]

    def update(self, u: Update) -> torch.Tensor:
        if u.initial:
            stats = write_masks(u, random_masks(u))
            for i, (w, m) in enumerate(zip(u.weights, u.masks)):
                w.copy_(torch.where(m, w.abs() * self.signs(u, i), 0))
            return stats
        lr = float(u.optimizer.param_groups[0]["lr"])
        stats = []
        for i, (w, m) in enumerate(zip(u.weights, u.masks)):
            generator, sign = u.generator(i), self.signs(u, i)
            theta = w * sign
            if not bool(torch.isfinite(theta[m]).all()):
                raise ValueError(f"non-finite (NaN or Inf) weights in {u.names[i]!r} at step "
                                 f"{u.step}; masks left unchanged")
            step = torch.randn(w.shape, generator=generator, device=w.device) * (lr * self.noise)
            theta = torch.where(m, theta + step - lr * self.l1, theta).contiguous()
            alive = m & (theta > 0)
            keep = alive.reshape(-1).nonzero().view(-1)
            need = int(torch.count_nonzero(m)) - keep.numel()
            scores = torch.rand(m.numel(), generator=generator, device=m.device)
            scores[keep] = 0
            (wake,) = select_top([scores], need, generator, excluded=[keep])
            theta.view(-1)[wake] = WAKE
            new = mask_of(m, keep, wake)
            regrown = m.reshape(-1)[wake].sum()
            w.copy_(torch.where(new, theta * sign, 0))
            stats.append(torch.stack([regrown.new_tensor(keep.numel() + wake.numel()),
                                      wake.numel() - regrown, torch.zeros_like(regrown), regrown]))
            m.copy_(new)
        return torch.stack(stats).to(torch.int64)
