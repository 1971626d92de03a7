"""SNIP, single-shot network pruning (Lee et al., ICLR 2019; namhoonlee/snip-public
``snip/model.py``): once, before training, keep the weights of largest ``|g ⊙ w|`` on one
batch; the mask is then fixed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .base import Method, Update, mask_of, select_top, unrecorded, write_masks
from .recipe import Recipe


@dataclass(eq=False)
class SNIP(Method):
    """Connection sensitivity ``|g ⊙ w|`` on the batch ``batch_loss(model)`` (a scalar loss;
    normalisation layers in inference mode, as in the official code), one threshold over
    all prunable weights by default (the budget); the mask is fixed and the gradient masked.
    The official code also scores biases; this one scores the prunable weights, as RigL's and
    jaxpruner's versions do."""

    name = "snip"
    recipe = Recipe("constant", fixed=True, budget="global")
    values_storage = True

    batch_loss: Callable[[nn.Module], torch.Tensor] | None = unrecorded(None)

    def __post_init__(self):
        if self.batch_loss is None or not callable(self.batch_loss):
            raise ValueError("snip scores the weights on one batch before training: pass "
                             "method_options={'batch_loss': lambda model: loss_fn(model(x), y)}")
        self._model: nn.Module | None = None

    def check(self, run) -> None:
        self._model = run.model

    def update(self, u: Update) -> torch.Tensor:
        weights = [layer.dense_weight for layer in u.layers]
        was_training = self._model.training
        self._model.eval()
        try:
            with torch.enable_grad():
                grads = torch.autograd.grad(self.batch_loss(self._model), weights, allow_unused=True)
        finally:
            self._model.train(was_training)
        scores = []
        for name, layer, w, g in zip(u.names, u.layers, weights, grads):
            if g is None:
                raise ValueError(f"snip: layer {name!r} got no gradient from batch_loss")
            score = (g * w).detach().abs()
            scores.append(score.movedim(layer.channel_dim, 0) if layer.channel_dim else score)
        new: list[torch.Tensor] = [None] * len(scores)
        for idx, k in u.groups():
            try:
                chosen = select_top([scores[i] for i in idx], k, u.generator(idx[0]))
            except ValueError:
                raise ValueError(f"snip: non-finite scores (NaN or Inf weights or gradients) in "
                                 f"{[u.names[i] for i in idx]}; masks left unchanged") from None
            for i, c in zip(idx, chosen):
                new[i] = mask_of(scores[i], c)
        return write_masks(u, new)
