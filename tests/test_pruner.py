"""The DPF controller: feedback, schedules in force, exact sparsity, scopes, resume,
finalize and bad input."""

import copy
import warnings

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.schedules import Constant, Cubic, OneShot


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(20, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(32, 20, generator=g)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def train_steps(model, pruner, optimizer, data, after_step=None):
    for x, y in data:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
        if after_step is not None:
            after_step()


def watch_masks(model, check):
    """An ``after_step`` callback calling ``check(layer, old_mask, new_mask)`` per layer."""
    prev = [masks_of(model)]

    def after_step():
        now = masks_of(model)
        for (_, layer), old, new in zip(dpf_ext.nn.dpf_layers(model), prev[0], now):
            check(layer, old, new)
        prev[0] = now

    return after_step


def setup(seed=0, **pruner_kwargs):
    model = dpf_ext.sparsify(mlp(seed))
    pruner_kwargs.setdefault("update_every", 4)
    pruner = dpf_ext.DPF(model, **pruner_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return model, pruner, opt


def masks_of(model):
    return [m.mask.clone() for _, m in dpf_ext.nn.dpf_layers(model)]


def test_feedback_brings_pruned_weights_back_with_their_dense_values():
    model, pruner, opt = setup(sparsity=0.8, total_steps=200)
    seen = {"came_back_nonzero": 0}

    def check(layer, old, new):
        # a reactivated weight resumes from its dense value, not from zero
        seen["came_back_nonzero"] += int((layer.weight.detach()[new & ~old] != 0).sum())

    train_steps(model, pruner, opt, batches(200), watch_masks(model, check))
    rep = pruner.report()
    assert rep.reactivated_total > 0
    assert seen["came_back_nonzero"] == rep.reactivated_total
    assert abs(rep.sparsity - 0.8) < 1e-3


def test_pruned_weights_keep_receiving_gradient_under_dpf():
    model, pruner, opt = setup(schedule=Constant(0.7))
    layer = model[0]
    pruned = ~layer.mask
    before = layer.weight.detach().clone()
    train_steps(model, pruner, opt, batches(3))  # no mask update within 3 steps
    assert (layer.weight.detach()[pruned] != before[pruned]).all()


def test_no_feedback_pruned_weights_stay_zero_and_never_return():
    model, pruner, opt = setup(sparsity=0.8, total_steps=200, feedback=False)

    def check(layer, old, new):
        assert not (new & ~old).any()  # the mask only shrinks
        if pruner.step_count % pruner.update_every == 0:
            assert (layer.weight.detach()[~new] == 0).all()  # pruned weights are zero

    train_steps(model, pruner, opt, batches(200), watch_masks(model, check))
    assert pruner.report().reactivated_total == 0
    assert abs(pruner.sparsity() - 0.8) < 1e-3


def test_stale_mask_is_used_between_updates():
    model, pruner, opt = setup(schedule=Constant(0.5), update_every=10)
    snapshots = []
    train_steps(model, pruner, opt, batches(9), lambda: snapshots.append(masks_of(model)))
    for snap in snapshots:  # no update in steps 1..9: the step-0 mask stays in force
        assert all(torch.equal(a, b) for a, b in zip(snap, snapshots[0]))
    # while the dense weights moved enough that a fresh threshold would give another mask
    fresh = dpf_ext.DPF(copy.deepcopy(model), schedule=Constant(0.5))
    assert any(not torch.equal(a, b) for a, b in zip(masks_of(fresh.model), snapshots[0]))


def test_masks_update_on_the_period_and_at_the_schedules_end_only():
    model, pruner, opt = setup(sparsity=0.9, total_steps=100, update_every=8)
    assert pruner.schedule.final_step == 75
    changes = []
    prev = masks_of(model)
    for step, (x, y) in enumerate(batches(100), start=1):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        now = masks_of(model)
        if any(not torch.equal(a, b) for a, b in zip(prev, now)):
            changes.append(step)
        prev = now
    assert changes and all(s % 8 == 0 or s == 75 for s in changes)
    assert 75 in changes


@pytest.mark.filterwarnings("ignore:.*entirely pruned")
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.94, 0.99])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("floor", [True, False], ids=["floor", "no-floor"])
def test_exact_sparsity_after_an_update(sparsity, scope, floor):
    # with the floor, 0.99 is out of reach (tested below) and 0.94 forces weights
    if floor and sparsity == 0.99:
        pytest.skip("below the channel floor's minimum")
    model, pruner, _ = setup(schedule=Constant(sparsity), scope=scope, channel_floor=floor)
    layers = dpf_ext.nn.dpf_layers(model)
    if scope == "global":
        n = sum(m.weight.numel() for _, m in layers)
        expected = [n - round(sparsity * n)]
        kept = [sum(int(m.mask.sum()) for _, m in layers)]
    else:
        expected = [max(m.weight.numel() - round(sparsity * m.weight.numel()), 1) for _, m in layers]
        kept = [int(m.mask.sum()) for _, m in layers]
    assert kept == expected
    assert pruner.report().kept == pruner.target_kept == sum(expected)


