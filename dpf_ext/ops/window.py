"""The first pass's window: the second pass's histograms of a few high bins, counted early.

Between two mask updates the threshold moves little. A first pass (the histogram of
:func:`~dpf_ext.ops.magnitude_histogram`, or a fused optimizer step counting it) that is
given a :class:`Window` around a guess of the threshold also counts, at full resolution, the
low 16 bits of the elements of those high bins; when the threshold lands in the window, the
exact search needs no second pass over the weights.
"""

from __future__ import annotations

import torch

from .bits import LOW_BINS, NONFINITE_BIN


class Window:
    """The low-16-bit histograms of ``width`` consecutive finite high bins from ``start``.

    ``start`` is a 0-dim int64 tensor on the weights' device (a top-16-bit value, moved down
    where needed so that the window holds finite bins only); ``counts`` an int64 tensor of
    ``width * LOW_BINS`` zeros that the first pass adds into, slice ``j`` for high bin
    ``start + j``. A first pass with a window only needs to tell the rest apart coarsely,
    so its high histogram is summarised (see :func:`~dpf_ext.ops.magnitude_histogram`),
    which is what makes it cheap. Counts of disjoint sets of weights add up, like the
    histograms'. Build one with :meth:`around`.
    """

    def __init__(self, start: torch.Tensor, width: int):
        if not 1 <= width <= 64:
            raise ValueError(f"a window spans 1 to 64 high bins, got {width}")
        if start.dtype != torch.int64 or start.numel() != 1:
            raise ValueError(f"window start must be a one-element int64 tensor, got {start.dtype} "
                             f"{tuple(start.shape)}")
        self.start = start.reshape(()).clamp(max=NONFINITE_BIN - width)
        self.counts = torch.zeros(width * LOW_BINS, dtype=torch.int64, device=start.device)

    @classmethod
    def around(cls, guess: torch.Tensor, width: int = 3) -> Window:
        """A window of ``width`` high bins centred on the bin of ``|guess|`` (a 0-dim float
        tensor, such as the previous threshold), on ``guess``'s device."""
        bits = guess.detach().float().abs().reshape(()).view(torch.int32).to(torch.int64)
        return cls((bits >> 16) - width // 2, width)

    @property
    def width(self) -> int:
        """How many high bins the window spans."""
        return self.counts.numel() // LOW_BINS

    @property
    def device(self) -> torch.device:
        """The device the window counts on."""
        return self.counts.device

    def low_histogram(self, high_bin: torch.Tensor) -> torch.Tensor | None:
        """A copy of the low histogram of ``high_bin`` (0-dim int64) if the window spans it,
        else ``None``. Reads ``high_bin`` and ``start`` back to the host."""
        slot = int(high_bin - self.start)
        if not 0 <= slot < self.width:
            return None
        return self.counts[slot * LOW_BINS:(slot + 1) * LOW_BINS].clone()
