"""N:M patterns with feedback: the pattern exact after every update, weights returning
within a group, the dense phase, bad patterns, checkpoints and the 2:4 GPU format."""

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.methods.patterns import NMPattern, gemm_view
from dpf_ext.schedules import OneShot


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 12),
                         nn.ReLU(), nn.Linear(12, 4)).to(dtype)


def _pattern_holds(model, n, m):
    for name, layer in dpf_ext.nn.dpf_layers(model):
        per_group = gemm_view(layer.mask, layer).reshape(-1, m).sum(1)
        assert bool((per_group == n).all()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("text", ["2:4", "1:4", "3:6", "1:2"])
def test_pattern_is_exact_after_every_update_and_weights_come_back(dtype, text):
    pattern = NMPattern.parse(text)
    model = dpf_ext.sparsify(_model(dtype))
    pruner = dpf_ext.DPF(model, pattern=text, update_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    came_back_nonzero = 0
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        before = [layer.mask.clone() for _, layer in dpf_ext.nn.dpf_layers(model)]
        x = torch.randn(16, 4, 6, 6, generator=g).to(dtype)
        nn.functional.cross_entropy(model(x).float(), torch.randint(0, 4, (16,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
        _pattern_holds(model, pattern.n, pattern.m)
        for (_, layer), old in zip(dpf_ext.nn.dpf_layers(model), before):
            came_back_nonzero += int((layer.weight.detach()[layer.mask & ~old] != 0).sum())
    rep = pruner.report()
    assert rep.sparsity == pytest.approx(pattern.sparsity)
    assert rep.reactivated_total > 0 and came_back_nonzero == rep.reactivated_total
    assert f"pattern {text}" in str(rep)


def test_dense_until_the_schedule_says_then_the_pattern():
    model = dpf_ext.sparsify(_model())
    pruner = dpf_ext.DPF(model, pattern="2:4", schedule=OneShot(0.5, 3), update_every=1)
    assert all(bool(layer.mask.all()) for _, layer in dpf_ext.nn.dpf_layers(model))
    for _ in range(3):
        pruner.step()
    _pattern_holds(model, 2, 4)


def test_one_group_keeps_its_largest_and_ties_go_to_the_earlier():
    layer = dpf_ext.sparsify(nn.Sequential(nn.Linear(8, 1, bias=False)))
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.0]]))
    dpf_ext.DPF(layer, pattern="2:4")
    assert layer[0].mask.tolist() == [[False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize("text", ["4:2", "0:4", "2:0", "2:17", "2-4", "2:4:8", "a:b", "4:4"])
def test_bad_patterns_are_named(text):
    with pytest.raises(ValueError, match="pattern"):
        dpf_ext.DPF(dpf_ext.sparsify(_model()), pattern=text)


def test_layers_that_do_not_fit_the_pattern_are_named_and_can_be_excluded():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 6))  # K = 9
    with pytest.raises(ValueError, match=r"\['0 \(9\)'\] is not a multiple of 4.*exclude"):
        dpf_ext.DPF(dpf_ext.sparsify(model), pattern="2:4")
    pruner = dpf_ext.DPF(dpf_ext.sparsify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(),
                                                        nn.Linear(64, 6)), exclude=["0"]), pattern="2:4")
    assert [name for name, _ in pruner.layers] == ["2"]
    with pytest.raises(ValueError, match="excludes scope"):
        dpf_ext.DPF(dpf_ext.sparsify(_model()), pattern="2:4", scope="layer")
    with pytest.raises(ValueError, match="disagrees with nm's own 0.5"):
        dpf_ext.DPF(dpf_ext.sparsify(_model()), 0.9, pattern="2:4")


def test_non_finite_weights_leave_the_masks_unchanged():
    model = dpf_ext.sparsify(_model())
    pruner = dpf_ext.DPF(model, pattern="2:4")
    masks = [layer.mask.clone() for _, layer in pruner.layers]
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\['3'\]"):
        pruner.update_masks()
    assert all(torch.equal(a, layer.mask) for a, (_, layer) in zip(masks, pruner.layers))


