"""DPFSGD against torch.optim.SGD, and its histogram hand-off to the DPF pruner."""

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.channels import new_row_max
from dpf_ext import DPFSGD, ops


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
    model = dpf_ext.sparsify(_model()).to(device)
    pruner = dpf_ext.DPF(model, 0.8, total_steps=40, update_every=4, threshold=threshold)
    opt = DPFSGD(model.parameters(), lr=0.1, momentum=0.9, pruner=pruner)
    backend = ops.backend_for(device)
    first_passes = []
    in_pruner = [False]
    original = backend.magnitude_histogram

    def counting(weights, prefix, row_max):
        if prefix is None and in_pruner[0]:
            first_passes.append(pruner.step_count)
        return original(weights, prefix, row_max)

    monkeypatch.setattr(backend, "magnitude_histogram", counting)
    layers = dpf_ext.nn.dpf_layers(model)
    for step in range(1, 21):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
        in_pruner[0] = True
        pruner.step()
        in_pruner[0] = False
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
    # at its five updates the pruner never ran a first histogram pass of its own
    assert first_passes == []


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
