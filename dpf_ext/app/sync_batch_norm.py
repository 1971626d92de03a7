"""Batch normalisation over the whole global batch when several processes train one model.

With plain BatchNorm each process of a DDP run normalises with the statistics of its own
share of the batch, so N processes train a different model from one process with the same
global batch. ``torch.nn.SyncBatchNorm`` shares the statistics on GPUs only (DDP refuses it
on the CPU); :class:`SyncBatchNorm` here does it on any device, through a differentiable
all-reduce of each channel's count, sum and sum of squares (in float64).
:func:`synchronize_batch_norm` puts it in place of a model's BatchNorm layers; ``dpf-train``
does so under ``torchrun`` unless ``--no-sync-bn``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (of any input with channels on dim 1) that, in training with a process
    group of more than one process, normalises with the mean and variance of the global
    batch (every process's share), equal on every process, the running statistics following
    from them. Outside a process group, or in eval mode, it is plain batch norm.
    ``process_group``: the group to share with (``None``: the default one)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_initialized() else None)
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        wide = input.double()
        count = torch.tensor([input.numel() // input.size(1)], dtype=torch.float64)
        stats = torch.cat([wide.sum(dims), (wide * wide).sum(dims), count])
        stats = _AllReduce.apply(stats, group)
        channels = input.size(1)
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
            with torch.no_grad():
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - factor).add_(mean.to(input.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(input.dtype), alpha=factor)
        shape = [1, channels] + [1] * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype)
        out = (input - mean.to(input.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class _AllReduce(torch.autograd.Function):
    """The sum over the group's processes; its gradient is the sum of theirs (each process's
    loss depends on every process's statistics)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def synchronize_batch_norm(model: nn.Module) -> nn.Module:
    """Turn every ``nn.BatchNorm1d/2d/3d`` of ``model`` into a :class:`SyncBatchNorm`, in
    place (the same modules, parameters and running statistics); returns ``model``. Call it
    before wrapping the model in DDP."""
    for module in model.modules():
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            module.__class__ = SyncBatchNorm
            module.process_group = None
    return model
