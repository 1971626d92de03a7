"""Hugging Face transformers integration: the ``Trainer`` callback (and, from
:mod:`dpf_ext.nn.conv1d`, the DPF version of transformers' ``Conv1D`` layer).

Importing this module imports transformers."""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .nn.conv1d import DPFConv1D
from .nn.convert import set_state_dict_form
from .nn.layers import dpf_layers
from .dpf import DPF
from .pruner import Pruner

__all__ = ["DPFCallback", "DPFConv1D"]


def _to_json(state):
    """``state`` (nested dicts and lists of numbers, strings and tensors) as JSON values."""
    if isinstance(state, torch.Tensor):
        return {"tensor": state.tolist(), "dtype": str(state.dtype).removeprefix("torch.")}
    if isinstance(state, dict):
        return {k: _to_json(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_to_json(v) for v in state]
    return state


def _from_json(state):
    """The inverse of :func:`_to_json`."""
    if isinstance(state, dict):
        if state.keys() == {"tensor", "dtype"}:
            return torch.tensor(state["tensor"], dtype=getattr(torch, state["dtype"]))
        return {k: _from_json(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_from_json(v) for v in state]
    return state


class DPFCallback(TrainerCallback, ExportableState):
    """Runs DPF inside transformers' ``Trainer``: builds the pruner when training begins
    (``total_steps`` from the Trainer's ``max_steps``), steps it after every optimizer step,
    adds ``sparsity`` and ``reactivations`` to the logs, and at the end of training folds the
    masks in (``finalize``: ``"unwrap"``, the default, leaves plain layers whose weights
    save and load as the original architecture; ``"fold"`` keeps the DPF layers; ``None``
    leaves the masks in place).

    ``sparsify`` the model before building the Trainer; the other keyword arguments go to
    :class:`dpf_ext.DPF`, or with ``method=`` (``"rigl"``, ...) and ``method_options=`` to
    :class:`dpf_ext.Pruner` (the Trainer's optimizer is passed for the methods that read it
    or reset grown weights' state). The pruner is ``callback.pruner`` once training has
    begun.

    Checkpoints and resuming: the Trainer's checkpoints hold the model in the sparse
    state-dict form (:func:`dpf_ext.nn.set_state_dict_form`): ``from_pretrained`` on a
    ``checkpoint-N`` folder gives the SPARSE model of step N (its load report lists the
    ``mask`` and ``weight_pruned`` entries as unexpected: they are what resuming needs), and
    the pruner's state is in the folder's ``trainer_state.json``. ``trainer.train(
    resume_from_checkpoint=...)`` restores the dense weights, the masks and the pruner's
    schedule position, statistics and warm start, so the run continues exactly as if never
    stopped. Resuming from a checkpoint without that state (saved without this callback) is
    a ``ValueError``. The Trainer's ``restore_callback_states_from_checkpoint=True`` would
    replace this object by a copy: it is refused.

    ``storage="values"`` (with ``method=`` one that runs on it) trains on values storage (the
    Trainer's optimizer gets the values); its checkpoints hold the values and their index,
    which the Trainer loads into the model before this callback builds the pruner, so
    ``resume_from_checkpoint`` does not work on values storage: resume such runs from the
    model's, the optimizer's and the pruner's own state dicts.
    """

    def __init__(self, sparsity: float, finalize: str | None = "unwrap", **dpf_kwargs):
        if finalize not in ("unwrap", "fold", None):
            raise ValueError(f"finalize must be 'unwrap', 'fold' or None, got {finalize!r}")
        self.sparsity = sparsity
        self.finalize = finalize
        self.dpf_kwargs = dpf_kwargs
        self.pruner = None
        self.report = None  # the pruner's report before the masks were folded in

    def _build(self, model, kwargs: dict) -> Pruner:
        """DPF with ``kwargs``, or the ``Pruner`` of their ``method``."""
        kwargs = dict(kwargs)
        method = kwargs.pop("method", None)
        if method is None:
            return DPF(model, self.sparsity, **kwargs)
        return Pruner(model, method, self.sparsity, **kwargs.pop("method_options", None) or {},
                      **kwargs)

    def state(self) -> dict:
        """What the Trainer keeps in each checkpoint's ``trainer_state.json``: the pruner's
        state (the masks and weights are in the model's files)."""
        pruner = None if self.pruner is None else _to_json(self.pruner.state_dict())
        return {"args": {"sparsity": self.sparsity, "finalize": self.finalize},
                "attributes": {"pruner_state": pruner}}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if args.restore_callback_states_from_checkpoint:
            raise ValueError(
                "DPFCallback restores the pruner from the checkpoint by itself; "
                "restore_callback_states_from_checkpoint=True would replace the callback by a "
                "copy built from its arguments alone: set it to False"
            )
        resuming = state.global_step > 0
        if self.pruner is not None and not self.pruner.finalized and not resuming:
            return  # a further train() of the same run
        saved = None
        if resuming:
            saved = (state.stateful_callbacks.get(type(self).__name__) or {}).get("attributes", {})
            saved = saved.get("pruner_state")
            if saved is None:
                raise ValueError(
                    f"resuming at step {state.global_step} from a checkpoint without the DPF "
                    "pruner's state (saved without DPFCallback): the schedule and the masks "
                    "cannot continue. Start a new training from its weights instead"
                )
            if saved["step_count"] != state.global_step:
                raise ValueError(f"the checkpoint's pruner is at step {saved['step_count']}, the "
                                 f"Trainer at step {state.global_step}")
        kwargs = dict(self.dpf_kwargs)
        if "schedule" not in kwargs:
            kwargs["total_steps"] = state.max_steps
        if "optimizer" not in kwargs:  # for methods that reset the state of grown weights
            kwargs["optimizer"] = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        set_state_dict_form(model, "sparse")
        if saved is None:
            self.pruner = self._build(model, kwargs)
            return
        # the model holds the checkpoint's weights and masks: keep them through construction
        layers = [layer for _, layer in dpf_layers(model)]
        loaded = [(layer.dense_weight.detach().clone(), layer.mask.clone()) for layer in layers]
        self.pruner = self._build(model, {**kwargs, "replace": True})
        with torch.no_grad():
            for layer, (weight, mask) in zip(layers, loaded):
                layer.dense_weight.copy_(weight)
                layer.mask.copy_(mask)
        self.pruner.load_state_dict(_from_json(saved))

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
