"""Resetting an optimizer's state at the positions a method grows, so that a new weight
starts as a freshly initialised one: momentum and Adam's moments at 0."""

from __future__ import annotations

import torch

RESETTABLE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""The per-weight state entries of SGD, Adam and AdamW (and of dpf_ext's fused versions)."""


def check_resettable(optimizer: torch.optim.Optimizer, method: str) -> None:
    """Raise ``TypeError`` unless ``optimizer`` is one whose state :func:`reset_state` knows:
    SGD, Adam, AdamW or their dpf_ext versions."""
    from .optim import DPFAdamW, DPFSGD

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
