"""The DPF layers: a torch layer plus a bool ``mask`` buffer of its prunable weight's shape.

The dense weight stays the real ``nn.Parameter`` under its usual name, so optimizers,
``state_dict`` and distributed wrappers see a normal model; the forward uses
``mask ⊙ weight`` through its estimator (:mod:`dpf_ext.nn.estimators`), whose backward hands
the full gradient to the dense weight (the DPF estimator) or the masked gradient.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Iterator

import torch
from torch import nn

from . import compute as compute_paths
from . import sparse_attention
from . import values_storage
from ..distributed import is_sharded
from .estimators import Estimator, GradientTap, StraightThrough
from ..ops.bits import SUPPORTED_DTYPES
from ..ops.sparse import all_finite
from .powerprop import effective
from .state_dict_forms import read_state_dict_form, state_dict_hook


class DPFLayer:
    """Mixin of the DPF layers: a ``mask`` buffer and the masked weight.

    Class attributes a new layer type may override: ``weight_name`` (the prunable
    parameter, ``"weight"``) and ``channel_dim`` (the dimension of its output channels, 0;
    the channel floor keeps one weight per channel).

    Attributes: ``mask`` (bool buffer, all ones until a pruner writes it), ``estimator``
    (the :class:`~dpf_ext.nn.estimators.Estimator` that passes the gradient of ``mask ⊙ w`` to
    ``w``; the pruner's method sets it), ``grad_tap`` (a
    :class:`~dpf_ext.nn.estimators.GradientTap`, for methods that grow weights by their dense
    gradient), ``state_dict_form`` (see :func:`set_state_dict_form`) and ``powerprop``
    (``None``, or the exponent α of :mod:`dpf_ext.nn.powerprop`: the parameter is then ``v`` and
    the forward's weight ``v · |v|^(α-1)``).
    """

    weight_name: ClassVar[str] = "weight"
    channel_dim: ClassVar[int] = 0
    sparse_product: ClassVar[bool] = False
    """Whether :mod:`dpf_ext.nn.compute` can run the forward from the kept weights only
    (``compute="sparse"``): the product of the input with the ``(out, in)`` weight, or a
    Conv2d."""
    mask: torch.Tensor
    estimator: Estimator
    grad_tap: GradientTap

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.dense_weight, dtype=torch.bool))
        self.estimator = StraightThrough()
        self.grad_tap = GradientTap()
        self.state_dict_form = "dense"
        self.powerprop: float | None = None
        self.storage = "dense"
        """``"dense"`` (the weight parameter and a mask of its shape) or ``"values"`` (the kept
        values only: :mod:`dpf_ext.nn.values_storage`)."""
        self.compute = "dense"
        """Which product the forward runs: ``"dense"``, ``"sparse"`` or ``"auto"`` (see
        :mod:`dpf_ext.nn.compute`, :func:`set_compute`)."""
        self._sparse_cache: dict = {}
        self._register_state_dict_hook(state_dict_hook)

    @property
    def dense_weight(self) -> nn.Parameter:
        """The prunable parameter (``getattr(self, self.weight_name)``)."""
        return getattr(self, self.weight_name)

    @property
    def feedback(self) -> bool:
        """Whether pruned weights receive gradient (the estimator's)."""
        return self.estimator.feedback

    def __getattr__(self, name: str):
        if name == "mask" and self.__dict__.get("storage") == "values":
            raise AttributeError(f"{type(self).__name__} is on values storage: it holds no mask "
                                 "(its kept positions are its kept_* index buffers)")
        return super().__getattr__(name)

    def masked_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``weight ⊙ mask`` with the estimator's gradient."""
        if self.storage == "values":
            raise RuntimeError(f"{type(self).__name__} is on values storage: it holds no dense "
                               "weight (its forward is the sparse product of its kept values)")
        weight = self.dense_weight
        if self.powerprop is not None:
            weight = effective(weight, self.powerprop)
        return self.grad_tap(self.estimator.masked_weight(weight, self.mask))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        read_state_dict_form(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@contextlib.contextmanager
def masked_weights_in_place(module: nn.Module) -> Iterator[None]:
    """Within the block, every DPF layer in ``module`` (itself included) holds its masked
    weight in place of its parameter, for code that reads the weights of its submodules
    directly instead of calling them (the fused attention paths of torch)."""
    layers = [m for m in module.modules() if isinstance(m, DPFLayer)]
    dense = [m._parameters[m.weight_name] for m in layers]
    masked = [m.masked_weight() for m in layers]
    try:
        for m, w in zip(layers, masked):
            m._parameters[m.weight_name] = w
        yield
    finally:
        for m, w in zip(layers, dense):
            m._parameters[m.weight_name] = w


class _DPFConv(DPFLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class DPFLinear(DPFLayer, nn.Linear):
    """``nn.Linear`` whose forward uses ``weight ⊙ mask`` (the kept weights only where its
    ``compute`` says sparse)."""

    sparse_product = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.storage == "values":
            return values_storage.linear(self, input)
        out = compute_paths.linear(self, input, self.bias)
        return nn.functional.linear(input, self.masked_weight(), self.bias) if out is None else out


class DPFConv1d(_DPFConv, nn.Conv1d):
    """``nn.Conv1d`` whose forward uses ``weight ⊙ mask``."""


class DPFConv2d(_DPFConv, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight ⊙ mask`` (the kept weights only where its
    ``compute`` says sparse: stride-1 layers with "same" padding)."""

    sparse_product = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = compute_paths.conv2d(self, input, self.bias)
        return super().forward(input) if out is None else out


class DPFConv3d(_DPFConv, nn.Conv3d):
    """``nn.Conv3d`` whose forward uses ``weight ⊙ mask``."""


class DPFOutProjection(DPFLayer, nn.modules.linear.NonDynamicallyQuantizableLinear):
    """The output projection of a :class:`DPFMultiheadAttention`: a :class:`DPFLinear`
    (sparse where its ``compute`` says), whose masked weight torch's attention forward
    reads where the attention layer runs dense."""

    sparse_product = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = compute_paths.linear(self, input, self.bias)
        return nn.functional.linear(input, self.masked_weight(), self.bias) if out is None else out


class DPFMultiheadAttention(DPFLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed input projection (``in_proj_weight``, 3E x E:
    the channels are its 3E output features) and output projection (a
    :class:`DPFOutProjection`) are masked. Unless both its ``compute`` and its output
    projection's are ``"dense"``, the forward is :func:`dpf_ext.nn.sparse_attention.forward`:
    each projection sparse or dense as its own layer's path says. Otherwise (and for inputs
    holding NaN or Inf) torch's forward runs on the masked weights, its fused attention kernel included where torch
    chooses it (inference without grad)."""

    weight_name = "in_proj_weight"
    sparse_product = True

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        args = (query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal)
        if ((self.compute, self.out_proj.compute) != ("dense", "dense")
                and compute_paths.attention_unsupported(self) is None
                and all(all_finite(t) for t in {id(t): t for t in (query, key, value)}.values())):
            return sparse_attention.forward(self, *args)
        with masked_weights_in_place(self):
            return super().forward(*args)


class DPFTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose fused inference path reads the masked weights of
    its DPF submodules (it reads their weights directly instead of calling them). Not a DPF
    layer itself: it has no weight of its own."""

    def forward(self, *args, **kwargs):
        with masked_weights_in_place(self):
            return super().forward(*args, **kwargs)


def dpf_layers(model: nn.Module) -> list[tuple[str, DPFLayer]]:
    """The ``(name, layer)`` pairs of every DPF layer of ``model``, in module order; a weight
    shared by several layers (``tied="prune"``) is listed once."""
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, DPFLayer) and id(m.dense_weight) not in seen:
            seen.add(id(m.dense_weight))
            out.append((name, m))
    return out


def prunable_layers(model: nn.Module, allow_meta: bool = False) -> list[tuple[str, "DPFLayer"]]:
    """:func:`dpf_layers` of ``model``, checked for pruning: at least one, materialized
    (unless ``allow_meta``), of a supported dtype, not under FSDP1, sharded only where the channels are dim 0; else a
    ``ValueError`` or ``TypeError`` naming the problem."""
    layers = dpf_layers(model)
    if not layers:
        raise ValueError(
            "the model has no prunable layer: DPF prunes the DPF layers that "
            "dpf_ext.sparsify(model) puts in place of nn.Linear and nn.Conv1d/2d/3d"
        )
    for name, layer in layers:
        name = name or type(layer).__name__ + " (the model itself)"
        if layer.dense_weight.device.type == "meta" and not allow_meta:
            raise ValueError(
                f"layer {name!r} has its weight on the meta device: materialize the model "
                "first (model.to_empty(device=...) and initialise or load its weights), or "
                "build the pruner with storage='values', which draws the kept weights only"
            )
        if layer.dense_weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"layer {name!r} has {layer.dense_weight.dtype} weights; DPF supports "
                f"{', '.join(map(str, SUPPORTED_DTYPES))}"
            )
    if any(layer.channel_dim and is_sharded(layer.dense_weight) for _, layer in layers):
        raise ValueError("layers whose output channels are not dim 0 (transformers' Conv1D) "
                         "cannot be pruned sharded: FSDP2 shards dim 0")
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) flattens the weights DPF prunes; shard the "
            "model with torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )
    return layers
