"""Output channels under DPF: the channel floor that keeps every channel alive and the watch
that warns before a channel's feedback gradient blows up (the feedback clip, for channels
left with very few weights, is an estimator: :func:`dpf_ext.nn.estimators.clip_pruned_gradient`).

A channel is a row of a prunable weight: an output feature of a Linear, an output filter of
a ConvNd (``weight.shape[0]`` rows). Both objects work from each row's largest magnitude,
which the mask update's first pass records at no extra pass over the weights (the
``row_max`` keys of :mod:`dpf_ext.ops`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..ops.bits import FINITE_LIMIT

BLOWUP_RATIO = 100.0
"""The watch warns when a layer's largest dense weight exceeds this multiple of the
threshold (from a target sparsity of :data:`WATCH_FROM` on, where the threshold is a
sizeable magnitude). Healthy runs stay far below it (their largest weights are a few to a
few tens of thresholds); a feedback blow-up passes it within a few mask updates."""

WATCH_FROM = 0.5
"""Target sparsity from which the watch compares weights with the threshold."""

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def channels(weight: torch.Tensor) -> int:
    """Output channels (rows) of a prunable weight: its first dimension."""
    return weight.shape[0] if weight.numel() else 0


def new_row_max(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeroed ``row_max`` tensors for ``weights`` (one int64 entry per channel)."""
    return [torch.zeros(channels(w), dtype=torch.int64, device=w.device) for w in weights]


def row_max_bits(row_max: torch.Tensor) -> torch.Tensor:
    """The magnitude bit pattern (int64) of each row's largest weight."""
    return row_max >> 32


def below(row_max: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Which rows have every weight below the threshold ``tau`` (bool per row)."""
    tau_bits = tau.float().reshape(1).view(torch.int32).to(torch.int64).clamp_(min=0)
    return row_max_bits(row_max) < tau_bits


class ChannelFloor:
    """Keeps at least one weight (its largest) in every output channel at every mask update.

    The forced weights count toward the target: the threshold is taken over the other
    weights with the budget less one weight per channel, so the kept total is unchanged
    (ties aside). When no channel would be emptied, the masks are exactly the unguarded
    ones.
    """

    def __init__(self, names: list[str], weights: list[torch.Tensor]):
        self.names = names
        self.rows = [channels(w) for w in weights]
        self.sizes = [w.numel() for w in weights]

    def check_reachable(self, sparsity: float, groups) -> None:
        """Raise ``ValueError`` if keeping one weight per channel exceeds the budget of
        ``sparsity`` split into ``groups`` (``(layer indices, kept)`` pairs, see
        :mod:`dpf_ext.budgets`)."""
        if len(groups) == 1 and len(groups[0][0]) == len(self.rows):
            k, n, rows = groups[0][1], sum(self.sizes), sum(self.rows)
            if k < rows:
                raise ValueError(
                    f"sparsity {sparsity} keeps {k} weights but the channel floor keeps one in "
                    f"each of the {rows} output channels: the highest reachable sparsity is "
                    f"{1 - rows / n:.6f}; lower the sparsity or pass channel_floor=False"
                )
            return
        bad = [(idx, 1 - sum(self.rows[i] for i in idx) / sum(self.sizes[i] for i in idx))
               for idx, k in groups if sum(self.sizes[i] for i in idx)
               and k < sum(self.rows[i] for i in idx)]
        if bad:
            worst = min(s for _, s in bad)
            raise ValueError(
                f"sparsity {sparsity} in every layer leaves fewer weights than output channels "
                f"in {[self.names[i] for idx, _ in bad for i in idx]}: with the channel floor "
                f"the highest reachable layer sparsity is {worst:.6f}; lower the sparsity or "
                "pass channel_floor=False"
            )


def _norm_after(model: nn.Module, layer_names: list[str]) -> dict[str, str]:
    """For each layer name, the normalisation module that follows it in module order and
    normalises its output channels (same feature count), if any."""
    modules = list(model.named_modules())
    found = {}
    for i, (name, module) in enumerate(modules):
        if name not in layer_names:
            continue
        for next_name, nxt in modules[i + 1:]:
            if isinstance(nxt, NORM_TYPES):
                features = getattr(nxt, "num_features", getattr(nxt, "num_channels", None))
                if features is None:
                    shape = getattr(nxt, "normalized_shape", ())
                    features = shape[-1] if shape else None
                if features == module.dense_weight.shape[module.channel_dim]:
                    found[name] = next_name
                break
            if len(list(nxt.children())) == 0 and getattr(nxt, "weight", None) is not None:
                break  # another layer with weights comes first
    return found


class BlowUpWatch:
    """Warns, once per layer and kind, of the two signs that precede a feedback blow-up:
    a layer whose largest dense weight exceeds :data:`BLOWUP_RATIO` times the threshold,
    and an output channel entirely pruned in front of a normalisation layer (its variance
    there is zero, so the normalisation's backward scales the channel's gradient by about
    ``1/sqrt(eps)``)."""

    def __init__(self, model: nn.Module, names: list[str], ratio: float = BLOWUP_RATIO):
        self.names = names
        self.ratio = ratio
        self.norms = _norm_after(model, names)
        self.warned: set[tuple[str, str]] = set()

    def check(self, step: int, sparsity: float, row_max: list[torch.Tensor], taus: torch.Tensor,
              kept_by_row: list[torch.Tensor] | None) -> None:
        """``row_max``: each layer's row keys; ``taus``: each layer's threshold for the
        target ``sparsity``; ``kept_by_row``: per layer, whether each channel keeps a weight
        (``None``: all do)."""
        largest = torch.stack([row_max_bits(r).max() if r.numel() else r.new_zeros(())
                               for r in row_max]).clamp_(max=FINITE_LIMIT)
        largest = largest.to(torch.int32).view(torch.float32)
        ratios = largest / taus.float().clamp(min=torch.finfo(torch.float32).tiny)
        dead = (torch.stack([(~alive).sum() for alive in kept_by_row]).float()
                if kept_by_row is not None else torch.zeros_like(ratios))
        ratios, dead = torch.stack([ratios, dead]).tolist()  # one read-back for all layers
        messages = []
        for i, (name, ratio, dead_count) in enumerate(zip(self.names, ratios, dead)):
            if sparsity >= WATCH_FROM and ratio > self.ratio and (name, "ratio") not in self.warned:
                self.warned.add((name, "ratio"))
                messages.append(f"layer {name!r}: largest dense weight is {ratio:.0f}x the "
                                f"threshold (warning level {self.ratio:g}x)")
            if dead_count and name in self.norms and (name, "dead") not in self.warned:
                channels_dead = torch.nonzero(~kept_by_row[i]).flatten().tolist()
                self.warned.add((name, "dead"))
                shown = ", ".join(map(str, channels_dead[:8])) + (" ..." if len(channels_dead) > 8 else "")
                messages.append(f"layer {name!r}: output channels [{shown}] are entirely pruned "
                                f"in front of {self.norms[name]!r}")
        if messages:
            warnings.warn(
                f"step {step}: signs of a feedback blow-up: " + "; ".join(messages) +
                ". The feedback gradient of such channels can grow without bound and empty "
                "other layers; keep channel_floor=True (the default), lower the sparsity, or "
                "save a checkpoint now",
                RuntimeWarning, stacklevel=6,
            )
