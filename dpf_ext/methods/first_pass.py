"""The magnitude threshold's first pass, counted ahead: by a fused optimizer step
(:class:`HistogramRequest`) or around the previous threshold (:class:`WarmStart`)."""

from __future__ import annotations

import math
import struct

import torch

from .. import ops
from .channels import new_row_max
from ..ops.bits import HIGH_BINS, LOW_BINS


class HistogramRequest:
    """A pruner's request for the first pass over the prunable weights after the next
    optimizer step: the optimizer adds into ``histogram`` (and ``row_max``, and ``window``
    when it is not ``None``) and reports the weights it covered."""

    def __init__(self, weights: list[torch.Tensor], step: int, window: ops.Window | None = None):
        self.histogram = torch.zeros(HIGH_BINS, dtype=torch.int64, device=weights[0].device)
        self.row_max = new_row_max(weights)
        self.window = window
        self.step = step
        self._pending = {id(w) for w in weights}
        self._row_max_of = {id(w): r for w, r in zip(weights, self.row_max)}

    def wants(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is one of the prunable weights."""
        return id(param) in self._row_max_of

    def row_max_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ``row_max`` tensors the optimizer fills with the histogram for ``params``."""
        return [self._row_max_of[id(p)] for p in params]

    def covered(self, params: list[torch.Tensor]) -> None:
        """Record that ``histogram`` now includes the updated ``params``."""
        self._pending.difference_update(id(p) for p in params)

    @property
    def complete(self) -> bool:
        """Whether every prunable weight was counted."""
        return not self._pending


def _high_bin(x: float) -> int:
    """The top 16 bits of ``|x|`` as float32 (its first-pass histogram bin)."""
    return struct.unpack("<I", struct.pack("<f", abs(x)))[0] >> 16


class WarmStart:
    """The previous thresholds, as the guess that lets an exact threshold take one pass.

    The first pass also histograms at full resolution a :class:`~dpf_ext.ops.Window` of high
    bins around the previous threshold (3 bins, widened to twice the last move, at most 9);
    when the new threshold lands there, no second pass is needed. Only where that pays (see
    :meth:`pays`: a small model's, or a small layer's, second pass costs less than a
    window). A performance hint only: the thresholds are the same with or without it; it is
    in the pruner's state so that a resumed run reads the weights as the uninterrupted one
    would."""

    def __init__(self):
        self.taus: torch.Tensor | None = None
        self.host: list[float] = []
        self.width = 3

    def window(self, i: int, weights: list[torch.Tensor]) -> ops.Window | None:
        """A fresh window around the previous threshold of position ``i`` (global scope:
        0) for a first pass over ``weights``, if there is a finite one and it pays."""
        if self.taus is None or not math.isfinite(self.host[i]) or not self.pays(weights):
            return None
        return ops.Window.around(self.taus[i], self.width)

    def pays(self, weights: list[torch.Tensor]) -> bool:
        """Whether the second pass a window saves (a read of ``weights``) costs more than
        the window itself (zeroing its counts, copying a slice, one host synchronisation):
        from about half a million float32 weights with 3 bins. Pass whole (unsharded)
        weights, so that every rank decides alike."""
        return sum(w.numel() * w.element_size() for w in weights) >= (self.width + 1) * LOW_BINS * 8

    def record(self, taus: torch.Tensor) -> list[float]:
        """Remember this update's thresholds, size the next window by how far they moved,
        and return them on the host (the update's one read-back of its thresholds)."""
        taus = taus.detach().float().reshape(-1)
        host = taus.tolist()
        if len(host) == len(self.host):
            moves = [abs(_high_bin(a) - _high_bin(b)) for a, b in zip(host, self.host)
                     if math.isfinite(a) and math.isfinite(b)]
            if moves:
                self.width = min(2 * max(max(moves), 1) + 1, 9)
        self.taus, self.host = taus.clone(), host
        return host

    def state_dict(self) -> dict:
        """The previous thresholds (``None`` before the first update) and the window width."""
        return {"taus": None if self.taus is None else list(self.host), "width": self.width}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore :meth:`state_dict`, the thresholds onto ``device``."""
        self.width = state["width"]
        self.host = [] if state["taus"] is None else list(state["taus"])
        self.taus = (None if state["taus"] is None
                     else torch.tensor(self.host, dtype=torch.float32, device=device))
