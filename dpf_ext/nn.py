"""Sparse-aware layers and the functions that put them into (and take them out of) a model.

A DPF layer is its torch layer plus a bool ``mask`` buffer of its prunable weight's shape.
The dense weight stays the real ``nn.Parameter`` under its usual name, so optimizers,
``state_dict`` and distributed wrappers see a normal model; the forward uses
``mask ⊙ weight`` through its estimator (:mod:`dpf_ext.estimators`), whose backward hands
the full gradient to the dense weight (the DPF estimator) or the masked gradient.

Which module types become DPF layers is a registry (:func:`register_prunable`): Linear,
Conv1d/2d/3d, ``nn.MultiheadAttention`` (its packed input projection and its output
projection) and, when transformers is imported, its ``Conv1D``. Your own layer type is
made prunable the same way; see :func:`register_prunable`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Iterator, Union

import torch
from torch import nn

from . import compute as compute_paths
from . import ops
from .distributed import is_sharded, local_weight_and_mask
from .ops.bits import SUPPORTED_DTYPES
from .powerprop import SUFFIX as POWERPROP_SUFFIX
from .powerprop import check_alpha, effective, parameter
from .estimators import Estimator, GradientTap, StraightThrough

log = logging.getLogger("dpf_ext")


class UnfinalizedWarning(UserWarning):
    """A DPF model's ``state_dict`` was taken before its masks were folded in: it holds the
    dense weights (and the masks), which is right for resuming training and wrong for
    exporting the sparse model."""


STATE_DICT_FORMS = ("dense", "sparse")
PRUNED_SUFFIX = "_pruned"
"""In the sparse state-dict form, ``<weight><PRUNED_SUFFIX>`` holds the dense values of the
pruned weights (zeros where kept)."""


def _state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook of the DPF layers: writes the sparse form (see
    :func:`set_state_dict_form`), or warns (:class:`UnfinalizedWarning`) that the dense form
    holds the dense weights."""
    name = prefix + module.weight_name
    if module.powerprop is not None:  # the effective weight, and the parameter for resuming
        state_dict[name + POWERPROP_SUFFIX] = state_dict[name].detach()
        state_dict[name] = effective(state_dict[name].detach(), module.powerprop)
    if module.state_dict_form == "sparse":
        weight, mask = state_dict[name].detach(), state_dict[prefix + "mask"]
        if is_sharded(weight):
            raise NotImplementedError("the sparse state-dict form does not support sharded "
                                      "(fully_shard) weights; use the dense form")
        zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
        state_dict[name] = torch.where(mask, weight, zero)
        state_dict[name + PRUNED_SUFFIX] = torch.where(mask, zero, weight)
    elif not bool(module.mask.all()):
        warnings.warn(
            "state_dict of a DPF model whose masks are not folded in: it holds the DENSE "
            "weights plus the masks. That resumes training (load it into a sparsified model, "
            "with the pruner's state), but a plain model loading it (strict=False, "
            "from_pretrained) gets the dense model. For the sparse model call "
            "pruner.finalize(unwrap=True) (or dpf_ext.unsparsify) before saving, or "
            "dpf_ext.nn.set_state_dict_form(model, 'sparse') for checkpoints that do both; "
            "silence this with warnings.simplefilter('ignore', dpf_ext.nn.UnfinalizedWarning)",
            UnfinalizedWarning, stacklevel=4,
        )


def set_state_dict_form(model: nn.Module, form: str) -> nn.Module:
    """Choose what the DPF layers of ``model`` write into ``state_dict()``; returns ``model``.

    - ``"dense"`` (the default): the dense weight under its usual name, and the ``mask``.
      Loaded by a plain model (``strict=False``, ``from_pretrained``) it gives the DENSE
      model, hence the :class:`UnfinalizedWarning`.
    - ``"sparse"``: the pruned weight ``mask ⊙ weight`` under the usual name, the ``mask``,
      and ``<weight>_pruned``, the dense values at the pruned positions (zeros elsewhere).
      A plain model loading it gets the SPARSE model (the two extra keys are reported as
      unexpected); a sparsified model loading it gets the dense weights and the masks back
      exactly, so training resumes as if never stopped. It costs one more weight-sized
      tensor per layer on disk. :class:`dpf_ext.hf.DPFCallback` uses this form for the
      Trainer's checkpoints.

    Either form loads into a sparsified model.
    """
    if form not in STATE_DICT_FORMS:
        raise ValueError(f"form must be one of {STATE_DICT_FORMS}, got {form!r}")
    layers = [m for m in model.modules() if isinstance(m, DPFLayer)]
    if not layers:
        raise ValueError("the model has no DPF layer: call dpf_ext.sparsify(model) first")
    for m in layers:
        m.state_dict_form = form
    return model


