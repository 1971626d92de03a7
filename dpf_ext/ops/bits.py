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

MAX_GROUP = 16
"""The largest group size M of an N:M pattern."""

COLUMN_MASK = 0xFFFFFFFF
"""Low 32 bits of a row-max key: ``COLUMN_MASK - column``."""

FINITE_LIMIT = 0x7F800000
"""Bit pattern of +Inf: magnitudes below it are finite."""


def magnitude_bits(w: torch.Tensor) -> torch.Tensor:
    """int32 bit pattern of ``|w|`` widened to float32 (``-0.0`` maps to ``0``)."""
    return w.detach().abs().float().view(torch.int32)


def bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret int32 bit patterns (any integer dtype holding them) as float32."""
    return bits.to(torch.int32).view(torch.float32)


def row_key(bits: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """The int64 key of an element for the channel floor: ``|w|``'s bit pattern in the high
    32 bits and ``COLUMN_MASK - column`` in the low 32, so that the largest key of a row is
    its largest magnitude, the first column on ties. Every element's key is positive; a
    key of 0 stands for an empty row."""
    return (bits.to(torch.int64) << 32) | (COLUMN_MASK - column)


def key_columns(keys: torch.Tensor) -> torch.Tensor:
    """The column each row-max key names (meaningless for a key of 0)."""
    return COLUMN_MASK - (keys & COLUMN_MASK)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, eight elements per byte (little-endian bit order,
    zero-padded to whole bytes)."""
    flat = bits.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[:flat.numel()] = flat
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bools of :func:`pack_bits`' bytes, flat."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()
