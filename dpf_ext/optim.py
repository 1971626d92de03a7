"""Fused DPF optimizers: ``DPFSGD`` and ``DPFAdamW``, each step one multi-tensor pass over
the dense weights that can also count, for the pruner, the histogram of the updated
weights."""

from __future__ import annotations

from collections import defaultdict

import torch

from . import ops
from .distributed import is_sharded


class _FusedOptimizer(torch.optim.Optimizer):
    """What the fused optimizers share: the pruner hook and the batching of parameters.

    Subclasses implement :meth:`_step_batch` for a list of parameters of one device that
    all get (or all do not get) counted into the pruner's histogram.
    """

    def __init__(self, params, defaults: dict, pruner=None):
        super().__init__(params, defaults)
        self.pruner = pruner

    def _batch_key(self, param: torch.Tensor) -> tuple:
        """Parameters with equal keys go into one launch."""
        return (param.device,)

    def _step_batch(self, group: dict, params: list[torch.Tensor], first_pass: dict) -> None:
        """Step ``params``; ``first_pass``: the ``histogram``, ``row_max`` and ``window``
        keyword arguments of the fused op (empty: count nothing)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        request = self.pruner.histogram_request() if self.pruner is not None else None
        name = type(self).__name__
        for group in self.param_groups:
            # one launch per batch key and prunable or not: the histogram covers the
            # prunable weights
            batches = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if is_sharded(p):
                    raise TypeError(f"{name} does not step sharded (DTensor) parameters; use "
                                    "torch's optimizers with fully_shard models")
                prunable = request is not None and request.wants(p)
                batches[(*self._batch_key(p), prunable)].append(p)
            for key, params in batches.items():
                prunable = key[-1]
                first_pass = dict(histogram=request.histogram, row_max=request.row_max_for(params),
                                  window=request.window) if prunable else {}
                self._step_batch(group, params, first_pass)
                if prunable:
                    request.covered(params)
        return loss


class DPFSGD(_FusedOptimizer):
    """``torch.optim.SGD`` (same arguments, defaults and semantics) stepping every parameter
    of a device with one fused kernel, :func:`dpf_ext.ops.feedback_sgd_step`.

    Pass the DPF ``pruner`` (or set ``optimizer.pruner``) and, on the step before each mask
    update, the kernel also accumulates the histogram of the updated prunable weights, so
    the global threshold needs no first pass over the weights (``scope="global"`` with
    feedback; other settings compute it as usual); the same pass records each channel's
    largest weight for the channel floor and, for the exact threshold, the window around
    the previous one, so that an update whose threshold lands there reads no weight again.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 pruner=None):
        if not 0.0 <= lr:  # NaN included
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, pruner)

    def _step_batch(self, group, params, first_pass):
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        ops.feedback_sgd_step(
            params, [p.grad for p in params], bufs, lr=group["lr"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"],
            weight_decay=group["weight_decay"], maximize=group["maximize"], **first_pass,
        )
        if group["momentum"] != 0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b


class DPFAdamW(_FusedOptimizer):
    """``torch.optim.AdamW`` (same arguments, defaults, state and ``state_dict``; its state
    dicts load both ways) stepping every parameter of a device with one fused kernel,
    :func:`dpf_ext.ops.feedback_adamw_step`; hands the pruner the histogram of the updated
    weights as :class:`DPFSGD` does. Math in float32 for every dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, pruner=None):
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults, pruner)

    def _batch_key(self, param):
        # the bias corrections depend on the step count: one launch per count
        state = self.state[param]
        return (param.device, int(state["step"]) if "step" in state else 0)

    def _step_batch(self, group, params, first_pass):
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        beta1, beta2 = group["betas"]
        ops.feedback_adamw_step(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
            step=int(states[0]["step"]), lr=float(group["lr"]), beta1=beta1, beta2=beta2,
            eps=group["eps"], weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
            maximize=group["maximize"], **first_pass,
        )