class DPFLayer:
    """Mixin of the DPF layers: a ``mask`` buffer and the masked weight.

    Class attributes a new layer type may override: ``weight_name`` (the prunable
    parameter, ``"weight"``) and ``channel_dim`` (the dimension of its output channels, 0;
    the channel floor keeps one weight per channel).

    Attributes: ``mask`` (bool buffer, all ones until a pruner writes it), ``estimator``
    (the :class:`~dpf_ext.estimators.Estimator` that passes the gradient of ``mask ⊙ w`` to
    ``w``; the pruner's method sets it), ``grad_tap`` (a
    :class:`~dpf_ext.estimators.GradientTap`, for methods that grow weights by their dense
    gradient), ``state_dict_form`` (see :func:`set_state_dict_form`) and ``powerprop``
    (``None``, or the exponent α of :mod:`dpf_ext.powerprop`: the parameter is then ``v`` and
    the forward's weight ``v · |v|^(α-1)``).
    """

    weight_name: ClassVar[str] = "weight"
    channel_dim: ClassVar[int] = 0
    sparse_product: ClassVar[bool] = False
    """Whether the forward is the product of the input with the ``(out, in)`` weight, which
    :mod:`dpf_ext.compute` can run from the kept weights only (``compute="sparse"``)."""
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
        self.compute = "dense"
        """Which product the forward runs: ``"dense"``, ``"sparse"`` or ``"auto"`` (see
        :mod:`dpf_ext.compute`, :func:`set_compute`)."""
        self._sparse_cache: dict = {}
        self._register_state_dict_hook(_state_dict_hook)

    @property
    def dense_weight(self) -> nn.Parameter:
        """The prunable parameter (``getattr(self, self.weight_name)``)."""
        return getattr(self, self.weight_name)

    @property
    def feedback(self) -> bool:
        """Whether pruned weights receive gradient (the estimator's)."""
        return self.estimator.feedback

    def masked_weight(self) -> torch.Tensor:
        """The weight the forward uses: ``weight ⊙ mask`` with the estimator's gradient."""
        weight = self.dense_weight
        if self.powerprop is not None:
            weight = effective(weight, self.powerprop)
        return self.grad_tap(self.estimator.masked_weight(weight, self.mask))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        name, mask = prefix + self.weight_name, prefix + "mask"
        pruned = state_dict.pop(name + PRUNED_SUFFIX, None)
        if pruned is not None and name in state_dict and mask in state_dict:
            # the sparse form: the dense weight is the kept values plus the pruned ones
            state_dict[name] = torch.where(state_dict[mask].to(pruned.device), state_dict[name], pruned)
        v = state_dict.pop(name + POWERPROP_SUFFIX, None)
        if self.powerprop is not None and name in state_dict:  # the parameter, exactly if saved
            state_dict[name] = v if v is not None else parameter(state_dict[name],
                                                                           self.powerprop)
        # A dense checkpoint (no mask) loads into a DPF layer as "nothing pruned".
        if name in state_dict and mask not in state_dict:
            state_dict[mask] = torch.ones_like(self.mask)
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
        out = compute_paths.linear(self, input, self.bias)
        return nn.functional.linear(input, self.masked_weight(), self.bias) if out is None else out


class DPFConv1d(_DPFConv, nn.Conv1d):
    """``nn.Conv1d`` whose forward uses ``weight ⊙ mask``."""


