"""Compact checkpoints of sparse models: ``save_sparse`` / ``load_sparse``.

The file is ``torch.save`` of plain data (dicts, lists, strings, ints and tensors) and is
read with ``torch.load(weights_only=True)``, which runs no pickled code: a standard, safe
container that needs no package beyond torch. Each floating-point tensor of two or more
dimensions whose pruned form is smaller is stored as a bitmask (one bit per element,
packed in uint8) and its kept values; everything else (biases, norms, buffers, dense
layers) as is. The keys are those of the plain architecture (no ``mask`` entries), so the
file describes the finalized model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .nn import values_storage
from .nn.layers import DPFLayer
from .nn.state_dict_forms import PRUNED_SUFFIX, UnfinalizedWarning
from .nn.powerprop import SUFFIX as POWERPROP_SUFFIX
from .ops.bits import pack_bits, unpack_bits

FORMAT = "dpf_ext.sparse/1"


def finalized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The state dict ``model`` has once finalized (masks folded in, pruned weights +0.0,
    no mask entries), without changing ``model``; and each pruned weight's mask by name. A
    layer on values storage gives its dense weight (built for the call) and no index."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DPFLayer)}
    state, masks = {}, {}
    for key, value in model.state_dict(keep_vars=False).items():
        owner, _, leaf = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and (leaf in ("mask", layer.weight_name + PRUNED_SUFFIX,
                                           layer.weight_name + POWERPROP_SUFFIX)
                                  or values_storage.is_values(layer) and leaf.startswith("kept_")):
            continue
        if layer is not None and leaf == layer.weight_name and values_storage.is_values(layer):
            value, masks[key] = (t.cpu() for t in values_storage.dense(layer))
        elif layer is not None and leaf == layer.weight_name:
            masks[key] = layer.mask.detach().cpu()
            value = value.masked_fill(~layer.mask, 0)
        state[key] = value.detach().cpu()
    return state, masks


def save_sparse(model: nn.Module, path: str | Path) -> int:
    """Write ``model`` (DPF layers or a finalized plain model) to ``path`` in the compact
    format; returns the bytes written. DPF layers are saved as if finalized (the model is
    not changed); in a plain model, zeros are the pruned weights (stored back as +0.0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfinalizedWarning)  # the masks are folded in here
        state, masks = finalized_state(model)
    dense, sparse = {}, {}
    for key, value in state.items():
        if value.is_floating_point() and value.dim() >= 2:
            kept = masks.get(key, value != 0)
            values = value[kept]
            packed_bytes = -(-value.numel() // 8) + values.numel() * value.element_size()
            if packed_bytes < value.numel() * value.element_size():
                sparse[key] = {"shape": list(value.shape), "bits": pack_bits(kept), "values": values}
                continue
        dense[key] = value
    torch.save({"format": FORMAT, "dense": dense, "sparse": sparse}, path)
    return Path(path).stat().st_size


def load_sparse(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a :func:`save_sparse` file into ``model`` (the original architecture, plain or
    sparsified; a sparsified one gets its masks back) and return it. A file of another
    architecture raises ``ValueError`` naming the differences, before anything is loaded."""
    data = torch.load(path, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dpf_ext sparse checkpoint ({FORMAT})")
    state = dict(data["dense"])
    kept: dict[str, torch.Tensor] = {}
    for key, entry in data["sparse"].items():
        shape = torch.Size(entry["shape"])
        bits = unpack_bits(entry["bits"], shape.numel()).view(shape)
        values = entry["values"]
        if int(bits.sum()) != values.numel():  # a damaged file
            raise ValueError(f"{path}: {key} has {values.numel()} values for {int(bits.sum())} kept weights")
        full = torch.zeros(shape, dtype=values.dtype)
        full[bits] = values
        state[key], kept[key] = full, bits

    layers = {name: m for name, m in model.named_modules() if isinstance(m, DPFLayer)}
    extra = {f"{name}.{m.weight_name}{suffix}".lstrip(".") for name, m in layers.items()
             for suffix in (PRUNED_SUFFIX, POWERPROP_SUFFIX)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfinalizedWarning)
        expected = {k: v for k, v in model.state_dict().items() if k not in extra}  # either form
    for name, layer in layers.items():
        weight_key = f"{name}.{layer.weight_name}" if name else layer.weight_name
        mask_key = f"{name}.mask" if name else "mask"
        if weight_key in state:
            state[mask_key] = kept.get(weight_key, torch.ones_like(layer.mask, device="cpu"))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit this model (another architecture?): "
            + "; ".join(part for part in (
                f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}" if missing else "",
                f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}" if unexpected else "",
                f"shapes differ: {wrong[:6]}" if wrong else "") if part)
            + "; nothing was loaded"
        )
    model.load_state_dict(state, strict=True)
    return model