def test_pruned_decay_adds_to_the_pruned_gradient_only():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(8, 4, bias=False)))
    dpf_ext.DPF(model, pattern="2:4", pruned_decay=0.5)
    x = torch.randn(3, 8)
    model(x).sum().backward()
    layer = model[0]
    plain = torch.ones(3, 4).t() @ x  # the straight-through gradient
    expected = plain + 0.5 * layer.weight.detach() * ~layer.mask
    torch.testing.assert_close(layer.weight.grad, expected)
    with pytest.raises(ValueError, match="pruned_decay"):
        dpf_ext.DPF(model, pattern="2:4", pruned_decay=-1.0, replace=True)


def test_two_four_checkpoint_and_gpu_format(tmp_path):
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)))
    pruner = dpf_ext.DPF(model, pattern="2:4")
    path = tmp_path / "sparse.pt"
    dpf_ext.save_sparse(model, path)
    plain = dpf_ext.load_sparse(path, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)))
    pruner.finalize(unwrap=True)
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    not_two_four = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="layer '0' is not 2:4 sparse"):
        dpf_ext.to_semi_structured(not_two_four)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="compute capability 8.0"):
            dpf_ext.to_semi_structured(plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of compute capability 8.0 or newer")
def test_semi_structured_linear_matches_the_dense_one_on_gpu():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)))
    model = model.cuda().half()
    pruner = dpf_ext.DPF(model, pattern="2:4")
    pruner.finalize(unwrap=True)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = model(x)
        assert dpf_ext.to_semi_structured(model) == ["0", "2"]
        torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


def test_ast_ramps_the_pruned_decay_linearly_and_resumes_it():
    """Hand-checked AST schedule, pruned_decay 0.5 over 4 steps: the k-th forward (after k
    optimizer steps) decays the pruned weights by 0, 0.125, 0.25, 0.375, 0.5, 0.5."""
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(8, 4, bias=False)))
    pruner = dpf_ext.DPF(model, pattern="2:4", pruned_decay=0.5, pruned_decay_ramp=4)
    layer, x = model[0], torch.randn(3, 8)
    plain = torch.ones(3, 4).t() @ x  # the straight-through gradient
    for expected in (0.0, 0.125, 0.25, 0.375, 0.5, 0.5):
        layer.weight.grad = None
        model(x).sum().backward()
        torch.testing.assert_close(layer.weight.grad,
                                   plain + expected * layer.weight.detach() * ~layer.mask)
        pruner.step()  # no optimizer: the weights and masks stay, the step advances
    # resumed at step 2 in fresh objects: the next forward decays by 0.25, as uninterrupted
    fresh = dpf_ext.sparsify(nn.Sequential(nn.Linear(8, 4, bias=False)))
    fresh.load_state_dict(model.state_dict())
    again = dpf_ext.DPF(fresh, pattern="2:4", pruned_decay=0.5, pruned_decay_ramp=4)
    state = pruner.state_dict()
    state["step_count"] = 2
    state["method"] = {"decay_step": 2}
    again.load_state_dict(state)
    fresh(x).sum().backward()
    torch.testing.assert_close(fresh[0].weight.grad,
                               plain + 0.25 * fresh[0].weight.detach() * ~fresh[0].mask)
    with pytest.raises(ValueError, match="decay_ramp ramps pruned_decay"):
        dpf_ext.DPF(model, pattern="2:4", pruned_decay_ramp=4, replace=True)
    with pytest.raises(ValueError, match="decay_ramp must be a positive int"):
        dpf_ext.DPF(model, pattern="2:4", pruned_decay=0.5, pruned_decay_ramp=0, replace=True)
    with pytest.raises(ValueError, match="option of N:M training"):
        dpf_ext.DPF(model, 0.5, pruned_decay=0.5, pruned_decay_ramp=4, replace=True)
