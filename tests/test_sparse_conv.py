"""The direct sparse convolution (forward, input gradient, dense and sampled weight gradient)
against torch's convolution of ``mask ⊙ w``: the ops on random and adversarial masks and
shapes for every instruction set this CPU has, the compiled ops against the reference,
float64 gradcheck, NaN and Inf, Conv2d layers in every compute mode and every method's
training steps, resume and torch.compile."""

import pytest
import torch
from torch import nn

import dpf_ext
from cases import assert_resume_is_exact, assert_same_training, train_steps
from dpf_ext import ops
from dpf_ext.ops import ConvIndex, reference, sparse_conv2d

COMPILED = ops.simd() != "none"


def both(x, weight, mask, bias=None, dense_grad=True):
    """Outputs and gradients (x, weight, bias) of the sparse convolution and of torch's
    convolution of ``mask ⊙ w`` with the estimator's gradient."""
    out = []
    padding = (weight.shape[2] // 2, weight.shape[3] // 2)
    for sparse in (True, False):
        xs = x.detach().clone().requires_grad_()
        ws = weight.detach().clone().requires_grad_()
        bs = None if bias is None else bias.detach().clone().requires_grad_()
        y = (sparse_conv2d(xs, ws, ConvIndex.from_mask(mask), bs, dense_grad) if sparse else
             nn.functional.conv2d(xs, ops.masked_weight(ws, mask, dense_grad), bs, padding=padding))
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
        y.backward(dy)
        out.append((y.detach(), xs.grad, ws.grad, None if bs is None else bs.grad))
    return out


def assert_close_all(pair, tol=1e-4):
    for a, b in zip(*pair):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


def random_case(n, c, out, side, kernel, density, seed):
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    x = torch.randn(n, c, *side, generator=g)
    weight = torch.randn(out, c, kh, kw, generator=g)
    mask = torch.rand(out, c, kh, kw, generator=g) < density
    return x, weight, mask, torch.randn(out, generator=g)


CASES = [  # (batch, in, out, (H, W), kernel, density)
    (5, 3, 4, (7, 6), (3, 3), 0.3),
    (64, 16, 16, (8, 8), (3, 3), 0.05),
    (3, 4, 6, (9, 5), (3, 3), 0.5),
    (2, 5, 3, (6, 7), (3, 1), 0.6),
    (17, 8, 8, (5, 5), (5, 5), 0.2),
    (2, 3, 5, (1, 1), (3, 3), 0.7),      # every tap but the centre reads padding
    (4, 2, 3, (3, 17), (3, 3), 1.0),     # a plane that is not a whole number of vectors
    (1, 6, 2, (4, 4), (1, 1), 0.5),      # 1x1, batch 1
]


@pytest.mark.parametrize("dense_grad", [True, False], ids=["dense-grad", "sampled"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}to{c[2]}-{c[3]}-k{c[4]}")
def test_the_sparse_convolution_matches_the_masked_dense_one(isa, case, dense_grad):
    x, weight, mask, bias = random_case(*case, seed=sum(case[:3]))
    assert_close_all(both(x, weight, mask, bias, dense_grad))


def adversarial_masks(out, c, k):
    g = torch.Generator().manual_seed(3)
    shape = (out, c, k, k)
    empty_out = torch.rand(shape, generator=g) < 0.4
    empty_out[::2] = False  # output channels with no weight: their planes are the bias
    empty_in = torch.rand(shape, generator=g) < 0.4
    empty_in[:, ::2] = False  # input channels no weight reads
    one = torch.zeros(shape, dtype=torch.bool)
    one[out // 2, c - 1, 0, k - 1] = True  # a corner tap: half its plane reads padding
    return {"empty-out": empty_out, "empty-in": empty_in, "all-pruned": torch.zeros_like(one),
            "one-kept": one, "all-kept": torch.ones_like(one)}


@pytest.mark.parametrize("case", ["empty-out", "empty-in", "all-pruned", "one-kept", "all-kept"])
def test_adversarial_masks(isa, case):
    x, weight, _, bias = random_case(3, 5, 6, (9, 10), (3, 3), 0.5, seed=1)
    mask = adversarial_masks(6, 5, 3)[case]
    for dense_grad in (True, False):
        assert_close_all(both(x, weight, mask, bias, dense_grad))


def test_non_contiguous_inputs(isa):
    x, weight, mask, bias = random_case(4, 6, 5, (8, 8), (3, 3), 0.3, seed=2)
    assert_close_all(both(x.to(memory_format=torch.channels_last), weight, mask, bias))
    wide = torch.randn(4, 6, 8, 16)[..., ::2]
    assert not wide.is_contiguous()
    assert_close_all(both(wide, weight.to(memory_format=torch.channels_last), mask, None, False))


@pytest.mark.skipif(not COMPILED, reason="compares the compiled ops with the reference")
def test_the_compiled_ops_equal_the_reference(isa):
    x, weight, mask, bias = random_case(6, 7, 5, (6, 9), (3, 3), 0.3, seed=4)
    index = ConvIndex.from_mask(mask)
    values = weight.reshape(-1)[index.rows.pos]
    dy = torch.randn(6, 5, 6, 9)
    args = (index.rows.ptr, index.rows.idx, 3, 3)
    torch.testing.assert_close(torch.ops.dpf.sparse_conv(x, values, *args, bias),
                               reference.sparse_conv(x, values, *args, bias))
    torch.testing.assert_close(torch.ops.dpf.sampled_conv(dy, x, *args),
                               reference.sampled_conv(dy, x, *args), rtol=1e-5, atol=1e-4)
    t_values = values[index.t_perm]
    torch.testing.assert_close(
        torch.ops.dpf.sparse_conv(dy, t_values, index.t_ptr, index.t_idx, 3, 3, None),
        reference.sparse_conv(dy, t_values, index.t_ptr, index.t_idx, 3, 3, None))


def test_float64_gradcheck():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(3, 2, 3, 3, generator=g) < 0.5
    x = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    index = ConvIndex.from_mask(mask)
    assert torch.autograd.gradcheck(
        lambda x, w, b: sparse_conv2d(x, w * mask, index, b, dense_grad=False), (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, b: sparse_conv2d(x, weight.detach(), index, b, dense_grad=True), (x, bias))


def conv_model(**conv):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, **conv), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_nan_and_inf_propagate_as_in_the_dense_path():
    sparse = dpf_ext.sparsify(conv_model(), compute="sparse")
    dense = dpf_ext.sparsify(conv_model())
    for model in (sparse, dense):
        dpf_ext.Pruner(model, "static", 0.7, seed=0)
    x = torch.randn(2, 3, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    torch.testing.assert_close(sparse(x), dense(x), equal_nan=True)
    grads = []
    for model in (sparse, dense):
        y = model[0](torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1)))
        dy = torch.ones_like(y)
        dy[0, 0, 1, 1] = float("nan")
        y.backward(dy)
        grads.append(model[0].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)
    assert grads[0].isnan().any()


def test_bad_input_is_a_clear_error():
    index = ConvIndex.from_mask(torch.ones(4, 3, 3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="float16"):
        sparse_conv2d(torch.randn(2, 3, 5, 5).half(), torch.randn(4, 3, 3, 3).half(), index)
    with pytest.raises(ValueError, match=r"input must be \(N, 3, H, W\)"):
        sparse_conv2d(torch.randn(2, 4, 5, 5), torch.randn(4, 3, 3, 3), index)
    with pytest.raises(ValueError, match="does not match the index"):
        sparse_conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 1, 1), index)
    with pytest.raises(ValueError, match="odd sizes"):
        even = ConvIndex.from_mask(torch.ones(4, 3, 2, 2, dtype=torch.bool))
        sparse_conv2d(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 2, 2), even)
    with pytest.raises(ValueError, match="4-D bool"):
        ConvIndex.from_mask(torch.ones(4, 3, 3, dtype=torch.bool))
    for conv, message in (({"stride": 2}, "stride is (2, 2)"), ({"groups": 2}, "groups is 2"),
                          ({"dilation": 2}, "dilation is (2, 2)"),
                          ({"padding_mode": "reflect"}, "padding_mode is reflect")):
        with pytest.raises(ValueError, match=r"layers \['0'\]: DPFConv2d: its " + message.replace(
                "(", r"\(").replace(")", r"\)")):
            dpf_ext.sparsify(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, **conv)), compute="sparse")
    report = dpf_ext.compute_report(dpf_ext.sparsify(conv_model(stride=2), compute="auto"))
    assert report["0"] == "dense"  # auto: that layer stays dense


