"""The mask-choosing methods beside DPF: each rule on small hand-checked cases (which
positions drop and grow, counts, zero init, optimizer state reset, regrowth at once), the
budgets against a direct solve, constant sparsity, exact resume, a method written in this
file run through DPF, and bad input."""

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.budgets import ERK, Global, PerLayer, Uniform, erk_densities
from dpf_ext.methods import METHODS, Method, Recipe, make_method, method_options, register_method
from dpf_ext.methods.base import mask_of, select_top, unrecorded, write_masks
from dpf_ext.schedules import Constant


def linear(weight, mask=None):
    """A DPF Linear without bias holding ``weight``."""
    weight = torch.tensor(weight)
    layer = dpf_ext.sparsify(nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False)))
    with torch.no_grad():
        layer[0].weight.copy_(weight)
    return layer


def set_state(model, weight, mask):
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weight))
        model[0].mask.copy_(torch.tensor(mask))


def grow_step(model, optimizer, pruner, gradient):
    """One step whose dense gradient (with respect to ``mask ⊙ w``) is ``gradient``."""
    (model[0].masked_weight() * torch.tensor(gradient)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    pruner.step()


W = [[0.9, -0.1, 0.5, 0.0], [0.2, -0.8, 0.05, 0.3]]
M = [[True, True, False, False], [False, True, False, True]]
G = [[0.01, 5.0, 0.02, 0.03], [0.04, 0.05, -4.0, 0.06]]


def rigl(model, optimizer, **kwargs):
    # drop fraction 0.6 at step 1 of 10: 0.3 * (1 + cos(pi / 10)) = 0.585 of 4 active -> 2
    return dpf_ext.Pruner(model, "rigl", 0.5,
                       update_every=1, end_step=10, budget="uniform", optimizer=optimizer, **kwargs, drop_fraction=0.6)


def test_rigl_drops_the_smallest_and_grows_the_largest_gradients():
    model = linear(W)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    pruner = rigl(model, optimizer)
    set_state(model, W, M)
    grow_step(model, optimizer, pruner, G)
    # dropped: -0.1 (0,1) and 0.3 (1,3), the smallest active; grown: the largest |g| among
    # the rest: (0,1), just dropped (regrown at once, keeps -0.1), and (1,2), new (starts 0)
    assert model[0].mask.tolist() == [[True, True, False, False], [False, True, True, False]]
    assert torch.equal(model[0].weight, torch.tensor([[0.9, -0.1, 0.0, 0.0], [0.0, -0.8, 0.0, 0.0]]))
    row = pruner.report().layers[0]
    assert (row.kept, row.reactivated_last, row.regrown_last, row.dropped_last) == (4, 1, 1, 1)
    assert pytest.approx(pruner.method.drop_fraction_at(1)) == 0.3 * (1 + math.cos(math.pi / 10))


@pytest.mark.parametrize("make_optimizer, keys", [
    (lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9), ["momentum_buffer"]),
    (lambda p: torch.optim.AdamW(p, lr=0.0, amsgrad=True), ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]),
    (lambda p: dpf_ext.DPFSGD(p, lr=0.0, momentum=0.9), ["momentum_buffer"]),
])
def test_rigl_resets_the_optimizer_state_of_new_weights_only(make_optimizer, keys):
    model = linear(W)
    optimizer = make_optimizer(model.parameters())
    pruner = rigl(model, optimizer)
    set_state(model, W, M)
    (model[0].masked_weight() * torch.tensor(G)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    for key in keys:
        optimizer.state[model[0].weight][key].fill_(1.0)
    pruner.step()
    new = torch.tensor([[False, False, False, False], [False, False, True, False]])
    for key in keys:
        state = optimizer.state[model[0].weight][key]
        assert torch.equal(state == 0, new), key  # (0,1), regrown at once, keeps its state


def test_rigl_breaks_ties_at_random_and_keeps_the_count():
    # every gradient is 0 (a dead unit): growth draws among the ties, seeded
    grown = []
    for seed in (0, 0, 1, 2, 3, 4):
        model = linear(W)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = rigl(model, optimizer, seed=seed)
        set_state(model, W, M)
        grow_step(model, optimizer, pruner, torch.zeros(2, 4).tolist())
        assert int(model[0].mask.sum()) == 4
        grown.append(model[0].mask.clone())
    assert torch.equal(grown[0], grown[1])  # the same seed: the same draw
    assert len({tuple(g.flatten().tolist()) for g in grown}) > 1  # drawn, not taken in order


def test_set_grows_at_random_positions_with_zero_weights():
    masks = []
    for seed in (0, 0, 1, 2):
        model = linear(W)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        pruner = dpf_ext.Pruner(model, "set", 0.5,
                             update_every=1, end_step=10, optimizer=optimizer, seed=seed, drop_fraction=0.6)
        set_state(model, W, M)
        optimizer.step()
        pruner.step()  # no gradient needed
        mask = model[0].mask
        assert int(mask.sum()) == 4 and mask[0, 0] and mask[1, 1]  # the two largest stay
        was = torch.tensor(M)
        assert (model[0].weight[mask & ~was] == 0).all()
        masks.append(mask.clone())
    assert torch.equal(masks[0], masks[1])
    assert any(not torch.equal(masks[0], m) for m in masks[2:])


def test_redistribution_shares_caps_and_respreads():
    from dpf_ext.methods.sparse_momentum import redistribute

    assert redistribute(60, [0.5, 0.3, 0.2], [10, 100, 100]) == [10, 30, 20]
    assert redistribute(3, [0.25, 0.75], [3, 3]) == [1, 2]  # largest remainder: 0.75 vs 0.25
    assert redistribute(10, [0.9, 0.1], [2, 3]) == [2, 3]  # more than all caps: all of them
    assert sum(redistribute(7, [1 / 3] * 3, [5, 5, 5])) == 7


def test_sparse_momentum_regrows_by_layer_momentum():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(1, 4, bias=False)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    pruner = dpf_ext.Pruner(model, "snfs", 0.5, update_every=1, total_steps=10,
                         optimizer=optimizer, prune_rate=0.5, final_prune_rate=0.5)
    a, b = model[0], model[1]
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.9, -0.1, 0.5, 0.2]]))
        a.mask.copy_(torch.tensor([[True, True, True, False]]))
        b.weight.copy_(torch.tensor([[0.3], [0.05], [0.0], [0.0]]))
        b.mask.copy_(torch.tensor([[True], [True], [False], [False]]))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.state[a.weight]["momentum_buffer"].copy_(torch.tensor([[1.0, 1.0, 0.0, 8.0]]))
    optimizer.state[b.weight]["momentum_buffer"].copy_(torch.tensor([[2.0], [2.0], [3.0], [0.1]]))
    pruner.step()
    # dropped: ceil(0.5 * 3) = 2 of a (-0.1, 0.5) and ceil(0.5 * 2) = 1 of b (0.05); mean
    # momentum over the active weights: a 2/3, b 2, so b regrows 3/4 of the 3: a 1, b 2;
    # each at its largest momentum among the positions not kept
    assert a.mask.view(-1).tolist() == [True, False, False, True]
    assert b.mask.view(-1).tolist() == [True, True, True, False]
    assert b.weight.view(-1).tolist() == pytest.approx([0.3, 0.05, 0.0, 0.0])  # (1) regrown at once
    rows = pruner.report().layers
    assert [(r.kept, r.reactivated_last, r.regrown_last) for r in rows] == [(2, 1, 0), (3, 1, 1)]


