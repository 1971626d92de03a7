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
    **options,
) -> DPF | None:
    """The pruner of ``method`` for ``model`` (``None`` for ``dense``).

    ``prune_at`` is the one-shot pruning step; ``channel_floor`` applies to ``dpf`` (with
    the global or layer scope); ``options`` (``update_every``, ``scope``, ``threshold``) go
    to :class:`DPF`.
    """
    if method == "dense":
        return None
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
