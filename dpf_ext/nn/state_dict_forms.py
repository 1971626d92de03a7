"""The two forms a DPF layer's ``state_dict`` takes (see
:func:`dpf_ext.nn.set_state_dict_form`): the dense weight plus the mask, for resuming; or
the pruned weight, the mask and the pruned values, which a plain model loads as the sparse
model and a sparsified one as the dense weights and masks."""

from __future__ import annotations

import warnings

import torch

from ..distributed import is_sharded
from .powerprop import SUFFIX as POWERPROP_SUFFIX
from .powerprop import effective, parameter


class UnfinalizedWarning(UserWarning):
    """A DPF model's ``state_dict`` was taken before its masks were folded in: it holds the
    dense weights (and the masks), which is right for resuming training and wrong for
    exporting the sparse model."""


STATE_DICT_FORMS = ("dense", "sparse")
PRUNED_SUFFIX = "_pruned"
"""In the sparse state-dict form, ``<weight><PRUNED_SUFFIX>`` holds the dense values of the
pruned weights (zeros where kept)."""


def state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
    """State-dict hook of the DPF layers: writes the sparse form (see
    :func:`set_state_dict_form`), or warns (:class:`UnfinalizedWarning`) that the dense form
    holds the dense weights. A layer on values storage writes its values and index as they
    are (:mod:`dpf_ext.nn.values_storage`)."""
    if module.storage == "values":
        return
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


def read_state_dict_form(layer, state_dict: dict, prefix: str) -> None:
    """Turn ``layer``'s entries of ``state_dict`` (either form, or a plain model's) into the
    dense form it loads, in place: the dense weight from the kept and the pruned values, the
    powerprop parameter, and an all-ones mask where a dense checkpoint has none. A layer on
    values storage loads only its own form (values and index buffers)."""
    name, mask = prefix + layer.weight_name, prefix + "mask"
    if layer.storage == "values":
        if name in state_dict and prefix + "kept_ptr" not in state_dict:
            raise ValueError(f"{prefix or 'the layer '}: a checkpoint of dense storage (weight "
                             f"{tuple(state_dict[name].shape)}) does not load into a layer on "
                             "values storage; load it before building the pruner with "
                             "storage='values'")
        return
    pruned = state_dict.pop(name + PRUNED_SUFFIX, None)
    if pruned is not None and name in state_dict and mask in state_dict:
        # the sparse form: the dense weight is the kept values plus the pruned ones
        state_dict[name] = torch.where(state_dict[mask].to(pruned.device), state_dict[name], pruned)
    v = state_dict.pop(name + POWERPROP_SUFFIX, None)
    if layer.powerprop is not None and name in state_dict:  # the parameter, exactly if saved
        state_dict[name] = v if v is not None else parameter(state_dict[name], layer.powerprop)
    # A dense checkpoint (no mask) loads into a DPF layer as "nothing pruned".
    if name in state_dict and mask not in state_dict:
        state_dict[mask] = torch.ones_like(layer.mask)
