"""Sparse convolutions: a stride-1 ``Conv2d`` with "same" padding (odd kernel, padding half
of it) whose forward, input gradient and weight gradient are computed from its kept weights
only, directly in torch's ``(N, C, H, W)`` layout (no unfolded or transposed copy).

Each kept weight multiplies a whole input plane shifted by its tap into an output plane: the
kernels read vectors of consecutive positions, with the lanes whose shifted input falls in the
zero padding masked off. The weight is read through a :class:`ConvIndex` built from the mask
when it changes: CSR by output channel for the forward and the sampled weight gradient, and by
input channel with the taps flipped for the input gradient, which is then the same
convolution of the output gradient (no scatter, no atomics).

The backend ops are ``sparse_conv`` and ``sampled_conv`` (:mod:`dpf_ext.ops.reference`
defines them). Only float32 has compiled kernels; float64 runs the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sparse import SparseIndex, all_finite, check_dtypes, follows_autocast, sparse_backend

OPS = ("sparse_conv", "sampled_conv")


@dataclass(frozen=True)
class ConvIndex:
    """Where the kept weights of an ``(out, in, kh, kw)`` convolution weight are: ``rows``,
    the :class:`~dpf_ext.ops.SparseIndex` of its ``(out, in · kh · kw)`` view (CSR by output
    channel, columns ``c · kh · kw + i · kw + j``); and the same entries by input channel
    (``t_ptr``: ``in + 1`` offsets; ``t_idx``: int32 columns ``r · kh · kw + (kh · kw - 1 - i ·
    kw - j)``, the output channel and the flipped tap; ``t_perm``: each entry's position in
    the row order, where its value is)."""

    shape: tuple[int, int, int, int]
    rows: SparseIndex
    t_ptr: torch.Tensor
    t_idx: torch.Tensor
    t_perm: torch.Tensor

    @property
    def nnz(self) -> int:
        """The number of kept weights."""
        return self.rows.nnz

    @staticmethod
    def from_mask(mask: torch.Tensor) -> "ConvIndex":
        """The index of the ``True`` entries of the 4-D bool ``mask``."""
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"mask must be a 4-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        out, inp, kh, kw = mask.shape
        taps = kh * kw
        rows = SparseIndex.from_mask(mask.reshape(out, inp * taps))
        tap = torch.arange(inp * taps, device=mask.device).remainder(taps)
        tap = tap.repeat_interleave(rows.t_ptr.diff())
        t_idx = (rows.t_idx.long() * taps + (taps - 1 - tap)).to(torch.int32)
        return ConvIndex((out, inp, kh, kw), rows, rows.t_ptr[::taps].contiguous(), t_idx,
                         rows.t_perm)


def _kept(index: ConvIndex, like: torch.Tensor) -> torch.Tensor:
    """The mask of ``index`` as a 0/1 tensor of the weight's shape, dtype and device."""
    kept = torch.zeros(index.shape, dtype=like.dtype, device=like.device)
    kept.view(-1)[index.rows.pos] = 1.0
    return kept


