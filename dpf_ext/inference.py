"""Faster inference with the sparse weights: ``to_sparse_inference``.

Pruned Linear layers (``nn.Linear`` and transformers' ``Conv1D``, plain with zeros or DPF
layers) become :class:`SparseLinear` modules, and pruned stride-1 ``nn.Conv2d`` layers with
"same" padding :class:`SparseConv2d` modules, that multiply with their kept weights only
(the sparse products of :mod:`dpf_ext.ops.sparse` and :mod:`dpf_ext.ops.sparse_conv`, the
kernels training uses), but only those that a rule of density and size (the default: the
same model always converts the same way) or a measurement on this machine at conversion
time says are faster sparse (``bench/test_sparse_inference.py`` reports the crossovers).
What stays dense is reported, with the reason.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from .nn.compute import conv2d_unsupported
from .nn.crossover import median_time
from .nn import values_storage
from .nn.layers import DPFLayer
from .ops.sparse import SparseIndex, kept_product
from .ops.sparse_conv import ConvIndex, kept_conv


class SparseLinear(nn.Module):
    """An inference-only Linear layer holding its kept weights (``values``, in the order of
    its :class:`~dpf_ext.ops.SparseIndex`) and their index as buffers; ``weight`` is the
    ``(out, in)`` dense weight with zeros it is built from."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach()
        self.index = SparseIndex.from_mask(weight != 0)
        self.register_buffer("values", weight.reshape(-1)[self.index.pos].clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_kept(cls, values: torch.Tensor, index: SparseIndex,
                  bias: torch.Tensor | None) -> "SparseLinear":
        """The layer of the kept ``values`` (in ``index``'s order: a layer on values storage),
        built without a dense weight."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.index = index
        layer.register_buffer("values", values.detach().clone())
        layer.register_buffer("bias", None if bias is None else bias.detach().clone())
        layer.out_features, layer.in_features = index.rows, index.cols
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kept_product(x, self.values, self.index, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={1 - self.values.numel() / (self.in_features * self.out_features):.2%}")


class SparseConv2d(nn.Module):
    """An inference-only stride-1 Conv2d with "same" padding holding its kept weights
    (``values``, in the order of its :class:`~dpf_ext.ops.ConvIndex`) and their index;
    ``weight`` is the ``(out, in, kh, kw)`` dense weight with zeros it is built from."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach()
        self.index = ConvIndex.from_mask(weight != 0)
        self.register_buffer("values", weight.reshape(-1)[self.index.rows.pos].clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kept_conv(x, self.values, self.index, self.bias)

    def extra_repr(self) -> str:
        out, inp, kh, kw = self.index.shape
        return (f"{inp}, {out}, kernel_size=({kh}, {kw}), padding=({kh // 2}, {kw // 2}), "
                f"sparsity={1 - self.values.numel() / (out * inp * kh * kw):.2%}")


LINEAR_RULE = ((2**20, 0.2), (2**17, 0.05))
"""``decide="rule"``: a Linear layer of at least the first number of weights converts at
the second density (fraction kept) or lower; smaller ones stay dense. From
``bench/results/sparse-inference-cpu-2core-intel-xeon.json`` (2-core Intel Xeon, batch 64),
with a margin over the default 1.1x: 1024x1024 is 1.44x the dense layer's speed at density
0.2, 256x512 1.12x at 0.05, 512x64 at most 1.03x at any density. Convolutions convert at
:data:`CONV_RULE` or lower."""

CONV_RULE = 0.3
"""``decide="rule"``: a stride-1 "same" convolution converts at this density or lower. A
training step of ResNet-20's 3x3 layers (16 channels at 32x32 to 64 at 8x8, batch 64) with
the sampled weight gradient is 1.0-1.4x faster sparse at density 0.3 (2-core AMD EPYC,
AVX-512, 1 thread, ``docs/results.md``); a forward alone gains more."""

DECISIONS = ("rule", "measure")


def rule_says_dense(size: int, density: float, conv: bool) -> str:
    """Why :data:`LINEAR_RULE` (or, for a convolution, its density limit) keeps a weight of
    ``size`` entries, ``density`` of them non-zero, dense; ``""`` if it converts."""
    if conv:
        limit = CONV_RULE
        return "" if density <= limit else f"density {density:.4f} above the rule's {limit} for convolutions"
    for weights, limit in LINEAR_RULE:
        if size >= weights:
            return "" if density <= limit else (
                f"density {density:.4f} above the rule's {limit} for {weights:,}+ weights")
    return f"fewer than {LINEAR_RULE[-1][0]:,} weights: too small to gain (the rule)"


@dataclass(frozen=True)
class InferenceChoice:
    """What :func:`to_sparse_inference` measured for one Linear or Conv2d layer and decided;
    ``reason`` says why a layer stays dense. The times are NaN where nothing was measured
    (``repeats=0``, a convolution without ``example``, a layer left untried)."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    dense_ms: float
    sparse_ms: float
    sparse: bool
    reason: str = ""


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``(out, in)`` weight (masked, for DPF layers) of an ``nn.Linear`` or transformers'
    ``Conv1D``; ``None`` for other modules."""
    conv1d = sys.modules.get("transformers.pytorch_utils")
    is_conv1d = conv1d is not None and isinstance(module, conv1d.Conv1D)
    if not (isinstance(module, nn.Linear) or is_conv1d):
        return None
    weight = module.masked_weight() if isinstance(module, DPFLayer) else module.weight
    return weight.detach().t() if is_conv1d else weight.detach()


def _conv_inputs(model: nn.Module, example) -> dict[str, torch.Size]:
    """The input shape of each ``nn.Conv2d`` of ``model`` in one forward of ``example`` (a
    tensor, or a tuple of the model's inputs); empty without ``example``."""
    if example is None:
        return {}
    shapes: dict[str, torch.Size] = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, args[0].shape)  # returns None: the input is kept
        return hook

    hooks = [m.register_forward_pre_hook(record(name)) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d)]
    try:
        model(*example) if isinstance(example, tuple) else model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _candidate(name: str, module: nn.Module, batch_size: int, conv_inputs: dict):
    """``(weight, sparse module, input, dense product, why not)`` for a layer
    :func:`to_sparse_inference` may swap; ``None`` for other modules."""
    weight = _linear_weight(module)
    if weight is not None:
        x = torch.randn(batch_size, weight.shape[1], device=weight.device, dtype=weight.dtype)
        return (weight, lambda: SparseLinear(weight, module.bias), x,
                lambda: nn.functional.linear(x, weight, module.bias), "")
    if not isinstance(module, nn.Conv2d):
        return None
    weight = (module.masked_weight() if isinstance(module, DPFLayer) else module.weight).detach()
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    shape = conv_inputs.get(name)
    x = None if shape is None else torch.randn(shape, device=weight.device, dtype=weight.dtype)
    why = conv2d_unsupported(module) or ""
    return (weight, lambda: SparseConv2d(weight, module.bias), x,
            lambda: nn.functional.conv2d(x, weight, module.bias, padding=padding), why)


