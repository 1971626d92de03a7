"""The pruner ``dpf-train`` builds from its flags: the loop's inputs go to the methods that
declare an option of that name; the rest comes from the method's recipe."""

from __future__ import annotations

from torch import nn

from ..methods import METHODS, make_method, method_options, recipe_of
from ..methods.patterns import NMPattern
from ..pruner import Pruner
from ..schedules import OneShot


def method_phases(method: str, options: dict | None = None) -> int:
    """The training phases of ``method`` with ``options`` (1 but for the prune-retrain methods,
    whose recipe trains in ``cycles``; ``--epochs`` is per phase)."""
    if method not in METHODS or recipe_of(method).schedule != "cycles":
        return 1
    return make_method(method, **{k: v for k, v in (options or {}).items()
                                  if k in method_options(method)}).phases


def make_pruner(method: str, model: nn.Module, sparsity: float, total_steps: int,
                prune_at: int = 0, channel_floor: bool = True, pattern: str | None = None,
                scope: str = "global", threshold: str = "exact",
                feedback_clip: float | None = None, optimizer=None, batch_loss=None,
                seed: int = 0, options: dict | None = None, **controller) -> Pruner | None:
    """The pruner of ``method`` for ``model`` (``None`` for ``dense``, the run without one).

    Offered to a method that has the option: ``at_step`` (``prune_at``, the one-shot
    step), ``batch_loss`` (the batch SNIP scores on) and ``channel_floor``. Given to the
    method, and an error where it has no such option: a ``threshold`` other than
    ``"exact"``, a ``feedback_clip``, an N:M ``pattern`` (``"2:4"``: the sparsity is the
    pattern's, dense until ``prune_at``) and ``scope="filter"`` (``filters=True``).
    ``scope="layer"`` is the uniform budget. ``options``: the method's own; ``controller``
    (``update_every``, ``budget``, ``schedule``, ``end_step``) go to :class:`Pruner`.
    """
    if method == "dense":
        return None
    options = dict(options or {})
    valid = method_options(method)
    asked = {"threshold": threshold if threshold != "exact" else None,
             "feedback_clip": feedback_clip, "pattern": pattern,
             "filters": True if scope == "filter" else None}
    for key, value in asked.items():
        if value is None:
            continue
        if key not in valid:
            what = {"pattern": "has no N:M form", "filters": "prunes no whole filters"}.get(
                key, f"takes no option {key!r}")
            raise ValueError(f"method {method!r} {what}; its options are {valid}")
        options.setdefault(key, value)
    offered = {"at_step": prune_at, "batch_loss": batch_loss}
    if pattern is None and scope != "filter":
        offered["channel_floor"] = channel_floor
    for key, value in offered.items():
        if key in valid:
            options.setdefault(key, value)
    if pattern is not None:
        if scope != "global":
            raise ValueError("an N:M pattern chooses the masks by itself: leave scope global")
        controller["schedule"] = OneShot(NMPattern.parse(pattern).sparsity, prune_at)
        sparsity = None
    if scope == "layer":
        controller.setdefault("budget", "uniform")
    built = make_method(method, **options)
    return Pruner(model, built, sparsity if built.recipe.takes_target else None,
                  total_steps=total_steps, optimizer=optimizer, seed=seed, **controller)
