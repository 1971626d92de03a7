"""STR, soft threshold reparameterization (Kusupati et al., ICML 2020; RAIVNLab/STR
``utils/conv_type.py`` STRConv): each layer learns a threshold, and its weight is
``sign(w) · relu(|w| - sigmoid(s))``; the sparsity is what the thresholds make of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.estimators import Estimator
from .base import Method, Update, require_optimizer, write_masks
from .recipe import Recipe

PARAMETER = "str_threshold"
"""The name of the threshold parameter ``s`` on each layer (``sigmoid(s)`` is the
threshold)."""


class SoftThreshold(Estimator):
    """STR's forward ``sign(w) · relu(|w| - sigmoid(s))`` (the mask is not used: it is what
    the threshold keeps); the gradient reaches the weights above the threshold and ``s``."""

    feedback = True  # weights under the threshold keep their values (and may come back)

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def masked_weight(self, weight, mask):
        tau = torch.sigmoid(getattr(self.layer, PARAMETER))
        return weight.sign() * torch.relu(weight.abs() - tau)


@dataclass(eq=False)
class STR(Method):
    """A learnable threshold ``s`` per layer (a scalar parameter, ``initial_threshold`` at
    the start: ``sigmoid(-5)`` ≈ 0.0067), trained with the weights by the optimizer (a new
    parameter group with ``weight_decay``, by default the optimizer's: the decay on ``s`` is
    what raises the threshold). No target sparsity: it emerges, and ``report()`` shows it
    (the masks are recomputed as ``|w| > sigmoid(s)`` every ``update_every`` step, 1 by
    default); steer it with ``initial_threshold`` and ``weight_decay``.

    The parameters join the layers (``<layer>.str_threshold``), so build the pruner before
    wrapping the model in DDP. :meth:`~dpf_ext.DPF.finalize` writes ``sign(w) · relu(|w| -
    sigmoid(s))`` into the weights and removes the parameters."""

    name = "str"
    recipe = Recipe("constant", update_every=1, takes_target=False)

    initial_threshold: float = -5.0
    weight_decay: float | None = None

    def __post_init__(self):
        initial_threshold, weight_decay = self.initial_threshold, self.weight_decay
        if isinstance(initial_threshold, bool) or not isinstance(initial_threshold, (int, float)):
            raise ValueError(f"initial_threshold must be a number, got {initial_threshold!r}")
        if weight_decay is not None and (isinstance(weight_decay, bool) or
                                         not isinstance(weight_decay, (int, float)) or weight_decay < 0):
            raise ValueError(f"weight_decay must be a non-negative number or None, got {weight_decay!r}")
        self.initial_threshold = float(initial_threshold)

    def layer_estimator(self, i, shared):
        return SoftThreshold(self._layers[i])

    def check(self, run) -> None:
        require_optimizer(run, self.name)  # the thresholds join it as a parameter group
        self._layers = [layer for _, layer in run.layers]
        fresh = []
        for layer in self._layers:
            if not hasattr(layer, PARAMETER):
                weight = layer.dense_weight
                layer.register_parameter(PARAMETER, nn.Parameter(
                    torch.full((), self.initial_threshold, dtype=weight.dtype, device=weight.device)))
                fresh.append(getattr(layer, PARAMETER))
        if fresh:
            decay = (run.optimizer.param_groups[0].get("weight_decay", 0.0)
                     if self.weight_decay is None else self.weight_decay)
            run.optimizer.add_param_group({"params": fresh, "weight_decay": decay})

    def update(self, u: Update) -> torch.Tensor:
        new = []
        for w, layer in zip(u.weights, u.layers):
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"non-finite (NaN or Inf) weights at step {u.step}; masks left "
                                 "unchanged")
            new.append(w.abs() > torch.sigmoid(getattr(layer, PARAMETER).detach()))
        u.target_kept = 0  # no target: the report shows what the thresholds keep
        return write_masks(u, new)

    def finalize(self, run) -> None:
        for _, layer in run.layers:
            weight = layer.dense_weight
            weight.copy_(SoftThreshold(layer).masked_weight(weight, layer.mask))
            del layer._parameters[PARAMETER]
