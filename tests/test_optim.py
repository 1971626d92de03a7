"""DPFSGD against torch.optim.SGD, and its histogram hand-off to the DPF pruner."""

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.methods.channels import new_row_max
from dpf_ext import DPFSGD, ops
from dpf_ext.methods.first_pass import WarmStart


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 3))


def _loss(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 12, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("settings", [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.9, dampening=0.1, maximize=True),
])
def test_matches_torch_sgd_step_for_step(device, settings):
    ours, theirs = _model().to(device), _model().to(device)
    groups = lambda m: [  # noqa: E731  (two groups with different options)
        {"params": [m[0].weight, m[3].weight]},
        {"params": [m[0].bias, m[1].weight, m[1].bias, m[3].bias], "weight_decay": 0.0, "lr": 0.02},
    ]
    opt_ours, opt_theirs = DPFSGD(groups(ours), **settings), torch.optim.SGD(groups(theirs), **settings)
    for step in range(5):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    state = opt_ours.state_dict()
    assert (state["param_groups"][1]["lr"], state["param_groups"][1]["weight_decay"]) == (0.02, 0.0)
    if settings.get("momentum"):
        buf = opt_ours.state[ours[0].weight]["momentum_buffer"]
        torch.testing.assert_close(buf, opt_theirs.state[theirs[0].weight]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)


def test_closure_and_state_dict_round_trip():
    model = _model()
    opt = DPFSGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = opt.step(lambda: _loss(model, 0).backward() or _loss(model, 0))
    assert loss is not None
    other = DPFSGD(_model().parameters(), lr=0.5, momentum=0.9)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.1 and len(other.state) == len(opt.state)


def test_bad_arguments():
    params = _model().parameters()
    with pytest.raises(ValueError, match="learning rate"):
        DPFSGD(params, lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        DPFSGD(_model().parameters(), lr=0.1, nesterov=True)


@pytest.mark.parametrize("threshold", ["approx", "exact"])
def test_pruner_uses_the_optimizer_histogram(device, threshold, monkeypatch):
    # the test model is far below the size from which a window pays; its path is tested
    monkeypatch.setattr(WarmStart, "pays", lambda self, weights: True)
    model = dpf_ext.sparsify(_model()).to(device)
    pruner = dpf_ext.DPF(model, schedule=dpf_ext.schedules.Cubic(0.8, 0, 12), update_every=4,
                         threshold=threshold)
    opt = DPFSGD(model.parameters(), lr=0.01, momentum=0.9, pruner=pruner)
    requests = []
    ask = pruner.histogram_request
    monkeypatch.setattr(pruner, "histogram_request", lambda: requests.append(ask()) or requests[-1])
    backend = ops.backend_for(device)
    first_passes = []
    in_pruner = [False]
    original = backend.magnitude_histogram

    second_passes = []

    def counting(weights, prefix, *args):
        if in_pruner[0]:
            (first_passes if prefix is None else second_passes).append(pruner.step_count)
        return original(weights, prefix, *args)

    monkeypatch.setattr(backend, "magnitude_histogram", counting)
    layers = dpf_ext.nn.dpf_layers(model)
    one_pass_updates = 0
    for step in range(1, 41):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        window = requests[-1].window if requests and requests[-1] is not None else None
        in_pruner[0] = True
        pruner.step()
        in_pruner[0] = False
        if step % 4 == 0 and threshold == "exact":
            # the step counted the window around the last threshold: no pass over the weights
            # exactly when the new threshold landed there (else a full first pass and the
            # second)
            assert window is not None
            tau = pruner.state_dict()["method"]["warm_start"]["taus"][0]
            slot = (torch.tensor(tau, dtype=torch.float32).view(torch.int32) >> 16) - window.start.cpu()
            landed = 0 <= int(slot) < window.width
            assert (step in second_passes) != landed, (step, int(slot), window.width)
            one_pass_updates += landed
        if step % 4 == 0:
            # the masks are what a threshold computed from scratch gives (channel floor on)
            weights = [m.weight.detach() for _, m in layers]
            row_max = new_row_max(weights)
            tau = ops.global_threshold(weights, pruner.target_kept - sum(len(r) for r in row_max),
                                       exact=threshold == "exact", row_max=row_max)
            expected = [torch.zeros_like(m.mask) for _, m in layers]
            ops.update_masks(weights, tau, expected, row_max=row_max)
            for (_, m), e in zip(layers, expected):
                assert torch.equal(m.mask, e)
    if threshold == "exact":
        assert first_passes == second_passes
        assert one_pass_updates >= 3, one_pass_updates
    else:  # at its ten updates the pruner never ran a pass of its own
        assert first_passes == second_passes == []


def test_histogram_request_only_when_it_can_serve():
    model = dpf_ext.sparsify(_model())
    layer_scope = dpf_ext.DPF(model, 0.5, total_steps=10, update_every=1, scope="layer")
    assert layer_scope.histogram_request() is None
    no_feedback = dpf_ext.DPF(model, 0.5, total_steps=10, update_every=1, feedback=False,
                              replace=True)
    assert no_feedback.histogram_request() is None
    pruner = dpf_ext.DPF(model, 0.5, total_steps=10, update_every=2, replace=True)
    assert pruner.histogram_request() is None  # step 1 is no update step
    pruner.step()
    request = pruner.histogram_request()
    assert request is not None and request.wants(model[0].weight) and not request.wants(model[0].bias)
    assert not request.complete


ADAMW_SETTINGS = [
    dict(),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    dict(lr=2e-3, amsgrad=True, weight_decay=0.0),
    dict(lr=1e-3, maximize=True, amsgrad=True),
]


def _adam_model(seed=0):
    # no bias in front of a BatchNorm: its gradient would be round-off noise, which Adam's
    # normalisation turns into full-size steps that differ between any two implementations
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.LayerNorm(40), nn.Linear(40, 3))


