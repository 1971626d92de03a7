"""The controller: when masks change, to what sparsity, over which layers; the method
(:mod:`dpf_ext.methods`) decides which weights."""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from torch import nn

from .nn import compute
from .budgets import Budget, make_budget
from .distributed import Shards, average_over_ranks, check_same_on_all_ranks, is_sharded
from .nn.estimators import MaskedGradient, take_gradients
from .methods.first_pass import HistogramRequest
from .methods.base import (Method, PrunerView, Update, channel_major, full_weights,
                           zero_pruned_weights)
from .methods import make_method, values_storage_methods
from .nn.convert import unsparsify
from .nn.coverage import coverage
from .nn import values_storage
from .nn.layers import DPFMultiheadAttention, DPFTransformerEncoderLayer, prunable_layers
from .ops import SparseIndex
from .report import LayerReport, SparsityReport
from .schedules import Schedule, check_sparsity, resolve_schedule


STORAGES = ("dense", "values")
"""How the pruned layers hold their weights (:class:`Pruner`'s ``storage``)."""

STARVED = 10
"""A layer sharing one threshold with others is *starved* when it keeps less than
1/``STARVED`` of the fraction its group keeps (warned once per layer)."""


def kept_fan_in_scale(kept: torch.Tensor, fan_in: int) -> torch.Tensor:
    """``sparse_init``'s factor per unit: ``sqrt(fan_in / kept)`` for the units that keep
    ``kept`` of their ``fan_in`` weights, 1 for those that keep none."""
    return torch.where(kept > 0, (fan_in / kept.clamp(min=1)).sqrt(), 1.0)


_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
"""The pruner managing each DPF layer (weakly: neither is kept alive by this)."""