@pytest.mark.parametrize("prune_target, threshold", [(1, 5e-4), (2, 1e-3), (10, 2e-3)])
def test_dsr_prunes_under_its_threshold_and_adapts_it(prune_target, threshold):
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(8, 1, bias=False), nn.Linear(1, 8, bias=False)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = dpf_ext.Pruner(model, "dsr", 0.5, update_every=1, prune_target=prune_target)
    a, b = model[0], model[1]
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.5, 0.0005, 0.002, -0.0001, 0.3, 0.0, 0.0, 0.0]]))
        a.mask.copy_(torch.tensor([[True] * 5 + [False] * 3]))
        b.weight.copy_(torch.tensor([[0.4], [-0.2]] + [[0.0]] * 6))
        b.mask.copy_(torch.tensor([[True], [True]] + [[False]] * 6))
    optimizer.step()
    pruner.step()
    # pruned: |w| < 1e-3, (0,1) and (0,3) of a; 2 weights regrow, shared by the survivors
    # (a 3, b 2: 1.2 and 0.8, so one each) at positions empty before the update
    assert a.mask[0, [0, 2, 4]].all() and not a.mask[0, [1, 3]].any()
    assert int(a.mask[0, 5:].sum()) == 1 and b.mask[:2].all() and int(b.mask[2:].sum()) == 1
    # 2 pruned against a target of 1: halved; of 2: kept; of 10: doubled
    assert pruner.state_dict()["method"]["threshold"] == pytest.approx(threshold)
    assert pruner.report().reactivated_last == 2 and pruner.report().dropped_last == 2