def test_unbatched_input_runs_as_a_batch_of_one():
    model = dpf_ext.sparsify(conv_model(), compute="sparse")
    dpf_ext.Pruner(model, "static", 0.5, seed=0)
    x = torch.randn(3, 6, 6)
    torch.testing.assert_close(model[0](x), model[0](x[None])[0])


def batch(g):
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


@pytest.mark.parametrize("method, options", [("static", {}), ("set", {"update_every": 3}),
                                             ("rigl", {"update_every": 3}),
                                             ("snfs", {"update_every": 3})])
def test_training_steps_match_the_dense_path_for_every_method(method, options):
    """Masked-gradient methods through sparse Conv2d layers, their update steps included:
    the same masks, and weights to float tolerance."""
    runs = []
    for mode in ("dense", "sparse"):
        model = dpf_ext.sparsify(conv_model(), compute=mode)
        runs.append((train_steps(model, method, 8, batch, **options), model))
    assert dpf_ext.compute_report(runs[1][1]) == {"0": "sparse", "2": "sparse", "6": "sparse"}
    assert_same_training(*runs)


def test_a_resumed_sparse_run_ends_as_the_uninterrupted_one():
    """RigL through sparse convolutions: a run checkpointed mid-way (model, optimizer, pruner) and
    continued in fresh objects, whose index is rebuilt from the loaded masks, ends as the
    uninterrupted one."""
    def build():
        model = dpf_ext.sparsify(conv_model(), compute="sparse")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, dpf_ext.Pruner(model, "rigl", 0.8, total_steps=16,
                                                update_every=3, optimizer=optimizer, seed=3)

    assert_resume_is_exact(build, batch, torch.randn(4, 3, 6, 6))