@torch.no_grad()
def to_sparse_inference(model: nn.Module, batch_size: int = 64, min_speedup: float = 1.1,
                        min_sparsity: float = 0.5, repeats: int = 20, example=None,
                        decide: str = "rule") -> list[InferenceChoice]:
    """Swap, in place, each pruned Linear layer of ``model`` (``nn.Linear``, transformers'
    ``Conv1D``) for a :class:`SparseLinear`, and each pruned stride-1 "same" ``nn.Conv2d``
    for a :class:`SparseConv2d`, where the sparse product is the faster one. DPF layers are
    taken with their masks applied.

    ``decide="rule"`` (the default) decides by density and size (:data:`LINEAR_RULE`): the
    same model converts the same way on every run. ``decide="measure"`` times both products
    here, on a random batch of ``batch_size`` rows (a convolution at the input shape it sees
    in one forward of ``example``: the model's input, a tensor or a tuple of its inputs),
    and converts where the sparse one is at least ``min_speedup`` times faster; timings vary
    from run to run, so can the decisions. Either way both products are timed
    (``repeats`` runs each, the median; ``repeats=0`` times nothing under the rule) and the
    times returned: one :class:`InferenceChoice` per Linear or Conv2d layer, converted or
    left dense with the ``reason`` (under ``min_sparsity``, a dtype without sparse kernels,
    a convolution without a sparse path, the rule, or the measurement). The result is for
    inference only (no gradient reaches the weights). Layers on values storage always
    become :class:`SparseLinear` modules of their kept values (nothing timed: they hold no
    dense weight to compare with).
    """
    if decide not in DECISIONS:
        raise ValueError(f"decide must be one of {DECISIONS}, got {decide!r}")
    if batch_size < 1 or min_speedup <= 0 or not 0 <= min_sparsity < 1 or repeats < 0 \
            or (decide == "measure" and repeats < 1):
        raise ValueError("batch_size must be >= 1, repeats >= 1 (0 allowed with decide='rule'), "
                         "min_speedup > 0, min_sparsity in [0, 1)")
    modules = dict(model.named_modules())
    conv_inputs = _conv_inputs(model, example)
    choices = []
    for name, module in list(modules.items()):
        if isinstance(module, DPFLayer) and values_storage.is_values(module):
            rows, cols = module.dense_shape
            choices.append(InferenceChoice(name, (rows, cols), 1 - module.weight.numel() / (rows * cols),
                                           float("nan"), float("nan"), True))
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, SparseLinear.from_kept(
                module.weight, values_storage.index(module), module.bias))
            continue
        found = _candidate(name, module, batch_size, conv_inputs) if name else None
        if found is None:
            continue
        weight, build, x, dense, why = found
        conv = isinstance(module, nn.Conv2d)
        density = int((weight != 0).sum()) / weight.numel()
        sparsity = 1.0 - density
        untried = (why or (f"sparsity {sparsity:.1%} under min_sparsity"
                           if sparsity < min_sparsity else "")
                   or (f"{weight.dtype} has no sparse kernels (float32 has)"
                       if weight.dtype != torch.float32 else "")
                   or ("a convolution: pass example= to measure it"
                       if decide == "measure" and x is None else ""))
        if untried:
            choices.append(InferenceChoice(name, tuple(weight.shape), sparsity, float("nan"),
                                           float("nan"), False, untried))
            continue
        candidate = build().to(weight.device)
        dense_ms = sparse_ms = float("nan")
        if repeats and x is not None:
            dense_ms = 1e3 * median_time(dense, repeats)
            sparse_ms = 1e3 * median_time(lambda: candidate(x), repeats)
        if decide == "rule":
            reason = rule_says_dense(weight.numel(), density, conv)
        else:
            reason = "" if dense_ms >= min_speedup * sparse_ms else "the dense product is faster here"
        choices.append(InferenceChoice(name, tuple(weight.shape), sparsity, dense_ms, sparse_ms,
                                       not reason, reason))
        if not reason:
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, candidate)
    return choices


