"""SET, Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018), in the form
RigL and jaxpruner compare with: RigL's schedule of updates with random growth."""

from __future__ import annotations

import math

import torch

from ..nn import values_storage
from .base import Update
from .rigl import RigL


class SET(RigL):
    """RigL's drop (smallest active magnitudes, cosine-decayed fraction from 0.3, every 100
    steps until 75% of training, ERK) with growth at positions drawn uniformly at random
    among those not kept, new weights at 0. The original SET drops the fraction 0.3 every
    epoch, splitting it between the smallest positive and the largest negative weights, with
    ER densities (epsilon 20); that form is not implemented."""

    name = "set"
    needs_gradient = False

    def grow(self, u: Update, i: int, k: int, keep: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """``k`` positions drawn uniformly among those not in ``keep`` (no tensor of the
        layer's size)."""
        return values_storage.random_positions(math.prod(u.shapes[i]), k, generator,
                                               keep.device, excluded=keep)
