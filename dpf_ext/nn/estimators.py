"""Gradient estimators: how a layer's forward weight ``mask ⊙ w`` hands its gradient back to
the dense ``w``. A DPF layer holds one (``layer.estimator``); the pruner's method chooses it.

- :class:`StraightThrough`: ``d(m ⊙ w)/dw := I``, DPF's feedback: pruned weights keep
  training. Optionally with the feedback clip and SR-STE's pruned-weight decay.
- :class:`MaskedGradient`: ``d(m ⊙ w)/dw = m``: pruned weights get no gradient (gradual
  pruning, retraining, the sparse-from-scratch methods).

Independently, a layer's :class:`GradientTap`, when armed, records the dense gradient (the
gradient with respect to ``m ⊙ w`` at every position) for methods that grow weights by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..distributed import average_over_ranks


class _ClipPrunedGradient(torch.autograd.Function):
    """Identity forward; backward clips the gradient of pruned weights to ``ratio`` times the
    largest gradient magnitude among the layer's kept weights."""

    @staticmethod
    def forward(ctx, weight, mask, ratio):
        ctx.save_for_backward(mask)
        ctx.ratio = ratio
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        bound = ctx.ratio * torch.where(mask, grad, 0).abs().amax()
        return torch.where(mask, grad, torch.minimum(torch.maximum(grad, -bound), bound)), None, None


