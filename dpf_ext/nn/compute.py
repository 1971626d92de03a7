"""Which product a DPF layer's forward runs: ``"dense"`` (``mask ⊙ w`` into torch's matrix
product or convolution, every weight multiplied) or ``"sparse"`` (the kept weights only:
:func:`dpf_ext.ops.sparse_linear` for Linear layers, transformers' Conv1D and the
projections of ``nn.MultiheadAttention`` (:mod:`dpf_ext.nn.sparse_attention`),
:func:`dpf_ext.ops.sparse_conv2d` for stride-1 Conv2d layers with "same" padding), or
``"auto"``: sparse where it is faster (:func:`prefers_sparse`).

A layer's ``compute`` attribute holds its mode (:func:`dpf_ext.nn.set_compute`, or
``sparsify(model, compute=...)``). The sparse path's index is rebuilt only when the mask
changes (its version counter moves: a pruner's update, ``load_state_dict``); each call
gathers the kept values from the dense weight, which stays the parameter the optimizer
updates. The gradient the weight gets is the estimator's, as on the dense path: dense for
DPF's straight-through estimator and on the steps where a method reads the dense gradient
(the layer's gradient tap is armed), sampled at the kept positions otherwise.

Sparse kernels exist for float32 on the CPU (:func:`dpf_ext.ops.simd` names the instruction
set) and on CUDA (simple kernels, tested under emulation, their speed unmeasured); where
none is built ``"sparse"`` runs the reference implementation (correct, not fast).
``"auto"`` runs sparse on the CPU only, below the densities measured on the machine
(:mod:`dpf_ext.nn.crossover`). A forward whose
input holds NaN or Inf takes the dense path, so that they spread as they do there
(``0 · NaN`` is NaN).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..ops import reference
from ..ops.sparse import all_finite
from .crossover import crossover
from .powerprop import effective

MODES = ("dense", "sparse", "auto")

AUTO_MIN_WEIGHTS = 16384
"""``"auto"`` leaves Linear layers with fewer weights dense: their products cost less than the
sparse path's fixed work (transposes, gathers, the autograd node). Convolutions have no such
floor: each of their weights multiplies a whole input plane."""


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ``ValueError`` listing them."""
    if mode not in MODES:
        raise ValueError(f"compute must be one of {MODES}, got {mode!r}")
    return mode


