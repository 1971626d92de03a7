"""The magnitude methods under their usual names: DPF, gradual magnitude pruning, one-shot
pruning and DNW (straight-through magnitude). Each is :class:`Magnitude` with settings."""

from __future__ import annotations

from ..schedules import Constant, OneShot
from .magnitude import Magnitude


def dpf(threshold: str = "exact", channel_floor: bool = True, feedback_clip: float | None = None,
        watch: bool = True) -> Magnitude:
    """DPF (Lin et al., ICLR 2020): global magnitude threshold, straight-through feedback,
    cubic schedule, a mask update every 16 steps; with the channel floor (this library's
    guard for BatchNorm networks at high sparsity)."""
    return Magnitude(True, threshold, channel_floor, feedback_clip, None, watch)


def gradual(threshold: str = "exact") -> Magnitude:
    """Zhu & Gupta's gradual magnitude pruning: DPF's schedule without feedback (masked
    gradient; pruned weights zeroed and never back); no channel floor, as published."""
    return Magnitude(False, threshold, False)


class _OneShot(Magnitude):
    name = "oneshot"

    def __init__(self, at_step: int, threshold: str):
        super().__init__(False, threshold, False)
        self.at_step = at_step

    def defaults(self, sparsity, total_steps):
        if sparsity is None:
            raise ValueError("oneshot needs the target sparsity: pass sparsity=")
        return {"schedule": OneShot(sparsity, self.at_step), "freeze_at": self.at_step}


def oneshot(at_step: int = 0, threshold: str = "exact") -> Magnitude:
    """One-shot magnitude pruning at step ``at_step``, then training with the mask frozen
    and the gradient masked; no channel floor."""
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
        raise ValueError(f"at_step must be a non-negative int, got {at_step!r}")
    return _OneShot(at_step, threshold)


class _DNW(Magnitude):
    name = "dnw"

    def defaults(self, sparsity, total_steps):
        if sparsity is None:
            raise ValueError("dnw needs the target sparsity: pass sparsity=")
        return {"schedule": Constant(sparsity), "update_every": 1}


def dnw(threshold: str = "exact") -> Magnitude:
    """DNW (Wortsman et al. 2019), jaxpruner's ``magnitude_ste``: the top-k mask recomputed
    at every step at a constant sparsity, straight-through gradient to the dense weights.
    It is DPF with a mask update every step, no gradual schedule and no channel floor; DPF
    adds the cubic ramp, a 16-step period and one global threshold (DNW's is per layer in
    its paper; here the budget decides, global by default)."""
    return _DNW(True, threshold, False)
