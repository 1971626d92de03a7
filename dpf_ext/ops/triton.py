"""The Triton backend: the kernels of :mod:`dpf_ext.triton_kernels` as ``dpf_triton`` ops.

The ops are ``torch.library.custom_op``s (opaque to ``torch.compile``, with fake kernels
and the gradient of ``masked_weight`` from :func:`register_abstract`). The backend serves
CUDA tensors where a GPU is present, and CPU tensors when ``TRITON_INTERPRET=1`` (for tests:
the interpreter is slow). It ranks below the compiled backends: select it with
``DPF_EXT_BACKEND=triton``.
"""

from __future__ import annotations

import os

import torch

from .dispatch import register_backend
from .op_backend import OpBackend, register_abstract

try:
    from ..triton_kernels import launch
except ImportError:  # triton is not installed
    launch = None

if launch is not None:

    @torch.library.custom_op("dpf_triton::magnitude_histogram", mutates_args=("row_max", "window"))
    def _histogram(weights: list[torch.Tensor], prefix: torch.Tensor | None,
                   row_max: list[torch.Tensor], window: torch.Tensor | None,
                   window_start: torch.Tensor | None) -> torch.Tensor:
        return launch.magnitude_histogram(weights, prefix, row_max, window, window_start)

    @torch.library.custom_op("dpf_triton::update_masks", mutates_args=("masks",))
    def _update_masks(weights: list[torch.Tensor], taus: torch.Tensor, masks: list[torch.Tensor],
                      shrink_only: bool, row_max: list[torch.Tensor]) -> torch.Tensor:
        return launch.update_masks(weights, taus, masks, shrink_only, row_max)

    @torch.library.custom_op("dpf_triton::nm_masks", mutates_args=("masks",))
    def _nm_masks(weights: list[torch.Tensor], n: int, m: int, masks: list[torch.Tensor]) -> torch.Tensor:
        return launch.nm_masks(weights, n, m, masks)

    @torch.library.custom_op("dpf_triton::masked_weight", mutates_args=())
    def _masked_weight(weight: torch.Tensor, mask: torch.Tensor, feedback: bool) -> torch.Tensor:
        return launch.masked_weight(weight, mask)

    @torch.library.custom_op(
        "dpf_triton::feedback_sgd_step",
        mutates_args=("params", "momentum_buffers", "masked_out", "histogram", "row_max",
                      "window"),
    )
    def _sgd(params: list[torch.Tensor], grads: list[torch.Tensor],
             momentum_buffers: list[torch.Tensor], fresh: list[bool], lr: float, momentum: float,
             dampening: float, nesterov: bool, weight_decay: float, maximize: bool,
             masks: list[torch.Tensor], masked_out: list[torch.Tensor],
             histogram: torch.Tensor | None, row_max: list[torch.Tensor],
             window: torch.Tensor | None, window_start: torch.Tensor | None) -> None:
        launch.feedback_sgd_step(params, grads, momentum_buffers, fresh, lr, momentum, dampening,
                                 nesterov, weight_decay, maximize, masks, masked_out, histogram,
                                 row_max, window, window_start)

    @torch.library.custom_op(
        "dpf_triton::feedback_adamw_step",
        mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "histogram", "row_max",
                      "window"),
    )
    def _adamw(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], step: int,
               lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
               maximize: bool, histogram: torch.Tensor | None, row_max: list[torch.Tensor],
               window: torch.Tensor | None, window_start: torch.Tensor | None) -> None:
        launch.feedback_adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, lr,
                                   beta1, beta2, eps, weight_decay, amsgrad, maximize, histogram,
                                   row_max, window, window_start)

    register_abstract("dpf_triton")
    devices = (("cuda",) if torch.cuda.is_available() else ()) + (
        ("cpu",) if os.environ.get("TRITON_INTERPRET") == "1" else ())
    if devices:
        register_backend("triton", OpBackend("dpf_triton"), devices)
