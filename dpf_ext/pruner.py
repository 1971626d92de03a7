"""The DPF controller: when masks change, to what sparsity, over which weights."""

from __future__ import annotations

import math
import struct
import warnings
import weakref

import torch
from torch import nn

from . import ops
from .channels import BlowUpWatch, ChannelFloor, below, new_row_max
from .distributed import Shards, check_same_on_all_ranks, is_sharded, local_weight_and_mask
from .nn import coverage, dpf_layers, unsparsify
from .ops.bits import HIGH_BINS, LOW_BINS, NONFINITE_BIN, SUPPORTED_DTYPES
from .report import LayerReport, SparsityReport
from .patterns import NMPattern
from .schedules import Cubic, OneShot, Schedule, check_sparsity

SCOPES = ("global", "layer", "filter")
THRESHOLDS = ("exact", "approx")
RAMP_FRACTION = 0.75
"""The default cubic schedule reaches its final sparsity at this fraction of training (the
paper's second learning-rate milestone)."""


_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
"""The pruner managing each DPF layer (weakly: neither is kept alive by this)."""


def kept_count(sparsity: float, n: int) -> int:
    """How many of ``n`` weights a target ``sparsity`` keeps: ``n - round(sparsity * n)``,
    and at least one."""
    return max(n - round(sparsity * n), 1)


def filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter (row of a linear layer) in float32."""
    return weight.detach().float().flatten(1).norm(dim=1)


class HistogramRequest:
    """A pruner's request for the first pass over the prunable weights after the next
    optimizer step: the optimizer adds into ``histogram`` (and ``row_max``, and ``window``
    when it is not ``None``) and reports the weights it covered."""

    def __init__(self, weights: list[torch.Tensor], step: int, window: ops.Window | None = None):
        self.histogram = torch.zeros(HIGH_BINS, dtype=torch.int64, device=weights[0].device)
        self.row_max = new_row_max(weights)
        self.window = window
        self.step = step
        self._pending = {id(w) for w in weights}
        self._row_max_of = {id(w): r for w, r in zip(weights, self.row_max)}

    def wants(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is one of the prunable weights."""
        return id(param) in self._row_max_of

    def row_max_for(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ``row_max`` tensors the optimizer fills with the histogram for ``params``."""
        return [self._row_max_of[id(p)] for p in params]

    def covered(self, params: list[torch.Tensor]) -> None:
        """Record that ``histogram`` now includes the updated ``params``."""
        self._pending.difference_update(id(p) for p in params)

    @property
    def complete(self) -> bool:
        """Whether every prunable weight was counted."""
        return not self._pending


def _high_bin(x: float) -> int:
    """The top 16 bits of ``|x|`` as float32 (its first-pass histogram bin)."""
    return struct.unpack("<I", struct.pack("<f", abs(x)))[0] >> 16


class WarmStart:
    """The previous thresholds, as the guess that lets an exact threshold take one pass.

    The first pass also histograms at full resolution a :class:`~dpf_ext.ops.Window` of high
    bins around the previous threshold (3 bins, widened to twice the last move, at most 9);
    when the new threshold lands there, no second pass is needed. Only where that pays (see
    :meth:`pays`: a small model's, or a small layer's, second pass costs less than a
    window). A performance hint only: the thresholds are the same with or without it; it is
    in the pruner's state so that a resumed run reads the weights as the uninterrupted one
    would."""

    def __init__(self):
        self.taus: torch.Tensor | None = None
        self.host: list[float] = []
        self.width = 3

    def window(self, i: int, weights: list[torch.Tensor]) -> ops.Window | None:
        """A fresh window around the previous threshold of position ``i`` (global scope:
        0) for a first pass over ``weights``, if there is a finite one and it pays."""
        if self.taus is None or not math.isfinite(self.host[i]) or not self.pays(weights):
            return None
        return ops.Window.around(self.taus[i], self.width)

    def pays(self, weights: list[torch.Tensor]) -> bool:
        """Whether the second pass a window saves (a read of ``weights``) costs more than
        the window itself (zeroing its counts, copying a slice, one host synchronisation):
        from about half a million float32 weights with 3 bins. Pass whole (unsharded)
        weights, so that every rank decides alike."""
        return sum(w.numel() * w.element_size() for w in weights) >= (self.width + 1) * LOW_BINS * 8

    def record(self, taus: torch.Tensor) -> list[float]:
        """Remember this update's thresholds, size the next window by how far they moved,
        and return them on the host (the update's one read-back of its thresholds)."""
        taus = taus.detach().float().reshape(-1)
        host = taus.tolist()
        if len(host) == len(self.host):
            moves = [abs(_high_bin(a) - _high_bin(b)) for a, b in zip(host, self.host)
                     if math.isfinite(a) and math.isfinite(b)]
            if moves:
                self.width = min(2 * max(max(moves), 1) + 1, 9)
        self.taus, self.host = taus.clone(), host
        return host

    def state_dict(self) -> dict:
        """The previous thresholds (``None`` before the first update) and the window width."""
        return {"taus": None if self.taus is None else list(self.host), "width": self.width}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore :meth:`state_dict`, the thresholds onto ``device``."""
        self.width = state["width"]
        self.host = [] if state["taus"] is None else list(state["taus"])
        self.taus = (None if state["taus"] is None
                     else torch.tensor(self.host, dtype=torch.float32, device=device))


class DPF:
    """Dynamic Pruning with Feedback on the DPF layers of ``model``.

    Call :meth:`step` after every ``optimizer.step()``. Every ``update_every`` steps, and at
    the step the schedule reaches its final sparsity, the masks are recomputed from the
    dense weights for the schedule's target at that step;
    between updates the forward uses the last masks, and (``feedback=True``) the gradient
    of ``mask ⊙ w`` reaches the dense ``w`` in full, so pruned weights keep training and
    come back when their magnitude climbs over the threshold.

    Args:
        model: a model with DPF layers (see :func:`dpf_ext.sparsify`).
        sparsity: final fraction of pruned weights in ``[0, 1)``. With ``total_steps`` and no
            ``schedule`` it gives the default schedule: cubic from 0 at step 0 to
            ``sparsity`` at ``0.75 * total_steps``.
        schedule: a :class:`~dpf_ext.schedules.Schedule`; overrides the default one.
        update_every: steps between mask updates (the paper uses 16).
        scope: ``"global"`` (one magnitude threshold over all prunable weights), ``"layer"``
            (the same sparsity in every layer) or ``"filter"`` (whole output filters by L2
            norm, one threshold over all filters; sparsity counts filters).
        feedback: ``False`` gives gradual magnitude pruning without feedback: pruned weights
            get no gradient, are zeroed at every update and never come back.
        threshold: ``"exact"`` (two histogram passes) or ``"approx"`` (one pass; keeps the
            whole histogram bin at the threshold, a relative error below 2^-7 in magnitude).
        total_steps: length of training in optimizer steps, for the default schedule.
        freeze_at: step at which the mask is updated one last time and then frozen
            (:meth:`freeze`), for retraining or one-shot pruning; ``None`` never freezes.
        channel_floor: never leave an output channel (row of a Linear, filter of a ConvNd)
            without a weight: each mask update keeps every channel's largest weight, inside
            the same budget (the threshold is taken over the other weights). Without it, a
            channel pruned entirely in front of a BatchNorm gets a gradient scaled by about
            ``1/sqrt(eps)``, which feedback carries into its dense weights until they
            dominate the global threshold and empty the other layers. It changes nothing
            while no channel would be emptied. Default: on for the global and layer scopes
            (``False`` gives the paper's unguarded algorithm); not used by the filter scope.
        feedback_clip: bound the feedback gradient of pruned weights, per layer, to this
            multiple of the largest gradient among the layer's kept weights (see
            :func:`dpf_ext.channels.clip_pruned_gradient`); ``None`` (default) leaves the
            paper's estimator as it is. A guard for channels left with one or two weights
            at 99% sparsity; ``1.0`` is the measured setting.
        pattern: ``"N:M"`` (e.g. ``"2:4"``) for N:M structured sparsity instead of a
            magnitude threshold: every update keeps the N largest of each M consecutive
            weights along a layer's reduction dimension (see :mod:`dpf_ext.patterns`), with
            feedback. The schedule then says when: a target of 0 keeps the layers dense, any
            other the pattern; the default is the pattern from step 0 (pass
            ``schedule=OneShot(1 - N/M, t)`` for dense training until step ``t``).
            Excludes ``scope`` and the channel floor (every channel keeps N of each M).
        pruned_decay: with feedback, add ``pruned_decay * w`` to the gradient of pruned
            weights (SR-STE's decay); ``None`` (default) leaves the estimator as it is.
        replace: take over layers that another live, unfinalized pruner manages (that
            pruner stops: its :meth:`step` raises). Without it, that is an error: two
            pruners would overwrite each other's masks.
        watch: warn (``RuntimeWarning``, once per layer) at a mask update that shows the
            signs of a feedback blow-up: a layer's largest dense weight above
            :data:`~dpf_ext.channels.BLOWUP_RATIO` times the threshold, or an output channel
            entirely pruned in front of a normalisation layer.

    Construction applies the schedule's step-0 target. To resume, build the model, the
    optimizer and the pruner, then load the state dicts of all three (the masks live in the
    model's).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        schedule: Schedule | None = None,
        update_every: int = 16,
        scope: str = "global",
        feedback: bool = True,
        threshold: str = "exact",
        total_steps: int | None = None,
        freeze_at: int | None = None,
        channel_floor: bool | None = None,
        feedback_clip: float | None = None,
        watch: bool = True,
        replace: bool = False,
        pattern: str | None = None,
        pruned_decay: float | None = None,
    ):
        self.layers = dpf_layers(model)
        if not self.layers:
            raise ValueError(
                "the model has no prunable layer: DPF prunes the DPF layers that "
                "dpf_ext.sparsify(model) puts in place of nn.Linear and nn.Conv1d/2d/3d"
            )
        for name, layer in self.layers:
            if layer.dense_weight.device.type == "meta":
                raise ValueError(
                    f"layer {name!r} has its weight on the meta device: materialize the model "
                    "first (model.to_empty(device=...) and initialise or load its weights)"
                )
            if layer.dense_weight.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"layer {name!r} has {layer.dense_weight.dtype} weights; DPF supports "
                    f"{', '.join(map(str, SUPPORTED_DTYPES))}"
                )
        if any(layer.channel_dim and is_sharded(layer.dense_weight) for _, layer in self.layers):
            raise ValueError("layers whose output channels are not dim 0 (transformers' Conv1D) "
                             "cannot be pruned sharded: FSDP2 shards dim 0")
        if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
            raise ValueError(
                "FSDP1 (FullyShardedDataParallel) flattens the weights DPF prunes; shard the "
                "model with torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )
        self.model = model
        self.pattern = None if pattern is None else NMPattern.parse(pattern)
        if self.pattern is not None:
            if scope != "global" or channel_floor:
                raise ValueError("pattern= chooses the masks by itself: it excludes scope= and "
                                 "channel_floor=")
            self.pattern.check(self.layers)
            channel_floor, watch = False, False
            if schedule is None:
                if sparsity is not None and abs(float(sparsity) - self.pattern.sparsity) > 1e-9:
                    raise ValueError(f"sparsity={sparsity} disagrees with pattern {self.pattern} "
                                     f"({self.pattern.sparsity:.4g}); pass one of them")
                sparsity, total_steps = None, None
                schedule = OneShot(self.pattern.sparsity, 0)
            elif abs(schedule.final - self.pattern.sparsity) > 1e-9:
                raise ValueError(f"the schedule's final sparsity {schedule.final} is not pattern "
                                 f"{self.pattern}'s {self.pattern.sparsity:.4g}")
        if pruned_decay is not None and (isinstance(pruned_decay, bool)
                                         or not isinstance(pruned_decay, (int, float))
                                         or pruned_decay < 0):
            raise ValueError(f"pruned_decay must be a non-negative number or None, got {pruned_decay!r}")
        self.pruned_decay = None if pruned_decay is None else float(pruned_decay)
        self.schedule = self._resolve_schedule(sparsity, schedule, total_steps)
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be a positive int, got {update_every!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
        if freeze_at is not None and freeze_at < 0:
            raise ValueError(f"freeze_at must be >= 0 or None, got {freeze_at}")
        if channel_floor is None:
            channel_floor = scope != "filter"
        if feedback_clip is not None and (isinstance(feedback_clip, bool)
                                          or not isinstance(feedback_clip, (int, float))
                                          or not feedback_clip > 0):
            raise ValueError(f"feedback_clip must be a positive number or None, got {feedback_clip!r}")
        if channel_floor and scope == "filter":
            raise ValueError("channel_floor applies to the global and layer scopes; the filter "
                             "scope prunes whole channels by design")
        self.update_every = update_every
        self.scope = scope
        self.feedback = feedback
        self.threshold = threshold
        self.freeze_at = freeze_at
        self.channel_floor = bool(channel_floor)
        self.feedback_clip = None if feedback_clip is None else float(feedback_clip)
        names = [name for name, _ in self.layers]
        self._floor = ChannelFloor(names, self._channel_major([l.dense_weight for _, l in self.layers]))
        if self.channel_floor:
            self._floor.check_reachable(self.schedule.final, scope, kept_count)
        self._watch = BlowUpWatch(model, names) if watch and feedback and scope != "filter" else None
        check_same_on_all_ranks(self._config())
        self._take_over(replace)

        device = self.layers[0][1].dense_weight.device
        self.step_count = 0
        self.frozen = False
        self.finalized = False
        self._replaced = False
        self.target_sparsity = 0.0
        self.target_kept = sum(layer.dense_weight.numel() for _, layer in self.layers)
        self.reactivated_last = torch.zeros(len(self.layers), dtype=torch.int64, device=device)
        self.reactivated_total = torch.zeros_like(self.reactivated_last)
        self.forced_last = torch.zeros_like(self.reactivated_last)
        self._empty: set[str] = set()
        self._request: HistogramRequest | None = None
        self._warm = WarmStart()
        for _, layer in self.layers:
            layer.feedback = feedback
            layer.feedback_clip = self.feedback_clip
            layer.pruned_decay = self.pruned_decay
        self.update_masks()
        if freeze_at == 0:
            self.freeze()

    def _take_over(self, replace: bool) -> None:
        """Register as the pruner of every layer, refusing (unless ``replace``) layers that
        a live, unfinalized pruner already manages."""
        owners = {id(p): p for _, layer in self.layers
                  if (p := _OWNERS.get(layer, lambda: None)()) is not None and not p.finalized}
        if owners and not replace:
            raise ValueError(
                "this model's layers are already managed by another DPF pruner; finalize() "
                "it, or pass replace=True to take over (the other pruner then stops)"
            )
        for other in owners.values():
            other.finalized = True
            other._replaced = True
        for _, layer in self.layers:
            _OWNERS[layer] = weakref.ref(self)

    @staticmethod
    def _resolve_schedule(sparsity, schedule, total_steps) -> Schedule:
        if schedule is not None:
            if sparsity is not None and check_sparsity(sparsity) != schedule.final:
                raise ValueError(
                    f"sparsity={sparsity} disagrees with the schedule's final sparsity "
                    f"{schedule.final}; pass one of them"
                )
            return schedule
        if sparsity is None:
            raise ValueError("pass a target sparsity or a schedule")
        if total_steps is None:
            raise ValueError(
                "the default cubic schedule needs the length of training: pass total_steps= "
                "(optimizer steps) or a schedule= from dpf_ext.schedules"
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int (optimizer steps), got {total_steps!r}")
        return Cubic(check_sparsity(sparsity), 0, max(1, round(RAMP_FRACTION * total_steps)))

    def step(self) -> None:
        """Advance one optimizer step; update the masks when one is due."""
        if self.finalized:
            if self._replaced:
                raise RuntimeError("another DPF pruner took over this model (replace=True)")
            raise RuntimeError("this pruner was finalized; build a new one to keep pruning")
        self.step_count += 1
        if self.frozen:
            return
        freezing = self.step_count == self.freeze_at
        if freezing or self._due(self.step_count):
            self.update_masks()
        if freezing:
            self.freeze()

    def _due(self, step: int) -> bool:
        """Whether the masks update at ``step``: every ``update_every`` steps, and at the
        step where the schedule reaches its final sparsity."""
        return step % self.update_every == 0 or step == self.schedule.final_step

    def histogram_request(self) -> HistogramRequest | None:
        """Called by a fused optimizer before its step: a request for the histogram of the
        updated prunable weights if the following :meth:`step` updates the masks with a
        global threshold, else ``None``."""
        next_step = self.step_count + 1
        due = self._due(next_step) or next_step == self.freeze_at
        if (self.finalized or self.frozen or not due or self.scope != "global"
                or not self.feedback or is_sharded(self.layers[0][1].dense_weight)
                or any(layer.channel_dim for _, layer in self.layers)):
            self._request = None
        else:
            weights = [layer.dense_weight for _, layer in self.layers]
            window = self._warm.window(0, weights) if self.threshold == "exact" else None
            self._request = HistogramRequest(weights, next_step, window)
        return self._request

    def update_masks(self) -> None:
        """Recompute every mask now for the schedule's target at the current step.

        Raises ``ValueError`` (masks unchanged) if any prunable weight is NaN or Inf.
        """
        with torch.no_grad():
            self._update_masks()

    def _update_masks(self) -> None:
        sparsity = self.schedule.sparsity_at(self.step_count)
        check_sparsity(sparsity, f"scheduled sparsity at step {self.step_count}")
        full_weights = [layer.dense_weight for _, layer in self.layers]
        shards = Shards([name for name, _ in self.layers], full_weights,
                        [layer.mask for _, layer in self.layers])
        weights, masks = self._channel_major(shards.weights), self._channel_major(shards.masks)
        reduce = shards.reduce if shards.group is not None else None
        exact = self.threshold == "exact"
        if not self.feedback:
            self._zero_pruned()  # momentum may have moved them since the last update
        if self.pattern is not None:
            return self._update_pattern(sparsity, shards)
        if self.channel_floor:
            self._floor.check_reachable(sparsity, self.scope, kept_count)
        floor = self.channel_floor
        rows = self._floor.rows if floor else [0] * len(weights)
        row_max = None  # each channel's largest weight, when recorded
        if self.scope == "global":
            target_kept = kept_count(sparsity, sum(w.numel() for w in full_weights))
            request, self._request = self._request, None
            ready = request is not None and request.step == self.step_count and request.complete
            if ready:
                histogram, row_max, window = request.histogram, request.row_max, request.window
            else:
                histogram, window = None, self._warm.window(0, full_weights) if exact else None
                if floor or self._watch is not None:
                    row_max = new_row_max(weights)
                if self._watch is not None and not floor:
                    histogram = ops.magnitude_histogram(weights, row_max=row_max, window=window)
            taus = self._threshold(weights, target_kept - sum(rows), exact, reduce,
                                   row_max if floor else None, histogram, window)
        elif self.scope == "layer":
            ks = [kept_count(sparsity, w.numel()) for w in full_weights]
            target_kept = sum(ks)
            recorded = floor or self._watch is not None
            row_max = new_row_max(weights) if recorded else None
            taus = []
            for i, (w, k, r) in enumerate(zip(weights, ks, rows)):
                window = self._warm.window(i, full_weights[i:i + 1]) if exact else None
                histogram = (ops.magnitude_histogram([w], row_max=[row_max[i]], window=window)
                             if recorded and not floor else None)
                taus.append(self._threshold([w], k - r, exact, reduce,
                                            [row_max[i]] if floor else None, histogram, window))
            taus = torch.stack(taus)
        else:
            scores = [filter_scores(w) for w in weights]
            target_kept = kept_count(sparsity, sum(self._floor.rows))
            taus = ops.global_threshold(scores, target_kept, exact, reduce=reduce)
            weights = [s.view(-1, *[1] * (w.dim() - 1)).expand_as(w) for s, w in zip(scores, weights)]
        if any(math.isnan(t) for t in self._warm.record(taus)):  # +Inf: the floor alone
            bad = [name for (name, _), w in zip(self.layers, shards.weights)
                   if not torch.isfinite(w).all()]
            raise ValueError(
                f"non-finite (NaN or Inf) weights in {bad or 'another rank'} at step "
                f"{self.step_count}; masks left unchanged"
            )
        layer_taus = taus.expand(len(weights))
        stats = ops.update_masks(weights, taus, masks, shrink_only=not self.feedback,
                                 row_max=row_max if floor else None)
        forced = torch.zeros_like(stats[:, :1])
        if row_max is not None:  # channels entirely below the threshold: forced, or empty
            emptied = [below(r, t) for r, t in zip(row_max, layer_taus)]
            if floor:
                forced = torch.stack([e.sum() for e in emptied]).reshape(-1, 1)
        stats = self._commit(torch.cat([stats, forced], dim=1), shards, sparsity, target_kept)
        if self._watch is not None and row_max is not None:
            self._watch.check(self.step_count, sparsity, row_max, layer_taus,
                              None if floor else [~e for e in emptied])
        self._warn_empty_layers(stats[:, 0])

    def _update_pattern(self, sparsity: float, shards: Shards) -> None:
        """The N:M update: the pattern where the schedule's target is not 0, else dense."""
        if sparsity == 0:
            reactivated = torch.stack([(~m).sum() for m in shards.masks])
            kept = torch.tensor([m.numel() for m in shards.masks], device=reactivated.device)
            stats = torch.stack([kept, reactivated], dim=1)
            for m in shards.masks:
                m.fill_(True)
        else:
            stats = self.pattern.update(shards.weights, shards.masks, self.layers)
            if not bool((stats[:, 2] == 0).all()):
                bad = [name for (name, _), s in zip(self.layers, stats[:, 2].tolist()) if s]
                raise ValueError(f"non-finite (NaN or Inf) weights in {bad} at step "
                                 f"{self.step_count}; masks left unchanged")
            stats = stats[:, :2]
        numels = [layer.dense_weight.numel() for _, layer in self.layers]
        target_kept = sum(numels) if sparsity == 0 else sum(k // self.pattern.m * self.pattern.n
                                                           for k in numels)
        self._commit(torch.cat([stats, torch.zeros_like(stats[:, :1])], dim=1), shards, sparsity,
                     target_kept)

    def _commit(self, stats: torch.Tensor, shards: Shards, sparsity: float,
                target_kept: int) -> torch.Tensor:
        """Finish a mask update: sum the per-layer ``[kept, reactivated, forced]`` counts
        over the ranks, make the masks whole, zero pruned weights without feedback, and
        record the update. Returns the summed counts."""
        stats = shards.reduce(stats)
        shards.assemble_masks()
        if not self.feedback:
            self._zero_pruned()
        self.reactivated_last = stats[:, 1]
        self.reactivated_total += stats[:, 1]
        self.forced_last = stats[:, 2]
        self.target_sparsity = sparsity
        self.target_kept = target_kept
        return stats

    def _channel_major(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the layers' weights (or masks) with the output channels first, as the
        channel floor and the filter scope count them."""
        return [t.movedim(layer.channel_dim, 0) if layer.channel_dim else t
                for t, (_, layer) in zip(tensors, self.layers)]

    def _threshold(self, weights, k, exact, reduce, row_max, histogram=None,
                   window=None) -> torch.Tensor:
        """The threshold over ``weights`` less each row's largest (recorded into
        ``row_max``), keeping ``k`` of the others; +Inf (the forced weights alone) for
        ``k == 0``. ``histogram``: the first pass, if already counted (with ``window``);
        ``window`` lets the exact search finish in that pass when the threshold moved
        little (see :class:`WarmStart`)."""
        if k < 1:
            if histogram is None:  # the pass still records the rows and meets any NaN
                histogram = ops.magnitude_histogram(weights, row_max=row_max)
            nonfinite = reduce(histogram.clone()) if reduce else histogram
            nonfinite = nonfinite[NONFINITE_BIN:].sum() > 0
            inf = torch.full((), float("inf"), device=weights[0].device)
            return torch.where(nonfinite, torch.full_like(inf, float("nan")), inf)
        return ops.global_threshold(weights, k, exact, histogram=histogram, reduce=reduce,
                                    row_max=row_max, window=window)

    def _warn_empty_layers(self, kept: torch.Tensor) -> None:
        emptied = [name for (name, _), k in zip(self.layers, kept.tolist())
                   if k == 0 and name not in self._empty]
        self._empty = {name for (name, _), k in zip(self.layers, kept.tolist()) if k == 0}
        if emptied:
            warnings.warn(
                f"step {self.step_count}: layers {emptied} are entirely pruned; the model's "
                "output no longer depends on them. With BatchNorm behind such a layer the "
                "feedback gradient can blow up; consider channel_floor=True (the default), a "
                "lower sparsity, or excluding these layers in dpf_ext.sparsify",
                RuntimeWarning, stacklevel=5,
            )

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        """``w ← mask ⊙ w`` for every layer (pruned weights become +0.0)."""
        for _, layer in self.layers:
            weight, mask = local_weight_and_mask(layer.dense_weight, layer.mask)
            weight.masked_fill_(~mask, 0)

    def freeze(self) -> None:
        """Keep the masks fixed from now on and mask the gradient (retraining)."""
        self.frozen = True
        for _, layer in self.layers:
            layer.feedback = False

    def finalize(self, unwrap: bool = False) -> nn.Module:
        """Fold the masks into the weights (``w ← mask ⊙ w``) and return the model.

        ``unwrap=True`` also turns the DPF layers back into plain torch layers (see
        :func:`dpf_ext.unsparsify`), whose ``state_dict`` loads into the original
        architecture. The pruner cannot step afterwards.
        """
        if unwrap:
            unsparsify(self.model)
        else:
            self._zero_pruned()
        self.finalized = True
        return self.model

    def sparsity(self) -> float:
        """Actual fraction of prunable weights that the masks prune."""
        kept = int(torch.stack([layer.mask.sum() for _, layer in self.layers]).sum())  # one sync
        return 1.0 - kept / sum(layer.mask.numel() for _, layer in self.layers)

    def report(self) -> SparsityReport:
        """Per-layer table of shapes, kept weights, sparsity, reactivations and the weights
        the channel floor forced at the last update."""
        kept = torch.stack([layer.mask.sum() for _, layer in self.layers])
        kept, last, total, forced = torch.stack(
            [kept, self.reactivated_last, self.reactivated_total, self.forced_last]).tolist()
        rows = [
            LayerReport(name, tuple(layer.dense_weight.shape), layer.dense_weight.numel(), kept[i],
                        last[i], total[i], forced[i])
            for i, (name, layer) in enumerate(self.layers)
        ]
        return SparsityReport(self.step_count, self.target_sparsity, self.target_kept,
                              self.frozen, rows, coverage(self.model),
                              str(self.pattern) if self.pattern else None)

    def _config(self) -> dict:
        return {
            "schedule": repr(self.schedule), "update_every": self.update_every,
            "scope": self.scope, "feedback": self.feedback, "threshold": self.threshold,
            "freeze_at": self.freeze_at, "channel_floor": self.channel_floor,
            "feedback_clip": self.feedback_clip, "pattern": str(self.pattern) if self.pattern else None,
            "pruned_decay": self.pruned_decay,
            "layers": [name for name, _ in self.layers],
        }

    def state_dict(self) -> dict:
        """Everything needed to continue pruning exactly (the masks are in the model's)."""
        return {
            "config": self._config(),
            "step_count": self.step_count,
            "frozen": self.frozen,
            "target_sparsity": self.target_sparsity,
            "target_kept": self.target_kept,
            "reactivated_last": self.reactivated_last.clone(),
            "reactivated_total": self.reactivated_total.clone(),
            "forced_last": self.forced_last.clone(),
            "warm_start": self._warm.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the pruner's settings must match the saved ones."""
        mine = self._config()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff:
            details = "; ".join(f"{k}: saved {s!r}, this pruner {m!r}" for k, (s, m) in diff.items())
            raise ValueError(f"pruner settings differ from the checkpoint's: {details}")
        self.step_count = state["step_count"]
        self.target_sparsity = state["target_sparsity"]
        self.target_kept = state["target_kept"]
        self.reactivated_last.copy_(state["reactivated_last"])
        self.reactivated_total.copy_(state["reactivated_total"])
        if "forced_last" in state:
            self.forced_last.copy_(state["forced_last"])
        if "warm_start" in state:
            self._warm.load_state_dict(state["warm_start"], self.reactivated_last.device)
        self.frozen = False
        for _, layer in self.layers:
            layer.feedback = self.feedback
        if state["frozen"]:
            self.freeze()
