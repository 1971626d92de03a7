"""The registry of layer types :func:`dpf_ext.sparsify` makes prunable, and the
containers it replaces so that their direct weight reads see the masked weights.
transformers' ``Conv1D`` joins it when transformers is imported (never importing it)."""

from __future__ import annotations

import sys

from torch import nn

from .layers import (DPFConv1d, DPFConv2d, DPFConv3d, DPFLayer, DPFLinear, DPFMultiheadAttention,
                     DPFOutProjection, DPFTransformerEncoderLayer)


PRUNABLE: dict[type, type] = {
    nn.Linear: DPFLinear,
    nn.Conv1d: DPFConv1d,
    nn.Conv2d: DPFConv2d,
    nn.Conv3d: DPFConv3d,
    nn.MultiheadAttention: DPFMultiheadAttention,
    nn.modules.linear.NonDynamicallyQuantizableLinear: DPFOutProjection,
}
"""The module types :func:`sparsify` makes prunable (exact types), and their DPF layers."""

WEIGHT_READERS: dict[type, type] = {nn.TransformerEncoderLayer: DPFTransformerEncoderLayer}
"""Containers whose forward may read their submodules' weights directly, and the versions
:func:`sparsify` puts in their place so that those reads see the masked weights."""


def register_prunable(torch_type: type, dpf_type: type) -> None:
    """Make :func:`sparsify` turn modules of exactly ``torch_type`` into ``dpf_type``.

    ``dpf_type`` subclasses :class:`DPFLayer` and ``torch_type`` (DPFLayer first), sets
    ``weight_name`` / ``channel_dim`` if its prunable weight is not ``weight`` with output
    channels on dim 0, and computes its forward with ``self.masked_weight()``. For example::

        class DPFMyLinear(dpf_ext.DPFLayer, MyLinear):
            channel_dim = 1   # weight stored as (in, out)

            def forward(self, x):
                return x @ self.masked_weight() + self.bias

        dpf_ext.nn.register_prunable(MyLinear, DPFMyLinear)
    """
    if not (isinstance(dpf_type, type) and issubclass(dpf_type, DPFLayer)
            and issubclass(dpf_type, torch_type)):
        raise TypeError(f"{dpf_type!r} must subclass both dpf_ext.DPFLayer and {torch_type!r}")
    PRUNABLE[torch_type] = dpf_type


def register_transformers() -> None:
    """Register transformers' ``Conv1D`` (see :mod:`dpf_ext.nn.conv1d`) if transformers is already
    imported; never imports it."""
    if "transformers.pytorch_utils" in sys.modules:
        from .conv1d import Conv1D, DPFConv1D

        PRUNABLE.setdefault(Conv1D, DPFConv1D)