def conv2d_unsupported(conv: nn.Conv2d) -> str | None:
    """Why the Conv2d ``conv`` is not a stride-1 "same" convolution, or ``None``."""
    kernel = conv.kernel_size
    if any(k % 2 == 0 for k in kernel):
        return f"its kernel {kernel} has an even size (the sparse convolution needs odd ones)"
    for name, value, want in (("stride", conv.stride, (1, 1)), ("dilation", conv.dilation, (1, 1)),
                              ("groups", conv.groups, 1), ("padding_mode", conv.padding_mode, "zeros")):
        if value != want:
            return f"its {name} is {value} (the sparse convolution needs {want})"
    same = tuple(k // 2 for k in kernel)
    if conv.padding not in ("same", same):
        return f"its padding is {conv.padding} (the sparse convolution needs {same}: \"same\")"
    return None


def attention_unsupported(attention: nn.MultiheadAttention) -> str | None:
    """Why :mod:`dpf_ext.nn.sparse_attention` does not cover this attention layer, or ``None``."""
    if attention.bias_k is not None or attention.add_zero_attn or not attention._qkv_same_embed_dim:
        return "add_bias_kv, add_zero_attn and separate kdim/vdim have no sparse path"
    return None


def unsupported(layer) -> str | None:
    """Why ``layer`` (a DPF layer) cannot run sparse, or ``None`` if it can."""
    if layer.storage == "values":
        return None  # its forward is always the sparse product
    if not type(layer).sparse_product:
        return (f"{type(layer).__name__} has no sparse path (Linear, transformers' Conv1D, "
                "nn.MultiheadAttention and Conv2d have; Conv1d and Conv3d layers run dense)")
    if isinstance(layer, nn.Conv2d):
        reason = conv2d_unsupported(layer)
        if reason is not None:
            return f"{type(layer).__name__}: {reason}"
    if isinstance(layer, nn.MultiheadAttention):
        reason = attention_unsupported(layer)
        if reason is not None:
            return f"{type(layer).__name__}: {reason}"
    weight = layer.dense_weight
    if weight.dtype != torch.float32:
        return f"its weight is {weight.dtype}; the sparse kernels run float32"
    with torch.no_grad():
        if layer.estimator.sparse_weight(weight, layer.mask, True) is None:
            return f"its estimator {type(layer.estimator).__name__} is not mask ⊙ w"
    return None


def density(layer) -> float:
    """The fraction of ``layer``'s weights its mask keeps (counted once per mask change)."""
    if layer.storage == "values":
        return layer.weight.numel() / max(1, math.prod(layer.dense_shape))
    mask = layer.mask
    key = (mask._version, mask.data_ptr())
    cached = layer._sparse_cache.get("density")
    if cached is None or cached[0] != key:
        cached = (key, int(mask.count_nonzero()) / max(1, mask.numel()))
        layer._sparse_cache["density"] = cached
    return cached[1]


def prefers_sparse(layer) -> bool:
    """The ``"auto"`` rule: sparse on the CPU where the compiled kernels are built and the
    layer's density is at most this machine's crossover (:func:`~dpf_ext.nn.crossover.crossover`:
    measured once per CPU and thread count) for its kind, a Linear layer only from
    :data:`AUTO_MIN_WEIGHTS` weights."""
    weight = layer.dense_weight
    conv = isinstance(layer, nn.Conv2d)
    if (unsupported(layer) is not None or weight.device.type != "cpu"
            or ops.backend_for(weight.device, "sparse_conv" if conv else "sparse_mm") is reference
            or (not conv and weight.numel() < AUTO_MIN_WEIGHTS)):
        return False
    limits = crossover()
    return density(layer) <= (limits.conv if conv else limits.linear)


def runs_sparse(layer) -> bool:
    """Whether ``layer``'s next forward takes the sparse path under its ``compute`` mode;
    ``"sparse"`` on a layer that cannot is a ``ValueError`` saying why."""
    if layer.storage == "values":
        return True
    if layer.compute == "dense":
        return False
    if layer.compute == "sparse":
        reason = unsupported(layer)
        if reason is not None:
            raise ValueError(f"compute='sparse': {reason}")
        return True
    return prefers_sparse(layer)


def path(layer) -> str:
    """``"sparse"`` or ``"dense"``: the product ``layer``'s next forward runs (a layer set to
    ``"sparse"`` that cannot is reported ``"dense"``; its forward raises). A layer on values
    storage is always ``"sparse"``."""
    if layer.storage == "values":
        return "sparse"
    if layer.compute == "dense":
        return "dense"
    if layer.compute == "sparse":
        return "sparse" if unsupported(layer) is None else "dense"
    return "sparse" if prefers_sparse(layer) else "dense"


def _weight_2d(layer, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (or the layer's mask) as ``(out, in)``: a view of the stored tensor."""
    return weight if layer.channel_dim == 0 else weight.t()


def sparse_index(layer, rows: slice | None = None) -> ops.SparseIndex | ops.ConvIndex:
    """The layer's :class:`~dpf_ext.ops.SparseIndex` (a
    :class:`~dpf_ext.ops.ConvIndex` for a convolution), rebuilt when its mask has changed;
    with ``rows``, the index of those output rows alone (an attention layer's ``q``, ``k``
    or ``v`` block)."""
    mask, weight = layer.mask, layer.dense_weight
    key = (mask._version, mask.data_ptr(), weight.stride())
    name = ("index", None if rows is None else (rows.start, rows.stop))
    cached = layer._sparse_cache.get(name)
    if cached is None or cached[0] != key:
        if isinstance(layer, nn.Conv2d):
            index = ops.ConvIndex.from_mask(mask)
        else:
            mask2, weight2 = _weight_2d(layer, mask), _weight_2d(layer, weight)
            if rows is not None:
                mask2, weight2 = mask2[rows], weight2[rows]
            index = ops.SparseIndex.from_mask(mask2, weight2)
        cached = (key, index)
        layer._sparse_cache[name] = cached
    return cached[1]


def sparse_weight(layer) -> tuple[torch.Tensor, bool]:
    """The weight the sparse products read, with the estimator's gradient, and whether that
    gradient is dense (the estimator's feedback, or a method reading this step's gradient)."""
    weight = layer.dense_weight
    if layer.powerprop is not None:
        weight = effective(weight, layer.powerprop)
    dense_grad = layer.estimator.feedback or layer.grad_tap.armed
    return layer.grad_tap(layer.estimator.sparse_weight(weight, layer.mask, dense_grad)), dense_grad


def linear(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``x (m ⊙ w)ᵀ + b`` on the sparse path, or ``None`` where the dense path must run (the
    layer's mode and density, or a non-finite ``x``)."""
    if not runs_sparse(layer) or not all_finite(x):
        return None
    weight, dense_grad = sparse_weight(layer)
    return ops.sparse_linear(x, _weight_2d(layer, weight), sparse_index(layer), bias,
                             dense_grad=dense_grad)


def conv2d(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The Conv2d ``layer``'s convolution of ``x`` with ``m ⊙ w`` on the sparse path, or
    ``None`` where the dense path must run (the layer's mode and density, or a non-finite
    ``x``). An unbatched ``(C, H, W)`` input runs as a batch of one."""
    if not runs_sparse(layer) or not all_finite(x):
        return None
    weight, dense_grad = sparse_weight(layer)
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    y = ops.sparse_conv2d(batched, weight, sparse_index(layer), bias, dense_grad=dense_grad)
    return y if x.dim() == 4 else y.squeeze(0)
