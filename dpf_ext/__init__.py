"""dpf_ext: train sparse networks in one pass with Dynamic Pruning with Feedback.

    model = dpf_ext.sparsify(model)
    pruner = dpf_ext.DPF(model, sparsity=0.9, total_steps=steps)
    # or any method: dpf_ext.Pruner(model, "rigl", 0.9, total_steps=steps, optimizer=opt)
    for x, y in data:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step()
    sparse_model = pruner.finalize()
"""

from . import allocator, budgets, methods, nn, ops, schedules
from .checkpoint import load_sparse, save_sparse
from .inference import to_semi_structured, to_sparse_inference
from .nn import (DPFConv1d, DPFConv2d, DPFConv3d, DPFLayer, DPFLinear, DPFMultiheadAttention,
                 compute_report, coverage, register_prunable, set_compute, sparsify, unsparsify)
from .optim import DPFAdamW, DPFSGD
from .dpf import DPF
from .pruner import Pruner
from .report import LayerReport, SparsityReport

__all__ = [
    "DPF",
    "DPFAdamW",
    "DPFSGD",
    "DPFConv1d",
    "DPFConv2d",
    "DPFConv3d",
    "DPFLayer",
    "DPFLinear",
    "DPFMultiheadAttention",
    "LayerReport",
    "Pruner",
    "allocator",
    "budgets",
    "methods",
    "nn",
    "SparsityReport",
    "compute_report",
    "coverage",
    "ops",
    "register_prunable",
    "schedules",
    "set_compute",
    "save_sparse",
    "load_sparse",
    "sparsify",
    "to_semi_structured",
    "to_sparse_inference",
    "unsparsify",
]
__version__ = "0.1.0"
