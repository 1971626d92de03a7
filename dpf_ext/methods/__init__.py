"""Mask-choosing methods, by name: DPF and the methods it is compared with, all through the
same :class:`dpf_ext.Pruner` controller (``Pruner(model, "rigl", 0.9, ...)``).

============  ==============================================================================
``dpf``       global magnitude, straight-through feedback, cubic schedule (the default)
``gradual``   Zhu & Gupta's schedule, one global magnitude threshold, no feedback
``oneshot``   magnitude pruning once, then the mask frozen
``dnw``       straight-through magnitude, mask every step (DNW, jaxpruner's magnitude_ste)
``rigl``      RigL: drop smallest magnitudes, grow largest dense gradients, ERK
``set``       SET: RigL's machinery with random growth
``snip``      SNIP: ``|g ⊙ w|`` on one batch before training, mask fixed
``static``    a random mask (ERK by default), fixed
``snfs``      sparse momentum: drop smallest magnitudes, regrow by momentum across layers
``dsr``       DSR: one adaptive global threshold prunes, random regrowth by survivors
``deepr``     DeepR: fixed signs, noisy L1 steps, dormant at zero, random wake-ups
``topkast``   Top-KAST: forward on the top-D, updates on the larger top-(D+M), a penalty
``str``       STR: a learned soft threshold per layer; the sparsity emerges
``imp``       iterative magnitude pruning: train, prune, rewind, retrain, in cycles
``sms``       sparse model soups: each cycle trains copies and averages them
============  ==============================================================================

A method is one file: a :class:`~dpf_ext.methods.base.Method` subclass with ``update`` and
its :class:`~dpf_ext.methods.recipe.Recipe`, registered with :func:`register_method`.
"""

from __future__ import annotations

import inspect
from typing import Callable

from .base import Method, PrunerView, Update
from .deep_rewiring import DeepR
from .dynamic_reparameterization import DSR
from .imp import IMP
from .presets import dnw, dpf, gradual, oneshot
from .recipe import Recipe
from .rigl import RigL
from .sparse_evolutionary import SET
from .sparse_momentum import SparseMomentum
from .snip import SNIP
from .soft_threshold import STR
from .soups import SparseModelSoups
from .static import Static
from .top_kast import TopKAST

METHODS: dict[str, Callable[..., Method]] = {
    "dpf": dpf, "gradual": gradual, "oneshot": oneshot, "dnw": dnw,
    "rigl": RigL, "set": SET, "snip": SNIP, "static": Static, "snfs": SparseMomentum,
    "dsr": DSR, "deepr": DeepR, "topkast": TopKAST,
    "str": STR, "imp": IMP, "sms": SparseModelSoups,
}
"""The registry: name -> factory of the method (its keyword arguments are the options)."""


def values_storage_methods() -> list[str]:
    """The registered methods that run on values storage (:attr:`Method.values_storage`)."""
    return [name for name, factory in METHODS.items() if getattr(factory, "values_storage", False)]


def register_method(name: str, factory: Callable[..., Method]) -> None:
    """Make ``factory`` (a :class:`Method` subclass, or a function returning one with the
    :class:`Recipe` of what it returns as its ``recipe`` attribute) available as
    ``Pruner(model, name)`` and ``dpf-train --method name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    if not isinstance(getattr(factory, "recipe", None), Recipe):
        raise TypeError(f"factory {factory!r} carries no recipe: register a Method subclass, "
                        "or set the function's .recipe to a dpf_ext.methods.Recipe")
    METHODS[name] = factory


def recipe_of(name: str) -> Recipe:
    """The recipe of the method ``name`` (what its options do not change), without
    building it."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name].recipe


def method_options(name: str) -> list[str]:
    """The options (keyword arguments) of the method ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return [p for p in inspect.signature(METHODS[name]).parameters if p != "self"]


def make_method(name: str, **options) -> Method:
    """The method ``name`` built with ``options``; an unknown name or option is a
    ``ValueError`` listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    valid = method_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {name!r} takes no option {unknown}; its options are {valid}")
    method = METHODS[name](**options)
    if not isinstance(method, Method):
        raise TypeError(f"the factory of {name!r} returned {type(method).__name__}, not a Method")
    return method


__all__ = ["DSR", "DeepR", "IMP", "METHODS", "Method", "PrunerView", "Recipe", "RigL", "SET",
           "SNIP", "STR", "SparseModelSoups", "SparseMomentum", "Static", "TopKAST", "Update",
           "make_method", "values_storage_methods",
           "method_options", "recipe_of", "register_method"]
