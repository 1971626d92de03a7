"""Powerpropagation: the layers start as the plain model, the gradient is the
reparametrisation's, masks are the same whether taken over v or over the weights, the
finalised and saved weights are the effective ones, and resuming is exact."""

import copy

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.schedules import Constant


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def test_the_effective_weights_start_as_the_plain_ones():
    plain = net()
    model = dpf_ext.sparsify(copy.deepcopy(plain), powerprop=3.0)
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(model(x), plain(x))
    v, w = model[3].weight, plain[3].weight
    torch.testing.assert_close(v.abs().pow(3) * v.sign(), w)  # v = sign(w) |w|^(1/3)


def test_the_gradient_is_the_reparametrisations():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(3, 2, bias=False)), powerprop=2.0)
    v = model[0].weight
    x = torch.randn(5, 3)
    model(x).sum().backward()
    # d/dv sum(x @ (v |v|)^T) = (sum over the batch of x) * 2 |v|
    torch.testing.assert_close(v.grad, x.sum(0).expand(2, 3) * 2 * v.detach().abs())


def test_masks_over_v_are_masks_over_the_weights():
    model = dpf_ext.sparsify(net(), powerprop=2.0)
    dpf_ext.DPF(model, schedule=Constant(0.7), channel_floor=False)
    weights = [m.weight.detach() for m in (model[0], model[3])]
    effective = torch.cat([(w * w.abs()).abs().flatten() for w in weights])
    kept = torch.cat([m.mask.flatten() for m in (model[0], model[3])])
    k = int(kept.sum())
    assert set(effective.topk(k).indices.tolist()) == set(kept.nonzero().view(-1).tolist())


def test_finalised_and_saved_weights_are_the_effective_ones():
    model = dpf_ext.sparsify(net(), powerprop=2.0)
    pruner = dpf_ext.DPF(model, schedule=Constant(0.5))
    x = torch.randn(3, 2, 6, 6)
    expected = model(x)
    state = model.state_dict()
    assert set(state) >= {"3.weight", "3.weight_powerprop", "3.mask"}
    plain = net(seed=9)
    plain.load_state_dict(state, strict=False)
    with torch.no_grad():  # the dense effective weights, masked, give the model's output
        for i in (0, 3):
            plain[i].weight.mul_(model[i].mask)
    torch.testing.assert_close(plain(x), expected)
    pruner.finalize(unwrap=True)
    again = net(seed=9)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x), expected)


@pytest.mark.filterwarnings("ignore::dpf_ext.nn.UnfinalizedWarning")
def test_resuming_a_powerprop_run_is_exact():
    def run(state=None, steps=12):
        model = dpf_ext.sparsify(net(), powerprop=2.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pruner = dpf_ext.DPF(model, 0.8, total_steps=24, update_every=4)
        if state:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            pruner.load_state_dict(state[2])
        g = torch.Generator().manual_seed(len(state or ()))
        for _ in range(steps):
            model(torch.randn(8, 2, 6, 6, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            pruner.step()
        return model, opt, pruner

    model, opt, pruner = run()
    state = copy.deepcopy((model.state_dict(), opt.state_dict(), pruner.state_dict()))
    resumed, _, _ = run(state, steps=0)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_bad_exponent_is_an_error():
    with pytest.raises(ValueError, match="powerprop must be a number >= 1"):
        dpf_ext.sparsify(net(), powerprop=0.5)


def test_powerprop_composes_with_a_method_from_the_cli(capsys):
    from dpf_ext.app.cli import main

    assert main(["--method", "rigl", "--model", "mlp", "--epochs", "1", "--powerprop", "2",
                 "--no-progress"]) == 0
    assert "rigl" in capsys.readouterr().out
