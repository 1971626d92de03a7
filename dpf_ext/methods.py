"""DPF and the baselines it is compared against, all through the same :class:`DPF` API.

- ``dense``: no pruning.
- ``oneshot``: magnitude pruning once, at ``prune_at``, then training with the mask fixed
  and the gradient masked.
- ``gradual``: Zhu & Gupta's gradual magnitude pruning without feedback: the cubic schedule,
  pruned weights zeroed and never coming back.
- ``dpf``: the cubic schedule with feedback (and the channel floor, by default).

The baselines run as published: without the channel floor.
"""

from __future__ import annotations

from torch import nn

from .patterns import NMPattern
from .pruner import DPF
from .schedules import OneShot

METHODS = ("dense", "oneshot", "gradual", "dpf")


def make_pruner(
    method: str,
    model: nn.Module,
    sparsity: float,
    total_steps: int,
    prune_at: int = 0,
    channel_floor: bool = True,
    pattern: str | None = None,
    **options,
) -> DPF | None:
    """The pruner of ``method`` for ``model`` (``None`` for ``dense``).

    ``prune_at`` is the one-shot pruning step; ``channel_floor`` applies to ``dpf`` (with
    the global or layer scope); ``options`` (``update_every``, ``scope``, ``threshold``) go
    to :class:`DPF`.

    With an N:M ``pattern`` (``"2:4"``), ``sparsity`` is the pattern's and both methods
    train dense until ``prune_at``: ``oneshot`` then prunes to the pattern once and
    retrains with the mask frozen (the recipe of NVIDIA's ASP), ``dpf`` keeps updating the
    N:M masks with feedback. ``gradual`` has no N:M form.
    """
    if method == "dense":
        return None
    if pattern is not None:
        options.pop("threshold", None)
        if options.get("scope", "global") != "global":
            raise ValueError("an N:M pattern chooses the masks by itself: leave scope global")
        options.pop("scope", None)
        schedule = OneShot(NMPattern.parse(pattern).sparsity, prune_at)
        if method == "oneshot":
            return DPF(model, schedule=schedule, pattern=pattern, feedback=False, freeze_at=prune_at,
                       **options)
        if method == "dpf":
            return DPF(model, schedule=schedule, pattern=pattern, **options)
        raise ValueError(f"method {method!r} has no N:M form; use dpf or oneshot with a pattern")
    if method == "oneshot":
        return DPF(model, schedule=OneShot(sparsity, prune_at), feedback=False,
                   freeze_at=prune_at, channel_floor=False, **options)
    if method == "gradual":
        return DPF(model, sparsity, total_steps=total_steps, feedback=False, channel_floor=False,
                   **options)
    if method == "dpf":
        floor = channel_floor and options.get("scope", "global") != "filter"
        return DPF(model, sparsity, total_steps=total_steps, channel_floor=floor, **options)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
