"""Sparse-aware layers and the functions that put them into (and take them out of) a model.

A DPF layer is its torch layer plus a bool ``mask`` buffer of the weight's shape. The dense
weight stays the real ``nn.Parameter`` under its usual name, so optimizers, ``state_dict``
and distributed wrappers see a normal model; the forward uses ``mask ⊙ weight`` through
:func:`dpf_ext.ops.masked_weight`, whose backward hands the full gradient to the dense
weight (``feedback=True``, the DPF estimator) or the masked gradient (``feedback=False``).
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Union

import torch
from torch import nn

from . import ops
from .channels import clip_pruned_gradient
from .distributed import is_sharded, local_weight_and_mask


class DPFLayer:
    """Mixin of the DPF layers: a ``mask`` buffer and the masked forward.

    Attributes: ``mask`` (bool buffer, all ones until a pruner writes it), ``feedback``
    (whether pruned weights receive gradient) and ``feedback_clip`` (``None``, or the bound
    on pruned weights' gradient relative to the largest kept one, see
    :func:`dpf_ext.channels.clip_pruned_gradient`).
    """

    mask: torch.Tensor
    feedback: bool
    feedback_clip: float | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_mask()

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.feedback = True
        self.feedback_clip = None

    def masked_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``weight ⊙ mask`` with the DPF gradient."""
        weight = self.weight
        if self.feedback and self.feedback_clip is not None:
            weight = clip_pruned_gradient(weight, self.mask, self.feedback_clip)
        return ops.masked_weight(weight, self.mask, self.feedback)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A dense checkpoint (no mask) loads into a DPF layer as "nothing pruned".
        if prefix + "weight" in state_dict and prefix + "mask" not in state_dict:
            state_dict[prefix + "mask"] = torch.ones_like(self.mask)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _DPFConv(DPFLayer):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, self.masked_weight(), self.bias)


class DPFLinear(DPFLayer, nn.Linear):
    """``nn.Linear`` whose forward uses ``weight ⊙ mask``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(input, self.masked_weight(), self.bias)


class DPFConv1d(_DPFConv, nn.Conv1d):
    """``nn.Conv1d`` whose forward uses ``weight ⊙ mask``."""


class DPFConv2d(_DPFConv, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight ⊙ mask``."""


class DPFConv3d(_DPFConv, nn.Conv3d):
    """``nn.Conv3d`` whose forward uses ``weight ⊙ mask``."""


DPF_LAYER_FOR = {
    nn.Linear: DPFLinear,
    nn.Conv1d: DPFConv1d,
    nn.Conv2d: DPFConv2d,
    nn.Conv3d: DPFConv3d,
}
"""The torch layer types :func:`sparsify` replaces, and their DPF layers."""

Exclude = Union[Iterable[str], Callable[[str, nn.Module], bool], None]


def _excluded(exclude: Exclude, layer_names: list[str]) -> Callable[[str, nn.Module], bool]:
    """The predicate of ``exclude``; names or patterns that match none of ``layer_names``
    raise ``ValueError`` (a typo would otherwise prune a layer meant to stay dense)."""
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        return exclude
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in layer_names)]
    if unmatched:
        shown = ", ".join(layer_names[:12]) + (", ..." if len(layer_names) > 12 else "")
        raise ValueError(f"exclude: {unmatched} match no prunable layer; the layers are: {shown}")
    return lambda name, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def sparsify(model: nn.Module, exclude: Exclude = None) -> nn.Module:
    """Make ``model`` sparse-aware in place and return it.

    Every module whose type is exactly ``nn.Linear`` or ``nn.Conv1d/2d/3d`` becomes its DPF
    layer: the same module object, parameters, device, dtype and name, with an all-ones
    ``mask`` buffer added. Subclasses of those layers are left alone (some, like the output
    projection of ``nn.MultiheadAttention``, are used without calling their forward).

    ``exclude`` keeps layers dense: module names or ``fnmatch`` patterns (``"fc"``,
    ``"layer1.*"``; one that matches no such layer is a ``ValueError``), or a predicate
    ``(name, module) -> bool``. By default every such layer
    becomes prunable, the first convolution and the classifier included; the DPF paper's
    reproductions differ on those two, so exclude them by name if you want them dense.
    Calling ``sparsify`` again is harmless: DPF layers are not replaced twice.
    """
    candidates = [name for name, module in model.named_modules()
                  if type(module) in DPF_LAYER_FOR or isinstance(module, DPFLayer)]
    is_excluded = _excluded(exclude, candidates)
    for name, module in model.named_modules():
        if isinstance(module, tuple(DPF_LAYER_FOR)) and is_sharded(module.weight):
            raise ValueError(
                f"layer {name!r} is already sharded (fully_shard): call dpf_ext.sparsify "
                "before sharding the model, so that its masks stay whole on every rank"
            )
        cls = DPF_LAYER_FOR.get(type(module))
        if cls is None or is_excluded(name, module):
            continue
        module.__class__ = cls
        cls._init_mask(module)
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (``w ← mask ⊙ w``) and turn DPF layers back into the
    plain torch layers, in place. The result's ``state_dict`` loads into the original model
    class. Returns ``model``."""
    plain_for = {dpf: plain for plain, dpf in DPF_LAYER_FOR.items()}
    for module in model.modules():
        if isinstance(module, DPFLayer):
            with torch.no_grad():
                weight, mask = local_weight_and_mask(module.weight, module.mask)
                weight.mul_(mask)
            del module._buffers["mask"]
            del module.feedback
            del module.feedback_clip
            module.__class__ = plain_for[type(module)]
    return model


def dpf_layers(model: nn.Module) -> list[tuple[str, DPFLayer]]:
    """The ``(name, layer)`` pairs of every DPF layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DPFLayer)]
