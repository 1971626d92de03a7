"""The workloads the benchmarks time, shared by the timed cases and the memory probe."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.nn.utils import prune

from dpf_ext import ops
from dpf_ext.ops.bits import HIGH_BINS

SPARSITY = 0.9
N_TENSORS = 50


def weight_set(n: int, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """About 50 float32 tensors of geometrically spread sizes totalling ``n`` weights, with
    per-layer scales as in a trained network. Filled in place (no temporaries)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    raw = torch.rand(N_TENSORS, generator=g) * 4
    sizes = (raw.exp() / raw.exp().sum() * n).long().clamp(min=1)
    sizes[-1] += n - int(sizes.sum())
    out = []
    for i, size in enumerate(sizes.tolist()):
        w = torch.empty(size, device=device)
        w.normal_(0.0, float(0.01 + i / N_TENSORS), generator=None)
        out.append(w)
    return out


def keep_count(weights: list[torch.Tensor]) -> int:
    n = sum(w.numel() for w in weights)
    return n - round(SPARSITY * n)


def dpf_threshold(weights, exact: bool) -> torch.Tensor:
    return ops.global_threshold(weights, keep_count(weights), exact=exact)


_previous: dict[int, torch.Tensor] = {}


def warm_threshold(weights) -> torch.Tensor:
    """The exact threshold warm-started from a previous one a third of a bin away (as after
    a mask update period in training): one pass when it lands in the window."""
    key = id(weights[0])
    if key not in _previous:
        _previous.clear()
        _previous[key] = dpf_threshold(weights, True) * (1 + 2.0 ** -9)
    return ops.global_threshold(weights, keep_count(weights), window=ops.Window.around(_previous[key]))


def row_max_per_tensor(params) -> list[torch.Tensor]:
    """The channel floor's row maxima, one row per (flat) benchmark tensor."""
    return [torch.zeros(1, dtype=torch.int64, device=p.device) for p in params]


def first_pass_args(params, variant: str) -> dict:
    """The keyword arguments that make a fused step count what ``variant`` names: nothing
    (``fused``), the histogram for an approximate threshold (``fused_histogram``), or what
    the default pruner asks for an exact one (``fused_first_pass_exact``: also the row
    maxima and a window centred on the weights' threshold now, as the pruner's is on the
    previous one)."""
    if variant.startswith("fused_histogram"):
        return dict(histogram=torch.zeros(HIGH_BINS, dtype=torch.int64, device=params[0].device))
    if variant.startswith("fused_first_pass_exact"):
        tau = ops.global_threshold(params, keep_count(params))
        return dict(histogram=torch.zeros(HIGH_BINS, dtype=torch.int64, device=params[0].device),
                    row_max=row_max_per_tensor(params), window=ops.Window.around(tau))
    return {}


def interleaved_medians(fns: dict, rounds: int = 5, setups: dict | None = None) -> dict[str, float]:
    """The median time of each of ``fns`` (name -> callable without arguments), timed in
    interleaved rounds after one warm-up call each: a shared machine that drifts between
    cases drifts alike for all of them, so their ratios hold where separate timings do not.
    ``setups`` (name -> callable) run untimed before each call of the same name."""
    setups = setups or {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            if name in setups:
                setups[name]()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def one_read(weights) -> list[torch.Tensor]:
    """The floor: one read of every weight (a max per tensor)."""
    return [w.max() for w in weights]


def kthvalue_threshold(weights) -> torch.Tensor:
    """What a user writes: concatenate the magnitudes and take the k-th largest."""
    mags = torch.cat([w.abs().flatten() for w in weights])
    return mags.kthvalue(mags.numel() - keep_count(weights) + 1).values


def topk_threshold(weights) -> torch.Tensor:
    mags = torch.cat([w.abs().flatten() for w in weights])
    return mags.topk(keep_count(weights), sorted=False).values.min()


class _Holder(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)


def prune_modules(weights) -> list[nn.Module]:
    return [_Holder(w) for w in weights]


def prune_global_unstructured(modules) -> None:
    """torch.nn.utils.prune's global magnitude pruning (it also builds the masks)."""
    prune.global_unstructured([(m, "weight") for m in modules],
                              pruning_method=prune.L1Unstructured, amount=SPARSITY)


THRESHOLD_METHODS = {
    "dpf_exact": lambda ws: dpf_threshold(ws, True),
    "dpf_approx": lambda ws: dpf_threshold(ws, False),
    "dpf_exact_warm": warm_threshold,
    "torch_one_read": one_read,
    "torch_kthvalue": kthvalue_threshold,
    "torch_topk": topk_threshold,
    "torch_prune_global": lambda ws: prune_global_unstructured(prune_modules(ws)),
}
"""Global threshold at 90% sparsity, by method name."""


def training_steps(model, opt, pruner, x, y, loss_fn, n: int):
    """A function running ``n`` training steps of ``model`` on the batch ``(x, y)``, the
    pruner (if any) after each optimizer step."""

    def steps():
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if pruner is not None:
                pruner.step()

    return steps
