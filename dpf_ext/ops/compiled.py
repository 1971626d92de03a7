"""The compiled backends: the ``dpf`` ops of the ``dpf_ext._C`` extension.

The schemas and the CPU (C++) and CUDA kernels are registered in C++ with
``TORCH_LIBRARY``; this module adds what ``torch.compile`` and autograd need (fake kernels,
the gradient of ``masked_weight``) and registers the backends whose kernels were built:
``cpp`` for CPU tensors, ``cuda`` for CUDA tensors.
"""

from __future__ import annotations

import sys

import torch

from .bits import HIGH_BINS, LOW_BINS
from .dispatch import register_backend

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops)
except ImportError:
    _C = None


def _has_kernel(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("dpf::update_masks", key)


def magnitude_histogram(weights, prefix):
    return torch.ops.dpf.magnitude_histogram([w.detach() for w in weights], prefix)


def update_masks(weights, taus, masks, shrink_only):
    return torch.ops.dpf.update_masks([w.detach() for w in weights], taus, masks, shrink_only)


def masked_weight(weight, mask, feedback):
    return torch.ops.dpf.masked_weight(weight, mask, feedback)


def feedback_sgd_step(params, grads, momentum_buffers, *, lr, momentum, dampening, nesterov,
                      weight_decay, maximize, masks, masked_out, histogram):
    fresh: list[bool] = []
    if momentum != 0:
        fresh = [b is None for b in momentum_buffers]
        for i, b in enumerate(momentum_buffers):
            if b is None:
                momentum_buffers[i] = torch.empty_like(params[i], memory_format=torch.contiguous_format)
    torch.ops.dpf.feedback_sgd_step(
        [p.detach() for p in params], [g.detach() for g in grads],
        momentum_buffers if momentum != 0 else [], fresh, lr, momentum, dampening, nesterov,
        weight_decay, maximize, masks or [], masked_out or [], histogram,
    )


if _C is not None:

    @torch.library.register_fake("dpf::magnitude_histogram")
    def _(weights, prefix):
        bins = HIGH_BINS if prefix is None else LOW_BINS
        return weights[0].new_empty(bins, dtype=torch.int64)

    @torch.library.register_fake("dpf::update_masks")
    def _(weights, taus, masks, shrink_only):
        return taus.new_empty(len(weights), 2, dtype=torch.int64)

    @torch.library.register_fake("dpf::masked_weight")
    def _(weight, mask, feedback):
        return torch.empty_like(weight)

    @torch.library.register_fake("dpf::feedback_sgd_step")
    def _(params, grads, momentum_buffers, fresh, lr, momentum, dampening, nesterov,
          weight_decay, maximize, masks, masked_out, histogram):
        return None

    def _masked_weight_setup(ctx, inputs, output):
        _, mask, feedback = inputs
        ctx.feedback = feedback
        if not feedback:
            ctx.save_for_backward(mask)

    def _masked_weight_backward(ctx, grad):
        if ctx.feedback:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return torch.ops.dpf.masked_weight(grad, mask, True), None, None

    torch.library.register_autograd("dpf::masked_weight", _masked_weight_backward,
                                    setup_context=_masked_weight_setup)

    for _name, _device in (("cpp", "cpu"), ("cuda", "cuda")):
        if _has_kernel(_device):
            register_backend(_name, sys.modules[__name__], (_device,))