class _SparseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, index, dense_grad):
        backend = sparse_backend(x, "sparse_conv")
        _, _, kh, kw = index.shape
        x = x.contiguous()
        values = sparse_backend(weight, "kept_values").kept_values(
            weight.detach().reshape(weight.shape[0], -1), index.rows.ptr, index.rows.idx)
        y = backend.sparse_conv(x, values, index.rows.ptr, index.rows.idx, kh, kw,
                                None if bias is None else bias.detach())
        ctx.save_for_backward(x, weight, values)
        ctx.index, ctx.dense_grad, ctx.has_bias = index, dense_grad, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, values = ctx.saved_tensors
        index, backend = ctx.index, sparse_backend(dy, "sparse_conv")
        _, _, kh, kw = index.shape
        padding, needs = [kh // 2, kw // 2], ctx.needs_input_grad
        sums = dy.sum((0, 2, 3))  # the bias gradient, and one read of dy to check it is finite
        db = sums if ctx.has_bias and needs[2] else None
        if not all_finite(sums):  # as the dense path: 0 · NaN is NaN
            kept = _kept(index, weight)
            dx, dw, _ = torch.ops.aten.convolution_backward(
                dy, x, weight.detach() * kept, None, [1, 1], padding, [1, 1], False, [0, 0], 1,
                [needs[0], needs[1], False])
            if dw is not None and not ctx.dense_grad:
                dw = dw * kept
            return dx, dw, db, None, None
        dy = dy.contiguous()
        dx = dw = None
        if needs[0]:
            dx = backend.sparse_conv(dy, values.index_select(0, index.t_perm), index.t_ptr,
                                     index.t_idx, kh, kw, None)
        if needs[1]:
            if ctx.dense_grad:
                dw = torch.ops.aten.convolution_backward(
                    dy, x, weight.detach(), None, [1, 1], padding, [1, 1], False, [0, 0], 1,
                    [False, True, False])[1]
            else:
                dw = backend.sampled_conv(dy, x, index.rows.ptr, index.rows.idx, kh,
                                          kw).view(index.shape)
        return dx, dw, db, None, None


@follows_autocast
def sparse_conv2d(x: torch.Tensor, weight: torch.Tensor, index: ConvIndex,
                  bias: torch.Tensor | None = None, dense_grad: bool = True) -> torch.Tensor:
    """``conv2d(x, m ⊙ w, b, stride=1, padding=(kh // 2, kw // 2))`` with ``m`` the positions
    of ``index``, computed from the kept weights only; the kernel sizes must be odd ("same"
    padding: the output has the input's height and width).

    ``x``: ``(N, C, H, W)``, float32 (float64 runs the reference ops; autocast as
    :func:`~dpf_ext.ops.sparse_linear`); ``weight``: ``(out, C,
    kh, kw)``. The backward gives ``x`` the gradient through the kept weights, ``bias`` the
    usual one and ``weight`` the gradient of ``m ⊙ w``: at every position (``dense_grad``, one
    dense product) or at the kept ones only (zeros elsewhere). As
    :func:`~dpf_ext.ops.sparse_linear`, a non-finite ``x`` is not special-cased (the layers
    take the dense path for it); a non-finite output gradient runs the backward densely, so
    that it spreads as there.
    """
    if tuple(weight.shape) != index.shape:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the index {index.shape}")
    if x.dim() != 4 or x.shape[1] != index.shape[1]:
        raise ValueError(f"input must be (N, {index.shape[1]}, H, W), got {tuple(x.shape)}")
    if any(k % 2 == 0 for k in index.shape[2:]):
        raise ValueError(f"the kernel {index.shape[2:]} must have odd sizes (\"same\" padding)")
    check_dtypes(x, weight, bias)
    return _SparseConv2d.apply(x, weight, bias, index, dense_grad)


@follows_autocast
def kept_conv(x: torch.Tensor, values: torch.Tensor, index: ConvIndex,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The "same" stride-1 convolution of ``x`` (``(N, C, H, W)`` or ``(C, H, W)``) with the
    weight whose kept entries are ``values`` (in ``index``'s CSR order), without autograd:
    the inference product of a layer that keeps only its values."""
    if x.shape[-3] != index.shape[1] or values.numel() != index.nnz or x.dim() not in (3, 4):
        raise ValueError(f"input {tuple(x.shape)} and {values.numel()} values for a "
                         f"{index.shape} index of {index.nnz} entries")
    _, _, kh, kw = index.shape
    with torch.no_grad():
        batched = (x if x.dim() == 4 else x.unsqueeze(0)).contiguous()
        y = sparse_backend(x, "sparse_conv").sparse_conv(batched, values, index.rows.ptr,
                                                         index.rows.idx, kh, kw, bias)
    return y if x.dim() == 4 else y.squeeze(0)
