"""Top-KAST (Jayakumar et al., NeurIPS 2020; no official code, the rule from the paper):
the forward uses the largest weights of each layer (set A, the target density D), the
backward updates a larger set B (density D + M), and a penalty keeps the weights of B that
the forward does not use small."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..nn.estimators import Estimator
from ..ops.bits import pack_bits, unpack_bits
from .base import Method, Update, select_top, write_masks, mask_of
from .recipe import Recipe


class _Penalty(torch.autograd.Function):
    """Identity forward; backward adds ``scale * w`` on set A and ``scale * w / density``
    on B \\ A (the gradient of Top-KAST's penalty, up to a factor 2 taken into ``scale``)."""

    @staticmethod
    def forward(ctx, weight, forward_set, backward_set, scale, density):
        ctx.save_for_backward(weight, forward_set, backward_set)
        ctx.scale, ctx.density = scale, density
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        weight, a, b = ctx.saved_tensors
        w = weight.detach()
        extra = torch.where(a, w, torch.where(b, w / ctx.density, 0))
        return grad + ctx.scale * extra, None, None, None, None


class TwoSets(Estimator):
    """Top-KAST's estimator for one layer: forward ``w ⊙ A`` (A: the layer's mask), the
    gradient reaches the weights of the backward set B (its method's ``backward_sets[i]``)
    only, plus the penalty's."""

    feedback = True  # weights outside A keep their values (and those in B train)

    def __init__(self, method: "TopKAST", i: int):
        self.method, self.i = method, i

    def masked_weight(self, weight, mask):
        backward = self.method.backward_sets.get(self.i)
        if backward is None:  # before the first masks
            return ops.masked_weight(weight, mask, False)
        if self.method.penalty:
            weight = _Penalty.apply(weight, mask, backward, self.method.penalty,
                                    self.method.densities[self.i])
        return ops.masked_weight(ops.masked_weight(weight, backward, False), mask, True)


@dataclass(eq=False)
class TopKAST(Method):
    """Per layer (the budget's counts, uniform by default), at every update: A = the
    ``k`` largest ``|w|`` (the forward's mask), B = A plus the next ``round(extra · n)``
    largest (``extra``: M, the backward set's added density; 0.1 by default). Between
    updates the forward uses ``w ⊙ A`` and only B's weights are updated; the others keep
    their values and return to A when they outgrow it. ``penalty`` (λ, 1e-4 by default)
    adds ``λ·w`` to the gradient on A and ``λ·w / D`` on B \\ A (D: the layer's density).

    How often the sets are recomputed is not in the paper: here every ``update_every``
    steps, 16 by default (DPF's period). The constant target applies from step 0."""

    name = "topkast"
    recipe = Recipe("constant", budget="uniform")

    extra: float = 0.1
    penalty: float = 1e-4

    def __post_init__(self):
        extra, penalty = self.extra, self.penalty
        if isinstance(extra, bool) or not isinstance(extra, (int, float)) or not 0 <= extra < 1:
            raise ValueError(f"extra must be in [0, 1), got {extra!r}")
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 0:
            raise ValueError(f"penalty must be a non-negative number, got {penalty!r}")
        self.extra, self.penalty = float(extra), float(penalty)
        self.backward_sets: dict[int, torch.Tensor] = {}
        self.densities: dict[int, float] = {}
        self._channel_dims: list[int] = []

    def layer_estimator(self, i, shared):
        return TwoSets(self, i)

    def check(self, run) -> None:
        self._channel_dims = [layer.channel_dim for _, layer in run.layers]

    def _install(self, i: int, backward_cm: torch.Tensor) -> None:
        """Keep layer ``i``'s backward set (given output channels first) in its layout."""
        dim = self._channel_dims[i]
        self.backward_sets[i] = backward_cm.movedim(0, dim).contiguous() if dim else backward_cm

    def update(self, u: Update) -> torch.Tensor:
        new: list[torch.Tensor] = [None] * len(u.weights)
        backward: list[torch.Tensor] = [None] * len(u.weights)
        for idx, k in u.groups():
            scores = [u.weights[i].abs().contiguous() for i in idx]
            if not all(bool(torch.isfinite(s).all()) for s in scores):
                raise ValueError(f"non-finite (NaN or Inf) weights in {[u.names[i] for i in idx]} "
                                 f"at step {u.step}; masks left unchanged")
            generator = u.generator(idx[0])
            forward = select_top(scores, k, generator)
            for s, f in zip(scores, forward):
                s.view(-1)[f] = 0
            more = round(self.extra * sum(u.weights[i].numel() for i in idx))
            added = select_top(scores, more, generator, excluded=forward)
            for i, f, a in zip(idx, forward, added):
                new[i] = mask_of(u.weights[i], f)
                backward[i] = mask_of(u.weights[i], f, a)
                self.densities[i] = max(k / sum(u.weights[j].numel() for j in idx), 1e-12)
        stats = write_masks(u, new)
        for i, b in enumerate(backward):
            self._install(i, b)
        return stats

    def state_dict(self) -> dict:
        return {"backward_sets": {i: (list(b.shape), pack_bits(b)) for i, b in self.backward_sets.items()},
                "densities": dict(self.densities)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.densities = {int(i): float(d) for i, d in state.get("densities", {}).items()}
        self.backward_sets = {}
        for i, (shape, bits) in state.get("backward_sets", {}).items():
            n = 1
            for d in shape:
                n *= d
            self.backward_sets[int(i)] = unpack_bits(torch.as_tensor(bits).to(device), n).view(shape)
