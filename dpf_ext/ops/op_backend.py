"""A backend whose kernels are torch ops with the dpf schemas, under one namespace: the C++
and CUDA ops (``torch.ops.dpf``, defined in csrc/register.cpp) and the Triton ops
(``torch.ops.dpf_triton``). Adds what ``torch.compile`` and autograd need to such ops."""

from __future__ import annotations

import torch

from .bits import HIGH_BINS, LOW_BINS


class OpBackend:
    """The backend functions of :mod:`dpf_ext.ops.reference`, calling ``torch.ops.<namespace>``."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.ops = getattr(torch.ops, namespace)

    def __repr__(self) -> str:
        return f"OpBackend({self.namespace!r})"

    def provides(self, op: str, device_type: str) -> bool:
        """Whether ``op`` has a kernel of this namespace for ``device_type``."""
        key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
        return key is not None and hasattr(self.ops, op) and \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"{self.namespace}::{op}", key)

    def sparse_mm(self, xt, values, ptr, idx, bias):
        return self.ops.sparse_mm(xt, values, ptr, idx, bias)

    def sampled_mm(self, dyt, xt, ptr, idx):
        return self.ops.sampled_mm(dyt, xt, ptr, idx)

    def sampled_values(self, dyt, xt, ptr, idx):
        return self.ops.sampled_values(dyt, xt, ptr, idx)

    def batch_major(self, x, sums):
        return self.ops.batch_major(x, sums)

    def kept_values(self, weight, ptr, idx):
        return self.ops.kept_values(weight, ptr, idx)

    def sparse_conv(self, x, values, ptr, idx, kh, kw, bias):
        return self.ops.sparse_conv(x, values, ptr, idx, kh, kw, bias)

    def sampled_conv(self, dy, x, ptr, idx, kh, kw):
        return self.ops.sampled_conv(dy, x, ptr, idx, kh, kw)

    def sparse_index(self, mask, s0, s1):
        return self.ops.sparse_index(mask, s0, s1)

    def magnitude_histogram(self, weights, prefix, row_max, window=None, window_start=None):
        return self.ops.magnitude_histogram([w.detach() for w in weights], prefix, row_max, window,
                                            window_start)

    def update_masks(self, weights, taus, masks, shrink_only, row_max):
        return self.ops.update_masks([w.detach() for w in weights], taus, masks, shrink_only,
                                     row_max)

    def nm_masks(self, weights, n, m, masks):
        return self.ops.nm_masks([w.detach() for w in weights], n, m, masks)

    def masked_weight(self, weight, mask, feedback):
        return self.ops.masked_weight(weight, mask, feedback)

    def feedback_sgd_step(self, params, grads, momentum_buffers, *, lr, momentum, dampening,
                          nesterov, weight_decay, maximize, masks, masked_out, histogram,
                          row_max, window=None, window_start=None):
        fresh: list[bool] = []
        if momentum != 0:  # the kernel initialises a fresh buffer with the first update
            fresh = [b is None for b in momentum_buffers]
            for i, b in enumerate(momentum_buffers):
                if b is None:
                    momentum_buffers[i] = torch.empty_like(params[i], memory_format=torch.contiguous_format)
        self.ops.feedback_sgd_step(
            [p.detach() for p in params], [g.detach() for g in grads],
            momentum_buffers if momentum != 0 else [], fresh, lr, momentum, dampening, nesterov,
            weight_decay, maximize, masks or [], masked_out or [], histogram, row_max, window,
            window_start,
        )

    def feedback_adamw_step(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *, step,
                            lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, histogram,
                            row_max, window=None, window_start=None):
        self.ops.feedback_adamw_step(
            [p.detach() for p in params], [g.detach() for g in grads], exp_avgs, exp_avg_sqs,
            max_exp_avg_sqs if amsgrad else [], step, lr, beta1, beta2, eps, weight_decay,
            amsgrad, maximize, histogram, row_max or [], window, window_start,
        )


def register_abstract(namespace: str) -> None:
    """Fake kernels (for tracing) and the gradient of ``masked_weight`` for the ops of
    ``namespace``."""
    torch.library.register_fake(f"{namespace}::magnitude_histogram")(
        lambda weights, prefix, row_max, window, window_start: weights[0].new_empty(
            HIGH_BINS if prefix is None else LOW_BINS, dtype=torch.int64))
    torch.library.register_fake(f"{namespace}::update_masks")(
        lambda weights, taus, masks, shrink_only, row_max: taus.new_empty(
            len(weights), 2, dtype=torch.int64))
    torch.library.register_fake(f"{namespace}::nm_masks")(
        lambda weights, n, m, masks: weights[0].new_empty(len(weights), 3, dtype=torch.int64))
    torch.library.register_fake(f"{namespace}::masked_weight")(
        lambda weight, mask, feedback: torch.empty_like(weight))
    if hasattr(getattr(torch.ops, namespace), "sparse_mm"):
        torch.library.register_fake(f"{namespace}::sparse_mm")(
            lambda xt, values, ptr, idx, bias: xt.new_empty(xt.shape[1], ptr.shape[0] - 1))
        torch.library.register_fake(f"{namespace}::sampled_mm")(
            lambda dyt, xt, ptr, idx: xt.new_empty(ptr.shape[0] - 1, xt.shape[0]))
        torch.library.register_fake(f"{namespace}::sampled_values")(
            lambda dyt, xt, ptr, idx: xt.new_empty(idx.shape[0]))
        torch.library.register_fake(f"{namespace}::kept_values")(
            lambda weight, ptr, idx: weight.new_empty(idx.shape[0]))
        torch.library.register_fake(f"{namespace}::batch_major")(
            lambda x, sums: (x.new_empty(x.shape[1], x.shape[0]),
                             x.new_empty(x.shape[1] if sums else 0)))
        torch.library.register_fake(f"{namespace}::sparse_conv")(
            lambda x, values, ptr, idx, kh, kw, bias: x.new_empty(
                x.shape[0], ptr.shape[0] - 1, x.shape[2], x.shape[3]))
        torch.library.register_fake(f"{namespace}::sampled_conv")(
            lambda dy, x, ptr, idx, kh, kw: x.new_empty(ptr.shape[0] - 1, x.shape[1] * kh * kw))
        # sparse_index has data-dependent output sizes: built outside compiled graphs
    torch.library.register_fake(f"{namespace}::feedback_sgd_step")(lambda *args: None)
    torch.library.register_fake(f"{namespace}::feedback_adamw_step")(lambda *args: None)

    masked_weight = getattr(torch.ops, namespace).masked_weight

    def setup_context(ctx, inputs, output):
        _, mask, feedback = inputs
        ctx.feedback = feedback
        if not feedback:
            ctx.save_for_backward(mask)

    def backward(ctx, grad):
        if ctx.feedback:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return masked_weight(grad, mask, True), None, None

    torch.library.register_autograd(f"{namespace}::masked_weight", backward,
                                    setup_context=setup_context)
