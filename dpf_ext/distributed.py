"""DPF across processes: what each rank prunes locally and what the ranks exchange.

- Replicated weights (DDP, or one process): every rank holds the same dense weights after
  the gradient all-reduce and the threshold is deterministic, so every rank computes the
  same masks on its own; nothing is exchanged.
- Sharded weights (FSDP2 ``fully_shard``: DTensor parameters sharded on dim 0): each rank
  histograms its local rows; the histograms are summed with one all-reduce per pass
  (32768 int64 bins, then 65536 for the exact pass), so every rank derives the same global
  threshold without gathering any weights. Each rank then writes the mask rows of its shard
  and one all-reduce of one bit per weight assembles the full masks, which the forward
  needs on every rank (FSDP2 unshards parameters, not buffers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops.bits import pack_bits, unpack_bits

try:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without distributed support
    DTensor = None


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter sharded by FSDP2 or DTensor APIs)."""
    return DTensor is not None and isinstance(t, DTensor)


def _row_offset(w) -> int:
    _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    return int(offset[0])


def local_weight_and_mask(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of ``weight`` and the matching view of the full ``mask``."""
    if not is_sharded(weight):
        return weight.detach(), mask
    local = weight.to_local().detach()
    start = _row_offset(weight)
    return local, mask[start:start + local.shape[0]]


class Shards:
    """The local part of every prunable weight and mask, and the collectives that make the
    pruner's decisions global. ``group`` is ``None`` when the weights are not sharded."""

    def __init__(self, names: list[str], weights: list[torch.Tensor], masks: list[torch.Tensor]):
        sharded = [is_sharded(w) for w in weights]
        self.group = None
        if any(sharded):
            plain = [n for n, s in zip(names, sharded) if not s]
            if plain:
                raise ValueError(
                    f"layers {plain} are not sharded while others are: shard every prunable "
                    "layer (fully_shard) or none"
                )
            meshes = {w.device_mesh for w in weights}
            for name, w in zip(names, weights):
                if w.device_mesh.ndim != 1 or tuple(w.placements) != (Shard(0),):
                    raise ValueError(
                        f"layer {name!r} is sharded as {w.placements} on a {w.device_mesh.ndim}-D "
                        "mesh; DPF supports weights sharded on dim 0 over a 1-D mesh (FSDP2)"
                    )
            if len(meshes) != 1:
                raise ValueError("prunable weights are sharded over different device meshes")
            self.group = next(iter(meshes)).get_group()
        pairs = [local_weight_and_mask(w, m) for w, m in zip(weights, masks)]
        self.weights = [w for w, _ in pairs]
        self.masks = [m for _, m in pairs]
        self.full_masks = masks

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks holding shards (in place); identity when unsharded."""
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def assemble_masks(self) -> None:
        """Fill every rank's full masks from the rows each rank wrote, with one all-reduce
        of one bit per weight."""
        if self.group is None:
            return
        n = sum(m.numel() for m in self.full_masks)
        flat = torch.zeros(n, dtype=torch.bool, device=self.full_masks[0].device)
        base = 0
        for full, local in zip(self.full_masks, self.masks):
            start = base + (local.data_ptr() - full.data_ptr())  # bool: one byte per element
            flat[start:start + local.numel()] = local.reshape(-1)
            base += full.numel()
        # Each bit is set by at most the one rank owning that weight, so summing the packed
        # bytes is a bitwise or (no carries) and works with every backend, NCCL included.
        packed = pack_bits(flat)
        dist.all_reduce(packed, group=self.group)
        flat = unpack_bits(packed, n)
        base = 0
        for full in self.full_masks:
            full.copy_(flat[base:base + full.numel()].view(full.shape))
            base += full.numel()


def average_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors``, each averaged in place over the ranks of the default group (as DDP
    averages gradients); unchanged outside a process group. Entries that are not tensors (a
    :class:`~dpf_ext.nn.estimators.ProductGradient`, averaged block by block) pass as
    they are."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            dist.all_reduce(t)
            t.div_(dist.get_world_size())
    return tensors


def check_same_on_all_ranks(config: dict, group=None) -> None:
    """Raise ``ValueError`` on every rank if ``config`` differs between ranks of ``group``
    (the default group when ``None``). A no-op outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    configs = [None] * dist.get_world_size(group)
    dist.all_gather_object(configs, config, group=group)
    differing = [r for r, c in enumerate(configs) if c != configs[0]]
    if differing:
        keys = sorted(k for k in config if any(c.get(k) != configs[0].get(k) for c in configs))
        raise ValueError(
            f"DPF settings differ across ranks: ranks {differing} disagree with rank 0 on "
            f"{keys}; every rank must build the pruner with the same settings"
        )
