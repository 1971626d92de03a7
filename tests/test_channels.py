"""The channel floor and the blow-up watch: the threshold with each channel's largest weight
set aside (against torch.kthvalue, every backend), the dead-channel blow-up it prevents, the
early warning, and the floor's bad input."""

import re
import warnings

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext import ops
from dpf_ext.methods.channels import new_row_max
from dpf_ext.schedules import Constant

from cases import ks_for, weight_cases


def _bits(x):
    return int(x.float().cpu().view(torch.int32))


def _row_maxima(weights):
    """Each row's largest |w| (first column on ties), by torch: (flat indices per tensor)."""
    out = []
    for w in weights:
        rows = w.shape[0] if w.dim() > 1 else 1
        mags = w.detach().abs().float().reshape(rows, -1) if w.numel() else torch.zeros(0, 1)
        out.append(mags.argmax(1) + torch.arange(mags.shape[0]) * mags.shape[1])
    return out


def _rows(weights, device):
    return [torch.zeros((w.shape[0] if w.dim() > 1 else 1) if w.numel() else 0,
                        dtype=torch.int64, device=device) for w in weights]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_threshold_without_the_row_maxima_equals_kthvalue(device, dtype):
    for name, weights in weight_cases(dtype).items():
        if name in ("ties", "one_hot_scale", "all_zeros", "signed_zeros"):
            continue  # ties make "the" row maximum a choice; tested below
        others = []
        for w, idx in zip(weights, _row_maxima(weights)):
            keep = torch.ones(w.numel(), dtype=torch.bool)
            keep[idx] = False
            others.append(w.detach().reshape(-1)[keep])
        n = sum(o.numel() for o in others)
        if n == 0:
            continue
        mags = torch.cat([o.abs().float() for o in others])
        for k in ks_for(n):
            row_max = _rows(weights, device)
            tau = ops.global_threshold([w.to(device) for w in weights], k, row_max=row_max)
            assert _bits(tau) == _bits(mags.kthvalue(n - k + 1).values), (name, k)


def test_floor_masks_keep_every_row_and_the_budget(device):
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(32, 9, generator=g), torch.randn(16, 40, generator=g) * 1e-3,
               torch.randint(-2, 3, (10, 6), generator=g).float()]  # a tiny layer, ties
    rows = sum(w.shape[0] for w in weights)
    n = sum(w.numel() for w in weights)
    for kept in (rows, rows + 1, rows + 50, n // 2):
        on_dev = [w.to(device) for w in weights]
        row_max = _rows(weights, device)
        if kept == rows:  # the floor alone: nothing left for the threshold
            ops.magnitude_histogram(on_dev, row_max=row_max)
            tau = torch.tensor(float("inf"), device=device)
        else:
            tau = ops.global_threshold(on_dev, kept - rows, row_max=row_max)
        masks = [torch.zeros(w.shape, dtype=torch.bool, device=device) for w in weights]
        stats = ops.update_masks(on_dev, tau, masks, row_max=row_max).cpu()
        assert all(bool(m.any(1).all()) for m in masks)
        # the ties of the integer layer may keep a few more, never fewer
        assert kept <= int(stats[:, 0].sum()) <= kept + weights[2].numel()
        assert int(stats[:, 0].sum()) == sum(int(m.sum()) for m in masks)


def _bn_net():
    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(
        nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)))
    with torch.no_grad():
        model[0].weight[0] *= 0.01  # channel 0 of the first layer falls under any threshold
        model[1].bias.fill_(0.1)  # so that its ReLU passes gradient
    return model


