"""Sparse products: a Linear layer's forward, input gradient and weight gradient computed
from its kept weights only.

The weight is read through a :class:`SparseIndex` built from the mask when it changes (CSR
by output row, and the transposed CSR for the input gradient, so that no kernel scatters or
needs atomics); each call gathers the kept values from the dense weight, which stays the
real parameter. Inside the ops the activations are batch-major (``xᵀ``: one row of ``B``
values per input feature), the layout in which every kept weight is one contiguous
multiply-add over the batch.

- :func:`sparse_linear`: ``y = x (m ⊙ w)ᵀ + b`` whose backward gives ``dx = dy (m ⊙ w)``
  through the transposed index and the weight gradient either dense (``dyᵀ x`` at every
  position: DPF's straight-through estimator, or a method that reads this step's dense
  gradient) or sampled at the kept positions only (zeros elsewhere: the masked gradient).

- :func:`values_linear`: the same product for a layer that stores only its kept values
  (the weight's gradient is those values' own: ``sampled_values``).

The backend ops are ``sparse_mm``, ``sampled_mm`` and ``sampled_values`` (:mod:`dpf_ext.ops.reference` defines
them). Only float32 has compiled sparse kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import reference
from .dispatch import backend_for

OPS = ("sparse_mm", "sampled_mm", "sampled_values")


@dataclass(frozen=True)
class SparseIndex:
    """Where the kept weights of a ``(rows, cols)`` weight are: CSR by row (``ptr``: int64,
    ``rows + 1`` offsets; ``idx``: int32 columns; ``pos``: int64 flat storage offsets in the
    weight, from which a call gathers the values in this order) and by column (``t_ptr``,
    ``t_idx``: int32 rows; ``t_perm``: int64, each entry's position in the row order, so
    that the transposed product's values are ``values[t_perm]``, a gather from the kept
    values instead of a strided walk over the weight)."""

    rows: int
    cols: int
    ptr: torch.Tensor
    idx: torch.Tensor
    pos: torch.Tensor
    t_ptr: torch.Tensor
    t_idx: torch.Tensor
    t_perm: torch.Tensor

    @property
    def nnz(self) -> int:
        """The number of kept weights."""
        return self.idx.numel()

    @staticmethod
    def from_mask(mask: torch.Tensor, weight: torch.Tensor | None = None) -> "SparseIndex":
        """The index of the ``True`` entries of the 2-D bool ``mask``; the storage offsets are
        those of ``weight`` (a tensor of ``mask``'s shape, possibly a transposed view:
        default ``mask``'s own contiguous layout)."""
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        if weight is not None and weight.shape != mask.shape:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ in shape")
        rows, cols = mask.shape
        if cols >= 2**31 or rows >= 2**31:
            raise ValueError(f"a {rows}x{cols} weight is too large for int32 indices")
        s0, s1 = weight.stride() if weight is not None else (cols, 1)
        backend = backend_for(mask.device, "sparse_index")
        return SparseIndex(rows, cols, *backend.sparse_index(mask.detach(), s0, s1))


    @staticmethod
    def from_positions(rows: int, cols: int, positions: torch.Tensor) -> "SparseIndex":
        """The index of the kept entries at the sorted, distinct flat ``positions`` (int64,
        ``r * cols + c``) of a contiguous ``(rows, cols)`` weight, built without a tensor of
        the weight's size (its ``pos`` are the positions themselves)."""
        if positions.dtype != torch.int64 or positions.dim() != 1:
            raise ValueError("positions must be a 1-D int64 tensor")
        if cols >= 2**31 or rows >= 2**31:
            raise ValueError(f"a {rows}x{cols} weight is too large for int32 indices")
        if positions.numel() and (bool((positions.diff() <= 0).any()) or positions[0] < 0
                                  or positions[-1] >= rows * cols):
            raise ValueError(f"positions must be sorted, distinct and inside a {rows}x{cols} weight")
        r, c = positions.div(cols, rounding_mode="floor"), positions.remainder(cols)

        def offsets(of: torch.Tensor, n: int) -> torch.Tensor:
            ptr = torch.zeros(n + 1, dtype=torch.int64, device=positions.device)
            torch.cumsum(torch.bincount(of, minlength=n), 0, out=ptr[1:])
            return ptr

        t_perm = torch.sort(c, stable=True).indices  # by column, rows ascending within each
        return SparseIndex(rows, cols, offsets(r, rows), c.to(torch.int32), positions,
                           offsets(c, cols), r[t_perm].to(torch.int32), t_perm)

def sparse_backend(x: torch.Tensor, op: str = "sparse_mm"):
    """The backend of the sparse op ``op`` for ``x``: the preferred one with a kernel for it
    on its device in float32, the reference in other dtypes (float64, for gradcheck)."""
    return backend_for(x.device, op) if x.dtype == torch.float32 else reference


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, index, dense_grad):
        backend = sparse_backend(x)
        xt = _batch_major(x, False)[0]
        values = sparse_backend(weight, "kept_values").kept_values(weight.detach(), index.ptr,
                                                                   index.idx)
        y = backend.sparse_mm(xt, values, index.ptr, index.idx,
                              None if bias is None else bias.detach())
        ctx.save_for_backward(xt, weight, values)
        ctx.index, ctx.dense_grad, ctx.has_bias = index, dense_grad, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xt, weight, values = ctx.saved_tensors
        index, backend = ctx.index, sparse_backend(dy)
        dyt, sums = _batch_major(dy, True)
        dx = dw = db = None
        if not all_finite(sums):  # as the dense path: 0 · NaN is NaN
            return (*_dense_backward(dy, xt, weight, index, ctx), None, None)
        if ctx.needs_input_grad[0]:
            dx = backend.sparse_mm(dyt, values.index_select(0, index.t_perm), index.t_ptr,
                                   index.t_idx, None)
        if ctx.needs_input_grad[1]:
            if ctx.dense_grad:
                dw = torch.mm(dyt, xt.t())
            else:
                dw = backend.sampled_mm(dyt, xt, index.ptr, index.idx)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = sums
        return dx, dw, db, None, None


