"""The float32 bit-pattern view of magnitudes that the threshold search works on.

For ``x >= 0`` the IEEE-754 bit pattern of a float32, read as an integer, is monotone in
``x``. The top 16 bits (sign 0, so 32768 values) pick a histogram bin whose relative width
is 2^-7; the low 16 bits resolve the exact value inside a bin. float16 and bfloat16 weights
are widened to float32 first, which is exact.
"""

from __future__ import annotations

import torch

HIGH_BINS = 1 << 15
"""Bins of the first-pass histogram: the top 16 bits of a non-negative float32."""

LOW_BINS = 1 << 16
"""Bins of the second-pass histogram: the low 16 bits."""

NONFINITE_BIN = 0x7F80
"""First high bin holding Inf or NaN: every bin from here up is non-finite."""

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def magnitude_bits(w: torch.Tensor) -> torch.Tensor:
    """int32 bit pattern of ``|w|`` widened to float32 (``-0.0`` maps to ``0``)."""
    return w.detach().abs().float().view(torch.int32)


def bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret int32 bit patterns (any integer dtype holding them) as float32."""
    return bits.to(torch.int32).view(torch.float32)