def test_dsr_rewires_on_its_period_schedule():
    model = dpf_ext.sparsify(_mlp())
    pruner = dpf_ext.Pruner(model, "dsr", 0.8, periods={0: 2, 6: 3})
    due = [step for step in range(1, 13) if pruner.method.due(step, pruner.update_every)]
    assert due == [2, 4, 6, 9, 12]


def test_deepr_steps_theta_and_keeps_each_layers_count():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(10, 1, bias=False)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = dpf_ext.Pruner(model, "deepr", 0.7, optimizer=optimizer, l1=1.0, noise=0.0)
    layer = model[0]
    active = layer.mask.view(-1).nonzero().view(-1)
    signs = layer.weight.view(-1)[active].sign()  # the fixed signs the first masks took
    with torch.no_grad():
        layer.weight.view(-1)[active] = signs * torch.tensor([0.05, 0.5, 0.2])
    pruner.step()  # theta - lr * l1: 0.05 -> -0.05 (dormant), 0.5 -> 0.4, 0.2 -> 0.1
    w, m = layer.weight.view(-1), layer.mask.view(-1)
    assert int(m.sum()) == 3 and m[active[1:]].all()
    assert torch.allclose(w[active[1:]], signs[1:] * torch.tensor([0.4, 0.1]))
    (woken,) = (m & (w.abs() < 1e-6)).nonzero().view(-1).tolist() or [None]
    assert woken is not None and w[woken].abs().item() == pytest.approx(1e-12)
    assert all(w[i] == 0 for i in range(10) if not m[i])


