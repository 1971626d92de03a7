"""Hugging Face transformers integration: the DPF version of its ``Conv1D`` layer and a
``Trainer`` callback.

Importing this module imports transformers; :func:`dpf_ext.sparsify` does so only when the
user has imported transformers already.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.pytorch_utils import Conv1D

from .nn import DPFLayer


class DPFConv1D(DPFLayer, Conv1D):
    """transformers' ``Conv1D`` (GPT-2's linear layers: ``x @ weight + bias``, weight stored
    in x out) whose forward uses ``weight ⊙ mask``; its output channels are the weight's
    columns."""

    channel_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.masked_weight())
        return out.reshape(*x.shape[:-1], self.nf)


class DPFCallback(TrainerCallback):
    """Runs DPF inside transformers' ``Trainer``: builds the pruner when training begins
    (``total_steps`` from the Trainer's ``max_steps``), steps it after every optimizer step,
    adds ``sparsity`` and ``reactivations`` to the logs, and at the end of training folds the
    masks in (``finalize``: ``"unwrap"``, the default, leaves plain layers whose weights
    save and load as the original architecture; ``"fold"`` keeps the DPF layers; ``None``
    leaves the masks in place).

    ``sparsify`` the model before building the Trainer; the other keyword arguments go to
    :class:`dpf_ext.DPF`. The pruner is ``callback.pruner`` once training has begun.
    """

    def __init__(self, sparsity: float, finalize: str | None = "unwrap", **dpf_kwargs):
        if finalize not in ("unwrap", "fold", None):
            raise ValueError(f"finalize must be 'unwrap', 'fold' or None, got {finalize!r}")
        self.sparsity = sparsity
        self.finalize = finalize
        self.dpf_kwargs = dpf_kwargs
        self.pruner = None
        self.report = None  # the pruner's report before the masks were folded in

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from .pruner import DPF

        if self.pruner is None:
            kwargs = dict(self.dpf_kwargs)
            if "schedule" not in kwargs:
                kwargs["total_steps"] = state.max_steps
            self.pruner = DPF(model, self.sparsity, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self.pruner.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.pruner is not None and not self.pruner.finalized:
            logs["sparsity"] = self.pruner.sparsity()
            logs["reactivations"] = int(self.pruner.reactivated_total.sum())

    def on_train_end(self, args, state, control, **kwargs):
        if self.finalize is not None and not self.pruner.finalized:
            self.report = self.pruner.report()
            self.pruner.finalize(unwrap=self.finalize == "unwrap")
