"""The method interface: what a mask-choosing method gets at an update and gives back.

The controller (:class:`dpf_ext.Pruner`) decides *when* masks change and over *which layers*;
a :class:`Method` decides *which weights* each mask keeps. A method declares what it needs
(:attr:`Method.needs_gradient`: this step's dense gradient), receives an :class:`Update`,
writes the masks it was given and returns their counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from .. import ops
from ..budgets import Budget, Groups
from ..distributed import local_weight_and_mask
from ..nn import values_storage
from ..nn.estimators import GRADIENT_BLOCK, Estimator, MaskedGradient, ProductGradient
from .first_pass import HistogramRequest
from .optimizer_state import check_resettable, reset_state
from ..schedules import Schedule
from .recipe import Recipe

STATS = ("kept", "reactivated", "forced", "regrown")
"""The per-layer counts a method returns from :meth:`Method.update`, in this order: weights
kept, weights kept now and pruned before (grown; for DPF, the feedback's reactivations),
weights the channel floor forced, and weights dropped and grown again in the same update."""


@dataclass
class Update:
    """What a method gets at a mask update. ``weights``/``masks``/``gradients``: this
    process's part of each prunable layer (rows of a sharded weight), output channels first;
    the method writes ``masks`` in place. On values storage ``weights`` and ``masks`` are
    ``None`` and ``gradients`` hold :class:`~dpf_ext.nn.estimators.ProductGradient` objects: a
    method that runs there (:attr:`Method.values_storage`) reads and writes through
    :meth:`kept`, :meth:`set_kept` and :meth:`gradient_blocks`, which work on either
    storage."""

    step: int
    sparsity: float
    names: list[str]
    layers: list
    weights: list[torch.Tensor] | None
    masks: list[torch.Tensor] | None
    full_weights: list[torch.Tensor]
    budget: Budget
    reduce: Callable[[torch.Tensor], torch.Tensor] | None
    seed: int
    initial: bool
    """The update at construction (step 0): sparse-from-scratch methods draw their first
    masks here."""
    gradients: list[torch.Tensor] | None = None
    request: HistogramRequest | None = None
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    """The whole weights' shapes, output channels first."""
    optimizer: torch.optim.Optimizer | None = None
    target_kept: int | None = None
    """What the update aims to keep, for the report; a method that counts otherwise than
    the budget's groups (filters, N:M groups) sets it."""

    def groups(self) -> Groups:
        """The budget's split of the layers at this update's sparsity."""
        if self._groups is None:
            self._groups = self.budget.split(self.names, self.shapes, self.sparsity)
        return self._groups

    def __post_init__(self):
        self._groups: Groups | None = None

    def kept(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s kept weights: their flat positions (output channels first, sorted)
        and their values in that order. The same on either storage."""
        layer = self.layers[i]
        if values_storage.is_values(layer):
            return values_storage.positions(layer), layer.dense_weight.detach()
        flat = self.masks[i].reshape(-1).nonzero().view(-1)
        return flat, self.weights[i].reshape(-1)[flat]

    def set_kept(self, i: int, keep: torch.Tensor, grow: torch.Tensor) -> None:
        """Layer ``i`` keeps the positions ``keep`` (kept before) and ``grow`` (flat, output
        channels first, disjoint); grown weights not kept before start at 0 with their
        optimizer state reset (SGD's momentum, Adam's moments), weights dropped and grown again
        at once keep both. On either storage."""
        layer = self.layers[i]
        new = torch.cat([keep, grow]).sort().values
        if values_storage.is_values(layer):
            values_storage.move(layer, new, self.optimizer)
            return
        before = self.masks[i].clone()
        self.masks[i].copy_(mask_of(self.masks[i], new))
        grown = self.masks[i] & ~before
        self.weights[i].masked_fill_(grown, 0)
        if self.optimizer is not None:
            reset_state(self.optimizer, self.full_weights[i],
                        grown.movedim(0, layer.channel_dim) if layer.channel_dim else grown)

    def gradient_blocks(self, i: int):
        """This step's dense gradient of layer ``i`` (output channels first, flattened to
        ``(rows, rest)``) as ``(first flat position, block)`` pairs of whole rows, in order:
        slices of it, or blocks formed one at a time for a layer on values storage (a
        :class:`~dpf_ext.nn.estimators.ProductGradient`); about
        :data:`~dpf_ext.nn.estimators.GRADIENT_BLOCK` entries each."""
        gradient = self.gradients[i]
        if isinstance(gradient, ProductGradient):
            cols = gradient.shape[1]
            for r0, block in gradient.blocks():
                yield r0 * cols, block
            return
        rows = gradient.reshape(gradient.shape[0], -1)
        step = max(1, GRADIENT_BLOCK // max(rows.shape[1], 1))
        for r0 in range(0, rows.shape[0], step):
            yield r0 * rows.shape[1], rows[r0:r0 + step]

    def generator(self, layer: int) -> torch.Generator:
        """A generator seeded by the pruner's seed, this step and ``layer``: the same draws
        on every rank and in a resumed run."""
        key = hashlib.blake2b(f"{self.seed}/{self.step}/{layer}".encode(), digest_size=8).digest()
        device = self.layers[layer].dense_weight.device
        return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(
            int.from_bytes(key, "little") & (2**63 - 1))


@dataclass(frozen=True)
class PrunerView:
    """What a method may read of the controller that runs it (given to :meth:`Method.check`,
    :meth:`Method.histogram_window` and :meth:`Method.finalize`): the layers, their shapes
    (output channels first), the schedule, budget, end of updates, length of training, the
    optimizer and the model."""

    model: torch.nn.Module
    layers: list
    """``(name, layer)`` pairs of the prunable layers."""
    names: list[str]
    shapes: list[tuple[int, ...]]
    schedule: Schedule
    budget: Budget
    end_step: int | None
    total_steps: int | None
    optimizer: torch.optim.Optimizer | None
    step: int = 0
    """The pruner's step count."""
    phase: int = 0
    """The training phase (:attr:`Method.phases`) the run is in."""
    phase_steps: int | None = None
    """The steps of a phase (``total_steps`` over the phases), if known."""

    def full_weights(self) -> list[torch.Tensor]:
        """The prunable weights (whole: DTensors where sharded), in layer order."""
        return full_weights(self.layers)

    def channel_major(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of the layers' weights (or masks) with the output channels first."""
        return channel_major(self.layers, tensors)


def require_optimizer(run: PrunerView, name: str) -> None:
    """Raise unless ``run`` has an optimizer whose per-weight state the methods can read and
    reset (SGD, Adam, AdamW or their dpf_ext versions)."""
    if run.optimizer is None:
        raise ValueError(f"{name} reads or resets the optimizer's state: pass optimizer=")
    check_resettable(run.optimizer, name)


def zero_pruned_weights(layers: list) -> None:
    """``w ← mask ⊙ w`` for every ``(name, layer)`` pair (pruned weights become +0.0)."""
    for _, layer in layers:
        weight, mask = local_weight_and_mask(layer.dense_weight, layer.mask)
        weight.masked_fill_(~mask, 0)


def full_weights(layers: list) -> list[torch.Tensor]:
    """The weights of ``(name, layer)`` pairs (whole: DTensors where sharded)."""
    return [layer.dense_weight for _, layer in layers]


def channel_major(layers: list, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``tensors`` (one per layer of ``layers``) with the output channels first, as
    the channel floor and the filter method count them."""
    return [t.movedim(layer.channel_dim, 0) if layer.channel_dim else t
            for t, (_, layer) in zip(tensors, layers)]


def unrecorded(default):
    """A method option (dataclass field) left out of :meth:`Method.config`: one that does
    not choose the masks (a warning switch) or that comes from the training loop (a loss)."""
    return field(default=default, metadata={"recorded": False})


class Method:
    """Base class of the mask-choosing methods, written as dataclasses whose fields are
    their options (``@dataclass(eq=False)``; checks in ``__post_init__``). Override
    :meth:`update`; set ``name`` and :attr:`recipe`; override :meth:`estimator`,
    :meth:`check`, :meth:`state_dict` where the method needs to. Register it with
    :func:`dpf_ext.methods.register_method` to make it available by name."""

    name: ClassVar[str] = ""
    recipe: ClassVar[Recipe] = Recipe()
    """The published schedule, period, budget and end of updates (see
    :class:`~dpf_ext.methods.recipe.Recipe`); an instance may refine it from its options."""
    needs_gradient: ClassVar[bool] = False
    """Whether :meth:`update` needs the dense gradient of the update step (``Update.gradients``)."""
    sharded: ClassVar[bool] = False
    """Whether :meth:`update` works on the rows of sharded (FSDP2) weights, with
    ``Update.reduce`` summing its counts across the ranks."""
    values_storage: ClassVar[bool] = False
    """Whether the method runs on values storage (``Pruner(storage="values")``): its masks
    never read the pruned weights' values, its gradient is masked, and each layer keeps a
    constant number of weights."""

    def initial_positions(self, u: Update) -> list[torch.Tensor] | None:
        """The first masks (``u.initial``) as each layer's sorted flat kept positions, drawn
        without reading the weights, for a model built on the meta device; ``None`` (the
        default): the method needs the dense weights at initialisation."""
        return None

    @property
    def phases(self) -> int:
        """The training phases of equal length the method trains in: its recipe's (1; a
        prune-retrain method more: the loop calls :meth:`dpf_ext.Pruner.end_phase` after
        each)."""
        return self.recipe.phases

    def phase_end(self, run: PrunerView, phase: int):
        """At the end of training phase ``phase``: move the weights as the method does there
        and return a :class:`~dpf_ext.methods.phases.PhaseEnd` (the sparsity to prune to
        now, if any). Only for methods of several phases."""
        raise NotImplementedError

    def phase_start(self, run: PrunerView, phase: int) -> None:
        """Before training phase ``phase`` (after the masks changed): rewind or restore the
        weights, clear the optimizer's state, as the method does."""

    def phase_of(self, phase: int) -> dict:
        """What phase ``phase`` is in the method's terms (its cycle, its soup ingredient)."""
        return {}

    def estimator(self) -> Estimator:
        """The gradient estimator the layers use under this method."""
        return MaskedGradient()

    def layer_estimator(self, i: int, shared: Estimator) -> Estimator:
        """The estimator of layer ``i`` (by default ``shared``, :meth:`estimator`'s)."""
        return shared

    def finalize(self, run: PrunerView) -> None:
        """Before the masks are folded in: write into the weights what the forward uses, if
        that is not ``mask ⊙ w`` (nothing by default)."""

    def due(self, step: int, every: int) -> bool:
        """Whether the masks update at ``step`` (before ``end_step``); by default every
        ``every`` (the pruner's ``update_every``) steps."""
        return step % every == 0

    def check(self, run: PrunerView) -> None:
        """Raise ``ValueError`` before training if this method cannot run on ``run``'s
        layers with its schedule and budget."""

    def after_step(self, run: PrunerView) -> None:
        """After every optimizer step, before a mask update that is due (nothing by default;
        :func:`zero_pruned_weights` for a method whose pruned weights stay 0 under a dense
        gradient)."""

    def update(self, u: Update) -> torch.Tensor:
        """Write the masks for ``u`` and return the ``(layers, 4)`` int64 counts of
        :data:`STATS` (this process's part)."""
        raise NotImplementedError

    def histogram_window(self, run: PrunerView) -> ops.Window | None | bool:
        """``False`` if a fused optimizer's first pass cannot serve this method's next update;
        else the window to count with it (or ``None``). Only magnitude thresholds use it."""
        return False

    def config(self) -> dict:
        """The settings a resumed run must share (compared by ``load_state_dict``): the
        dataclass fields, but those marked :func:`unrecorded` (none for a plain class)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("recorded", True)}

    def state_dict(self) -> dict:
        """State that continues across updates (none by default)."""
        return {}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore :meth:`state_dict`."""


def counts(kept: list[torch.Tensor], reactivated: list[torch.Tensor],
           regrown: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The :data:`STATS` table from per-layer 0-dim counts (no floor)."""
    kept_t, react_t = torch.stack(kept), torch.stack(reactivated)
    regrown_t = torch.stack(regrown) if regrown else torch.zeros_like(kept_t)
    return torch.stack([kept_t, react_t, torch.zeros_like(kept_t), regrown_t], dim=1).to(torch.int64)


SMALL = 65536
"""From this many values on, :func:`top_k` takes the histogram threshold (measured on the
2-core CPU: a 1M-value histogram threshold 1.3 ms against 10 ms for ``kthvalue``; at 20k,
0.33 ms against 0.22 ms)."""


def top_k(values: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Positions of the ``k`` largest of the 1-D non-negative ``values``, exactly: the k-th
    largest by the exact histogram threshold (from :data:`SMALL` values on; below, by
    ``kthvalue``'s selection, which costs less there; no sort either way), then the ties
    at it drawn at random."""
    if k >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64, device=values.device)
    if values.numel() >= SMALL:
        tau = ops.global_threshold([values], k, exact=True)
    else:
        tau = values.kthvalue(values.numel() - k + 1).values
    above = (values > tau).nonzero().view(-1)
    ties = (values == tau).nonzero().view(-1)
    if above.numel() + ties.numel() == k:
        return torch.cat([above, ties])
    order = torch.randperm(ties.numel(), generator=generator, device=generator.device)
    return torch.cat([above, ties[order[:k - above.numel()].to(ties.device)]])


MIX = (0x45D9F3B, 0x119DE1F3)
"""The multipliers of :func:`position_keys`' hash (31-bit products stay inside int64)."""


def position_keys(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """A pseudo-random 31-bit key per flat position, from ``seed`` (an integer hash of the
    position: the same key wherever and however the positions are visited)."""
    mask = 0x7FFFFFFF
    x = positions >> 31  # in place from here: one temporary of the positions' size at a time
    x.bitwise_xor_(positions).bitwise_xor_(seed & mask).bitwise_and_(mask)
    for multiplier in MIX:
        x.bitwise_xor_(x >> 16).mul_(multiplier).bitwise_and_(mask)
    return x.bitwise_xor_(x >> 16)


def top_positions(blocks, k: int, excluded: torch.Tensor, seed: int) -> torch.Tensor:
    """The flat positions of the ``k`` largest non-negative scores, ``blocks`` being
    ``(first position, scores)`` pairs that cover the positions in order, never one of the
    sorted ``excluded``; ties (zeros included) go by :func:`position_keys` of ``seed``, so
    the choice is the same whatever the blocks. One block is held at a time, beside at most
    ``2k`` candidates (the best ``k`` kept each time they reach that). Sorted.
    ``ValueError`` on a NaN or Inf score."""
    pool_keys, pool = [excluded.new_empty(0)], [excluded.new_empty(0)]  # candidates so far
    size, floor = 0, None  # floor: the k-th best key of the last compaction

    def compact():
        keys, positions = torch.cat(pool_keys), torch.cat(pool)
        top = torch.topk(keys, min(k, keys.numel())).indices
        return keys[top], positions[top]

    for start, scores in blocks:
        scores = scores.reshape(-1)
        if not bool(torch.isfinite(scores).all()):
            raise ValueError("non-finite (NaN or Inf) scores")
        bits = scores.float().abs().view(torch.int32)
        if floor is not None:  # only scores at or over the k-th best so far compete
            chosen = (bits >= floor >> 31).nonzero().view(-1)
            positions, bits = chosen + start, bits[chosen]
        else:
            positions = torch.arange(start, start + scores.numel(), device=scores.device)
        keys = bits.long().bitwise_left_shift_(31).bitwise_or_(position_keys(positions, seed))
        if excluded.numel():
            at = torch.searchsorted(excluded, positions).clamp_(max=excluded.numel() - 1)
            keys[excluded[at] == positions] = -1
        pool_keys.append(keys)
        pool.append(positions)
        size += keys.numel()
        if k and size >= 2 * k:  # keep the best k (one selection per k candidates or so)
            best_keys, best = compact()
            pool_keys, pool, size = [best_keys], [best], best_keys.numel()
            floor = max(int(best_keys.min()), 0)
    best_keys, best = compact()
    if k and bool((best_keys < 0).any()):
        raise ValueError(f"fewer than {k} positions outside the excluded ones")
    return best.sort().values


def select_top(scores: list[torch.Tensor], k: int, generator: torch.Generator,
               excluded: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Exactly ``k`` positions of the largest non-negative ``scores``, over all tensors
    together, as flat index tensors (one per score tensor). ``excluded``: flat positions
    (one index tensor per score tensor) never chosen; their scores must be 0. If fewer
    than ``k`` positions are eligible, all of them.

    One histogram pass finds a threshold the k-th largest score is at most one bin under
    (:func:`dpf_ext.ops.global_threshold`, approximate); the exact choice is then made
    among the scores over it by :func:`top_k`. No sort. Raises ``ValueError`` if a score
    is NaN or Inf."""
    flat = [s.reshape(-1) for s in scores]
    if k <= 0:
        return [torch.zeros(0, dtype=torch.int64, device=s.device) for s in flat]
    tau = ops.global_threshold(flat, k, exact=False)
    if not torch.isfinite(tau):
        raise ValueError("non-finite (NaN or Inf) scores")
    over = tau > 0
    found = [((s >= tau) if over else (s > 0)).nonzero().view(-1) for s in flat]
    sizes = [f.numel() for f in found]
    if sum(sizes) < k:  # a zero score makes the count: draw the rest among eligible zeros
        pools = []
        for i, s in enumerate(flat):
            eligible = s == 0
            if excluded is not None:
                eligible[excluded[i]] = False
            pools.append(eligible.nonzero().view(-1))
        order = torch.randperm(sum(p.numel() for p in pools), generator=generator,
                               device=generator.device)[:k - sum(sizes)]
        return [torch.cat([f, p[o]]) for f, p, o in zip(found, pools, _split(order, pools))]
    if len(flat) == 1:
        return [found[0][top_k(flat[0][found[0]], k, generator)]]
    picked = top_k(torch.cat([s[f] for s, f in zip(flat, found)]), k, generator)
    return [f[o] for f, o in zip(found, _split(picked, found))]


def _split(picked: torch.Tensor, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Positions into the concatenation of ``parts`` as positions into each part."""
    out, base = [], 0
    for part in parts:
        mine = picked[(picked >= base) & (picked < base + part.numel())] - base
        out.append(mine.to(part.device))
        base += part.numel()
    return out


def mask_of(like: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
    """A bool tensor shaped ``like`` that is True at the flat ``positions``."""
    mask = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    for p in positions:
        mask[p] = True
    return mask.view(like.shape)


def write_masks(u: Update, new: list[torch.Tensor], regrown: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Write ``new`` into ``u.masks`` and return the :data:`STATS` counts."""
    kept = [torch.count_nonzero(n) for n in new]
    reactivated = [torch.count_nonzero(n & ~m) for n, m in zip(new, u.masks)]
    regrown = [torch.count_nonzero(r) for r in regrown] if regrown is not None else None
    for m, n in zip(u.masks, new):
        m.copy_(n)
    return counts(kept, reactivated, regrown)


def random_positions(u: Update) -> list[torch.Tensor]:
    """The kept positions of random masks with the budget's counts, as :func:`random_masks`
    draws them in distribution (each group's count uniformly among its positions; not the
    same draws), without a tensor of a layer's size: sorted flat positions per layer, on the
    CPU."""
    out: list[torch.Tensor] = [None] * len(u.shapes)
    for idx, k in u.groups():
        sizes = [math.prod(u.shapes[i]) for i in idx]
        chosen = values_storage.random_positions(sum(sizes), k, u.generator(idx[0]),
                                                 torch.device("cpu"))
        start = 0
        for i, size in zip(idx, sizes):
            lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + size])).tolist()
            out[i] = chosen[lo:hi] - start
            start += size
    return out


def random_masks(u: Update) -> list[torch.Tensor]:
    """Masks drawn uniformly at random with the budget's counts: each group keeps exactly
    its count (seeded per layer, see :meth:`Update.generator`)."""
    out: list[torch.Tensor] = [None] * len(u.weights)
    for idx, k in u.groups():
        scores = [torch.rand(u.weights[i].shape, generator=u.generator(i), device=u.weights[i].device)
                  for i in idx]
        for i, chosen in zip(idx, select_top(scores, k, u.generator(idx[0]))):
            out[i] = mask_of(u.weights[i], chosen)
    return out