def check_two_four(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ``ValueError`` unless every group of 4 consecutive input features of each row of
    ``weight`` has at most 2 non-zeros (the 2:4 pattern GPU sparse tensor cores run)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"{name}: a 2:4 weight is a matrix whose input features are a multiple "
                         f"of 4, got shape {tuple(weight.shape)}")
    per_group = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    if bool((per_group > 2).any()):
        raise ValueError(f"{name} is not 2:4 sparse: {int((per_group > 2).sum())} groups of 4 keep "
                         "more than 2 weights (prune with DPF(pattern='2:4') and finalize first)")


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> list[str]:
    """Convert, in place, every 2:4-sparse ``nn.Linear`` weight of ``model`` to torch's
    semi-structured sparse format (``torch.sparse.to_sparse_semi_structured``), which GPU
    sparse tensor cores multiply (CUDA, compute capability 8.0 or newer; float16 or
    bfloat16). Returns the names converted. Each weight's pattern is checked first; a layer
    that is not 2:4 raises ``ValueError`` naming it, and a machine without such a GPU
    raises ``RuntimeError``; nothing is converted then."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("the model has no nn.Linear layer to convert")
    for name, layer in layers:
        weight = layer.masked_weight() if isinstance(layer, DPFLayer) else layer.weight
        check_two_four(weight, f"layer {name!r}")
    devices = {layer.weight.device for _, layer in layers}
    if any(d.type != "cuda" for d in devices) or not all(
            torch.cuda.get_device_capability(d) >= (8, 0) for d in devices):
        raise RuntimeError("semi-structured (2:4) sparse weights need the model on a CUDA GPU of "
                           "compute capability 8.0 or newer (Ampere and later)")
    from torch.sparse import to_sparse_semi_structured

    for name, layer in layers:
        weight = layer.masked_weight() if isinstance(layer, DPFLayer) else layer.weight
        layer.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
    return [name for name, _ in layers]
