"""A RigL mask update at 90% sparsity over ~50 layers (1M and 10M weights): dpf_ext's
(histogram thresholds over |w| of the active weights and |g| of the others, exact counts)
against the same update written with ``torch.topk`` per layer, as PyTorch implementations of
RigL do it, and against one read of the weights and gradients (the floor; the dpf_ext case is
also timed interleaved with it)."""

import pytest
import torch

from dpf_ext.budgets import Uniform
from dpf_ext.methods import RigL, Update
from workloads import interleaved_medians, one_read, training_steps, weight_set

SIZES = {"1M": 1_000_000, "10M": 10_000_000}
DENSITY = 0.1
STEP, END = 100, 1000  # drop fraction 0.3 / 2 * (1 + cos(pi / 10)) = 0.29 of the active ones
_cache = {}


def _problem(n):
    if n not in _cache:
        _cache.clear()
        weights = weight_set(n)
        g = torch.Generator().manual_seed(1)
        grads = [torch.randn(w.shape, generator=g) for w in weights]
        masks = [torch.rand(w.shape, generator=g) < DENSITY for w in weights]
        _cache[n] = weights, grads, masks
    return _cache[n]


def dpf_ext_update(weights, grads, masks):
    """RigL's update as the library runs it (on copies of the masks). It turns the
    gradients into their magnitudes in place, as it does with the ones it owns in training:
    repeated calls see the same scores."""
    method = RigL()
    method._end = END
    u = Update(STEP, 1 - DENSITY, [str(i) for i in range(len(weights))], [], weights,
               [m.clone() for m in masks], weights, Uniform(), None, 0, False, grads,
               shapes=[tuple(w.shape) for w in weights])
    method.update(u)
    return u.masks


def topk_update(weights, grads, masks):
    """The same update with torch.topk per layer: drop the smallest active magnitudes, grow
    the largest gradients among the rest."""
    fraction = RigL().drop_fraction * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * STEP / END)))
    out = []
    for w, g, m in zip(weights, grads, masks):
        active = int(m.sum())
        k = int(active * float(fraction))
        score = torch.where(m, w.abs(), -1.0).view(-1)
        keep = torch.zeros_like(m).view(-1)
        keep[torch.topk(score, active - k).indices] = True
        grow = torch.where(keep, -1.0, g.abs().view(-1))
        new = keep.clone()
        new[torch.topk(grow, k).indices] = True
        out.append(new.view_as(m))
    return out


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("method", ["dpf_ext", "torch_topk"])
def test_rigl_update(benchmark, size, method):
    weights, grads, masks = _problem(SIZES[size])
    benchmark.group = f"rigl update N={size}"
    fn = dpf_ext_update if method == "dpf_ext" else topk_update
    rounds = 3 if SIZES[size] >= 10_000_000 else 10
    if method == "dpf_ext":
        medians = interleaved_medians({"dpf": lambda: fn(weights, grads, masks),
                                       "topk": lambda: topk_update(weights, grads, masks),
                                       "read": lambda: one_read(weights + grads)}, rounds=rounds)
        benchmark.extra_info["interleaved"] = {
            "reads of weights and gradients": medians["dpf"] / medians["read"],
            "speed-up over torch.topk": medians["topk"] / medians["dpf"]}
    result = benchmark.pedantic(fn, args=(weights, grads, masks), rounds=rounds, warmup_rounds=1)
    assert [int(r.sum()) for r in result] == [int(m.sum()) for m in masks]  # constant count


ROUND = 100  # steps per round: one RigL/SET/DSR update, six of DPF's, 100 of DeepR's and DNW's


def _method_trainer(method):
    """A function running ROUND training steps of the small CNN (batch 64, 1x16x16) with
    ``method`` (``dense``: no pruner), as ``dpf-train`` builds it."""
    from dpf_ext.app.cli_pruner import make_pruner
    from dpf_ext.app.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", (1, 16, 16), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss()
    if method != "dense":
        import dpf_ext

        dpf_ext.sparsify(model)
    pruner = make_pruner(method, model, 0.9, 10_000, optimizer=opt, seed=0,
                         batch_loss=lambda m: loss_fn(m(x), y),
                         **({"update_every": 62} if method == "snfs" else {}))  # an epoch of gratings

    return training_steps(model, opt, pruner, x, y, loss_fn, ROUND)


@pytest.mark.parametrize("method", ["dense", "dpf", "gradual", "dnw", "rigl", "set", "snip",
                                    "static", "snfs", "dsr", "deepr", "topkast", "str"])
def test_method_training_steps(benchmark, method):
    benchmark.group = f"CNN training, {ROUND} steps, per method"
    benchmark.extra_info["steps"] = ROUND
    if method != "dense":
        medians = interleaved_medians({"dense": _method_trainer("dense"),
                                       method: _method_trainer(method)}, rounds=2)
        benchmark.extra_info["interleaved_ratio"] = medians[method] / medians["dense"]
    benchmark.pedantic(_method_trainer(method), rounds=2, warmup_rounds=0)
