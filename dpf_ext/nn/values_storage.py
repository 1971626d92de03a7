"""Values storage: a Linear DPF layer that holds only its kept weights.

On values storage (``Pruner(..., storage="values")``) the layer's ``weight`` parameter is the
1-D tensor of its kept values, in the CSR order of its index (by output row, columns
ascending), and the index is five buffers of the layer (``kept_ptr``, ``kept_idx``,
``kept_t_ptr``, ``kept_t_idx``, ``kept_t_perm``: see :class:`~dpf_ext.ops.SparseIndex`), so
that a ``state_dict`` holds them. No tensor of the layer's dense size stays allocated: not the
weight, the mask, the gradient (:func:`dpf_ext.ops.values_linear` computes the kept entries'
gradient only) nor the optimizer's state (built for the values). The forward always runs the
sparse product.

A mask update gives a layer its new kept positions (:func:`move`): kept entries keep their
values and optimizer state, grown ones enter at zero with zero state, dropped ones leave; no
dense tensor is formed (a method reads the dense gradient a block of rows at a time:
:class:`~dpf_ext.nn.estimators.ProductGradient`). The number of kept weights per layer is
constant (the methods that run on values storage keep it so).
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..ops.sparse import SparseIndex, sparse_backend

BUFFERS = ("ptr", "idx", "t_ptr", "t_idx", "t_perm")
"""The index fields a layer on values storage holds as buffers ``kept_<field>``."""

INIT_BLOCK = 1 << 22
"""Weights initialised per block when a layer on the meta device gets its kept values from
its own initialisation (:func:`init_values`): 16 MiB of float32 at a time."""


def is_values(layer) -> bool:
    """Whether the DPF ``layer`` is on values storage."""
    return getattr(layer, "storage", "dense") == "values"


def unsupported(layer) -> str | None:
    """Why ``layer`` (a DPF layer) cannot go on values storage, or ``None``."""
    if not isinstance(layer, nn.Linear) or layer.weight_name != "weight" or \
            isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return (f"{type(layer).__name__}: values storage covers Linear layers (DPFLinear); "
                "convolutions, transformers' Conv1D and attention projections store densely")
    if layer.powerprop is not None:
        return f"{type(layer).__name__}: powerprop's reparametrisation needs the dense weight"
    if layer.weight.dtype not in (torch.float32, torch.float64):
        return f"its weight is {layer.weight.dtype}; values storage runs float32 (float64: the reference)"
    return None


def dense_shape(layer) -> tuple[int, ...]:
    """The shape of ``layer``'s prunable weight (its dense one on values storage)."""
    return tuple(layer.dense_shape) if is_values(layer) else tuple(layer.dense_weight.shape)


def kept(layer) -> torch.Tensor:
    """``layer``'s number of kept weights (a 0-dim int64 tensor, on its device)."""
    if is_values(layer):
        return torch.tensor(layer.kept_idx.numel(), device=layer.kept_idx.device)
    return layer.mask.sum()


def index(layer) -> SparseIndex:
    """The :class:`~dpf_ext.ops.SparseIndex` of ``layer``'s buffers (rebuilt when they change:
    a mask update, ``load_state_dict``)."""
    buffers = [getattr(layer, "kept_" + f) for f in BUFFERS]
    key = tuple((b._version, b.data_ptr()) for b in buffers)
    cached = layer._sparse_cache.get("values_index")
    if cached is None or cached[0] != key:
        ptr, idx, t_ptr, t_idx, t_perm = buffers
        rows, cols = layer.dense_shape
        cached = (key, SparseIndex(rows, cols, ptr, idx, torch.empty(0, dtype=torch.int64,
                                                                     device=ptr.device),
                                   t_ptr, t_idx, t_perm))
        layer._sparse_cache["values_index"] = cached
    return cached[1]


def linear(layer, x: torch.Tensor) -> torch.Tensor:
    """The forward of ``layer`` on values storage: ``x Wᵀ + b`` from the kept values."""
    return ops.values_linear(x, layer.weight, index(layer), layer.bias, tap=layer.grad_tap)


def positions(layer) -> torch.Tensor:
    """The flat positions ``r * cols + c`` of ``layer``'s kept weights, in CSR order (sorted)."""
    return positions_of(index(layer))


