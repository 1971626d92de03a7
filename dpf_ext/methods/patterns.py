"""N:M structured sparsity: in every group of M consecutive weights along a layer's
reduction dimension, keep the N largest magnitudes.

The reduction dimension is the one a GEMM lowering contracts: a Linear's input features; a
ConvNd's ``in_channels / groups x kernel`` flattened in the weight's own order
(``weight.reshape(out_channels, -1)``); transformers' ``Conv1D`` its input features (its
weight is stored in x out). With feedback, the dense weights keep training and a pruned
weight returns as soon as it outgrows a kept one of its group: the N:M analogue of DPF
(SR-STE, Zhou et al. 2021, is this estimator plus an optional decay of the pruned weights:
``DPF(pruned_decay=...)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .. import ops
from ..ops.bits import MAX_GROUP


@dataclass(frozen=True)
class NMPattern:
    """An N:M pattern, ``0 < n < m <= 16``."""

    n: int
    m: int

    @classmethod
    def parse(cls, text: str) -> "NMPattern":
        """``"2:4"`` -> ``NMPattern(2, 4)``; anything else raises ``ValueError``."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {text!r}")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m <= MAX_GROUP:
            raise ValueError(f"pattern {text!r}: need 0 < N < M <= {MAX_GROUP} (keep N of every M)")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """The fraction of weights the pattern prunes: ``1 - n / m``."""
        return 1.0 - self.n / self.m

    def check(self, layers) -> None:
        """Raise ``ValueError`` naming the ``(name, layer)`` pairs whose reduction dimension
        is not a multiple of ``m``."""
        bad = [(name, reduction(layer)) for name, layer in layers if reduction(layer) % self.m]
        if bad:
            raise ValueError(
                f"pattern {self}: the reduction dimension of {[f'{n} ({k})' for n, k in bad]} is "
                f"not a multiple of {self.m}; exclude them (dpf_ext.sparsify(model, "
                f"exclude={[n for n, _ in bad]})) to keep them dense"
            )

    def update(self, weights: list[torch.Tensor], masks: list[torch.Tensor], layers) -> torch.Tensor:
        """Write the N:M masks of ``weights`` (this process's rows) into ``masks``; returns
        ``[kept, reactivated, non-finite]`` per layer. With a non-finite weight the masks are
        left unchanged."""
        views = [gemm_view(w, layer) for w, (_, layer) in zip(weights, layers)]
        new = [gemm_view(m, layer).clone() for m, (_, layer) in zip(masks, layers)]
        stats = ops.nm_masks(views, self.n, self.m, new)
        if not bool((stats[:, 2] == 0).all()):
            return stats
        for mask, updated, (_, layer) in zip(masks, new, layers):
            mask.copy_(updated.view(mask.movedim(layer.channel_dim, 0).shape)
                       .movedim(0, layer.channel_dim))
        return stats


def reduction(layer) -> int:
    """The length of a layer's reduction dimension (elements per output channel)."""
    weight = layer.dense_weight
    return weight.numel() // weight.shape[layer.channel_dim] if weight.numel() else 0


def gemm_view(t: torch.Tensor, layer) -> torch.Tensor:
    """``t`` (a layer's weight or mask) as the ``(out_channels, reduction)`` matrix of a GEMM
    lowering (a copy where the layout needs one)."""
    moved = t.movedim(layer.channel_dim, 0) if layer.channel_dim else t
    return moved.reshape(moved.shape[0], -1) if moved.dim() else moved
