"""Putting DPF layers into a model (:func:`sparsify`), taking them out
(:func:`unsparsify`), and the model-wide settings of its layers: the product they run
(:func:`set_compute`) and the form of their ``state_dict`` (:func:`set_state_dict_form`)."""

from __future__ import annotations

import fnmatch
import logging
import warnings
from typing import Callable, Iterable, Union

import torch
from torch import nn

from . import compute as compute_paths
from .crossover import crossover
from .coverage import coverage
from ..distributed import is_sharded, local_weight_and_mask
from .layer_types import PRUNABLE, WEIGHT_READERS, register_transformers
from .layers import DPFLayer, DPFMultiheadAttention
from .powerprop import check_alpha, effective, parameter
from .state_dict_forms import STATE_DICT_FORMS, state_dict_hook

log = logging.getLogger("dpf_ext")


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

    ``powerprop`` (α >= 1): Powerpropagation (:mod:`dpf_ext.nn.powerprop`): each new DPF
    layer's parameter becomes ``v = sign(w) |w|^(1/α)``, so that its weight ``v |v|^(α-1)``
    starts equal to the plain one; ``state_dict`` and :func:`unsparsify` give the weight
    (and, for resuming, ``v`` under ``<weight>_powerprop``).

    ``compute``: the product the layers' forward runs, ``"dense"`` (the default),
    ``"sparse"`` (the kept weights only) or ``"auto"`` (sparse where faster); see
    :func:`set_compute` and :mod:`dpf_ext.nn.compute`.

    What stays dense and why is logged (logger ``"dpf_ext"``) and shown by
    :func:`coverage` and the pruner's report. Calling ``sparsify`` again is harmless.
    """
    if tied not in ("dense", "prune"):
        raise ValueError(f"tied must be 'dense' or 'prune', got {tied!r}")
    compute_paths.check_mode(compute)
    alpha = None if powerprop is None else check_alpha(powerprop)
    reparametrised: set[int] = set()
    register_transformers()
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
    :mod:`dpf_ext.nn.compute`) of every DPF layer of ``model``; returns ``model``.
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
    if compute == "auto":
        crossover()  # measured now (once per machine), not inside a forward
    for _, m in layers:
        m.compute = compute
    for _, m in layers:  # torch's forward reads the output projection of these densely
        if (isinstance(m, nn.MultiheadAttention) and isinstance(m.out_proj, DPFLayer)
                and compute_paths.attention_unsupported(m)):
            m.out_proj.compute = "dense"
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
            for key in [k for k, hook in module._state_dict_hooks.items() if hook is state_dict_hook]:
                del module._state_dict_hooks[key]
        if type(module) in plain_for:
            module.__class__ = plain_for[type(module)]
    if hasattr(model, "_dpf_dense"):
        del model._dpf_dense
    return model


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