def test_ties_at_the_threshold_are_all_kept():
    model = dpf_ext.sparsify(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model.weight.copy_(torch.arange(100).reshape(10, 10) // 10)  # ten copies of 0..9
    pruner = dpf_ext.DPF(model, schedule=Constant(0.55), channel_floor=False)
    # target: keep 45 (values 5.5 and up would be 45 weights): tau = 5, and all ten 5s stay
    assert pruner.target_kept == 45
    assert int(model.mask.sum()) == 50
    assert pruner.report().kept - pruner.target_kept == 5


def test_approx_mode_reports_its_error():
    model, pruner, _ = setup(schedule=Constant(0.7), threshold="approx")
    rep = pruner.report()
    assert rep.kept >= pruner.target_kept
    n = rep.params
    assert 0 <= (rep.kept - pruner.target_kept) / n < 0.01


def test_filter_scope_prunes_whole_filters():
    model, pruner, _ = setup(schedule=Constant(0.5), scope="filter")
    filters_total = filters_kept = 0
    for _, layer in dpf_ext.nn.dpf_layers(model):
        rows = layer.mask.flatten(1)
        assert (rows.all(1) | ~rows.any(1)).all()  # each filter all kept or all pruned
        filters_total += rows.shape[0]
        filters_kept += int(rows.all(1).sum())
    assert filters_kept == pruner.target_kept == filters_total - round(0.5 * filters_total)


def test_oneshot_prunes_then_freezes():
    model, pruner, opt = setup(schedule=OneShot(0.8, at_step=5), feedback=False, freeze_at=5,
                               update_every=100)
    train_steps(model, pruner, opt, batches(4))
    assert all(m.all() for m in masks_of(model))
    train_steps(model, pruner, opt, batches(1))
    assert pruner.frozen and abs(pruner.sparsity() - 0.8) < 1e-3
    frozen = masks_of(model)
    train_steps(model, pruner, opt, batches(50))
    assert all(torch.equal(a, b) for a, b in zip(frozen, masks_of(model)))
    for _, layer in dpf_ext.nn.dpf_layers(model):
        assert not layer.feedback


def test_freeze_masks_the_gradient():
    model, pruner, opt = setup(schedule=Constant(0.6))
    pruner.freeze()
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    for _, layer in dpf_ext.nn.dpf_layers(model):
        assert (layer.weight.grad[~layer.mask] == 0).all()


def _run(steps_a, steps_b, checkpoint=False):
    data = batches(steps_a + steps_b, seed=7)
    model, pruner, opt = setup(sparsity=0.9, total_steps=steps_a + steps_b, update_every=5)
    train_steps(model, pruner, opt, data[:steps_a])
    if checkpoint:
        state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                               "pruner": pruner.state_dict()})
        model, pruner, opt = setup(seed=123, sparsity=0.9, total_steps=steps_a + steps_b,
                                   update_every=5)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pruner.load_state_dict(state["pruner"])
    train_steps(model, pruner, opt, data[steps_a:])
    return model, pruner