def _train(model, pruner, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        nn.functional.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()


@pytest.mark.parametrize("floor", [False, True], ids=["unguarded", "floor"])
def test_dead_channel_blows_up_without_the_floor_only(floor):
    model = _bn_net()
    pruner = dpf_ext.DPF(model, schedule=Constant(0.5), update_every=1000, channel_floor=floor,
                         watch=False)
    assert int(model[0].mask[0].sum()) == (1 if floor else 0)
    _train(model, pruner, 30)
    w = model[0].weight.detach().abs()
    channel, others = w[0].max().item(), w[1:].max().item()
    if floor:
        assert channel < 5 * others  # about 2x
    else:
        # BatchNorm's backward scales the dead channel's gradient by ~1/sqrt(eps), and
        # feedback hands it to the pruned dense weights: ~80x the others in 30 steps
        assert channel > 20 * others


def test_the_watch_warns_before_a_layer_is_emptied():
    model = _bn_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = dpf_ext.DPF(model, schedule=Constant(0.8), update_every=5, channel_floor=False)
        _train(model, pruner, 60)
    steps = lambda pattern: [int(re.match(r"step (\d+)", str(w.message)).group(1))  # noqa: E731
                             for w in caught if re.search(pattern, str(w.message))]
    watch, emptied = steps("signs of a feedback blow-up"), steps(r"layers \[.*\] are entirely pruned")
    assert emptied, "the unguarded run was expected to collapse"
    assert watch and watch[0] < emptied[0]
    first = next(str(w.message) for w in caught if "signs of" in str(w.message))
    assert "layer '0': output channels [0] are entirely pruned in front of '1'" in first


def test_the_floor_prevents_that_collapse():
    model = _bn_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the watch nor an emptied layer
        pruner = dpf_ext.DPF(model, schedule=Constant(0.8), update_every=5)
        _train(model, pruner, 60)
    rep = pruner.report()
    assert all(layer.kept >= layer.shape[0] for layer in rep.layers)
    assert rep.kept == pruner.target_kept


def test_the_watch_warns_of_a_weight_far_above_the_threshold():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4)))
    with torch.no_grad():
        model[2].weight[1, 3] = 1e4
    with pytest.warns(RuntimeWarning, match=r"layer '2': largest dense weight is \d+x the threshold"):
        dpf_ext.DPF(model, schedule=Constant(0.9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dpf_ext.DPF(model, schedule=Constant(0.9), watch=False)
        dpf_ext.DPF(model, schedule=Constant(0.3))  # the threshold is no yardstick this low


def test_an_unreachable_floor_names_the_highest_reachable_sparsity():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)))
    # 64 + 4 channels of 1280 + 256 weights: at most 1 - 68/1536 = 95.57% with the floor
    with pytest.raises(ValueError, match=r"highest reachable sparsity is 0\.955729"):
        dpf_ext.DPF(model, 0.97, total_steps=100)
    with pytest.raises(ValueError, match=r"\['0'\].*highest reachable layer sparsity is 0\.95"):
        dpf_ext.DPF(model, 0.97, total_steps=100, scope="layer")
    assert all(bool(m.mask.all()) for _, m in dpf_ext.nn.dpf_layers(model))  # nothing lost
    dpf_ext.DPF(model, 0.97, total_steps=100, channel_floor=False)  # the unguarded run may
    with pytest.raises(ValueError, match="filter scope"):
        dpf_ext.DPF(model, 0.5, total_steps=100, scope="filter", channel_floor=True)


def test_the_fused_optimizer_records_the_rows_for_the_floor(monkeypatch):
    model = _bn_net()
    pruner = dpf_ext.DPF(model, schedule=Constant(0.8), update_every=2)
    opt = dpf_ext.DPFSGD(model.parameters(), lr=0.05, pruner=pruner)
    requests = []
    ask = pruner.histogram_request
    monkeypatch.setattr(pruner, "histogram_request", lambda: requests.append(ask()) or requests[-1])
    pruner.step()
    x = torch.randn(32, 16)
    nn.functional.cross_entropy(model(x), x[:, :3].argmax(1)).backward()
    opt.step()  # the step before an update: the optimizer fills the pruner's request
    (request,) = requests
    assert request is not None and request.complete and len(request.row_max) == 3
    expected = new_row_max([m.weight for _, m in dpf_ext.nn.dpf_layers(model)])
    ops.magnitude_histogram([m.weight for _, m in dpf_ext.nn.dpf_layers(model)], row_max=expected)
    for got, exp in zip(request.row_max, expected):
        assert torch.equal(got, exp)
    pruner.step()
    assert all(bool(m.mask.any(1).all()) for _, m in dpf_ext.nn.dpf_layers(model))


def test_feedback_clip_bounds_the_pruned_gradient_only():
    model = dpf_ext.sparsify(nn.Linear(6, 4, bias=False))
    pruner = dpf_ext.DPF(model, schedule=Constant(0.5), feedback_clip=0.5)
    upstream = torch.randn(16, 4) * 100
    x = torch.randn(16, 6)
    (model(x) * upstream).sum().backward()
    got = model.weight.grad.clone()
    full = upstream.t() @ x  # the straight-through gradient
    mask = model.mask
    bound = 0.5 * full[mask].abs().max()
    assert torch.equal(got[mask], full[mask])
    assert torch.allclose(got[~mask], full[~mask].clamp(-bound, bound))
    assert (full[~mask].abs() > bound).any()  # the clip did something
    pruner.freeze()  # masked gradient: no feedback to clip
    model.weight.grad = None
    (model(x) * upstream).sum().backward()
    assert torch.equal(model.weight.grad[~mask], torch.zeros_like(full[~mask]))
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="feedback_clip"):
            dpf_ext.DPF(model, schedule=Constant(0.5), feedback_clip=bad)


@pytest.mark.parametrize("floor", [True, False], ids=["floor", "unguarded"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_the_floor_and_the_watch_cost_no_extra_pass(floor, scope, monkeypatch):
    model = _bn_net()
    pruner = dpf_ext.DPF(model, schedule=Constant(0.5), threshold="approx", scope=scope,
                         channel_floor=floor, watch=True)
    backend = ops.backend_for("cpu")
    passes = []
    original = backend.magnitude_histogram
    monkeypatch.setattr(backend, "magnitude_histogram",
                        lambda *args: passes.append(args[1]) or original(*args))
    pruner.update_masks()
    assert passes == [None] * (1 if scope == "global" else len(pruner.layers))  # first passes only
