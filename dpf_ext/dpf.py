"""DPF, the paper's preset of :class:`~dpf_ext.Pruner`: Dynamic Pruning with Feedback
(Lin et al., ICLR 2020) with its own options as arguments."""

from __future__ import annotations

import torch
from torch import nn

from .budgets import Budget
from .methods.presets import dpf_options
from .pruner import Pruner
from .schedules import Schedule


class DPF(Pruner):
    """Dynamic Pruning with Feedback on the DPF layers of ``model``: a :class:`Pruner`
    whose method is ``dpf`` (or, by its arguments, gradual, filter or N:M pruning).

    Every ``update_every`` steps (16), and at the step the schedule reaches its final
    sparsity, the masks are recomputed from the dense weights by one global magnitude
    threshold for the schedule's target at that step; between updates the forward uses the
    last masks, and (``feedback=True``) the gradient of ``mask ⊙ w`` reaches the dense
    ``w`` in full, so pruned weights keep training and come back when their magnitude climbs
    over the threshold.

    Args:
        model: a model with DPF layers (see :func:`dpf_ext.sparsify`).
        sparsity: final fraction of pruned weights in ``[0, 1)``. With ``total_steps`` and no
            ``schedule`` it gives the default schedule: cubic from 0 at step 0 to
            ``sparsity`` at ``0.75 * total_steps``.
        scope: ``"global"``, ``"layer"`` (the uniform budget) or ``"filter"`` (whole
            filters).
        feedback: ``False``: gradual magnitude pruning, no feedback (the method ``gradual``).
        threshold: ``"exact"`` or ``"approx"``.
        channel_floor: keep every output channel's largest weight (default on).
        feedback_clip: bound the pruned weights' gradient (``None``: off).
        watch: warn of the signs of a feedback blow-up.
        pattern: ``"N:M"`` (e.g. ``"2:4"``) for N:M sparsity.
        pruned_decay: SR-STE's decay of the pruned weights (``None``: off).
        pruned_decay_ramp: with ``pattern``, AST's schedule of that decay: linear from 0 to
            ``pruned_decay`` over this many steps (:class:`~dpf_ext.methods.nm.NM`).

    ``schedule``, ``update_every``, ``total_steps``, ``freeze_at``, ``replace``, ``budget``,
    ``optimizer``, ``end_step``, ``seed`` and ``check_every`` are :class:`Pruner`'s (see
    :func:`dpf_ext.methods.presets.dpf_options` for how the options combine).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        schedule: Schedule | None = None,
        update_every: int | None = None,
        scope: str = "global",
        feedback: bool = True,
        threshold: str = "exact",
        total_steps: int | None = None,
        freeze_at: int | None = None,
        channel_floor: bool | None = None,
        feedback_clip: float | None = None,
        watch: bool = True,
        replace: bool = False,
        pattern: str | None = None,
        pruned_decay: float | None = None,
        pruned_decay_ramp: int | None = None,
        budget: str | Budget | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        end_step: int | None = None,
        seed: int = 0,
        check_every: int | None = 100,
    ):
        built = dpf_options(scope=scope, feedback=feedback, threshold=threshold,
                            channel_floor=channel_floor, feedback_clip=feedback_clip,
                            watch=watch, pattern=pattern, pruned_decay=pruned_decay,
                            pruned_decay_ramp=pruned_decay_ramp)
        if scope == "layer":
            if budget is not None:
                raise ValueError("scope='layer' is budget='uniform': pass one of them")
            budget = "uniform"
        super().__init__(model, built, sparsity, schedule=schedule, update_every=update_every,
                         budget=budget, total_steps=total_steps, end_step=end_step,
                         freeze_at=freeze_at, optimizer=optimizer, seed=seed, replace=replace,
                         check_every=check_every)
