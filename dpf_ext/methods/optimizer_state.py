"""Resetting an optimizer's state at the positions a method grows, so that a new weight
starts as a freshly initialised one: momentum and Adam's moments at 0."""

from __future__ import annotations

import torch

from ..optim import DPFAdamW, DPFSGD

RESETTABLE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""The per-weight state entries of SGD, Adam and AdamW (and of dpf_ext's fused versions)."""


def check_resettable(optimizer: torch.optim.Optimizer, method: str) -> None:
    """Raise ``TypeError`` unless ``optimizer`` is one whose state :func:`reset_state` knows:
    SGD, Adam, AdamW or their dpf_ext versions."""
    known = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, DPFSGD, DPFAdamW)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(optimizer, known):
        raise TypeError(
            f"{method} resets the optimizer state of the weights it grows, and knows the state "
            f"of SGD, Adam and AdamW (and DPFSGD, DPFAdamW) only, not {type(optimizer).__name__}"
        )


def reset_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero ``optimizer``'s per-weight state of ``param`` at the ``where`` positions (bool,
    ``param``'s shape). State of another kind is a ``TypeError``."""
    state = optimizer.state.get(param, {})
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            continue  # scalars such as Adam's step
        if key not in RESETTABLE:
            raise TypeError(f"unknown optimizer state {key!r}: cannot reset it for grown weights")
        value.masked_fill_(where, 0)


def check_momentum(optimizer: torch.optim.Optimizer, method: str) -> None:
    """Raise ``ValueError`` if ``optimizer`` keeps no momentum (SGD with ``momentum=0``)."""
    if isinstance(optimizer, torch.optim.SGD) or type(optimizer).__name__ == "DPFSGD":
        if any(group.get("momentum", 0) == 0 for group in optimizer.param_groups):
            raise ValueError(f"{method} grows where the optimizer's momentum is largest, and SGD "
                             "with momentum=0 keeps none: give it momentum")


def momentum(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """``param``'s momentum in ``optimizer``: SGD's momentum buffer, or Adam's first moment
    over the root of its second (``exp_avg / (sqrt(exp_avg_sq) + 1e-8)``); zeros before the
    first step."""
    state = optimizer.state.get(param, {})
    if "momentum_buffer" in state and state["momentum_buffer"] is not None:
        return state["momentum_buffer"]
    if "exp_avg" in state:
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
    return torch.zeros_like(param)
