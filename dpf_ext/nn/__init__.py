"""Sparse-aware layers and the functions that put them into (and take them out of) a model.

A DPF layer is its torch layer plus a bool ``mask`` buffer of its prunable weight's shape.
The dense weight stays the real ``nn.Parameter`` under its usual name, so optimizers,
``state_dict`` and distributed wrappers see a normal model; the forward uses
``mask ⊙ weight`` through its estimator (:mod:`dpf_ext.nn.estimators`), whose backward hands
the full gradient to the dense weight (the DPF estimator) or the masked gradient.

Which module types become DPF layers is a registry (:func:`register_prunable`): Linear,
Conv1d/2d/3d, ``nn.MultiheadAttention`` (its packed input projection and its output
projection) and, when transformers is imported, its ``Conv1D``. Your own layer type is
made prunable the same way; see :func:`register_prunable`.

This module is the public import path; the code lives by concern in :mod:`dpf_ext.nn.layers`
(the layers), :mod:`dpf_ext.nn.layer_types` (the registry), :mod:`dpf_ext.nn.convert`
(``sparsify`` and the model-wide settings), :mod:`dpf_ext.nn.state_dict_forms` and
:mod:`dpf_ext.nn.coverage`.
"""

from .convert import Exclude, compute_report, set_compute, set_state_dict_form, sparsify, unsparsify
from .coverage import Coverage, coverage
from .layer_types import PRUNABLE, WEIGHT_READERS, register_prunable
from .layers import (DPFConv1d, DPFConv2d, DPFConv3d, DPFLayer, DPFLinear, DPFMultiheadAttention,
                     DPFOutProjection, DPFTransformerEncoderLayer, dpf_layers,
                     masked_weights_in_place, prunable_layers)
from .state_dict_forms import PRUNED_SUFFIX, STATE_DICT_FORMS, UnfinalizedWarning

__all__ = [
    "Coverage", "DPFConv1d", "DPFConv2d", "DPFConv3d", "DPFLayer", "DPFLinear",
    "DPFMultiheadAttention", "DPFOutProjection", "DPFTransformerEncoderLayer", "Exclude",
    "PRUNABLE", "PRUNED_SUFFIX", "STATE_DICT_FORMS", "UnfinalizedWarning", "WEIGHT_READERS",
    "compute_report", "coverage", "dpf_layers", "masked_weights_in_place", "prunable_layers",
    "register_prunable", "set_compute", "set_state_dict_form", "sparsify", "unsparsify",
]