class _ValuesLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, index, tap):
        xt = _batch_major(x, False)[0]
        y = sparse_backend(x).sparse_mm(xt, values.detach(), index.ptr, index.idx,
                                        None if bias is None else bias.detach())
        ctx.save_for_backward(xt, values)
        ctx.index, ctx.tap, ctx.has_bias = index, tap, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        xt, values = ctx.saved_tensors
        index, backend = ctx.index, sparse_backend(dy)
        dyt, sums = _batch_major(dy, True)
        dx = dv = db = None
        if ctx.needs_input_grad[0]:
            dx = backend.sparse_mm(dyt, values.detach().index_select(0, index.t_perm), index.t_ptr,
                                   index.t_idx, None)
        if ctx.needs_input_grad[1]:
            if ctx.tap is not None and ctx.tap.armed:  # a method reads this step's dense gradient
                ctx.tap.add_product(dyt, xt)
            dv = sparse_backend(dy, "sampled_values").sampled_values(dyt, xt, index.ptr, index.idx)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = sums
        return dx, dv, db, None, None


def _batch_major(x: torch.Tensor, sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(B, cols)`` as ``(cols, B)`` and, with ``sums``, the sum over the batch of each
    column (the ``batch_major`` op; the reference's outside float32)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return sparse_backend(x, "batch_major").batch_major(x, sums)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf, from one sum (no mask tensor): a sum that overflows
    to Inf says no, which only costs the dense path."""
    return bool(torch.isfinite(t.sum()))


def _dense_backward(dy, xt, weight, index, ctx):
    """The backward of ``x (m ⊙ w)ᵀ + b`` with dense products, for an output gradient with
    non-finite entries (which the dense path spreads to every position)."""
    kept = torch.zeros(index.rows, index.cols, dtype=dy.dtype, device=dy.device)
    rows = torch.repeat_interleave(torch.arange(index.rows, device=dy.device), index.ptr.diff())
    kept[rows, index.idx.long()] = 1.0
    needs = ctx.needs_input_grad
    dx = dy @ (weight.detach() * kept) if needs[0] else None
    dw = (dy.t() @ xt.t()) * (1.0 if ctx.dense_grad else kept) if needs[1] else None
    db = dy.sum(0) if ctx.has_bias and needs[2] else None
    return dx, dw, db


def follows_autocast(product):
    """``product`` (whose first argument is the input) as autocast runs a matrix product:
    where autocast is on for the input's device, the kernels compute in float32 (the
    floating-point tensors among the arguments are cast to it, autocast itself off inside)
    and the output comes back in autocast's dtype, so a layer on the sparse path returns
    what the same layer on the dense path returns. The casts are differentiable: the
    gradients reach the arguments in their own dtypes."""
    @functools.wraps(product)
    def run(x: torch.Tensor, *args, **kwargs):
        kind = x.device.type
        if not torch.is_autocast_enabled(kind):
            return product(x, *args, **kwargs)
        dtype = torch.get_autocast_dtype(kind)

        def f32(a):
            return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
        with torch.autocast(kind, enabled=False):
            out = product(f32(x), *map(f32, args), **{k: f32(v) for k, v in kwargs.items()})
        return out.to(dtype)
    return run


def check_dtypes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """A ``TypeError`` naming the tensor unless input, weight and bias share one dtype that the
    sparse ops run: float32 (compiled kernels) or float64 (the reference)."""
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the sparse products run in float32 (float64: the reference); "
                            f"the {name} is {t.dtype}")
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"the {name} is {t.dtype}, the input {x.dtype}")


def simd(isa: str = "") -> str:
    """The instruction set of the CPU sparse kernels: ``"avx512"``, ``"avx2"`` (with FMA) or
    ``"scalar"``, chosen at load time as the best this CPU has. Passing one (or ``"auto"``)
    selects it for the process (``RuntimeError`` where the CPU lacks it); returns the one in
    use before the call. ``""`` only asks; ``"none"`` if the kernels are not built."""
    if not hasattr(torch.ops.dpf, "sparse_simd"):
        return "none"
    return torch.ops.dpf.sparse_simd(isa)


def panel_lanes(lanes: int | None = None) -> int:
    """The batch panel width of the CPU sparse products, in floats: derived per product from
    the L2 size (:func:`cache_bytes`; ``0`` is returned then) unless fixed. Passing a
    positive ``lanes`` fixes it for the process (rounded down to a power-of-two number of
    vectors of the instruction set, one vector at least), ``0`` derives it again; returns the
    setting before the call. For measurements and tests; ``-1`` if the kernels are not
    built."""
    if not hasattr(torch.ops.dpf, "sparse_panel"):
        return -1
    if lanes is not None and (isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 0):
        raise ValueError(f"lanes must be a non-negative int or None, got {lanes!r}")
    return torch.ops.dpf.sparse_panel(-1 if lanes is None else lanes)


def cache_bytes() -> tuple[int, int]:
    """This CPU's L1 data and L2 cache sizes in bytes as the sparse kernels read them at load
    time (``sysconf``, else ``/sys/devices/system/cpu/cpu0/cache``); ``(0, 0)`` if the
    kernels are not built."""
    if not hasattr(torch.ops.dpf, "sparse_cache_bytes"):
        return (0, 0)
    l1, l2 = torch.ops.dpf.sparse_cache_bytes()
    return (l1, l2)


@follows_autocast
def sparse_linear(x: torch.Tensor, weight: torch.Tensor, index: SparseIndex,
                  bias: torch.Tensor | None = None, dense_grad: bool = True) -> torch.Tensor:
    """``x (m ⊙ w)ᵀ + b`` with ``m`` the positions of ``index`` (built from the mask of
    ``weight``, a ``(out, in)`` tensor or view), computed from the kept weights only.

    ``x``: ``(..., in)``; float32 (float64 runs the reference ops; under autocast, float32
    and the output in autocast's dtype: :func:`follows_autocast`). The backward gives ``x`` the gradient through the
    kept weights, ``bias`` the usual one and ``weight`` the gradient of ``m ⊙ w``: at every
    position (``dense_grad``, one dense product) or at the kept ones only (zeros elsewhere).
    A non-finite ``x`` or output gradient is not special-cased here: pruned weights do not
    multiply it (the layers take the dense path for such inputs).
    """
    if weight.dim() != 2 or tuple(weight.shape) != (index.rows, index.cols):
        raise ValueError(f"weight {tuple(weight.shape)} does not match the index "
                         f"({index.rows}, {index.cols})")
    if x.shape[-1] != index.cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {index.cols}")
    check_dtypes(x, weight, bias)
    lead = x.shape[:-1]
    y = _SparseLinear.apply(x.reshape(-1, index.cols), weight, bias, index, dense_grad)
    return y.reshape(*lead, index.rows)


@follows_autocast
def values_linear(x: torch.Tensor, values: torch.Tensor, index: SparseIndex,
                  bias: torch.Tensor | None = None, tap=None) -> torch.Tensor:
    """``x Wᵀ + b`` for the weight whose kept entries are the parameter ``values`` (one per
    entry of ``index``, in its CSR order; the pruned ones do not exist), with autograd: the
    product of a layer on values storage (:mod:`dpf_ext.nn.values_storage`). ``values`` gets
    the gradient of its entries only (one sampled product, no dense gradient). While ``tap``
    (a :class:`~dpf_ext.nn.estimators.GradientTap`) is armed, the products that make the
    dense gradient are recorded in it (not formed), for a method that grows weights by it. Pruned weights do
    not multiply ``x``, so a non-finite input reaches only the rows that keep its column."""
    if values.dim() != 1 or values.numel() != index.nnz:
        raise ValueError(f"{tuple(values.shape)} values for an index of {index.nnz} entries")
    if x.shape[-1] != index.cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight takes {index.cols}")
    check_dtypes(x, values, bias)
    y = _ValuesLinear.apply(x.reshape(-1, index.cols), values, bias, index, tap)
    return y.reshape(*x.shape[:-1], index.rows)


@follows_autocast
def kept_product(x: torch.Tensor, values: torch.Tensor, index: SparseIndex,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` for the weight whose kept entries are ``values`` (in ``index``'s CSR
    order), without autograd: the inference product of a layer that keeps only its values."""
    if x.shape[-1] != index.cols or values.numel() != index.nnz:
        raise ValueError(f"input of {x.shape[-1]} features and {values.numel()} values for a "
                         f"({index.rows}, {index.cols}) index of {index.nnz} entries")
    with torch.no_grad():
        xt = x.reshape(-1, index.cols).t().contiguous()
        y = sparse_backend(x).sparse_mm(xt, values, index.ptr, index.idx, bias)
    return y.reshape(*x.shape[:-1], index.rows)