def test_top_kast_forward_set_backward_set_and_penalty():
    model = linear([[0.9, -0.1, 0.5, 0.3, -0.05, 0.7]])
    pruner = dpf_ext.Pruner(model, "topkast", 4 / 6, extra=1 / 6, penalty=0.0)
    layer = model[0]
    assert layer.mask.tolist() == [[True, False, False, False, False, True]]  # A: 0.9, 0.7
    x = torch.ones(1, 6)
    torch.testing.assert_close(model(x), torch.tensor([[0.9 + 0.7]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    (layer.masked_weight() * g).sum().backward()
    # B = A and the next largest, 0.5: only B's weights get their gradient
    assert layer.weight.grad.tolist() == [[1.0, 0.0, 3.0, 0.0, 0.0, 6.0]]
    with_penalty = linear([[0.9, -0.1, 0.5, 0.3, -0.05, 0.7]])
    dpf_ext.Pruner(with_penalty, "topkast", 4 / 6, extra=1 / 6, penalty=0.1)
    (with_penalty[0].masked_weight() * 0).sum().backward()
    # 0.1 * w on A, 0.1 * w / D on B \ A (D = 1/3), nothing elsewhere
    torch.testing.assert_close(with_penalty[0].weight.grad,
                               torch.tensor([[0.09, 0.0, 0.15, 0.0, 0.0, 0.07]]))
    assert pruner.report().sparsity == pytest.approx(4 / 6)


def test_str_learns_a_threshold_and_its_sparsity_emerges():
    from dpf_ext.methods.soft_threshold import PARAMETER

    model = linear([[0.9, -0.1, 0.5, -0.3]])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)
    with pytest.raises(ValueError, match="str takes no target sparsity"):
        dpf_ext.Pruner(model, "str", 0.9, optimizer=optimizer)
    pruner = dpf_ext.Pruner(model, "str", optimizer=optimizer, initial_threshold=0.0)  # threshold sigmoid(0) = 0.5
    layer = model[0]
    s = getattr(layer, PARAMETER)
    assert optimizer.param_groups[-1]["params"] == [s] and optimizer.param_groups[-1]["weight_decay"] == 0.5
    x = torch.ones(1, 4)
    torch.testing.assert_close(model(x), torch.tensor([[0.4]]))  # only 0.9 - 0.5 passes
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (layer.masked_weight() * g).sum().backward()
    # d/dw: 1 above the threshold (0.9); d/ds = -sigmoid'(0) * sign(0.9) * 1 = -0.25
    assert layer.weight.grad.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert s.grad.item() == pytest.approx(-0.25)
    assert pruner.report().layers[0].kept == 1  # |w| > 0.5: the sparsity is what it keeps
    pruner.finalize(unwrap=True)
    assert not hasattr(layer, PARAMETER)
    assert torch.allclose(layer.weight, torch.tensor([[0.4, 0.0, 0.0, 0.0]]))


def test_snip_keeps_the_largest_connection_sensitivity():
    w = [[1.0, -2.0, 0.5], [0.1, 3.0, -1.0]]
    g = torch.tensor([[0.1, 0.1, 4.0], [10.0, -0.01, 0.2]])
    # |g w| = [[0.1, 0.2, 2.0], [1.0, 0.03, 0.2]]: the two largest are (0,2) and (1,0)
    model = linear(w)
    pruner = dpf_ext.Pruner(model, "snip", 4 / 6, batch_loss=lambda m: (m[0].masked_weight() * g).sum())
    assert model[0].mask.tolist() == [[False, False, True], [True, False, False]]
    assert model[0].weight[~model[0].mask].abs().sum() == 0  # pruned weights zeroed
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        pruner.step()
    assert model[0].mask.tolist() == [[False, False, True], [True, False, False]]  # fixed


def test_snip_puts_normalisation_in_inference_mode_and_restores_it():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    modes = []

    def loss(m):
        modes.append(m.training)
        return m(torch.randn(16, 4)).pow(2).sum()

    dpf_ext.Pruner(model, "snip", 0.5, batch_loss=loss)
    assert modes == [False] and model.training


def test_static_masks_follow_the_budget_and_never_change():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    model = dpf_ext.sparsify(net)
    pruner = dpf_ext.Pruner(model, "static", 0.9, seed=3)
    shapes = [tuple(layer.weight.shape) for _, layer in pruner.layers]
    groups = ERK().split(pruner.names, shapes, 0.9)
    assert [int(layer.mask.sum()) for _, layer in pruner.layers] == [k for _, k in groups]
    first = [layer.mask.clone() for _, layer in pruner.layers]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        optimizer.step()
        pruner.step()
    assert all(torch.equal(a, layer.mask) for a, (_, layer) in zip(first, pruner.layers))
    other = dpf_ext.Pruner(dpf_ext.sparsify(copy.deepcopy(net)), "static", 0.9, seed=4)
    assert any(not torch.equal(a, layer.mask) for a, (_, layer) in zip(first, other.layers))


def _direct_erk(shapes, density):
    """Densities min(1, eps * raw) with eps found by bisection: the water-filling solution
    the re-solve loop must reach."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    lo, hi = 0.0, 1e9
    for _ in range(200):
        eps = (lo + hi) / 2
        kept = sum(min(1.0, eps * r) * n for r, n in zip(raw, sizes))
        lo, hi = (eps, hi) if kept < density * sum(sizes) else (lo, eps)
    return [min(1.0, eps * r) for r in raw]


@pytest.mark.parametrize("density", [0.5, 0.2, 0.05])
def test_erk_densities_match_a_direct_solve(density):
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (10, 64), (3, 2)]
    got = erk_densities(shapes, density)
    assert got == pytest.approx(_direct_erk(shapes, density), rel=1e-6)
    assert sum(d * math.prod(s) for d, s in zip(got, shapes)) == pytest.approx(
        density * sum(map(math.prod, shapes)))
    assert got[-1] == 1.0  # the tiny layer is dense: the re-solve was needed
    assert max(got) <= 1.0


def test_budgets_split_the_target():
    names, shapes = ["a", "b", "c"], [(10, 10), (20, 5), (4, 25)]
    assert Global().split(names, shapes, 0.9) == [([0, 1, 2], 30)]
    assert Uniform().split(names, shapes, 0.9) == [([0], 10), ([1], 10), ([2], 10)]
    per = PerLayer({"a": 0.0}, rest=Uniform()).split(names, shapes, 0.5)
    assert per == [([0], 100), ([1], 50), ([2], 50)]
    with pytest.raises(ValueError, match=r"\['z\*'\] match no prunable layer"):
        PerLayer({"z*": 0.5}).split(names, shapes, 0.5)
    with pytest.raises(ValueError, match=r"sparsity of 'a'"):
        PerLayer({"a": 1.5})


def test_dpf_with_the_erk_budget_keeps_each_layers_count():
    model = dpf_ext.sparsify(_mlp())
    pruner = dpf_ext.DPF(model, schedule=Constant(0.8), budget="erk", channel_floor=False)
    shapes = [tuple(layer.weight.shape) for _, layer in pruner.layers]
    expected = [k for _, k in ERK().split(pruner.names, shapes, 0.8)]
    assert [int(layer.mask.sum()) for _, layer in pruner.layers] == expected
    assert len(set(r.sparsity for r in pruner.report().layers)) == 3  # ERK: not uniform
    with pytest.raises(ValueError, match="fewer than its 3 layers: no distribution reaches it"):
        ERK().split(["a", "b", "c"], [(2, 2)] * 3, 0.9)


def test_select_top_is_exact_under_ties():
    g = torch.Generator().manual_seed(0)
    scores = [torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 2.0])]
    chosen = select_top(scores, 4, g)  # 3 and 2, then two of the four 1.0s
    assert sum(c.numel() for c in chosen) == 4
    assert 0 in chosen[0].tolist() and 1 in chosen[1].tolist() and 4 not in chosen[0].tolist()
    draws = {tuple(sorted(c.tolist())) for _ in range(20) for c in select_top(scores, 4, g)[:1]}
    assert len(draws) > 1  # the ties are drawn, not taken in order
    # fewer positive scores than asked: the rest among the zeros that are not excluded
    zeros = [torch.tensor([0.0, 0.5, 0.0, 0.0])]
    for _ in range(10):
        (c,) = select_top(zeros, 3, g, excluded=[torch.tensor([0])])
        assert sorted(c.tolist())[0] != 0 and 1 in c.tolist() and c.numel() == 3
    (c,) = select_top([torch.tensor([1e-40, 2e-40, 0.0, 3.0])], 3, g)  # denormals
    assert sorted(c.tolist()) == [0, 1, 3]
    with pytest.raises(ValueError, match="non-finite"):
        select_top([torch.tensor([1.0, float("nan")])], 1, g)


@pytest.mark.parametrize("n, k", [(1000, 1), (1000, 999), (50_000, 4321), (7, 7), (400_000, 150_000)])
def test_select_top_matches_a_sort(n, k):
    g = torch.Generator().manual_seed(n + k)
    scores = [torch.rand(n // 3, generator=g), torch.randn(n - n // 3, generator=g).abs() * 3]
    chosen = select_top(scores, k, g)
    got = torch.cat([s[c] for s, c in zip(scores, chosen)]).sort().values
    expected = torch.cat(scores).topk(k).values.sort().values
    assert torch.equal(got, expected)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        x = torch.randn(16, 12, generator=g)
        out.append((x, (x[:, :3]).argmax(1)))
    return out


def _build(method, model, optimizer, total, **settings):
    x, y = _data(1)[0]
    options = {"batch_loss": lambda m: nn.functional.cross_entropy(m(x), y)} if method == "snip" else {}
    sparsity = 0.8 if METHODS[method] is not dpf_ext.methods.STR else None  # str takes none
    return dpf_ext.Pruner(model, method, sparsity, total_steps=total,
                       update_every=1 if method in ("deepr", "str") else 3, optimizer=optimizer,
                       seed=1, **options, **settings)


def _train(method, data, start=0, state=None, total=24, **settings):
    model = dpf_ext.sparsify(_mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = _build(method, model, optimizer, total, **settings)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        pruner.load_state_dict(state["pruner"])
    kept, snapshot = [], None
    for i, (x, y) in enumerate(data[start:], start=start):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        kept.append([int(layer.mask.sum()) for _, layer in pruner.layers])
        if i == 10:
            snapshot = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "pruner": pruner.state_dict()})
    return model, pruner, kept, snapshot


SPARSE_FROM_SCRATCH = ["rigl", "set", "snip", "static", "snfs", "dsr", "deepr", "topkast"]
REWIRING = ["rigl", "set", "snfs", "dsr", "deepr", "topkast"]


@pytest.mark.filterwarnings("ignore::dpf_ext.nn.UnfinalizedWarning")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_resumes_exactly(method):
    data = _data(24)
    model, pruner, kept, snapshot = _train(method, data)
    resumed, resumed_pruner, _, _ = _train(method, data, start=11, state=snapshot)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b), method
    assert pruner.report().to_dict() == resumed_pruner.report().to_dict()
    if method in SPARSE_FROM_SCRATCH:  # constant sparsity at every step (snfs: in total)
        per_layer = method not in ("snfs", "dsr")
        assert all((k == kept[0]) if per_layer else (sum(k) == sum(kept[0])) for k in kept), method
        assert abs(pruner.report().sparsity - 0.8) < 0.01
    if method in REWIRING:  # masks changed: dropped and grown weights
        assert pruner.report().reactivated_total > 0


class KeepLargestPerRow(Method):
    """A method written by a user: keep the largest weights of every row."""

    name = "per_row"

    def update(self, u):
        new = []
        for w in u.weights:
            k = max(1, round((1 - u.sparsity) * w.shape[1]))
            top = w.abs().topk(k, dim=1).indices
            new.append(torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True))
        return write_masks(u, new)


def test_a_method_in_one_file_runs_through_the_controller_and_the_cli(capsys):
    register_method("per_row", KeepLargestPerRow)
    try:
        model = dpf_ext.sparsify(_mlp())
        pruner = dpf_ext.Pruner(model, "per_row", 0.75, total_steps=20)
        assert pruner.report().sparsity == 0.0  # the cubic ramp starts dense
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in _data(20):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            pruner.step()
        assert all((layer.mask.sum(1) == layer.mask.shape[1] // 4).all() for _, layer in pruner.layers)
        from dpf_ext.app.cli import main

        assert main(["--method", "per_row", "--model", "mlp", "--epochs", "1", "--no-progress"]) == 0
        assert "per_row" in capsys.readouterr().out
    finally:
        METHODS.pop("per_row")


@dataclass(eq=False)
class LargestGradientOnce(Method):
    """A user's fixed-mask method with a loop input: keep the largest ``|g|`` of one batch
    (``batch_loss``, which dpf-train hands to a method with that option), never update."""

    name = "grad_once"
    recipe = Recipe("constant", fixed=True)
    batch_loss: Callable | None = unrecorded(None)

    def check(self, run):
        self.model = run.model

    def update(self, u):
        with torch.enable_grad():  # updates run under no_grad
            grads = torch.autograd.grad(self.batch_loss(self.model),
                                        [layer.dense_weight for layer in u.layers])
        scores = [g.abs() for g in grads]  # a Linear-only model: channels already first
        new = []
        for idx, k in u.groups():
            for i, chosen in zip(idx, select_top([scores[i] for i in idx], k, u.generator(idx[0]))):
                new.append(mask_of(u.weights[i], chosen))
        return write_masks(u, new)


def test_a_methods_options_are_its_fields_and_its_config_the_recorded_ones():
    @dataclass(eq=False)
    class Banded(Method):
        name = "banded"
        low: float = 0.1
        high: float = 0.9
        verbose: bool = unrecorded(False)

        def update(self, u):
            return write_masks(u, [(w.abs() >= self.low) & (w.abs() <= self.high)
                                   for w in u.weights])

    method = Banded(0.2, verbose=True)
    assert method.config() == {"low": 0.2, "high": 0.9}
    register_method("banded", Banded)
    try:
        assert method_options("banded") == ["low", "high", "verbose"]
        model = dpf_ext.sparsify(_mlp())
        saved = dpf_ext.Pruner(model, "banded", 0.5, total_steps=10, low=0.01).state_dict()
        other = dpf_ext.Pruner(dpf_ext.sparsify(_mlp()), "banded", 0.5, total_steps=10, low=0.02)
        with pytest.raises(ValueError, match="low"):
            other.load_state_dict(saved)  # a recorded option differs: another run
        quiet = dpf_ext.Pruner(dpf_ext.sparsify(_mlp()), "banded", 0.5, total_steps=10,
                               low=0.01, verbose=True)
        quiet.load_state_dict(saved)  # an unrecorded one may differ
    finally:
        METHODS.pop("banded")


def test_a_fixed_mask_method_with_a_loop_input_is_one_class(tmp_path, capsys):
    from dpf_ext.app.cli import main

    register_method("grad_once", LargestGradientOnce)
    try:
        x, y = _data(1)[0]
        model = dpf_ext.sparsify(_mlp())
        pruner = dpf_ext.Pruner(model, "grad_once", 0.75,
                                batch_loss=lambda m: nn.functional.cross_entropy(m(x), y))
        assert pruner.end_step == 0 and abs(pruner.sparsity() - 0.75) < 0.01
        state = pruner.state_dict()
        again = dpf_ext.Pruner(model, "grad_once", 0.75, batch_loss=lambda m: m(x).sum(),
                               replace=True)
        again.load_state_dict(state)
        out = tmp_path / "runs"
        args = ["--model", "mlp", "--epochs", "1", "--no-progress", "--out", str(out)]
        assert main([*args, "--compare", "dense,grad_once"]) == 0
        assert "grad_once" in capsys.readouterr().out
        assert main([*args, "--method", "grad_once", "--resume"]) == 0
        with pytest.raises(SystemExit):
            main([*args, "--method", "grad_once", "--updates-until", "0.5"])
        assert "grad_once fix their masks by design" in capsys.readouterr().err
    finally:
        METHODS.pop("grad_once")


def test_bad_input_is_a_clear_error_before_training():
    model = dpf_ext.sparsify(_mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masks = [layer.mask.clone() for _, layer in dpf_ext.nn.dpf_layers(model)]
    with pytest.raises(ValueError, match=r"unknown method 'rig'; choose from \[.*'rigl'"):
        dpf_ext.Pruner(model, "rig", 0.9, total_steps=10)
    with pytest.raises(ValueError, match=r"takes no option \['drop'\]; its options are \['drop_fraction'\]"):
        make_method("rigl", drop=0.3)
    with pytest.raises(ValueError, match="snip scores the weights on one batch"):
        dpf_ext.Pruner(model, "snip", 0.9)
    with pytest.raises(ValueError, match="pass optimizer="):
        dpf_ext.Pruner(model, "rigl", 0.9, total_steps=10)
    with pytest.raises(TypeError, match="RMSprop"):
        dpf_ext.Pruner(model, "rigl", 0.9, total_steps=10,
                    optimizer=torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="end_step"):
        dpf_ext.Pruner(model, "rigl", 0.9, optimizer=optimizer)
    with pytest.raises(ValueError, match=r"'rigl' takes no option \['scope'\]"):
        dpf_ext.Pruner(model, "rigl", 0.9, scope="filter", total_steps=10, optimizer=optimizer)
    with pytest.raises(ValueError, match="SGD with momentum=0 keeps none"):
        dpf_ext.Pruner(model, "snfs", 0.9, total_steps=10, update_every=5, optimizer=optimizer)
    with pytest.raises(ValueError, match="pass update_every=: snfs has no default period"):
        dpf_ext.Pruner(model, "snfs", 0.9, total_steps=10,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match="drop_fraction"):
        make_method("rigl", drop_fraction=1.5)
    with pytest.raises(ValueError, match="unknown budget 'erk2'"):
        dpf_ext.Pruner(model, "static", 0.9, budget="erk2")
    assert all(torch.equal(a, layer.mask) for a, (_, layer) in zip(masks, dpf_ext.nn.dpf_layers(model)))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_layers_whose_channels_are_not_dim_0(method):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(transformers.pytorch_utils.Conv1D(8, 6), nn.ReLU(),
                                           transformers.pytorch_utils.Conv1D(4, 8)))
    assert all(layer.channel_dim == 1 for _, layer in dpf_ext.nn.dpf_layers(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 6)
    options = {"batch_loss": lambda m: m(x).pow(2).mean()} if method == "snip" else {}
    pruner = dpf_ext.Pruner(model, method, None if method == "str" else 0.5, total_steps=8, update_every=1,
                         optimizer=optimizer, **options)
    kept = []
    for _ in range(4):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        kept.append(pruner.report().kept)
    if method in SPARSE_FROM_SCRATCH:
        assert len(set(kept)) == 1, kept


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_a_run_too_short_for_an_update_warns_and_names_the_fix(method):
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(8, 8)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"masks never change in this run.*update_every=100"
                                         r".*--update-every"):
        dpf_ext.Pruner(model, method, 0.5, total_steps=40, optimizer=optimizer)
    with warnings.catch_warnings():  # a period that fits: no warning
        warnings.simplefilter("error")
        dpf_ext.Pruner(model, method, 0.5, total_steps=40, update_every=10,
                    optimizer=optimizer, replace=True)
        dpf_ext.Pruner(model, "static", 0.5, total_steps=40, replace=True)  # fixed by design


def test_gradual_prunes_every_layer_to_the_target_and_global_is_dpf_without_feedback():
    """Zhu & Gupta's rule: each layer at the schedule's sparsity; budget="global" gives one
    threshold over all layers, whose masks are DPF's for the same weights."""
    def model():
        torch.manual_seed(0)
        built = dpf_ext.sparsify(nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 10)))
        with torch.no_grad():  # one threshold over both prunes the first layer most
            built[1].weight.mul_(10)
        return built

    per_layer = dpf_ext.Pruner(model(), "gradual", 0.6, schedule=Constant(0.6))
    assert per_layer.budget.name == "uniform"
    assert [int((~layer.mask).sum()) for _, layer in per_layer.layers] == [360, 180]  # 60% each
    masks = {}
    for method in ("gradual", "dpf"):
        pruner = dpf_ext.Pruner(model(), method, 0.6, schedule=Constant(0.6), budget="global",
                                **({"channel_floor": False} if method == "dpf" else {}))
        masks[method] = [layer.mask.clone() for _, layer in pruner.layers]
    assert all(torch.equal(a, b) for a, b in zip(masks["gradual"], masks["dpf"]))
    assert float(1 - masks["gradual"][0].float().mean()) > 0.8  # the small weights go first


