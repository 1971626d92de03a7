"""The magnitude methods under their usual names: DPF, gradual magnitude pruning, one-shot
pruning and DNW (straight-through magnitude). Each is :class:`Magnitude` with settings."""

from __future__ import annotations

from .base import Method
from .filter import FilterMagnitude
from .magnitude import THRESHOLDS, Magnitude
from .nm import NM
from .recipe import Recipe

SCOPES = ("global", "layer", "filter")
"""The values of :class:`dpf_ext.DPF`'s ``scope``."""


def dpf(threshold: str = "exact", channel_floor: bool | None = None,
        feedback_clip: float | None = None, watch: bool = True, pattern: str | None = None,
        filters: bool = False) -> Method:
    """DPF (Lin et al., ICLR 2020): global magnitude threshold, straight-through feedback,
    cubic schedule, a mask update every 16 steps; with the channel floor (this library's
    guard for BatchNorm networks at high sparsity, on unless ``channel_floor=False``).
    ``pattern`` (``"2:4"``): N:M masks (:class:`~dpf_ext.methods.nm.NM`, with feedback);
    ``filters``: whole output filters (:class:`~dpf_ext.methods.filter.FilterMagnitude`);
    neither takes the channel floor."""
    if pattern is not None or filters:
        if pattern is not None and filters:
            raise ValueError("pattern= and filters=True exclude each other")
        if channel_floor:
            raise ValueError("channel_floor applies to weight magnitudes; pattern= and "
                             "filters=True choose the masks by themselves")
        return NM(pattern) if pattern is not None else FilterMagnitude(True, threshold, feedback_clip)
    return Magnitude(True, threshold, channel_floor is not False, feedback_clip, None, watch)


def gradual(threshold: str = "exact", filters: bool = False) -> Method:
    """Gradual magnitude pruning as Zhu & Gupta (2017) publish it: every layer pruned to the
    schedule's sparsity by its own magnitude threshold (the uniform budget), the gradient
    masked (pruned weights zeroed and never back), no channel floor; on DPF's cubic
    schedule and 16-step period (theirs: a few hundred steps). With ``budget="global"``
    it is one global threshold: DPF without the feedback, DPF's own ablation.
    ``filters``: whole output filters (:class:`~dpf_ext.methods.filter.FilterMagnitude`)."""
    method = FilterMagnitude(False, threshold) if filters else Magnitude(False, threshold, False)
    method.recipe = gradual.recipe
    return method


class _OneShot(Magnitude):
    name = "oneshot"
    recipe = Recipe("oneshot", fixed=True)

    def __init__(self, at_step: int, threshold: str):
        super().__init__(False, threshold, False)
        self.at_step = at_step
        self.recipe = Recipe("oneshot", fixed=True, at_step=at_step)


def oneshot(at_step: int = 0, threshold: str = "exact", pattern: str | None = None) -> Method:
    """One-shot magnitude pruning at step ``at_step``, then training with the mask frozen
    and the gradient masked; no channel floor. ``pattern`` (``"2:4"``): N:M masks, dense
    until ``at_step`` (the recipe of NVIDIA's ASP)."""
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
        raise ValueError(f"at_step must be a non-negative int, got {at_step!r}")
    if pattern is not None:
        method = NM(pattern, feedback=False)
        method.recipe = Recipe("oneshot", fixed=True, at_step=at_step,
                               sparsity=method.pattern.sparsity)
        return method
    return _OneShot(at_step, threshold)


class _DNW(Magnitude):
    name = "dnw"
    recipe = Recipe("constant", update_every=1, budget="uniform")


def dnw(threshold: str = "exact") -> Method:
    """DNW (Wortsman et al. 2019), jaxpruner's ``magnitude_ste``: the top-k mask of every
    layer recomputed at every step at a constant sparsity (the uniform budget, as in its
    paper), straight-through gradient to the dense weights. It is DPF with a mask update
    every step, no gradual schedule, no channel floor and a threshold per layer; DPF adds
    the cubic ramp, a 16-step period and one global threshold."""
    return _DNW(True, threshold, False)


dpf.recipe = Magnitude.recipe
gradual.recipe = Recipe("ramp", budget="uniform")
oneshot.recipe = _OneShot.recipe
dnw.recipe = _DNW.recipe


def dpf_options(scope: str = "global", feedback: bool = True, threshold: str = "exact",
               channel_floor: bool | None = None, feedback_clip: float | None = None,
               watch: bool = True, pattern: str | None = None,
               pruned_decay: float | None = None, pruned_decay_ramp: int | None = None) -> Method:
    """The method that :class:`dpf_ext.DPF`'s own arguments describe.

    ``scope``: ``"global"`` (one magnitude threshold over all prunable weights), ``"layer"``
    (the same sparsity in every layer: the uniform budget) or ``"filter"`` (whole output
    filters by L2 norm, :class:`~dpf_ext.methods.filter.FilterMagnitude`). ``pattern``
    (``"2:4"``): N:M sparsity (:class:`~dpf_ext.methods.nm.NM`; excludes ``scope`` and the
    channel floor; ``pruned_decay_ramp``: AST's ramp of ``pruned_decay``, the N:M method's
    ``decay_ramp``). Otherwise :class:`~dpf_ext.methods.magnitude.Magnitude`, whose
    docstring describes ``feedback``, ``threshold``, ``channel_floor`` (default on),
    ``feedback_clip``, ``pruned_decay`` and ``watch``."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if pattern is not None:
        if scope != "global" or channel_floor:
            raise ValueError("pattern= chooses the masks by itself: it excludes scope= and "
                             "channel_floor=")
        return NM(pattern, pruned_decay, feedback, pruned_decay_ramp)
    if pruned_decay_ramp is not None:
        raise ValueError("pruned_decay_ramp (AST's schedule) is an option of N:M training: "
                         "pass pattern=")
    if scope == "filter":
        if channel_floor:
            raise ValueError("channel_floor applies to the global and layer scopes; the filter "
                             "scope prunes whole channels by design")
        return FilterMagnitude(feedback, threshold, feedback_clip, pruned_decay)
    floor = True if channel_floor is None else channel_floor
    return Magnitude(feedback, threshold, floor, feedback_clip, pruned_decay, watch)