def test_dpf_straight_through_gradient_matches_the_dense_path():
    grads = []
    for mode in ("dense", "sparse"):
        model = dpf_ext.sparsify(conv_model(), compute=mode)
        dpf_ext.DPF(model, 0.8, schedule=dpf_ext.schedules.Constant(0.8))
        model(torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    pruned = ~model[0].mask
    assert pruned.any() and bool((grads[1][0][pruned] != 0).any())  # the feedback reaches them


@pytest.mark.skipif(not COMPILED, reason="auto runs sparse only with the compiled kernels")
def test_auto_runs_a_convolution_sparse_once_it_is_sparse_enough():
    model = dpf_ext.sparsify(conv_model(), compute="auto")
    assert dpf_ext.compute_report(model)["2"] == "dense"
    dpf_ext.Pruner(model, "static", 0.9, seed=0, budget="uniform")
    assert dpf_ext.compute_report(model)["2"] == "sparse"


@pytest.mark.skipif(not COMPILED, reason="the fake kernels are the compiled ops'")
def test_torch_compile_runs_the_sparse_convolution():
    model = dpf_ext.sparsify(conv_model(), compute="sparse")
    dpf_ext.DPF(model, 0.8, schedule=dpf_ext.schedules.Constant(0.8))
    x = torch.randn(2, 3, 6, 6)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()
    assert model[0].weight.grad is not None