@pytest.mark.parametrize("settings", ADAMW_SETTINGS, ids=["defaults", "betas-eps-wd", "amsgrad", "maximize"])
def test_adamw_matches_torch_adamw_step_for_step(device, settings):
    ours, theirs = _adam_model().to(device), _adam_model().to(device)
    groups = lambda m: [  # noqa: E731  (two groups with different options)
        {"params": [m[0].weight, m[3].weight]},
        {"params": [m[0].bias, m[2].weight, m[2].bias, m[3].bias], "weight_decay": 0.0, "lr": 5e-4},
    ]
    opt_ours = dpf_ext.DPFAdamW(groups(ours), **settings)
    opt_theirs = torch.optim.AdamW(groups(theirs), foreach=False, **settings)
    for step in range(25):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            _loss(model, step).backward()
            if step < 5:  # a parameter joins late: its own step count, its own launch
                model[3].bias.grad = None
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    s_ours, s_theirs = opt_ours.state[ours[0].weight], opt_theirs.state[theirs[0].weight]
    assert set(s_ours) == set(s_theirs) and float(s_ours["step"]) == float(s_theirs["step"]) == 25
    for key in s_ours:
        torch.testing.assert_close(s_ours[key].float(), s_theirs[key].float(), rtol=2e-5, atol=1e-7)
    assert float(opt_ours.state[ours[3].bias]["step"]) == 20


def test_adamw_state_dicts_load_both_ways():
    ours, theirs = _model(), _model()
    opt_ours = dpf_ext.DPFAdamW(ours.parameters(), lr=1e-2, amsgrad=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2, amsgrad=True)
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        _loss(model, 0).backward()
        opt.step()
    fresh_torch = torch.optim.AdamW(_model().parameters(), lr=1e-2, amsgrad=True)
    fresh_torch.load_state_dict(opt_ours.state_dict())
    fresh_ours = dpf_ext.DPFAdamW(_model().parameters(), lr=1e-2, amsgrad=True)
    fresh_ours.load_state_dict(opt_theirs.state_dict())
    assert float(fresh_ours.state[fresh_ours.param_groups[0]["params"][0]]["step"]) == 1
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        dpf_ext.DPFAdamW(_model().parameters(), betas=(0.9, 1.0))


def test_adamw_hands_the_pruner_its_histogram(monkeypatch):
    model = dpf_ext.sparsify(_model())
    pruner = dpf_ext.DPF(model, 0.8, total_steps=40, update_every=4)
    opt = dpf_ext.DPFAdamW(model.parameters(), lr=1e-2, pruner=pruner)
    backend = ops.backend_for("cpu")
    passes = {None: [], "second": []}
    original = backend.magnitude_histogram

    def counting(weights, prefix, *args):
        passes[None if prefix is None else "second"].append(pruner.step_count)
        return original(weights, prefix, *args)

    monkeypatch.setattr(backend, "magnitude_histogram", counting)
    for step in range(1, 13):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        pruner.step()
    # the exact updates run no first pass of their own, only their second pass (the model
    # is too small for a window)
    assert passes == {None: [], "second": [4, 8, 12]}
    assert pruner.report().sparsity > 0.3
    approx = dpf_ext.DPF(model, 0.8, total_steps=40, update_every=4, threshold="approx",
                         replace=True)
    opt.pruner = approx
    passes = {None: [], "second": []}
    for step in range(1, 9):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        approx.step()
    assert passes == {None: [], "second": []}


@pytest.mark.filterwarnings("ignore:.*GradScaler")
def test_a_step_skipped_by_grad_scaler_still_counts_for_the_pruner():
    model = dpf_ext.sparsify(_model())
    pruner = dpf_ext.DPF(model, 0.5, total_steps=8, update_every=2)
    opt = dpf_ext.DPFAdamW(model.parameters(), lr=1e-2, pruner=pruner)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for step in range(8):
        opt.zero_grad()
        scaler.scale(_loss(model, step)).backward()
        if step == 3:
            model[0].weight.grad[0, 0] = float("inf")  # an overflow: the step is skipped
        before = model[0].weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        pruner.step()  # after scaler.step, whether or not the optimizer stepped
        if step == 3:
            assert torch.equal(model[0].weight, before)
    assert pruner.step_count == 8 and torch.isfinite(model[0].weight).all()
    assert pruner.report().sparsity == pytest.approx(0.5, abs=1e-2)


def test_a_window_only_where_it_saves_more_than_it_costs():
    warm = WarmStart()
    warm.record(torch.tensor([0.5]))
    assert warm.window(0, [torch.empty(10_000)]) is None  # zeroing 2 MiB would cost more
    window = warm.window(0, [torch.empty(600_000)])
    assert window is not None and window.width == 3
    assert warm.window(0, [torch.empty(600_000, dtype=torch.bfloat16)]) is None
