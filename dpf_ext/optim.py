"""``DPFSGD``: SGD whose step is one fused multi-tensor pass over the dense weights."""

from __future__ import annotations

from collections import defaultdict

import torch

from . import ops
from .distributed import is_sharded


class DPFSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` (same arguments, defaults and semantics) stepping every parameter
    of a device with one fused kernel, :func:`dpf_ext.ops.feedback_sgd_step`.

    Pass the DPF ``pruner`` (or set ``optimizer.pruner``) and, on the step before each mask
    update, the kernel also accumulates the histogram of the updated prunable weights, so
    the global threshold needs no first pass over the weights (``scope="global"`` with
    feedback; other settings compute it as usual); the same pass records each channel's
    largest weight for the channel floor.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 pruner=None):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)
        self.pruner = pruner

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        request = self.pruner.histogram_request() if self.pruner is not None else None
        for group in self.param_groups:
            # one launch per (device, prunable or not): the histogram covers prunable weights
            batches = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DPFSGD does not support sparse gradients")
                if is_sharded(p):
                    raise TypeError("DPFSGD does not step sharded (DTensor) parameters; use "
                                    "torch.optim.SGD with fully_shard models")
                batches[(p.device, request is not None and request.wants(p))].append(p)
            for (_, prunable), params in batches.items():
                bufs = [self.state[p].get("momentum_buffer") for p in params]
                ops.feedback_sgd_step(
                    params, [p.grad for p in params], bufs, lr=group["lr"],
                    momentum=group["momentum"], dampening=group["dampening"],
                    nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                    maximize=group["maximize"],
                    histogram=request.histogram if prunable else None,
                    row_max=request.row_max_for(params) if prunable else None,
                )
                if prunable:
                    request.covered(params)
                if group["momentum"] != 0:
                    for p, b in zip(params, bufs):
                        self.state[p]["momentum_buffer"] = b
        return loss
