"""Mask-choosing methods, by name: DPF and the methods it is compared with, all through the
same :class:`dpf_ext.DPF` controller (``DPF(model, 0.9, method="rigl", ...)``).

============  ==============================================================================
``dpf``       global magnitude, straight-through feedback, cubic schedule (the default)
``gradual``   Zhu & Gupta's gradual magnitude pruning (no feedback)
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
============  ==============================================================================

A method is one file: a :class:`~dpf_ext.methods.base.Method` subclass with ``update``,
registered with :func:`register_method`.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from .base import Method, Update
from .deep_rewiring import DeepR
from .dynamic_reparameterization import DSR
from .presets import dnw, dpf, dpf_options, gradual, oneshot
from .rigl import RigL
from .sparse_evolutionary import SET
from .sparse_momentum import SparseMomentum
from .snip import SNIP
from .soft_threshold import STR
from .static import Static
from .top_kast import TopKAST

METHODS: dict[str, Callable[..., Method]] = {
    "dpf": dpf, "gradual": gradual, "oneshot": oneshot, "dnw": dnw,
    "rigl": RigL, "set": SET, "snip": SNIP, "static": Static, "snfs": SparseMomentum,
    "dsr": DSR, "deepr": DeepR, "topkast": TopKAST,
    "str": STR,
}
"""The registry: name -> factory of the method (its keyword arguments are the options)."""


def register_method(name: str, factory: Callable[..., Method]) -> None:
    """Make ``factory`` (a :class:`Method` subclass or a function returning one) available
    as ``DPF(method=name)`` and ``dpf-train --method name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {factory!r}")
    METHODS[name] = factory


def method_options(name: str) -> list[str]:
    """The options (keyword arguments) of the method ``name``."""
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


def resolve_method(method, options: dict | None, legacy: dict) -> Method:
    """The method :class:`dpf_ext.DPF` runs: ``method`` (a name with ``options``, or a built
    :class:`Method`), else the one its own arguments ``legacy`` describe (which must then
    keep their defaults)."""
    if method is None:
        if options:
            raise ValueError("method_options need a method=")
        return dpf_options(**legacy)
    defaults = inspect.signature(dpf_options).parameters
    changed = [k for k, v in legacy.items() if v != defaults[k].default]
    if changed:
        raise ValueError(f"{changed} are options of DPF's own method; with method= pass a "
                         "method's options in method_options=")
    if isinstance(method, Method):
        if options:
            raise ValueError("method_options go with a method name; this method is built")
        return method
    return make_method(method, **(options or {}))


def make_pruner(method: str, model: nn.Module, sparsity: float, total_steps: int,
                prune_at: int = 0, channel_floor: bool = True, pattern: str | None = None,
                optimizer=None, batch_loss=None, seed: int = 0, options: dict | None = None,
                **controller):
    """The pruner of ``method`` for ``model`` (``None`` for ``dense``), as ``dpf-train``
    builds it.

    ``prune_at``: the one-shot pruning step; ``channel_floor``: DPF's (the baselines run
    without it, as published); ``options``: the method's options; ``controller``
    (``update_every``, ``scope``, ``threshold``, ``budget``) go to :class:`dpf_ext.DPF`.
    ``optimizer`` is needed by methods that grow weights from zero, ``batch_loss`` by snip.

    With an N:M ``pattern`` (``"2:4"``), ``sparsity`` is the pattern's and both ``dpf`` and
    ``oneshot`` train dense until ``prune_at``: ``oneshot`` then prunes to the pattern once
    and retrains with the mask frozen (the recipe of NVIDIA's ASP), ``dpf`` keeps updating
    the N:M masks with feedback. The other methods have no N:M form.
    """
    from ..pruner import DPF
    from ..patterns import NMPattern
    from ..schedules import OneShot

    if method == "dense":
        return None
    options = dict(options or {})
    if pattern is not None:
        controller.pop("threshold", None)
        if controller.get("scope", "global") != "global":
            raise ValueError("an N:M pattern chooses the masks by itself: leave scope global")
        controller.pop("scope", None)
        schedule = OneShot(NMPattern.parse(pattern).sparsity, prune_at)
        if method == "oneshot":
            return DPF(model, schedule=schedule, pattern=pattern, feedback=False,
                       freeze_at=prune_at, **controller)
        if method == "dpf":
            return DPF(model, schedule=schedule, pattern=pattern, **controller)
        raise ValueError(f"method {method!r} has no N:M form; use dpf or oneshot with a pattern")
    scope = controller.pop("scope", "global")
    if scope == "filter":
        if method not in ("dpf", "gradual"):
            raise ValueError(f"the filter scope prunes with dpf or gradual, not {method!r}")
        return DPF(model, sparsity, total_steps=total_steps, scope="filter",
                   feedback=method == "dpf", **controller)
    if scope == "layer":
        controller.setdefault("budget", "uniform")
    valid = method_options(method) if method in METHODS else []
    for key, default in (("threshold", "exact"), ("feedback_clip", None)):
        value = controller.pop(key, default)
        if key in valid:
            options.setdefault(key, value)
        elif value != default:
            raise ValueError(f"method {method!r} takes no option {key!r}; its options are {valid}")
    if method == "dpf":
        options.setdefault("channel_floor", channel_floor)
    if method == "oneshot":
        options.setdefault("at_step", prune_at)
    if method == "snip":
        options.setdefault("batch_loss", batch_loss)
    built = make_method(method, **options)
    return DPF(model, sparsity if built.takes_target else None, total_steps=total_steps, method=built,
               optimizer=optimizer if built.grows_from_zero or built.needs_optimizer else None,
               seed=seed, **controller)


__all__ = ["DSR", "DeepR", "METHODS", "Method", "RigL", "SET", "SNIP", "STR", "SparseMomentum", "Static", "TopKAST", "Update",
           "make_method",
           "make_pruner", "method_options", "register_method", "resolve_method"]
