"""Layer-wise budgets: how a target sparsity is shared among the prunable layers.

A budget splits the layers into groups, each with the number of weights it keeps: one group
of all layers under one threshold (:class:`Global`, DPF's default), or one group per layer
with its own count (:class:`Uniform`, :class:`ERK`, :class:`PerLayer`). Budgets are pure
values, usable by every method.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

from .schedules import check_sparsity

Groups = list[tuple[list[int], int]]
"""``(layer indices, weights kept)`` per group."""


def kept_count(sparsity: float, n: int) -> int:
    """How many of ``n`` weights a target ``sparsity`` keeps: ``n - round(sparsity * n)``,
    and at least one."""
    return max(n - round(sparsity * n), 1)


class Budget:
    """Base class: override :meth:`split`."""

    name: str = ""

    def split(self, names: list[str], shapes: list[tuple[int, ...]], sparsity: float) -> Groups:
        """The groups of layers (by index into ``names``) and the weights each group keeps
        at the target ``sparsity`` over all of them."""
        raise NotImplementedError


@dataclass(frozen=True)
class Global(Budget):
    """One group: a single threshold over all layers, so layers get different sparsities
    (the DPF paper's default)."""

    name = "global"

    def split(self, names, shapes, sparsity):
        return [(list(range(len(shapes))), kept_count(sparsity, sum(map(math.prod, shapes))))]


@dataclass(frozen=True)
class Uniform(Budget):
    """The same sparsity in every layer."""

    name = "uniform"

    def split(self, names, shapes, sparsity):
        return [([i], kept_count(sparsity, math.prod(s))) for i, s in enumerate(shapes)]


def erk_densities(shapes: list[tuple[int, ...]], density: float, power: float = 1.0,
                  kernel: bool = True) -> list[float]:
    """Erdős–Rényi(-Kernel) densities of layers with weight ``shapes`` whose kept total is
    ``density`` of their weights (rigl's ``get_sparsities_erdos_renyi``).

    A layer's density is proportional to ``(sum(shape) / prod(shape)) ** power`` (with
    ``kernel=False``, ER, of the first two dimensions only: ``(n_out + n_in) / (n_out *
    n_in)``). A layer whose density would exceed 1 is made dense and the scale is solved
    again over the others, until none exceeds 1."""
    sizes = [math.prod(s) for s in shapes]
    raw = []
    for s in shapes:
        dims = s if kernel or len(s) < 2 else s[:2]
        raw.append((sum(dims) / math.prod(dims)) ** power if math.prod(dims) else 0.0)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(shapes)) if i not in dense]
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        weight = sum(raw[i] * sizes[i] for i in rest)
        if not rest or weight <= 0:
            return [1.0 if i in dense else 0.0 for i in range(len(shapes))]
        eps = budget / weight
        over = [i for i in rest if eps * raw[i] > 1]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.update(over)


@dataclass(frozen=True)
class ERK(Budget):
    """Erdős–Rényi-Kernel: a layer's density proportional to ``sum(shape) / prod(shape)``
    (raised to ``power``; 0 gives uniform), the dense-layer re-solve included (see
    :func:`erk_densities`). ``kernel=False`` is Erdős–Rényi (ER), the first two dimensions
    only."""

    power: float = 1.0
    kernel: bool = True

    @property
    def name(self) -> str:
        return "erk" if self.kernel else "er"

    def split(self, names, shapes, sparsity):
        total = sum(map(math.prod, shapes))
        if kept_count(sparsity, total) < len(shapes):
            raise ValueError(f"{self.name} at sparsity {sparsity} keeps "
                             f"{kept_count(sparsity, total)} weights, fewer than its "
                             f"{len(shapes)} layers: no distribution reaches it")
        densities = erk_densities(shapes, 1.0 - sparsity, self.power, self.kernel)
        return [([i], max(min(round(d * math.prod(s)), math.prod(s)), 1))
                for i, (d, s) in enumerate(zip(densities, shapes))]


@dataclass(frozen=True)
class PerLayer(Budget):
    """Fixed sparsities for the layers whose names match a key of ``sparsities`` (a name or
    an ``fnmatch`` pattern; the first matching key wins; 0 keeps a layer dense); the other
    layers share the target through ``rest`` (default :class:`Global`)."""

    sparsities: dict[str, float]
    rest: Budget = field(default_factory=Global)

    def __post_init__(self):
        for key, value in self.sparsities.items():
            check_sparsity(value, f"sparsity of {key!r}")

    @property
    def name(self) -> str:
        return f"per-layer({self.rest.name})"

    def _fixed(self, name: str) -> float | None:
        return next((s for p, s in self.sparsities.items() if fnmatch.fnmatchcase(name, p)), None)

    def split(self, names, shapes, sparsity):
        fixed = [self._fixed(n) for n in names]
        unmatched = [p for p in self.sparsities if not any(fnmatch.fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise ValueError(f"PerLayer: {unmatched} match no prunable layer; the layers are {names}")
        groups = [([i], kept_count(s, math.prod(shapes[i]))) for i, s in enumerate(fixed) if s is not None]
        rest = [i for i, s in enumerate(fixed) if s is None]
        if rest:
            inner = self.rest.split([names[i] for i in rest], [shapes[i] for i in rest], sparsity)
            groups += [([rest[j] for j in idx], k) for idx, k in inner]
        return groups


BUDGETS = {"global": Global, "uniform": Uniform, "erk": ERK, "er": lambda: ERK(kernel=False)}
"""Budgets by name (``DPF(budget="erk")``, ``dpf-train --budget``)."""


def make_budget(budget: Budget | str) -> Budget:
    """``budget`` itself, or the budget of that name in :data:`BUDGETS`."""
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose from {sorted(BUDGETS)} or pass a "
                         "dpf_ext.budgets.Budget")
    return BUDGETS[budget]()