def test_resume_continues_exactly():
    straight, p1 = _run(23, 40)
    resumed, p2 = _run(23, 40, checkpoint=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert p1.step_count == p2.step_count == 63
    assert torch.equal(p1.reactivated_total, p2.reactivated_total)
    assert p1.report().to_dict() == p2.report().to_dict()


def test_state_dict_carries_the_warm_start():
    model, pruner, opt = setup(sparsity=0.9, total_steps=40, update_every=5)
    train_steps(model, pruner, opt, batches(12))
    saved = pruner.state_dict()
    assert saved["method"]["warm_start"]["taus"] is not None
    _, other, _ = setup(seed=1, sparsity=0.9, total_steps=40, update_every=5)
    assert other.state_dict()["method"]["warm_start"] != saved["method"]["warm_start"]
    other.load_state_dict(copy.deepcopy(saved))
    assert other.state_dict()["method"]["warm_start"] == saved["method"]["warm_start"]


def test_load_state_dict_rejects_other_settings():
    _, pruner, _ = setup(sparsity=0.9, total_steps=100)
    _, other, _ = setup(sparsity=0.8, total_steps=100, scope="layer")
    with pytest.raises(ValueError, match="schedule.*budget|budget.*schedule"):
        other.load_state_dict(pruner.state_dict())


def test_finalize_loads_into_the_original_architecture():
    model, pruner, opt = setup(sparsity=0.9, total_steps=60)
    train_steps(model, pruner, opt, batches(60))
    x = torch.randn(16, 20)
    expected = model(x)
    sparsity = pruner.sparsity()
    plain = pruner.finalize(unwrap=True)
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in plain.modules())
    original = mlp(seed=99)
    original.load_state_dict(plain.state_dict())
    torch.testing.assert_close(original(x), expected)
    weights = [m.weight for m in original if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / sum(w.numel() for w in weights) == pytest.approx(sparsity)
    with pytest.raises(RuntimeError, match="finalized"):
        pruner.step()


def test_finalize_in_place_folds_masks():
    model, pruner, _ = setup(schedule=Constant(0.5))
    pruner.finalize()
    for _, layer in dpf_ext.nn.dpf_layers(model):
        assert (layer.weight[~layer.mask] == 0).all()


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.2])
def test_bad_sparsity_is_rejected(bad):
    model = dpf_ext.sparsify(mlp())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dpf_ext.DPF(model, bad, total_steps=10)


def test_non_finite_weights_raise_and_lose_nothing():
    for bad in (float("nan"), float("inf")):
        model, pruner, _ = setup(schedule=Constant(0.5))
        with torch.no_grad():
            model[2].weight[3, 4] = bad
        masks = masks_of(model)
        weights = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=r"non-finite.*'2'"):
            pruner.update_masks()
        assert all(torch.equal(a, b) for a, b in zip(masks, masks_of(model)))
        assert all(torch.equal(a, b, ) or (a.isnan() == b.isnan()).all()
                   for a, b in zip(weights, [p.detach() for p in model.parameters()]))


@pytest.mark.parametrize("method", ["static", "dpf-frozen"])
def test_a_run_gone_non_finite_is_reported_where_no_update_checks(method):
    # static never updates its masks; a frozen DPF pruner (retraining) neither
    torch.manual_seed(0)
    model = dpf_ext.sparsify(mlp())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if method == "static":
        pruner = dpf_ext.Pruner(model, "static", 0.5, check_every=5)
    else:
        pruner = dpf_ext.DPF(model, 0.5, total_steps=20, freeze_at=2, check_every=5)
    x = torch.randn(8, 20)
    for step in range(1, 5):
        model(x).sum().backward()
        optimizer.step()
        pruner.step()
        if step == 4:  # after the last update-free step before the check
            with torch.no_grad():
                kept = model[0].mask.nonzero()[0]
                model[0].weight[tuple(kept)] = float("nan")
    with pytest.raises(ValueError, match=r"at step 5: non-finite \(NaN or Inf\) weights in \['0'\]"):
        pruner.step()
    quiet = dpf_ext.Pruner(dpf_ext.sparsify(mlp()), "static", 0.5, check_every=None)
    with torch.no_grad():
        quiet.model[0].weight.fill_(float("nan"))
    for _ in range(200):
        quiet.step()  # never checks
    with pytest.raises(ValueError, match="check_every must be a positive int or None, got 0"):
        dpf_ext.Pruner(dpf_ext.sparsify(mlp()), "static", 0.5, check_every=0)


def test_a_layer_starved_by_a_shared_threshold_is_warned_of_once():
    def model():
        torch.manual_seed(0)
        built = dpf_ext.sparsify(nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40)))
        with torch.no_grad():
            built[1].weight.mul_(0.62)  # GPT-2's c_proj: a smaller scale than the others
        return built

    with pytest.warns(RuntimeWarning, match=r"budget 'global'\) keeps of these layers' weights "
                      r"only '1' .*its threshold keeps 20.00% of the 2 layers.*budget='erk'"):
        pruner = dpf_ext.DPF(model(), schedule=Constant(0.8), channel_floor=False)
    assert pruner.report().layers[1].kept < 0.02 * 1600
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruner.update_masks()  # once per layer
        dpf_ext.DPF(model(), schedule=Constant(0.8), budget="uniform")  # one threshold each
        dpf_ext.DPF(model(), schedule=Constant(0.3))  # 70% of the first, 60% of the second