def clip_pruned_gradient(weight: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """``weight`` whose gradient reaches the pruned coordinates clipped to ``ratio`` times the
    largest kept one of the layer (the feedback clip). A channel left with one or two small
    weights can still get a gradient hundreds of times the others' through the
    normalisation behind it; the kept weights absorb it by growing (which restores the
    channel's variance), but pruned ones do not affect the output and would keep growing."""
    return _ClipPrunedGradient.apply(weight, mask, ratio)


class _DecayPruned(torch.autograd.Function):
    """Identity forward; backward adds ``decay * w`` to the gradient of pruned weights."""

    @staticmethod
    def forward(ctx, weight, mask, decay):
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * torch.where(mask, 0, weight.detach()), None, None


def decay_pruned(weight: torch.Tensor, mask: torch.Tensor, decay: float) -> torch.Tensor:
    """``weight`` whose pruned coordinates get ``decay * w`` added to their gradient (SR-STE's
    refinement: pruned weights drift toward zero unless the loss pulls them back)."""
    return _DecayPruned.apply(weight, mask, decay)


class Estimator:
    """Base class: :meth:`masked_weight` is the weight a layer's forward uses."""

    feedback: ClassVar[bool]
    """Whether pruned weights keep their values and may come back (``False``: they get no
    gradient and the pruner sets them to 0 at each update)."""

    def masked_weight(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``weight ⊙ mask`` with this estimator's gradient."""
        raise NotImplementedError

    def sparse_weight(self, weight: torch.Tensor, mask: torch.Tensor,
                      dense_gradient: bool) -> torch.Tensor | None:
        """For the sparse products, which read the kept values of ``weight`` themselves and
        hand back the gradient of ``mask ⊙ w`` (at every position if ``dense_gradient``, else
        at the kept ones, zeros elsewhere): ``weight`` unchanged in the forward, with this
        estimator's backward applied to that gradient. ``None``: this estimator's forward is
        not ``mask ⊙ w``, and its layers take the dense path."""
        return None


class DecayRamp:
    """A pruned-weight decay that grows linearly from 0 to ``final`` over ``steps`` optimizer
    steps and then stays (AST's schedule, Huang et al. 2024: ``final * min(1, step /
    steps)``); ``float()`` of it is the decay at its ``step``, which its owner advances."""

    def __init__(self, final: float, steps: int):
        self.final, self.steps, self.step = float(final), int(steps), 0

    def __float__(self) -> float:
        return self.final * min(1.0, self.step / self.steps)

    def __repr__(self) -> str:
        return f"DecayRamp({self.final}, {self.steps}, step={self.step})"


@dataclass(frozen=True)
class StraightThrough(Estimator):
    """DPF's estimator: the full gradient reaches the dense weights. ``clip``: bound the
    pruned weights' gradient (see :func:`clip_pruned_gradient`); ``decay``: add
    ``decay * w`` to it (see :func:`decay_pruned`; a :class:`DecayRamp` for a decay that
    grows over training)."""

    clip: float | None = None
    decay: float | DecayRamp | None = None
    feedback: ClassVar[bool] = True

    def _with_decay(self, weight, mask):
        if self.clip is not None:
            weight = clip_pruned_gradient(weight, mask, self.clip)
        decay = 0.0 if self.decay is None else float(self.decay)
        return decay_pruned(weight, mask, decay) if decay else weight

    def masked_weight(self, weight, mask):
        return ops.masked_weight(self._with_decay(weight, mask), mask, True)

    def sparse_weight(self, weight, mask, dense_gradient):
        return self._with_decay(weight, mask)


class _MaskGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by the mask."""

    @staticmethod
    def forward(ctx, weight, mask):
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return ops.masked_weight(grad, mask, True), None


@dataclass(frozen=True)
class MaskedGradient(Estimator):
    """The masked gradient: pruned weights get none."""

    feedback: ClassVar[bool] = False

    def masked_weight(self, weight, mask):
        return ops.masked_weight(weight, mask, False)

    def sparse_weight(self, weight, mask, dense_gradient):
        # a sampled gradient is zero at the pruned positions already
        return _MaskGradient.apply(weight, mask) if dense_gradient else weight


class _Tap(torch.autograd.Function):
    """Identity forward; backward adds the incoming gradient into ``tap.gradient``."""

    @staticmethod
    def forward(ctx, masked, tap):
        ctx.tap = tap
        return masked.view_as(masked)

    @staticmethod
    def backward(ctx, grad):
        ctx.tap.add(grad)
        return grad, None


GRADIENT_BLOCK = 1 << 18
"""Entries of a dense gradient a growth by gradient reads at a time (1 MiB of float32;
:meth:`ProductGradient.blocks` forms no more)."""


class ProductGradient:
    """A layer's dense gradient kept as the products it is made of, ``Σ dytᵀ xt`` over the
    recorded backward passes (``dyt``: ``(rows, B)``, ``xt``: ``(cols, B)``), and formed a
    block of rows at a time (:meth:`blocks`): a layer on values storage never holds it
    whole."""

    def __init__(self):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, dyt: torch.Tensor, xt: torch.Tensor) -> None:
        """Record one backward pass's ``dyt`` and ``xt``."""
        self.pairs.append((dyt.detach(), xt.detach()))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.pairs[0][0].shape[0], self.pairs[0][1].shape[0])

    def blocks(self, entries: int | None = None):
        """``(first row, block)`` pairs covering the gradient's rows in order, each block a
        ``(rows, cols)`` tensor of at most about ``entries`` entries (default
        :data:`GRADIENT_BLOCK`; one row at least), averaged over the ranks of the default
        process group (as DDP averages gradients)."""
        rows, cols = self.shape
        entries = GRADIENT_BLOCK if entries is None else entries
        step = max(1, entries // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            block = sum(torch.mm(dyt[r0:r1], xt.t()) for dyt, xt in self.pairs)
            yield r0, average_over_ranks([block])[0]


class GradientTap:
    """Records a layer's dense gradient (with respect to ``mask ⊙ w``, every position) while
    :attr:`armed`, summed over the backward passes until :meth:`take`; a layer on values
    storage records it as a :class:`ProductGradient` (:meth:`add_product`)."""

    def __init__(self):
        self.armed = False
        self.gradient: torch.Tensor | None = None

    def __call__(self, masked: torch.Tensor) -> torch.Tensor:
        """``masked`` itself, recorded in the backward when armed."""
        if not self.armed or not torch.is_grad_enabled():
            return masked
        return _Tap.apply(masked, self)

    def add(self, grad: torch.Tensor) -> None:
        """Accumulate one backward pass's gradient."""
        grad = grad.detach()
        self.gradient = grad.clone() if self.gradient is None else self.gradient.add_(grad)

    def add_product(self, dyt: torch.Tensor, xt: torch.Tensor) -> None:
        """Accumulate one backward pass's gradient ``dytᵀ xt`` without forming it."""
        if self.gradient is None:
            self.gradient = ProductGradient()
        self.gradient.add(dyt, xt)

    def take(self) -> torch.Tensor | ProductGradient | None:
        """The recorded gradient (``None`` if none was), disarming the tap."""
        gradient, self.gradient, self.armed = self.gradient, None, False
        return gradient


def take_gradients(layers, who: str) -> list[torch.Tensor]:
    """The dense gradients the ``(name, layer)`` pairs' taps recorded (disarming them);
    ``RuntimeError`` naming ``who`` needs them and the layers that recorded none."""
    gradients = [layer.grad_tap.take() for _, layer in layers]
    missing = [name for (name, _), g in zip(layers, gradients) if g is None]
    if missing:
        raise RuntimeError(
            f"{who} needs this step's dense gradient, and layers {missing} recorded none: call "
            "loss.backward(), then optimizer.step(), then pruner.step(), with every layer in "
            "the forward"
        )
    return gradients
