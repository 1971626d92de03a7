"""Magnitude pruning: each group of the budget keeps its largest ``|w|``. With the
straight-through estimator this is DPF (Lin et al., ICLR 2020); with the masked gradient and
masks that only shrink, Zhu & Gupta's gradual magnitude pruning (and one-shot pruning with a
one-step schedule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from ..budgets import Global
from .channels import BlowUpWatch, ChannelFloor, below, new_row_max
from ..nn.estimators import MaskedGradient, StraightThrough
from .first_pass import WarmStart
from ..ops.bits import NONFINITE_BIN
from .base import Method, Update, unrecorded

THRESHOLDS = ("exact", "approx")


def check_positive(value, name: str, strict: bool = True) -> float | None:
    """``value`` as a float if it is ``None`` or a positive (``strict``) or non-negative
    number, else ``ValueError`` naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value > 0 if strict else value >= 0):
        kind = "positive" if strict else "non-negative"
        raise ValueError(f"{name} must be a {kind} number or None, got {value!r}")
    return float(value)


def threshold(weights, k, exact, reduce, row_max, histogram=None, window=None) -> torch.Tensor:
    """The threshold over ``weights`` less each row's largest (recorded into ``row_max``),
    keeping ``k`` of the others; +Inf (the forced weights alone) for ``k == 0``, NaN if a
    weight is. ``histogram``: the first pass, if already counted (with ``window``);
    ``window`` lets the exact search finish in that pass when the threshold moved little
    (see :class:`~dpf_ext.methods.first_pass.WarmStart`)."""
    if k < 1:
        if histogram is None:  # the pass still records the rows and meets any NaN
            histogram = ops.magnitude_histogram(weights, row_max=row_max)
        nonfinite = reduce(histogram.clone()) if reduce else histogram
        nonfinite = nonfinite[NONFINITE_BIN:].sum() > 0
        inf = torch.full((), float("inf"), device=weights[0].device)
        return torch.where(nonfinite, torch.full_like(inf, float("nan")), inf)
    return ops.global_threshold(weights, k, exact, histogram=histogram, reduce=reduce,
                                row_max=row_max, window=window)


def raise_nonfinite(u: Update) -> None:
    """The error of an update that met NaN or Inf weights (the masks are unchanged)."""
    weights = u.weights if u.weights is not None else [u.kept(i)[1] for i in range(len(u.names))]
    bad = [name for name, w in zip(u.names, weights) if not torch.isfinite(w).all()]
    raise ValueError(f"non-finite (NaN or Inf) weights in {bad or 'another rank'} at step "
                     f"{u.step}; masks left unchanged")


@dataclass(eq=False)
class Magnitude(Method):
    """Keep the largest ``|w|`` of each group of the budget (one global threshold by default).

    Args:
        feedback: ``True``: DPF's straight-through estimator, pruned weights keep training
            and come back. ``False``: gradual magnitude pruning: masked gradient, pruned
            weights zeroed and never back (masks only shrink).
        threshold: ``"exact"`` (histogram passes) or ``"approx"`` (one pass; keeps the whole
            histogram bin at the threshold, a relative error below 2^-7 in magnitude).
        channel_floor: keep every output channel's largest weight, inside the same budget
            (see :class:`dpf_ext.methods.channels.ChannelFloor`).
        feedback_clip: with feedback, bound the pruned weights' gradient (see
            :class:`dpf_ext.nn.estimators.StraightThrough`).
        pruned_decay: with feedback, SR-STE's decay of the pruned weights.
        watch: warn of the signs of a feedback blow-up (with feedback only).
    """

    sharded = True

    feedback: bool = True
    threshold: str = "exact"
    channel_floor: bool = True
    feedback_clip: float | None = None
    pruned_decay: float | None = None
    watch: bool = unrecorded(True)

    def __post_init__(self):
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {self.threshold!r}")
        self.feedback = bool(self.feedback)
        self.channel_floor = bool(self.channel_floor)
        self.feedback_clip = check_positive(self.feedback_clip, "feedback_clip")
        self.pruned_decay = check_positive(self.pruned_decay, "pruned_decay", strict=False)
        self.watch = bool(self.watch) and self.feedback
        self._warm = WarmStart()
        self._floor: ChannelFloor | None = None
        self._watch: BlowUpWatch | None = None

    @property
    def name(self) -> str:
        """``dpf`` with feedback, ``gradual`` without."""
        return "dpf" if self.feedback else "gradual"

    def estimator(self):
        if not self.feedback:
            return MaskedGradient()
        return StraightThrough(self.feedback_clip, self.pruned_decay)

    def check(self, run) -> None:
        self._floor = ChannelFloor(run.names, run.channel_major(run.full_weights()))
        if self.channel_floor:
            final = run.schedule.final
            self._floor.check_reachable(final, run.budget.split(run.names, run.shapes, final))
        self._watch = BlowUpWatch(run.model, run.names) if self.watch else None

    def histogram_window(self, run):
        if not self.feedback or not isinstance(run.budget, Global):
            return False
        return self._warm.window(0, run.full_weights()) if self.threshold == "exact" else None

    def update(self, u: Update) -> torch.Tensor:
        exact = self.threshold == "exact"
        groups = u.groups()
        floor = self.channel_floor
        if floor:
            self._floor.check_reachable(u.sparsity, groups)
        rows = self._floor.rows if floor else [0] * len(u.weights)
        recorded = floor or self._watch is not None
        if u.request is not None:
            row_max = u.request.row_max
        else:
            row_max = new_row_max(u.weights) if recorded else None
        taus = []
        for g, (idx, k) in enumerate(groups):
            weights = [u.weights[i] for i in idx]
            rm = [row_max[i] for i in idx] if row_max is not None else None
            if u.request is not None:
                histogram, window = u.request.histogram, u.request.window
            else:
                window = self._warm.window(g, [u.full_weights[i] for i in idx]) if exact else None
                histogram = (ops.magnitude_histogram(weights, row_max=rm, window=window)
                             if recorded and not floor else None)
            taus.append(threshold(weights, k - sum(rows[i] for i in idx), exact, u.reduce,
                                  rm if floor else None, histogram, window))
        taus = torch.stack(taus)
        if any(math.isnan(t) for t in self._warm.record(taus)):  # +Inf: the floor alone
            raise_nonfinite(u)
        if len(groups) == 1:  # one threshold for all: no index to copy to the device
            layer_taus = taus.expand(len(u.weights))
        else:
            group_of = [0] * len(u.weights)
            for g, (idx, _) in enumerate(groups):
                for i in idx:
                    group_of[i] = g
            layer_taus = taus[torch.tensor(group_of, device=taus.device)]
        stats = ops.update_masks(u.weights, layer_taus, u.masks, shrink_only=not self.feedback,
                                 row_max=row_max if floor else None)
        forced = torch.zeros_like(stats[:, :1])
        emptied = None
        if row_max is not None:  # channels entirely below the threshold: forced, or empty
            emptied = [below(r, t) for r, t in zip(row_max, layer_taus)]
            if floor:
                forced = torch.stack([e.sum() for e in emptied]).reshape(-1, 1)
        if self._watch is not None and row_max is not None:
            self._watch.check(u.step, u.sparsity, row_max, layer_taus,
                              None if floor else [~e for e in emptied])
        return torch.cat([stats, forced, torch.zeros_like(forced)], dim=1)

    def state_dict(self) -> dict:
        return {"warm_start": self._warm.state_dict()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if "warm_start" in state:
            self._warm.load_state_dict(state["warm_start"], device)