@pytest.mark.parametrize("scope", ["global", "layer", "filter"])
def test_nan_is_caught_in_every_scope(scope):
    model = dpf_ext.sparsify(mlp())
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        dpf_ext.DPF(model, schedule=Constant(0.5), scope=scope)


def test_model_without_prunable_layer():
    with pytest.raises(ValueError, match="no prunable layer"):
        dpf_ext.DPF(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 0.5, total_steps=10)
    with pytest.raises(ValueError, match="sparsify"):
        dpf_ext.DPF(mlp(), 0.5, total_steps=10)  # plain layers: sparsify was not called


def test_integer_and_double_weights_are_rejected():
    model = dpf_ext.sparsify(nn.Linear(4, 4))
    model.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="int32"):
        dpf_ext.DPF(model, 0.5, total_steps=10)
    with pytest.raises(TypeError, match="float64"):
        dpf_ext.DPF(dpf_ext.sparsify(nn.Linear(4, 4).double()), 0.5, total_steps=10)


def test_bad_settings_are_rejected():
    model = dpf_ext.sparsify(mlp())
    with pytest.raises(ValueError, match="total_steps"):
        dpf_ext.DPF(model, 0.5)
    with pytest.raises(ValueError, match="scope"):
        dpf_ext.DPF(model, 0.5, total_steps=10, scope="row")
    with pytest.raises(ValueError, match="threshold"):
        dpf_ext.DPF(model, 0.5, total_steps=10, threshold="fast")
    with pytest.raises(ValueError, match="update_every"):
        dpf_ext.DPF(model, 0.5, total_steps=10, update_every=0)
    with pytest.raises(ValueError, match="disagrees"):
        dpf_ext.DPF(model, 0.5, schedule=Cubic(0.9, 0, 10))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights(dtype):
    model = dpf_ext.sparsify(mlp()).to(dtype)
    pruner = dpf_ext.DPF(model, schedule=Constant(0.75))
    assert abs(pruner.sparsity() - 0.75) < 0.01
    out = model(torch.randn(3, 20, dtype=dtype))
    out.float().sum().backward()
    assert model[0].weight.grad.dtype == dtype


