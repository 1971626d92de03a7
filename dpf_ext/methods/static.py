"""Static sparse training: a random mask drawn once at initialisation from a layer-wise
distribution (uniform, ER or ERK: the budget), never updated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Method, Update, random_masks, random_positions, write_masks
from .recipe import Recipe


@dataclass(eq=False)
class Static(Method):
    """A random mask with the budget's per-layer counts (ERK by default), fixed for all of
    training; the gradient is masked. The baseline every dynamic method has to beat."""

    name = "static"
    recipe = Recipe("constant", fixed=True, budget="erk")
    values_storage = True

    def initial_positions(self, u: Update) -> list[torch.Tensor]:
        return random_positions(u)

    def update(self, u: Update) -> torch.Tensor:
        return write_masks(u, random_masks(u))
