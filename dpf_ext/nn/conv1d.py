"""transformers' ``Conv1D`` (GPT-2's linear layers) as a DPF layer. Importing this module
imports transformers; :func:`dpf_ext.sparsify` does so only when the user has imported
transformers already."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from . import compute as compute_paths
from .layers import DPFLayer


class DPFConv1D(DPFLayer, Conv1D):
    """transformers' ``Conv1D`` (GPT-2's linear layers: ``x @ weight + bias``, weight stored
    in x out) whose forward uses ``weight ⊙ mask``; its output channels are the weight's
    columns."""

    channel_dim = 1
    sparse_product = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sparse = compute_paths.linear(self, x, self.bias)
        if sparse is not None:
            return sparse
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.masked_weight())
        return out.reshape(*x.shape[:-1], self.nf)
