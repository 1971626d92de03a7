"""Powerpropagation (Schwarz et al., NeurIPS 2021; deepmind-research ``powerpropagation/``):
a layer's weight is ``w = v · |v|^(α-1)`` of its parameter ``v``. Gradient steps then move
large weights more than small ones, so magnitude pruners (DPF included) find masks that cost
less. ``|w|`` grows with ``|v|``, so a threshold over ``|v|`` keeps the same weights as one
over ``|w|``: every method works on ``v`` unchanged. See ``sparsify(powerprop=α)``."""

from __future__ import annotations

import numbers

import torch

SUFFIX = "_powerprop"
"""The state-dict entry ``<weight><SUFFIX>`` holds the parameter ``v`` (``<weight>``: the
effective ``w``, which a plain model loads)."""


def check_alpha(alpha) -> float:
    """``alpha`` as a float if it is a number >= 1, else ``ValueError``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha >= 1:
        raise ValueError(f"powerprop must be a number >= 1 (the exponent α), got {alpha!r}")
    return float(alpha)


def effective(v: torch.Tensor, alpha: float) -> torch.Tensor:
    """The weight ``w = v · |v|^(α-1)``."""
    return v * v.abs().pow(alpha - 1)


def parameter(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """The parameter ``v = sign(w) · |w|^(1/α)`` whose weight is ``w`` (up to rounding)."""
    return w.sign() * w.abs().pow(1.0 / alpha)