def test_report_table():
    model, pruner, _ = setup(schedule=Constant(0.5))
    rep = pruner.report()
    assert [r.name for r in rep.layers] == ["0", "2", "4"]
    assert rep.layers[0].shape == (64, 20) and rep.params == 64 * 20 + 32 * 64 + 4 * 32
    text = str(rep)
    assert "total" in text and "50.00%" in text
    assert rep.to_dict()["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_an_entirely_pruned_layer_is_warned_about():
    model = dpf_ext.sparsify(mlp())
    with torch.no_grad():
        model[4].weight.mul_(1e-6)  # the classifier falls under any global threshold
    with pytest.warns(RuntimeWarning, match=r"layers \['4'\] are entirely pruned"):
        dpf_ext.DPF(model, schedule=Constant(0.5), channel_floor=False)


def test_the_channel_floor_keeps_every_channel_inside_the_budget():
    model = dpf_ext.sparsify(mlp())
    with torch.no_grad():
        model[4].weight.mul_(1e-6)  # the classifier falls under any global threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer entirely pruned
        warnings.filterwarnings("ignore", ".*one threshold over several layers")  # starved: yes
        pruner = dpf_ext.DPF(model, schedule=Constant(0.5))
    classifier = model[4]
    assert classifier.mask.sum(1).tolist() == [1, 1, 1, 1]  # each row keeps its largest
    assert torch.equal(classifier.mask.float().argmax(1), classifier.weight.abs().argmax(1))
    rep = pruner.report()
    assert rep.layers[-1].forced == 4 and rep.forced == 4
    assert rep.kept == pruner.target_kept  # the forced weights count toward the target


@pytest.mark.parametrize("total_steps", [30, 37, 50])
def test_short_runs_meet_the_target_whatever_the_period(total_steps):
    model, pruner, opt = setup(sparsity=0.9, total_steps=total_steps, update_every=16)
    train_steps(model, pruner, opt, batches(total_steps))
    assert pruner.report().sparsity == pytest.approx(0.9, abs=1e-3)
    assert pruner.target_sparsity == 0.9


def test_api_bad_input_is_named():
    model = dpf_ext.sparsify(mlp())
    with pytest.raises(TypeError, match=r"sparsity must be a number in \[0, 1\), got '0.9' \(str\)"):
        dpf_ext.DPF(model, "0.9", total_steps=10)
    for steps in (0, -5, 2.5):
        with pytest.raises(ValueError, match="total_steps must be a positive int"):
            dpf_ext.DPF(model, 0.9, total_steps=steps)
    with pytest.raises(ValueError, match=r"exclude: \['fc', 'layer9\.\*'\] match no prunable layer"):
        dpf_ext.sparsify(mlp(), exclude=["0", "fc", "layer9.*"])
    meta = dpf_ext.sparsify(mlp().to("meta"))
    with pytest.raises(ValueError, match="meta device: materialize the model"):
        dpf_ext.DPF(meta, 0.5, total_steps=10)


def test_a_second_pruner_takes_over_only_when_asked():
    model = dpf_ext.sparsify(mlp())
    first = dpf_ext.DPF(model, schedule=Constant(0.5))
    masks = masks_of(model)
    with pytest.raises(ValueError, match="already managed by another pruner"):
        dpf_ext.DPF(model, schedule=Constant(0.9))
    assert all(torch.equal(a, b) for a, b in zip(masks, masks_of(model)))  # nothing reset
    second = dpf_ext.DPF(model, schedule=Constant(0.9), replace=True)
    with pytest.raises(RuntimeError, match="took over"):
        first.step()
    second.step()
    first_again = dpf_ext.DPF(dpf_ext.sparsify(mlp()), schedule=Constant(0.5))
    first_again.finalize()
    dpf_ext.DPF(first_again.model, schedule=Constant(0.5))  # a finalized pruner is no owner


def test_dropped_counts_see_masks_written_between_updates():
    model, pruner, _ = setup(schedule=Constant(0.5))
    for _, layer in dpf_ext.nn.dpf_layers(model):  # written behind the pruner's back
        layer.mask.fill_(True)
    before = masks_of(model)
    pruner.update_masks()
    after = masks_of(model)
    expected = [int((b & ~a).sum()) for b, a in zip(before, after)]
    assert [r.dropped_last for r in pruner.report().layers] == expected
    assert sum(expected) > 0
    pruner.update_masks()  # nothing changed since: nothing dropped
    assert pruner.report().dropped_last == 0


def test_sparse_init_rescales_each_unit_to_its_kept_fan_in():
    """Hand-checked: a unit keeping k of its n inputs is multiplied by sqrt(n / k)."""
    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(4, 3), nn.Conv2d(2, 2, 3, padding=1)))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(1.0)
    pruner = dpf_ext.Pruner(model, "static", 0.5, budget="uniform", sparse_init=True)
    linear, conv = model[0], model[1]
    for row, mask in zip(linear.weight, linear.mask):
        k = int(mask.sum())
        assert torch.allclose(row[mask], torch.full((k,), (4 / k) ** 0.5))  # fan-in 4
    for unit, mask in zip(conv.weight, conv.mask):
        k = int(mask.sum())
        assert torch.allclose(unit[mask], torch.full((k,), (18 / k) ** 0.5))  # fan-in 2·3·3
    assert pruner.report().sparsity == pytest.approx(0.5, abs=0.05)
    # a unit that keeps every weight, and a method that starts dense, are left alone
    dense_start = dpf_ext.sparsify(nn.Sequential(nn.Linear(4, 3)))
    before = dense_start[0].weight.detach().clone()
    dpf_ext.Pruner(dense_start, "dpf", 0.5, total_steps=10, sparse_init=True)
    assert torch.equal(dense_start[0].weight, before)
    # off by default: the published initialisation
    plain = dpf_ext.sparsify(nn.Sequential(nn.Linear(4, 3)))
    with torch.no_grad():
        plain[0].weight.fill_(1.0)
    dpf_ext.Pruner(plain, "static", 0.5, budget="uniform")
    assert set(plain[0].weight[plain[0].mask].tolist()) == {1.0}