def test_the_pruner_runs_a_method_under_its_own_name_and_dpf_is_its_preset():
    model = dpf_ext.sparsify(_mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = dpf_ext.Pruner(model, "rigl", 0.9, total_steps=400, optimizer=optimizer)
    assert rigl.method.name == "rigl" and rigl.report().method == "rigl"
    assert rigl.state_dict()["config"]["method"] == "rigl" and not isinstance(rigl, dpf_ext.DPF)
    assert (rigl.update_every, rigl.end_step, rigl.budget.name) == (100, 300, "erk")  # its recipe
    with pytest.raises(ValueError, match="already managed by another pruner"):
        dpf_ext.DPF(model, 0.9, total_steps=400)
    dpf = dpf_ext.DPF(model, 0.9, total_steps=400, replace=True)
    assert isinstance(dpf, dpf_ext.Pruner) and dpf.method.name == "dpf"
    assert dpf.update_every == 16 and dpf.schedule.final == 0.9
    gradual = dpf_ext.Pruner(dpf_ext.sparsify(_mlp()), "gradual", 0.9, total_steps=400)
    assert gradual.method.name == "gradual" and "gradual" in str(gradual.report())
    with pytest.raises(ValueError, match="needs the target sparsity: pass sparsity="):
        dpf_ext.Pruner(dpf_ext.sparsify(_mlp()), "static")