class DPFConv2d(_DPFConv, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight ⊙ mask``."""


class DPFConv3d(_DPFConv, nn.Conv3d):
    """``nn.Conv3d`` whose forward uses ``weight ⊙ mask``."""


class DPFOutProjection(DPFLayer, nn.modules.linear.NonDynamicallyQuantizableLinear):
    """The output projection of a :class:`DPFMultiheadAttention` (which reads its masked
    weight, densely; called on its own it is a dense :class:`DPFLinear`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(input, self.masked_weight(), self.bias)


class DPFMultiheadAttention(DPFLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed input projection (``in_proj_weight``, 3E x E:
    the channels are its 3E output features) and output projection (a
    :class:`DPFOutProjection`) are masked. torch's fused attention kernel still runs where
    torch chooses it (inference without grad), on the masked weights."""

    weight_name = "in_proj_weight"

    def forward(self, *args, **kwargs):
        with masked_weights_in_place(self):
            return super().forward(*args, **kwargs)


class DPFTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` whose fused inference path reads the masked weights of
    its DPF submodules (it reads their weights directly instead of calling them). Not a DPF
    layer itself: it has no weight of its own."""

    def forward(self, *args, **kwargs):
        with masked_weights_in_place(self):
            return super().forward(*args, **kwargs)


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


def _register_transformers() -> None:
    """Register transformers' ``Conv1D`` (see :mod:`dpf_ext.conv1d`) if transformers is already
    imported; never imports it."""
    if "transformers.pytorch_utils" in sys.modules:
        from .conv1d import Conv1D, DPFConv1D

        PRUNABLE.setdefault(Conv1D, DPFConv1D)


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


def _weight_users(model: nn.Module) -> dict[int, list[str]]:
    """For each parameter (by id), the names of the modules that hold it."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                users.setdefault(id(p), []).append(name)
    return users


def _prunable_weight(module: nn.Module) -> torch.Tensor | None:
    dpf_type = PRUNABLE.get(type(module))
    return getattr(module, dpf_type.weight_name, None) if dpf_type else None


def sparsify(model: nn.Module, exclude: Exclude = None, tied: str = "dense",
             powerprop: float | None = None, compute: str = "dense") -> nn.Module:
    """Make ``model`` sparse-aware in place and return it.

    Every module whose type is exactly one of :data:`PRUNABLE` (Linear, Conv1d/2d/3d,
    ``nn.MultiheadAttention`` with its output projection, transformers' ``Conv1D`` when
    transformers is imported, and any type given to :func:`register_prunable`) becomes its
    DPF layer: the same module object, parameters, device, dtype and name, with an all-ones
    ``mask`` buffer added. Subclasses of those types are left alone.

    ``exclude`` keeps layers dense: module names or ``fnmatch`` patterns (``"fc"``,
    ``"layer1.*"``; one that matches no such layer is a ``ValueError``), or a predicate
    ``(name, module) -> bool``. By default every such layer becomes prunable, the first
    convolution and the classifier included; the DPF paper's reproductions differ on those
    two, so exclude them by name if you want them dense.

    ``tied``: a weight held by several modules (an output layer tied to the token
    embedding) stays dense with ``"dense"`` (the default). ``"prune"`` prunes it with one
    mask shared by all its users, if all of them are prunable layers; a weight tied to an
    embedding or another module whose forward DPF does not mask is an error then.

    ``powerprop`` (α >= 1): Powerpropagation (:mod:`dpf_ext.powerprop`): each new DPF
    layer's parameter becomes ``v = sign(w) |w|^(1/α)``, so that its weight ``v |v|^(α-1)``
    starts equal to the plain one; ``state_dict`` and :func:`unsparsify` give the weight
    (and, for resuming, ``v`` under ``<weight>_powerprop``).

    ``compute``: the product the layers' forward runs, ``"dense"`` (the default),
    ``"sparse"`` (the kept weights only) or ``"auto"`` (sparse where faster); see
    :func:`set_compute` and :mod:`dpf_ext.compute`.

    What stays dense and why is logged (logger ``"dpf_ext"``) and shown by
    :func:`coverage` and the pruner's report. Calling ``sparsify`` again is harmless.
    """
    if tied not in ("dense", "prune"):
        raise ValueError(f"tied must be 'dense' or 'prune', got {tied!r}")
    compute_paths.check_mode(compute)
    alpha = None if powerprop is None else check_alpha(powerprop)
    reparametrised: set[int] = set()
    _register_transformers()
    modules = dict(model.named_modules())
    candidates = [name for name, module in modules.items()
                  if type(module) in PRUNABLE or isinstance(module, DPFLayer)]
    is_excluded = _excluded(exclude, candidates)
    users = _weight_users(model)
    dense: dict[str, str] = dict(getattr(model, "_dpf_dense", {}))
    shared_masks: dict[int, torch.Tensor] = {}
    for name, module in modules.items():
        if isinstance(module, tuple(PRUNABLE)) and any(is_sharded(p) for p in module._parameters.values()):
            raise ValueError(
                f"layer {name!r} is already sharded (fully_shard): call dpf_ext.sparsify "
                "before sharding the model, so that its masks stay whole on every rank"
            )
        if type(module) is nn.MultiheadAttention and not module._qkv_same_embed_dim:
            dense[f"{name}.q_proj_weight"] = "separate q/k/v projections (kdim or vdim != embed_dim)"
            continue
        weight = _prunable_weight(module)
        if weight is None:
            continue
        parent = modules.get(name.rpartition(".")[0])
        if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear) and not (
                isinstance(parent, nn.MultiheadAttention)):
            continue  # only as the output projection of an attention layer
        if isinstance(parent, nn.MultiheadAttention) and not isinstance(parent, DPFMultiheadAttention):
            dense[f"{name}.weight"] = "its attention layer stays dense (excluded or unsupported)"
            continue
        if is_excluded(name, module):
            dense[f"{name}.{PRUNABLE[type(module)].weight_name}"] = "excluded"
            continue
        others = [u for u in users.get(id(weight), []) if u != name]
        if others and tied == "dense":
            dense[f"{name}.{PRUNABLE[type(module)].weight_name}"] = f"tied to {others}"
            continue
        if others:
            foreign = [u for u in others if type(modules[u]) not in PRUNABLE
                       and not isinstance(modules[u], DPFLayer)]
            if foreign:
                raise ValueError(
                    f"tied='prune': the weight of {name!r} is also used by {foreign} "
                    f"({', '.join(type(modules[u]).__name__ for u in foreign)}), whose forward "
                    "DPF does not mask; it would be pruned there through a side door"
                )
        cls = PRUNABLE[type(module)]
        module.__class__ = cls
        cls._init_mask(module)
        if others:  # one mask for every user of the weight
            module._buffers["mask"] = shared_masks.setdefault(id(weight), module.mask)
        if alpha is not None:
            module.powerprop = alpha
            if id(weight) not in reparametrised:  # a tied weight once
                reparametrised.add(id(weight))
                with torch.no_grad():
                    weight.copy_(parameter(weight, alpha))
    for name, module in modules.items():
        if type(module) in WEIGHT_READERS and any(isinstance(m, DPFLayer) for m in module.modules()):
            module.__class__ = WEIGHT_READERS[type(module)]
    model._dpf_dense = dense
    log.info("%s", coverage(model))
    if not any(isinstance(m, DPFLayer) for m in model.modules()):
        warnings.warn(f"sparsify: nothing in this {type(model).__name__} is prunable "
                      f"({coverage(model)}); a pruner will refuse it", UserWarning, stacklevel=2)
    elif compute != "dense":
        set_compute(model, compute)
    return model


def set_compute(model: nn.Module, compute: str) -> nn.Module:
    """Set the ``compute`` mode (``"dense"``, ``"sparse"``, ``"auto"``; see
    :mod:`dpf_ext.compute`) of every DPF layer of ``model``; returns ``model``.
    ``"sparse"`` where a layer has no sparse path is a ``ValueError`` naming the layers,
    and changes nothing; ``"auto"`` leaves such layers dense (the pruner's report and
    :func:`compute_report` say which run sparse)."""
    compute_paths.check_mode(compute)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DPFLayer)]
    if not layers:
        raise ValueError("the model has no DPF layer: call dpf_ext.sparsify(model) first")
    if compute == "sparse":
        refused: dict[str, list[str]] = {}  # reason: the layers it refuses
        for name, m in layers:
            if (reason := compute_paths.unsupported(m)) is not None:
                refused.setdefault(reason, []).append(name)
        if refused:
            raise ValueError("compute='sparse': " + "; ".join(
                f"layers {names}: {reason}" for reason, names in refused.items())
                + "; use compute='auto' to run those dense")
    for _, m in layers:
        m.compute = compute
    return model


def compute_report(model: nn.Module) -> dict[str, str]:
    """``{layer name: "sparse" | "dense"}``: the product each DPF layer's next forward runs."""
    return {name: compute_paths.path(m) for name, m in model.named_modules()
            if isinstance(m, DPFLayer)}


def unsparsify(model: nn.Module) -> nn.Module:
    """Fold every mask into its weight (``w ← mask ⊙ w``) and turn DPF layers back into the
    plain torch layers, in place. The result's ``state_dict`` loads into the original model
    class. Returns ``model``."""
    plain_for = {dpf: plain for plain, dpf in PRUNABLE.items()}
    plain_for.update({reader: plain for plain, reader in WEIGHT_READERS.items()})
    folded: set[int] = set()
    for module in model.modules():
        if isinstance(module, DPFLayer):
            if id(module.dense_weight) not in folded:  # a tied weight is folded once
                folded.add(id(module.dense_weight))
                with torch.no_grad():
                    weight, mask = local_weight_and_mask(module.dense_weight, module.mask)
                    if module.powerprop is not None:  # the plain layer holds the weight itself
                        weight.copy_(effective(weight, module.powerprop))
                    weight.masked_fill_(~mask, 0)
            del module._buffers["mask"]
            del module.estimator
            del module.grad_tap
            del module.state_dict_form
            del module.powerprop
            del module.compute
            del module._sparse_cache
            for key in [k for k, hook in module._state_dict_hooks.items() if hook is _state_dict_hook]:
                del module._state_dict_hooks[key]
        if type(module) in plain_for:
            module.__class__ = plain_for[type(module)]
    if hasattr(model, "_dpf_dense"):
        del model._dpf_dense
    return model


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


def prunable_layers(model: nn.Module) -> list[tuple[str, "DPFLayer"]]:
    """:func:`dpf_layers` of ``model``, checked for pruning: at least one, materialized, of a
    supported dtype, not under FSDP1, sharded only where the channels are dim 0; else a
    ``ValueError`` or ``TypeError`` naming the problem."""
    layers = dpf_layers(model)
    if not layers:
        raise ValueError(
            "the model has no prunable layer: DPF prunes the DPF layers that "
            "dpf_ext.sparsify(model) puts in place of nn.Linear and nn.Conv1d/2d/3d"
        )
    for name, layer in layers:
        name = name or type(layer).__name__ + " (the model itself)"
        if layer.dense_weight.device.type == "meta":
            raise ValueError(
                f"layer {name!r} has its weight on the meta device: materialize the model "
                "first (model.to_empty(device=...) and initialise or load its weights)"
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


@dataclass(frozen=True)
class Coverage:
    """How much of a model's matrix and convolution weights (parameters with 2 or more
    dimensions) DPF prunes, and what stays dense and why."""

    pruned: int
    total: int
    embeddings: int
    dense: list[tuple[str, int, str]] = field(default_factory=list)
    """``(parameter name, elements, reason)`` of the weights left dense, largest first."""

    @property
    def fraction(self) -> float:
        """Pruned share of all matrix/conv weights."""
        return self.pruned / self.total if self.total else 0.0

    @property
    def fraction_without_embeddings(self) -> float:
        """Pruned share of the matrix/conv weights that are not embeddings."""
        rest = self.total - self.embeddings
        return self.pruned / rest if rest else 0.0

    def to_dict(self) -> dict:
        return {"pruned": self.pruned, "total": self.total, "embeddings": self.embeddings,
                "fraction": self.fraction,
                "fraction_without_embeddings": self.fraction_without_embeddings,
                "dense": [list(d) for d in self.dense]}

    def __str__(self) -> str:
        text = (f"DPF prunes {self.fraction:.1%} of the matrix/conv weights "
                f"({self.fraction_without_embeddings:.1%} of those that are not embeddings)")
        if self.dense:
            shown = "; ".join(f"{n} ({k} elements): {r}" for n, k, r in self.dense[:8])
            more = f"; and {len(self.dense) - 8} more" if len(self.dense) > 8 else ""
            text += f". Left dense: {shown}{more}"
        return text


def coverage(model: nn.Module) -> Coverage:
    """What :func:`sparsify` covered in ``model`` (see :class:`Coverage`)."""
    pruned_ids = {id(m.dense_weight) for m in model.modules() if isinstance(m, DPFLayer)}
    recorded: dict[int, list[str]] = {}
    for pname, reason in getattr(model, "_dpf_dense", {}).items():
        with contextlib.suppress(AttributeError):
            recorded.setdefault(id(model.get_parameter(pname)), []).append(f"{pname}: {reason}")
    owners: dict[int, tuple[str, nn.Module, torch.Tensor]] = {}
    for name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), (f"{name}.{pname}" if name else pname, module, p))
    pruned = total = embeddings = 0
    dense = []
    for pid, (pname, module, p) in owners.items():
        if p.dim() < 2:
            continue
        total += p.numel()
        is_embedding = isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        embeddings += p.numel() if is_embedding else 0
        if pid in pruned_ids:
            pruned += p.numel()
            continue
        notes = recorded.get(pid, [])
        if is_embedding:
            reason = "embedding" + (f" (also {'; '.join(notes)})" if notes else "")
        elif notes:
            reason = "; ".join(n.partition(": ")[2] if n.startswith(pname + ":") else n for n in notes)
        else:
            reason = f"unsupported type {type(module).__name__}"
        dense.append((pname, p.numel(), reason))
    dense.sort(key=lambda d: -d[1])
    return Coverage(pruned, total, embeddings, dense)