def dense(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s dense weight (zeros where pruned) and bool mask, new tensors (for
    :func:`to_dense` and exports)."""
    values = layer.weight.detach()
    at = positions(layer)
    weight = values.new_zeros(layer.dense_shape)
    weight.view(-1)[at] = values
    mask = torch.zeros(layer.dense_shape, dtype=torch.bool, device=values.device)
    mask.view(-1)[at] = True
    return weight, mask


def _set_index(layer, new: SparseIndex) -> None:
    for f in BUFFERS:
        getattr(layer, "kept_" + f).copy_(getattr(new, f))


def move(layer, new: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Give ``layer`` on values storage the kept positions ``new`` (flat, sorted; as many as
    before), in place: kept entries carry their values and ``optimizer``'s state of them,
    entries new to the layer start at 0 with zero state, dropped ones leave."""
    old = positions(layer)
    if new.numel() != old.numel():
        raise RuntimeError(f"values storage keeps a constant number of weights per layer: "
                           f"{old.numel()} before the update, {new.numel()} after")
    slot = torch.searchsorted(old, new).clamp(max=max(old.numel() - 1, 0))
    found = old[slot] == new if old.numel() else torch.zeros_like(new, dtype=torch.bool)
    param = layer.weight
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    rows, cols = layer.dense_shape
    with torch.no_grad():
        for value in [*state.values(), param]:
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.copy_(torch.where(found, value[slot], 0))
        _set_index(layer, SparseIndex.from_positions(rows, cols, new))


def positions_of(index: SparseIndex) -> torch.Tensor:
    """The flat positions of ``index``'s entries in a contiguous ``(rows, cols)`` weight."""
    rows = torch.repeat_interleave(torch.arange(index.rows, device=index.ptr.device),
                                   index.ptr.diff())
    return rows * index.cols + index.idx.long()


def to_values(layer, new_index: SparseIndex, values: torch.Tensor,
              optimizer: torch.optim.Optimizer | None) -> None:
    """Put ``layer`` on values storage with the kept entries of ``new_index`` and their
    ``values``: the weight parameter becomes ``values``, the mask buffer goes, the index
    becomes buffers. ``optimizer``'s reference to the dense weight is replaced by the values
    and its per-weight state gathered at the kept positions."""
    old = layer._parameters[layer.weight_name]
    param = nn.Parameter(values, requires_grad=old.requires_grad)
    if optimizer is not None:
        _swap_parameter(optimizer, old, param, new_index)
    layer._parameters[layer.weight_name] = param
    layer._buffers.pop("mask", None)
    for f in BUFFERS:
        layer.register_buffer("kept_" + f, getattr(new_index, f))
    layer.dense_shape = (new_index.rows, new_index.cols)
    layer.storage = "values"
    layer._sparse_cache.clear()


def compress(layer, optimizer: torch.optim.Optimizer | None) -> None:
    """Put the materialized ``layer`` on values storage from its dense weight and mask."""
    weight, mask = layer.dense_weight.detach(), layer.mask
    new_index = SparseIndex.from_mask(mask)
    values = sparse_backend(weight, "kept_values").kept_values(weight, new_index.ptr,
                                                               new_index.idx)
    to_values(layer, new_index, values, optimizer)


def _swap_parameter(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                    new_index: SparseIndex) -> None:
    found = False
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found = True
    if not found:
        return
    state = optimizer.state.pop(old, None)
    if state:
        at = positions_of(new_index)
        optimizer.state[new] = {
            k: v.reshape(-1)[at].clone() if isinstance(v, torch.Tensor) and v.shape == old.shape
            else v for k, v in state.items()}


def to_dense(layer) -> None:
    """Put ``layer`` back on dense storage: its dense weight (zeros where pruned) as the
    parameter and its mask as a buffer (for ``finalize``)."""
    weight, mask = dense(layer)
    old = layer._parameters[layer.weight_name]
    layer._parameters[layer.weight_name] = nn.Parameter(weight, requires_grad=old.requires_grad)
    for f in BUFFERS:
        del layer._buffers["kept_" + f]
    layer.register_buffer("mask", mask)
    layer.storage = "dense"
    del layer.dense_shape
    layer._sparse_cache.clear()


def random_positions(n: int, k: int, generator: torch.Generator, device: torch.device,
                     excluded: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` distinct positions in ``[0, n)`` outside ``excluded``, drawn uniformly (every
    ``k``-subset of the others equally likely), sorted, without a tensor of size ``n``:
    integers drawn at random until ``k`` are distinct and allowed, the last draw's new ones
    thinned at random to the count."""
    free = n - (0 if excluded is None else excluded.numel())
    if not 0 <= k <= free:
        raise ValueError(f"cannot draw {k} distinct positions out of {free}")
    chosen = torch.empty(0, dtype=torch.int64, device=device)
    taken = chosen if excluded is None else excluded.to(device)
    while chosen.numel() < k:
        need = k - chosen.numel()
        draw = torch.randint(n, (need + need // 8 + 16,), generator=generator,
                             device=generator.device).to(device).unique()
        fresh = draw[~torch.isin(draw, chosen) & ~torch.isin(draw, taken)]
        if fresh.numel() > need:
            fresh = fresh[torch.randperm(fresh.numel(), generator=generator,
                                         device=generator.device)[:need].to(device)]
        chosen = torch.cat([chosen, fresh]).sort().values
    return chosen


@torch.no_grad()
def init_values(layer, new_index: SparseIndex, device: torch.device) -> torch.Tensor:
    """The kept values of ``layer`` (on the meta device) drawn from its own initialisation,
    a block of rows at a time (:data:`INIT_BLOCK` weights): each block of the weight is
    initialised by the layer's ``reset_parameters`` (which reads the fan-in from the
    block's shape, the layer's own) and its kept entries taken. The layer's bias is
    materialized on ``device`` and initialised by the same calls."""
    if not hasattr(layer, "reset_parameters"):
        raise ValueError(f"{type(layer).__name__} has no reset_parameters to initialise its kept "
                         "values from on the meta device")
    meta = layer._parameters[layer.weight_name]
    dtype = meta.dtype
    if layer.bias is not None and layer.bias.device.type == "meta":
        layer.bias = nn.Parameter(torch.empty(layer.bias.shape, dtype=layer.bias.dtype,
                                              device=device))
    rows, cols = new_index.rows, new_index.cols
    ptr = new_index.ptr.tolist()
    values = torch.empty(new_index.nnz, dtype=dtype, device=device)
    block = max(1, INIT_BLOCK // max(cols, 1))
    try:
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            weight = torch.empty(r1 - r0, cols, dtype=dtype, device=device)
            layer._parameters[layer.weight_name] = nn.Parameter(weight)
            layer.reset_parameters()
            local = torch.repeat_interleave(torch.arange(r1 - r0, device=device),
                                            new_index.ptr[r0:r1 + 1].diff())
            values[ptr[r0]:ptr[r1]] = weight[local, new_index.idx[ptr[r0]:ptr[r1]].long()]
    finally:
        layer._parameters[layer.weight_name] = meta
    return values
