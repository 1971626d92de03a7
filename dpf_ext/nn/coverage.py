"""What :func:`dpf_ext.sparsify` covered in a model: the share of its matrix and
convolution weights that is prunable, and what stays dense and why."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import DPFLayer
from .values_storage import dense_shape


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
        return self.describe()

    def describe(self, method: str | None = None) -> str:
        """One line: the pruned share (by ``method``, where named) and what stays dense."""
        share = (f"{self.fraction:.1%} of the matrix/conv weights "
                 f"({self.fraction_without_embeddings:.1%} of those that are not embeddings)")
        text = f"{method} prunes {share}" if method else f"prunable: {share}"
        if self.dense:
            shown = "; ".join(f"{n} ({k} elements): {r}" for n, k, r in self.dense[:8])
            more = f"; and {len(self.dense) - 8} more" if len(self.dense) > 8 else ""
            text += f". Left dense: {shown}{more}"
        return text


def coverage(model: nn.Module) -> Coverage:
    """What :func:`sparsify` covered in ``model`` (see :class:`Coverage`)."""
    pruned_ids = {id(m.dense_weight): math.prod(dense_shape(m))
                  for m in model.modules() if isinstance(m, DPFLayer)}
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
        if pid in pruned_ids:  # its dense size (a layer on values storage holds a 1-D tensor)
            total += pruned_ids[pid]
            pruned += pruned_ids[pid]
            continue
        if p.dim() < 2:
            continue
        total += p.numel()
        is_embedding = isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        embeddings += p.numel() if is_embedding else 0
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