class Pruner:
    """The controller of sparse training: runs a mask-choosing ``method`` on the DPF layers of
    ``model``, deciding when the masks change and to what sparsity; the method decides which
    weights.

    Call :meth:`step` after every ``optimizer.step()``. Every ``update_every`` steps, and at
    the step the schedule reaches its final sparsity, up to ``end_step``, the method
    recomputes the masks for the schedule's target at that step. Every setting left out
    comes from the method's published recipe (:attr:`dpf_ext.methods.Method.recipe`).

    Args:
        model: a model with DPF layers (see :func:`dpf_ext.sparsify`).
        method: a name from :data:`dpf_ext.methods.METHODS` (``"dpf"``, ``"rigl"``,
            ``"set"``, ``"snip"``, ...) or a built :class:`~dpf_ext.methods.Method`.
        sparsity: the final fraction of pruned weights in ``[0, 1)`` (methods whose sparsity
            emerges take none).
        schedule: a :class:`~dpf_ext.schedules.Schedule`; default: the recipe's (a cubic ramp
            to ``sparsity`` at 75% of ``total_steps``, or ``sparsity`` from step 0).
        update_every: steps between mask updates (DPF: 16; RigL and SET: 100).
        budget: how the sparsity is shared among layers (see :mod:`dpf_ext.budgets`):
            ``"global"``, ``"uniform"``, ``"erk"``, ``"er"`` or a
            :class:`~dpf_ext.budgets.Budget`.
        total_steps: the length of training in optimizer steps, for the recipe's schedule
            and end of updates.
        end_step: the last step at which the masks may change (RigL and SET: 75% of
            ``total_steps``).
        freeze_at: the step at which the masks are updated one last time and then frozen
            (:meth:`freeze`), for retraining; ``None`` never freezes.
        optimizer: the optimizer, for methods that read its state or grow weights from zero
            (their state is reset at the grown positions).
        seed: seeds the random choices of a method (by seed, step and layer: the same on
            every rank and in a resumed run).
        replace: take over layers that another live, unfinalized pruner manages (that
            pruner stops: its :meth:`step` raises). Without it, that is an error: two
            pruners would overwrite each other's masks.
        sparse_init: rescale, once the first masks are set at construction, each unit's
            (output channel's) kept weights by ``sqrt(fan_in / kept fan_in)``, so that a
            unit's input has the variance the layer's dense initialisation gave it (Evci et
            al. 2022); units that keep every weight, and methods that start dense, are left
            as they are. Default off: the methods' published initialisation.
        check_every: steps between the checks (:meth:`check_finite`) that the weights are
            finite, at the steps where no mask update checks them (a method whose masks are
            fixed, a frozen pruner); ``None``: never. One read of the weights per check.
        storage: ``"dense"`` (the dense weight and a mask per layer) or ``"values"``: each
            layer keeps only its kept values and their index
            (:mod:`dpf_ext.nn.values_storage`), for methods that never read the pruned
            weights (:attr:`~dpf_ext.methods.Method.values_storage`: static, SET, RigL, SNIP)
            on Linear layers. The layers' weight parameters become their values: build the
            optimizer after the pruner, or pass it as ``optimizer=`` (its parameters are
            replaced and its state carried over). A model built on the meta device starts
            here without a dense tensor: the first masks are drawn as positions and the kept
            values from each layer's own initialisation (on the CPU).
        method_options: the options of the named ``method`` (see
            :func:`dpf_ext.methods.method_options`).

    Construction applies the schedule's step-0 target. To resume, build the model, the
    optimizer and the pruner, then load the state dicts of all three (the masks live in the
    model's).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method,
        sparsity: float | None = None,
        *,
        schedule: Schedule | None = None,
        update_every: int | None = None,
        budget: str | Budget | None = None,
        total_steps: int | None = None,
        end_step: int | None = None,
        freeze_at: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        seed: int = 0,
        replace: bool = False,
        sparse_init: bool = False,
        check_every: int | None = 100,
        storage: str = "dense",
        **method_options,
    ):
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        self.layers = prunable_layers(model, allow_meta=storage == "values")
        if any(values_storage.is_values(layer) for _, layer in self.layers):
            raise ValueError("this model's layers are on values storage already (another "
                             "pruner's): finalize() it first, or build the model anew")
        self.model = model
        self.names = [name for name, _ in self.layers]
        self.shapes = [tuple(w.shape) for w in self.channel_major(self.full_weights())]
        if isinstance(method, Method):
            if method_options:
                raise ValueError(f"options {sorted(method_options)} go with a method name; "
                                 "this method is built")
            self.method = method
        else:
            self.method = make_method(method, **method_options)
        recipe = self.method.recipe
        name = self.method.name
        if not recipe.takes_target and sparsity is not None:
            raise ValueError(f"{name} takes no target sparsity: it emerges from training "
                             f"(steer it with its options: {sorted(self.method.config())})")
        self.schedule = (recipe.make_schedule(name, sparsity, total_steps) if schedule is None
                         else resolve_schedule(sparsity, schedule, total_steps))
        update_every = recipe.update_every if update_every is None else update_every
        if update_every == "epoch":
            raise ValueError(f"pass update_every=: {name} has no default period in steps (its "
                             "published one is one epoch: pass the steps of an epoch)")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        freeze_at = recipe.freeze_at() if freeze_at is None else freeze_at
        if freeze_at is not None and freeze_at < 0:
            raise ValueError(f"freeze_at must be >= 0 or None, got {freeze_at}")
        end_step = recipe.end_step(total_steps) if end_step is None else end_step
        if end_step is not None and (isinstance(end_step, bool) or not isinstance(end_step, int)
                                     or end_step < 0):
            raise ValueError(f"end_step must be a non-negative int or None, got {end_step!r}")
        if check_every is not None and (isinstance(check_every, bool)
                                        or not isinstance(check_every, int) or check_every < 1):
            raise ValueError(f"check_every must be a positive int or None, got {check_every!r}")
        self.check_every = check_every
        self.budget = make_budget(recipe.budget if budget is None else budget)
        self.update_every = update_every
        self.total_steps = total_steps
        self.freeze_at = freeze_at
        self.end_step = end_step
        self.seed = int(seed)
        self.optimizer = optimizer
        if not self.method.sharded and is_sharded(self.layers[0][1].dense_weight):
            raise ValueError(f"{name} does not support sharded (fully_shard) weights; use DDP")
        self.estimator = self.method.estimator()
        """The method's gradient estimator (per layer: ``method.layer_estimator``)."""
        meta = [layer.dense_weight.device.type == "meta" for _, layer in self.layers]
        if storage == "values":
            self._check_values_storage(any(meta))
        self.step_count = 0
        self.phase = 0
        """The training phase (of the method's :attr:`~dpf_ext.methods.Method.phases`)."""
        self.method.check(self.view())
        check_same_on_all_ranks(self._config())
        self._take_over(replace)

        device = self.layers[0][1].dense_weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        self.frozen = False
        self.finalized = False
        self._replaced = False
        self.target_sparsity = 0.0
        self.target_kept = sum(layer.dense_weight.numel() for _, layer in self.layers)
        self.reactivated_last = torch.zeros(len(self.layers), dtype=torch.int64, device=device)
        self.reactivated_total = torch.zeros_like(self.reactivated_last)
        self.forced_last = torch.zeros_like(self.reactivated_last)
        self.dropped_last = torch.zeros_like(self.reactivated_last)
        self.regrown_last = torch.zeros_like(self.reactivated_last)
        self._empty: set[str] = set()
        self._starved: set[str] = set()
        self._request: HistogramRequest | None = None
        self._kept: tuple[torch.Tensor, list[int]] | None = None  # see _kept_before
        self._estimators = [self.method.layer_estimator(i, self.estimator)
                            for i in range(len(self.layers))]
        self._feedback = all(e.feedback for e in self._estimators)
        self._install_estimators()
        if any(meta):
            self._start_on_meta(sparse_init)
        else:
            self._update_masks(initial=True)
            if sparse_init:
                self._rescale_to_kept_fan_in()
            if storage == "values":
                for _, layer in self.layers:
                    values_storage.compress(layer, optimizer)
        self._versions = self._value_versions()
        self._warn_if_masks_never_change()
        if freeze_at == 0:
            self.freeze()
        self._arm_taps()

    def _check_values_storage(self, meta: bool) -> None:
        """Raise ``ValueError`` unless the method, the layers and the model can train on
        values storage (and, for a model on the meta device, start there)."""
        name = self.method.name
        if not self.method.values_storage:
            if self.estimator.feedback:
                why = (f"{name} trains its pruned weights (the feedback: they may come back), "
                       "and values storage holds no pruned weight")
            else:
                why = (f"{name} reads or updates the pruned weights' values (or changes how many "
                       "weights a layer keeps), and values storage holds none")
            raise ValueError(f"storage='values': {why}; values storage runs "
                             f"{values_storage_methods()}: use storage='dense' for this method")
        refused = {}
        for layer_name, layer in self.layers:
            if (reason := values_storage.unsupported(layer)) is not None:
                refused.setdefault(reason, []).append(layer_name)
        if refused:
            raise ValueError("storage='values': " + "; ".join(
                f"layers {names}: {reason}" for reason, names in refused.items()))
        if any(isinstance(m, (DPFMultiheadAttention, DPFTransformerEncoderLayer))
               for m in self.model.modules()):
            raise ValueError("storage='values' does not cover nn.MultiheadAttention or "
                             "nn.TransformerEncoderLayer (torch reads their weights directly); "
                             "use storage='dense'")
        if is_sharded(self.layers[0][1].dense_weight):
            raise ValueError("storage='values' does not support sharded (fully_shard) weights")
        if meta:
            prunable = {id(t) for _, layer in self.layers for t in (layer.dense_weight, layer.bias)}
            others = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                      if t.device.type == "meta" and id(t) not in prunable
                      and not n.endswith(".mask") and n != "mask"]
            if others:
                raise ValueError(f"the model is on the meta device, and the pruner materializes "
                                 f"only its prunable layers' weights and biases: materialize and "
                                 f"initialise {others[:5]}{'...' if len(others) > 5 else ''} first")
            if not all(layer.dense_weight.device.type == "meta" for _, layer in self.layers):
                raise ValueError("some prunable layers are on the meta device and some not: "
                                 "build all of them on the meta device, or none")

    @torch.no_grad()
    def _start_on_meta(self, sparse_init: bool) -> None:
        """The first masks and kept values of a model built on the meta device, on the CPU,
        without a tensor of a layer's dense size (values storage)."""
        sparsity = self.schedule.sparsity_at(0)
        check_sparsity(sparsity, "scheduled sparsity at step 0")
        weights = [layer.dense_weight for _, layer in self.layers]
        u = Update(0, sparsity, self.names, [layer for _, layer in self.layers], weights, [],
                   weights, self.budget, None, self.seed, True, shapes=self.shapes)
        positions = self.method.initial_positions(u)
        if positions is None:
            raise ValueError(f"{self.method.name} needs the dense weights to choose its first "
                             "masks (it scores them): build the model on a real device (storage="
                             "'values' then keeps the kept values only from there on)")
        cpu = torch.device("cpu")
        for (_, layer), at in zip(self.layers, positions):
            rows, cols = values_storage.dense_shape(layer)
            index = SparseIndex.from_positions(rows, cols, at.to(cpu))
            values = values_storage.init_values(layer, index, cpu)
            if sparse_init:
                kept = index.ptr.diff()
                values.mul_(torch.repeat_interleave(kept_fan_in_scale(kept, cols).to(values.dtype),
                                                    kept))
            values_storage.to_values(layer, index, values, self.optimizer)
        self.target_sparsity = sparsity
        self.target_kept = sum(k for _, k in u.groups())

    def _value_versions(self) -> list[int] | None:
        """The version counters of the layers' values (values storage), to see that an
        optimizer updates them."""
        if self.storage != "values":
            return None
        return [layer.dense_weight._version for _, layer in self.layers]

    def view(self) -> PrunerView:
        """What the method may read of this pruner."""
        phases = self.method.phases
        return PrunerView(self.model, self.layers, self.names, self.shapes, self.schedule,
                          self.budget, self.end_step, self.total_steps, self.optimizer,
                          self.step_count, self.phase,
                          None if self.total_steps is None else self.total_steps // phases)

    def _take_over(self, replace: bool) -> None:
        """Register as the pruner of every layer, refusing (unless ``replace``) layers that
        a live, unfinalized pruner already manages."""
        owners = {id(p): p for _, layer in self.layers
                  if (p := _OWNERS.get(layer, lambda: None)()) is not None and not p.finalized}
        if owners and not replace:
            raise ValueError(
                "this model's layers are already managed by another pruner; finalize() "
                "it, or pass replace=True to take over (the other pruner then stops)"
            )
        for other in owners.values():
            other.finalized = True
            other._replaced = True
        for _, layer in self.layers:
            _OWNERS[layer] = weakref.ref(self)

    def full_weights(self) -> list[torch.Tensor]:
        """The prunable weights (whole: DTensors where sharded), in layer order."""
        return full_weights(self.layers)

    def channel_major(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the layers' weights (or masks) with the output channels first, as the
        channel floor and the filter method count them."""
        return channel_major(self.layers, tensors)

    def step(self) -> None:
        """Advance one optimizer step; update the masks when one is due."""
        if self.finalized:
            if self._replaced:
                raise RuntimeError("another pruner took over this model (replace=True)")
            raise RuntimeError("this pruner was finalized; build a new one to keep pruning")
        self._check_values_updated()
        try:
            self._step()
        finally:
            self._versions = self._value_versions()

    def _step(self) -> None:
        self.step_count += 1
        self.method.after_step(self.view())
        updating = not self.frozen and (self.step_count == self.freeze_at
                                        or self._due(self.step_count))
        if not updating and self.check_every and self.step_count % self.check_every == 0:
            self.check_finite()
        if self.frozen:
            return
        if updating:
            self.update_masks()
        if self.step_count == self.freeze_at:
            self.freeze()
        self._arm_taps()

    def end_phase(self, measure=None) -> dict:
        """Close a training phase of a prune-retrain method (IMP, sparse model soups): call it
        after each phase's ``total_steps // phases`` steps (the last phase's: up to
        ``total_steps``), the last one included, once the
        loop has evaluated the trained model. The method prunes, rewinds or averages as it
        does there (:meth:`~dpf_ext.methods.Method.phase_end`); before the next phase, restart
        the learning-rate schedule. Returns what happened: ``phase`` (the one ended),
        the method's ``cycle`` and ``ingredient``, ``sparsity`` (the masks' now), ``soup``
        (whether the phase made the model an average of copies) and ``measured``: what
        ``measure()`` (a function of no arguments, say the test accuracy) returned on that
        soup before any further pruning (``None`` without a soup or ``measure``)."""
        phases = self.method.phases
        if phases == 1:
            raise RuntimeError(f"{self.method.name} trains in one phase: there is no end_phase()")
        if self.phase >= phases:
            raise RuntimeError(f"all {phases} phases of {self.method.name} have ended")
        length = self.total_steps // phases
        end = self.total_steps if self.phase == phases - 1 else (self.phase + 1) * length
        if self.step_count != end:
            raise RuntimeError(f"phase {self.phase} of {self.method.name} ends at step {end} "
                               f"({length} steps a phase, the last taking the remainder), and "
                               f"the pruner is at step {self.step_count}")
        ended = {"phase": self.phase, **self.method.phase_of(self.phase)}
        with torch.no_grad():
            outcome = self.method.phase_end(self.view(), self.phase)
            measured = measure() if outcome.soup and measure is not None else None
            if outcome.level is not None:
                self._update_masks(sparsity=outcome.level)
            self.phase += 1
            if self.phase < phases:
                self.method.phase_start(self.view(), self.phase)
                if not self._feedback:
                    zero_pruned_weights(self.layers)
        return {**ended, "sparsity": self.sparsity(), "soup": outcome.soup, "measured": measured}

    def _check_values_updated(self) -> None:
        """On values storage, raise if the layers' values got gradients and no optimizer
        changed them since the last step: an optimizer built before the pruner (and not
        given to it) steps the dense weights, which the layers no longer use."""
        if self.storage != "values":
            return
        values = [layer.dense_weight for _, layer in self.layers]
        if any(v.grad is not None for v in values) and \
                [v._version for v in values] == self._versions:
            raise RuntimeError(
                "storage='values': the layers' values got gradients but were not updated since "
                "the last step; the optimizer holds the dense weights the pruner replaced. Build "
                "the optimizer after the pruner, or pass it as Pruner(..., optimizer=opt)")

    @torch.no_grad()
    def _rescale_to_kept_fan_in(self) -> None:
        """``sparse_init``: each unit's weights times ``sqrt(fan_in / kept fan_in)``."""
        if is_sharded(self.layers[0][1].dense_weight):
            raise ValueError("sparse_init needs each unit's whole row of weights: it does not "
                             "support sharded (fully_shard) weights; use DDP")
        for (_, layer), weight, mask in zip(self.layers, self.channel_major(self.full_weights()),
                                            self.channel_major([l.mask for _, l in self.layers])):
            rows = mask.reshape(mask.shape[0], -1)
            scale = kept_fan_in_scale(rows.sum(1), rows.shape[1]).to(weight.dtype)
            weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))

    @torch.no_grad()
    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the layers whose weights hold NaN or Inf (the run has
        diverged); :meth:`step` calls it every ``check_every`` steps that update no masks."""
        finite = torch.stack([torch.isfinite(layer.dense_weight).all() for _, layer in self.layers])
        if not bool(finite.all()):
            bad = [name for name, ok in zip(self.names, finite.tolist()) if not ok]
            raise ValueError(f"{self.method.name} at step {self.step_count}: non-finite (NaN or "
                             f"Inf) weights in {bad}; training has diverged (a lower learning "
                             "rate or gradient clipping may help; resume from a checkpoint "
                             "before it)")

    def _due(self, step: int) -> bool:
        """Whether the masks update at ``step``: every ``update_every`` steps, and at the
        step where the schedule reaches its final sparsity, up to ``end_step``."""
        if self.end_step is not None and step > self.end_step:
            return False
        return self.method.due(step, self.update_every) or step == self.schedule.final_step

    def _warn_if_masks_never_change(self) -> None:
        """Warn when the masks can change in principle but no update falls inside the run:
        the first one would come after the last update step or after ``total_steps`` (a
        period of 100 steps on a run of 90 is static sparse training under another name)."""
        if self.end_step == 0 or self.freeze_at == 0:
            return  # fixed by design
        limits = [s for s in (self.end_step, self.total_steps) if s is not None]
        if not limits:
            return
        last = min(limits)
        if any(self._due(s) or s == self.freeze_at for s in range(1, last + 1)):
            return
        warnings.warn(
            f"{self.method.name}'s masks never change in this run: its first update would "
            f"come after step {last} (update_every={self.update_every}, end_step="
            f"{self.end_step}, total_steps={self.total_steps}); pass a smaller update_every= "
            "(dpf-train: --update-every) or train longer", UserWarning, stacklevel=3)

    def _arm_taps(self) -> None:
        """Have the layers record the dense gradient of the next step if the method needs
        it there."""
        if self.method.needs_gradient and not self.frozen:
            due = self._due(self.step_count + 1) or self.step_count + 1 == self.freeze_at
            for _, layer in self.layers:
                layer.grad_tap.armed = due

    def histogram_request(self) -> HistogramRequest | None:
        """Called by a fused optimizer before its step: a request for the histogram of the
        updated prunable weights if the following :meth:`step` updates the masks with a
        global magnitude threshold, else ``None``."""
        next_step = self.step_count + 1
        due = self._due(next_step) or next_step == self.freeze_at
        window = False
        if not (self.finalized or self.frozen or not due or is_sharded(self.layers[0][1].dense_weight)
                or any(layer.channel_dim for _, layer in self.layers)):
            window = self.method.histogram_window(self.view())
        self._request = None if window is False else HistogramRequest(
            self.full_weights(), next_step, window)
        return self._request

    def update_masks(self) -> None:
        """Recompute every mask now for the schedule's target at the current step.

        Raises ``ValueError`` (masks unchanged) if any prunable weight is NaN or Inf.
        """
        with torch.no_grad():
            self._update_masks()

    @torch.no_grad()
    def _update_masks(self, initial: bool = False, sparsity: float | None = None) -> None:
        if sparsity is None:
            sparsity = self.schedule.sparsity_at(self.step_count)
        check_sparsity(sparsity, f"scheduled sparsity at step {self.step_count}")
        values = self.storage == "values" and not initial  # the first masks precede the values
        gradients = None
        if self.method.needs_gradient and not initial:
            gradients = self.channel_major(average_over_ranks(
                take_gradients(self.layers, f"{self.method.name} at step {self.step_count}")))
        request, self._request = self._request, None
        ready = request is not None and request.step == self.step_count and request.complete
        layers = [layer for _, layer in self.layers]
        if values:  # no dense tensor: the method works through Update.kept and set_kept
            shards = None
            u = Update(self.step_count, sparsity, self.names, layers, None, None,
                       self.full_weights(), self.budget, None, self.seed, initial, gradients,
                       None, self.shapes, optimizer=self.optimizer)
            kept_before = torch.stack([values_storage.kept(layer) for layer in layers])
        else:
            full_weights = self.full_weights()
            shards = Shards(self.names, full_weights, [layer.mask for layer in layers])
            u = Update(self.step_count, sparsity, self.names, layers,
                       self.channel_major(shards.weights), self.channel_major(shards.masks),
                       full_weights, self.budget, shards.reduce if shards.group is not None else None,
                       self.seed, initial, gradients, request if ready else None, self.shapes,
                       optimizer=self.optimizer)
            if not self._feedback:
                zero_pruned_weights(self.layers)  # momentum may have moved them since the last update
            kept_before = self._kept_before(shards.masks)
        stats = self.method.update(u)
        dropped = kept_before + stats[:, 1] - stats[:, 0]
        kept = stats[:, 0]
        stats = torch.cat([stats, dropped.reshape(-1, 1)], dim=1)
        if not values:
            stats = shards.reduce(stats)
            shards.assemble_masks()
            if not self._feedback:
                zero_pruned_weights(self.layers)
        self._kept = None if values else (kept, [m._version for m in shards.masks])
        self.reactivated_last = stats[:, 1]
        self.reactivated_total += stats[:, 1]
        self.forced_last = stats[:, 2]
        self.regrown_last = stats[:, 3]
        self.dropped_last = stats[:, 4]
        self.target_sparsity = sparsity
        self.target_kept = u.target_kept if u.target_kept is not None else sum(
            k for _, k in u.groups())
        kept_now = stats[:, 0].tolist()  # one read-back for both checks
        self._warn_empty_layers(kept_now)
        self._warn_starved_layers(kept_now, u.groups())

    def _kept_before(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """This process's kept count per mask: the last update's while no one has written
        the masks since (their version counters tell), else counted (a pass over them)."""
        if self._kept is not None and self._kept[1] == [m._version for m in masks]:
            return self._kept[0]
        return torch.stack([torch.count_nonzero(m) for m in masks])

    def _warn_empty_layers(self, kept: list[int]) -> None:
        emptied = [name for name, k in zip(self.names, kept) if k == 0 and name not in self._empty]
        self._empty = {name for name, k in zip(self.names, kept) if k == 0}
        if emptied:
            floor = ("channel_floor=True (the default), "
                     if "channel_floor" in self.method.config() else "")
            warnings.warn(
                f"step {self.step_count}: layers {emptied} are entirely pruned ({self.method.name}); "
                "the model's output no longer depends on them. With BatchNorm behind such a "
                f"layer the gradient can blow up; consider {floor}a lower sparsity, another "
                "budget, or excluding these layers in dpf_ext.sparsify",
                RuntimeWarning, stacklevel=5,
            )

    def _warn_starved_layers(self, kept: list[int], groups) -> None:
        """Warn (once per layer) of layers that one threshold shared with other layers
        leaves far sparser than their group: typically layers initialised or trained at a
        smaller scale than the others (GPT-2's ``c_proj``)."""
        sizes = [math.prod(shape) for shape in self.shapes]
        found = []
        for layers, _ in groups:
            if len(layers) < 2:
                continue
            share = sum(kept[i] for i in layers) / sum(sizes[i] for i in layers)
            for i in layers:
                name = self.names[i]
                if 0 < kept[i] < share * sizes[i] / STARVED and name not in self._starved:
                    found.append(f"{name!r} {kept[i] / sizes[i]:.2%} (its threshold keeps "
                                 f"{share:.2%} of the {len(layers)} layers it spans)")
                    self._starved.add(name)
        if found:
            floor = "the channel floor (channel_floor=True), " \
                if "channel_floor" in self.method.config() else ""
            warnings.warn(
                f"step {self.step_count}: one threshold over several layers ({self.method.name}, "
                f"budget {self.budget.name!r}) keeps of these layers' weights only "
                f"{'; '.join(found)}: layers at a smaller scale than the others lose most of "
                "their weights to a shared threshold. A "
                f"per-layer budget (budget='erk' or 'uniform'), {floor}or leaving such layers "
                "dense (dpf_ext.sparsify(model, exclude=[...])) keeps them (the docs: Training, "
                "global thresholds across layers of different scale)",
                RuntimeWarning, stacklevel=5)

    def _install_estimators(self) -> None:
        """Give every layer the method's gradient estimator."""
        for (_, layer), estimator in zip(self.layers, self._estimators):
            layer.estimator = estimator

    def freeze(self) -> None:
        """Keep the masks fixed from now on and mask the gradient (retraining)."""
        self.frozen = True
        for _, layer in self.layers:
            layer.estimator = MaskedGradient()
            layer.grad_tap.armed = False

    def finalize(self, unwrap: bool = False) -> nn.Module:
        """Fold the masks into the weights (``w ← mask ⊙ w``) and return the model.

        ``unwrap=True`` also turns the DPF layers back into plain torch layers (see
        :func:`dpf_ext.unsparsify`), whose ``state_dict`` loads into the original
        architecture. The pruner cannot step afterwards.
        """
        if self.storage == "values":
            for _, layer in self.layers:
                values_storage.to_dense(layer)
        with torch.no_grad():
            self.method.finalize(self.view())
        if unwrap:
            unsparsify(self.model)
        else:
            zero_pruned_weights(self.layers)
        self.finalized = True
        return self.model

    def sparsity(self) -> float:
        """Actual fraction of prunable weights that the masks prune."""
        kept = int(torch.stack([values_storage.kept(layer) for _, layer in self.layers]).sum())
        return 1.0 - kept / sum(math.prod(values_storage.dense_shape(layer))
                                for _, layer in self.layers)

    def report(self) -> SparsityReport:
        """Per-layer table of shapes, kept weights, sparsity, reactivations (grown weights),
        dropped and regrown-at-once weights and the weights the channel floor forced at the
        last update."""
        kept = torch.stack([values_storage.kept(layer) for _, layer in self.layers])
        kept, last, total, forced, dropped, regrown = torch.stack(
            [kept, self.reactivated_last, self.reactivated_total, self.forced_last,
             self.dropped_last, self.regrown_last]).tolist()
        rows = [
            LayerReport(name, values_storage.dense_shape(layer),
                        math.prod(values_storage.dense_shape(layer)), kept[i],
                        last[i], total[i], forced[i], dropped[i], regrown[i], compute.path(layer))
            for i, (name, layer) in enumerate(self.layers)
        ]
        pattern = getattr(self.method, "pattern", None)
        return SparsityReport(self.step_count, self.target_sparsity, self.target_kept,
                              self.frozen, rows, coverage(self.model),
                              str(pattern) if pattern else None, self.method.name)

    def _config(self) -> dict:
        return {
            "method": self.method.name, **self.method.config(), "schedule": repr(self.schedule),
            "update_every": self.update_every, "end_step": self.end_step,
            "freeze_at": self.freeze_at, "budget": repr(self.budget),
            "seed": self.seed, "layers": self.names, "storage": self.storage,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue pruning exactly (the masks are in the model's)."""
        return {
            "config": self._config(),
            "step_count": self.step_count,
            "phase": self.phase,
            "frozen": self.frozen,
            "target_sparsity": self.target_sparsity,
            "target_kept": self.target_kept,
            "reactivated_last": self.reactivated_last.clone(),
            "reactivated_total": self.reactivated_total.clone(),
            "forced_last": self.forced_last.clone(),
            "dropped_last": self.dropped_last.clone(),
            "regrown_last": self.regrown_last.clone(),
            "method": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the pruner's settings must match the saved ones."""
        mine = self._config()
        saved = state["config"]
        diff = {k: (v, mine.get(k)) for k, v in saved.items() if mine.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: saved {s!r}, this pruner {m!r}" for k, (s, m) in diff.items())
            raise ValueError(f"pruner settings differ from the checkpoint's: {details}")
        self.step_count = state["step_count"]
        self.phase = state.get("phase", 0)
        self.target_sparsity = state["target_sparsity"]
        self.target_kept = state["target_kept"]
        for key in ("reactivated_last", "reactivated_total", "forced_last", "dropped_last",
                    "regrown_last"):
            if key in state:
                getattr(self, key).copy_(torch.as_tensor(state[key]))
        self.method.load_state_dict(state.get("method", {}), self.reactivated_last.device)
        self.frozen = False
        self._install_estimators()
        if state["frozen"]:
            self.freeze()
        self._arm_taps()
