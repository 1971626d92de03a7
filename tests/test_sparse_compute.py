"""The sparse products (forward, input gradient, dense and sampled weight gradient) against
the masked dense path: the op on random and adversarial inputs for every instruction set
this CPU has, float64 gradcheck, the layers' compute modes, every method's training steps,
NaN and Inf, the index rebuilt only at mask changes, resume, transformers' Conv1D and
torch.compile."""

import copy

import pytest
import torch
from torch import nn

import dpf_ext
from cases import assert_resume_is_exact, assert_same_training, train_steps
from dpf_ext import ops
from dpf_ext.nn import compute
from dpf_ext.ops import SparseIndex, sparse_linear

COMPILED = ops.simd() != "none"


def masked_dense(x, weight, mask, bias, dense_grad):
    """The reference: torch's product with ``mask ⊙ w`` and the estimator's gradient."""
    return nn.functional.linear(x, ops.masked_weight(weight, mask, dense_grad), bias)


def both(x, weight, mask, bias=None, dense_grad=True, view=None):
    """Outputs and gradients (x, weight, bias) of the sparse and the masked dense path."""
    out = []
    for sparse in (True, False):
        xs = x.detach().clone().requires_grad_()
        ws = weight.detach().clone().requires_grad_()
        bs = None if bias is None else bias.detach().clone().requires_grad_()
        w2 = ws if view is None else view(ws)
        m2 = mask if view is None else view(mask)
        xin = xs.t() if x.dim() == 2 and getattr(x, "_transposed", False) else xs
        y = (sparse_linear(xin, w2, SparseIndex.from_mask(m2, w2), bs, dense_grad) if sparse
             else masked_dense(xin, w2, m2, bs, dense_grad))
        dy = torch.randn_like(y, generator=torch.Generator().manual_seed(7))
        y.backward(dy)
        out.append((y.detach(), xs.grad, ws.grad, None if bs is None else bs.grad))
    return out


def assert_close_all(pair):
    (sparse, dense) = pair
    for a, b in zip(sparse, dense):
        if a is None:
            assert b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def random_case(out_f, in_f, batch, density, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) < density
    x = torch.randn(batch, in_f, generator=g)
    bias = torch.randn(out_f, generator=g)
    return x, weight, mask, bias


@pytest.mark.parametrize("dense_grad", [True, False], ids=["dense-grad", "sampled"])
@pytest.mark.parametrize("shape", [(37, 53, 5, 0.3), (64, 128, 64, 0.05), (130, 70, 1, 0.5),
                                   (33, 17, 65, 1.0), (300, 200, 130, 0.02)])
def test_the_sparse_products_match_the_masked_dense_path(isa, shape, dense_grad):
    out_f, in_f, batch, density = shape
    x, weight, mask, bias = random_case(out_f, in_f, batch, density, seed=sum(shape[:3]))
    assert_close_all(both(x, weight, mask, bias, dense_grad))


def adversarial_masks(out_f, in_f):
    g = torch.Generator().manual_seed(3)
    empty_rows = torch.rand(out_f, in_f, generator=g) < 0.3
    empty_rows[::3] = False
    empty_cols = torch.rand(out_f, in_f, generator=g) < 0.3
    empty_cols[:, ::2] = False
    one = torch.zeros(out_f, in_f, dtype=torch.bool)
    one[out_f // 2, in_f - 1] = True
    return {"empty-rows": empty_rows, "empty-cols": empty_cols, "all-pruned": torch.zeros_like(one),
            "one-kept": one, "all-kept": torch.ones_like(one)}


@pytest.mark.parametrize("case", ["empty-rows", "empty-cols", "all-pruned", "one-kept", "all-kept"])
@pytest.mark.parametrize("batch", [1, 17])
def test_adversarial_masks_and_batches(isa, case, batch):
    x, weight, _, bias = random_case(40, 24, batch, 0.5, seed=batch)
    mask = adversarial_masks(40, 24)[case]
    for dense_grad in (True, False):
        assert_close_all(both(x, weight, mask, bias, dense_grad))


def test_non_contiguous_and_batched_inputs(isa):
    x, weight, mask, bias = random_case(48, 32, 20, 0.2, seed=5)
    wide = torch.randn(20, 64)[:, ::2]  # strided columns
    assert not wide.is_contiguous()
    assert_close_all(both(wide, weight, mask, bias))
    assert_close_all(both(torch.randn(3, 7, 32), weight, mask, bias, dense_grad=False))
    transposed = torch.randn(32, 20).t()  # a transposed view
    assert_close_all(both(transposed, weight, mask, None))


def test_a_transposed_weight_view_reads_and_gets_the_right_positions(isa):
    """transformers' Conv1D stores its weight (in, out): the op reads it through ``w.t()``."""
    x, weight, mask, bias = random_case(24, 40, 9, 0.25, seed=11)
    assert_close_all(both(x, weight.t().contiguous(), mask.t().contiguous(), bias,
                          view=lambda t: t.t()))


def test_float64_gradcheck():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(6, 5, generator=g) < 0.5
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    index = SparseIndex.from_mask(mask)
    # the dense weight gradient is the gradient of mask ⊙ w: gradcheck the kept-weight function
    assert torch.autograd.gradcheck(
        lambda x, w, b: sparse_linear(x, w * mask, index, b, dense_grad=False), (x, weight, bias))
    assert torch.autograd.gradcheck(
        lambda x, b: sparse_linear(x, weight.detach(), index, b, dense_grad=True), (x, bias))


def test_nan_and_inf_propagate_as_in_the_dense_path():
    x, weight, mask, bias = random_case(16, 12, 6, 0.3, seed=2)
    mask[:, 3] = False  # a column every row prunes: the sparse product never reads x[:, 3]
    x[2, 3] = float("nan")
    x[4, 3] = float("inf")
    sparse = dpf_ext.sparsify(nn.Sequential(nn.Linear(12, 16)), compute="sparse")
    dense = dpf_ext.sparsify(nn.Sequential(nn.Linear(12, 16)))
    for model in (sparse, dense):
        with torch.no_grad():
            model[0].weight.copy_(weight)
            model[0].bias.copy_(bias)
            model[0].mask.copy_(mask)
    torch.testing.assert_close(sparse(x), dense(x), equal_nan=True)
    assert sparse(x)[2].isnan().all()
    # a NaN in the output gradient reaches every weight gradient, as densely
    grads = []
    for model in (sparse, dense):
        model.zero_grad()
        y = model(torch.randn(6, 12, generator=torch.Generator().manual_seed(1)))
        dy = torch.ones_like(y)
        dy[0, 0] = float("nan")
        y.backward(dy)
        grads.append(model[0].weight.grad)
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)


def test_bad_input_is_a_clear_error():
    index = SparseIndex.from_mask(torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="float16"):
        sparse_linear(torch.randn(2, 3).half(), torch.randn(4, 3).half(), index)
    with pytest.raises(ValueError, match="input has 5 features"):
        sparse_linear(torch.randn(2, 5), torch.randn(4, 3), index)
    with pytest.raises(ValueError, match="does not match the index"):
        sparse_linear(torch.randn(2, 3), torch.randn(3, 4), index)
    with pytest.raises(ValueError, match="2-D bool"):
        SparseIndex.from_mask(torch.ones(4, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_compute_modes_of_the_layers():
    with pytest.raises(ValueError, match=r"layers \['0'\]: DPFConv2d: its padding is \(0, 0\) "
                                         r"\(the sparse convolution needs \(1, 1\).*compute='auto'"):
        dpf_ext.sparsify(cnn(), compute="sparse")
    with pytest.raises(ValueError, match=r"layers \['0'\]: DPFConv1d has no sparse path"):
        dpf_ext.sparsify(nn.Sequential(nn.Conv1d(2, 2, 3)), compute="sparse")
    with pytest.raises(ValueError, match="compute must be one of"):
        dpf_ext.sparsify(cnn(), compute="fast")
    model = dpf_ext.sparsify(cnn(), compute="auto")
    assert dpf_ext.compute_report(model) == {"0": "dense", "2": "dense"}  # 1440 weights: small
    half = dpf_ext.sparsify(nn.Sequential(nn.Linear(8, 8)).double())
    with pytest.raises(ValueError, match="float64; the sparse kernels run float32"):
        dpf_ext.set_compute(half, "sparse")
    assert half[0].compute == "dense"  # refused: nothing changed


@pytest.mark.skipif(not COMPILED, reason="auto runs sparse only with the compiled kernels")
def test_auto_switches_to_sparse_as_the_ramp_sparsifies():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)),
                             compute="auto")
    pruner = dpf_ext.DPF(model, 0.95, total_steps=40, update_every=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    for _ in range(40):
        loss = model(torch.randn(8, 256)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
        seen.append(dpf_ext.compute_report(model)["0"])
    assert seen[0] == "dense" and seen[-1] == "sparse"
    assert seen.index("sparse") > 0


def test_the_index_is_rebuilt_only_when_the_mask_changes():
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(32, 32)), compute="sparse")
    pruner = dpf_ext.DPF(model, 0.9, total_steps=10, update_every=5)
    layer = model[0]
    first = compute.sparse_index(layer)
    model(torch.randn(2, 32))
    assert compute.sparse_index(layer) is first
    for _ in range(5):
        pruner.step()  # step 5 updates the masks
    rebuilt = compute.sparse_index(layer)
    assert rebuilt is not first
    assert rebuilt.nnz == int(layer.mask.sum())
    model.load_state_dict(model.state_dict())  # a load writes the mask: rebuilt again
    assert compute.sparse_index(layer) is not rebuilt


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


METHODS = {  # method: (options, whether a float difference can flip a later mask)
    "static": {},
    "set": {"update_every": 3},
    "rigl": {"update_every": 3},
    "snfs": {"update_every": 3},
}


def batch(g):
    return torch.randn(16, 24, generator=g), torch.randint(0, 5, (16,), generator=g)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_steps_match_the_dense_path_for_every_method(method):
    """Masked-gradient methods, their update steps included (RigL and sparse momentum read
    this step's dense gradient): the same masks, and weights to float tolerance."""
    runs = []
    for mode in ("dense", "sparse"):
        model = dpf_ext.sparsify(mlp(), compute=mode)
        losses = train_steps(model, method, 10, batch, **METHODS[method])
        runs.append((losses, model))
    assert all(v == "sparse" for v in dpf_ext.compute_report(runs[1][1]).values())
    assert_same_training(*runs)


def test_dpf_straight_through_gradient_matches_the_dense_path():
    """DPF's pruned weights get the full gradient: one step at 80% gives the same gradients
    (training further may flip a weight at the threshold, which the feedback amplifies)."""
    grads = []
    for mode in ("dense", "sparse"):
        model = dpf_ext.sparsify(mlp(), compute=mode)
        dpf_ext.DPF(model, 0.8, schedule=dpf_ext.schedules.Constant(0.8))
        x = torch.randn(16, 24, generator=torch.Generator().manual_seed(1))
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert bool((a != 0).any())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    pruned = ~dpf_ext.sparsify(mlp())[0].mask  # (all kept before a pruner: nothing to check)
    assert pruned.sum() == 0


def test_a_resumed_sparse_run_ends_as_the_uninterrupted_one():
    """RigL through sparse Linear layers: a run checkpointed mid-way (model, optimizer, pruner) and
    continued in fresh objects, whose index is rebuilt from the loaded masks, ends as the
    uninterrupted one."""
    def build():
        model = dpf_ext.sparsify(mlp(), compute="sparse")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, optimizer, dpf_ext.Pruner(model, "rigl", 0.8, total_steps=16,
                                                update_every=3, optimizer=optimizer, seed=3)

    assert_resume_is_exact(build, batch, torch.randn(4, 24))


def test_gpt2_conv1d_runs_sparse_and_matches_dense():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1,
                                     n_head=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    outs = []
    for mode in ("dense", "sparse"):
        model = dpf_ext.sparsify(copy.deepcopy(base), compute=mode)
        pruner = dpf_ext.DPF(model, 0.9, schedule=dpf_ext.schedules.Constant(0.9))
        ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
        loss = model(ids, labels=ids).loss
        loss.backward()
        outs.append((loss.detach(), [p.grad for _, p in sorted(model.named_parameters())]))
        if mode == "sparse":
            report = dpf_ext.compute_report(model)
            assert report and all(v == "sparse" for v in report.values()), report
            assert pruner.report().layers
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not COMPILED, reason="the fake kernels are the compiled ops'")
def test_torch_compile_runs_the_sparse_path():
    model = dpf_ext.sparsify(mlp(), compute="sparse")
    dpf_ext.DPF(model, 0.8, schedule=dpf_ext.schedules.Constant(0.8))
    x = torch.randn(16, 24)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)
    compiled(x).sum().backward()
    assert model[0].weight.grad is not None


@pytest.mark.skipif(not COMPILED, reason="compares the C++ index with the reference")
@pytest.mark.parametrize("case", ["empty-rows", "empty-cols", "all-pruned", "one-kept", "all-kept"])
def test_the_compiled_index_equals_the_reference(case):
    from dpf_ext.ops import reference

    for mask, strides in ((adversarial_masks(40, 24)[case], (24, 1)),
                          (adversarial_masks(24, 40)[case].t(), (1, 40))):
        got = torch.ops.dpf.sparse_index(mask, *strides)
        want = reference.sparse_index(mask, *strides)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.skipif(not COMPILED, reason="compares the compiled op with the reference")
@pytest.mark.parametrize("case", ["empty-rows", "empty-cols", "all-pruned", "one-kept", "all-kept"])
def test_the_compiled_kept_values_equal_the_reference(case):
    """The values gathered in the index's order, from a weight and from a transposed view."""
    from dpf_ext.ops import reference

    weight = torch.randn(40, 24, generator=torch.Generator().manual_seed(5))
    for w in (weight, weight.t()):
        mask = adversarial_masks(*w.shape)[case]
        index = SparseIndex.from_mask(mask, w)
        got = torch.ops.dpf.kept_values(w, index.ptr, index.idx)
        assert torch.equal(got, reference.kept_values(w, index.ptr, index.idx))
        assert torch.equal(got, w[mask])  # row-major order


@pytest.mark.skipif(not COMPILED, reason="compares the compiled op with the reference")
@pytest.mark.parametrize("shape", [(1, 1), (7, 17), (65, 100), (256, 40), (9, 8), (16, 16),
                                   (33, 529)])
def test_batch_major_equals_the_reference(isa, shape):
    """The transposed activations and the bias gradient: whole 8x8 and 16x16 blocks, their
    edges, more columns than one block of the walk (256), and a view whose rows are apart by
    more than their length."""
    from dpf_ext.ops import reference

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape[0], shape[1] + 3, generator=g)[:, 2:2 + shape[1]]
    for sums in (False, True):
        got, want = torch.ops.dpf.batch_major(x, sums), reference.batch_major(x, sums)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


AUTOCAST_MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)),
               lambda x: x, (8, 32)),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, 4, 3, padding=1)),
               lambda x: x, (2, 4, 6, 6)),
    "attention": (lambda: nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True)),
                  None, (2, 5, 16)),
}


def _autocast_step(kind, compute_mode, input_dtype):
    build, _, shape = AUTOCAST_MODELS[kind]
    torch.manual_seed(0)
    model = dpf_ext.sparsify(build(), compute=compute_mode)
    dpf_ext.Pruner(model, "static", 0.7)  # masks drawn from the seed: the same in both runs
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(input_dtype)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model[0](x, x, x, need_weights=False)[0] if kind == "attention" else model(x)
    y.float().square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    return y, x.grad, grads, dpf_ext.compute_report(model)


@pytest.mark.skipif(not COMPILED, reason="the compiled sparse kernels are not built")
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["f32-in", "bf16-in"])
@pytest.mark.parametrize("kind", sorted(AUTOCAST_MODELS))
def test_the_sparse_path_follows_autocast_as_the_dense_one(kind, input_dtype):
    y_dense, dx_dense, g_dense, report = _autocast_step(kind, "dense", input_dtype)
    y_sparse, dx_sparse, g_sparse, sparse_report = _autocast_step(kind, "sparse", input_dtype)
    assert set(report.values()) == {"dense"} and set(sparse_report.values()) == {"sparse"}
    assert y_sparse.dtype == y_dense.dtype == torch.bfloat16
    assert dx_sparse.dtype == dx_dense.dtype == input_dtype
    # bfloat16 has 8 bits of mantissa; the sparse path rounds once, the dense one per product
    torch.testing.assert_close(y_sparse.float(), y_dense.float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(dx_sparse.float(), dx_dense.float(), rtol=0.1, atol=0.1)
    for a, b in zip(g_sparse, g_dense):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.1 * b.abs().max().item())


@pytest.mark.parametrize("lanes", [0, 8, 16, 32, 64], ids=lambda n: f"panel-{n or 'derived'}")
@pytest.mark.parametrize("batch", [1, 7, 16, 17, 63, 65, 130])
def test_every_panel_width_matches_the_masked_dense_path(isa, lanes, batch):
    """The batch panels' edges: a batch that is not a multiple of the panel, one row, rows
    with no kept weight, every width the instruction set has (and the derived one)."""
    x, weight, mask, bias = random_case(70, 90, batch, 0.2, seed=batch + lanes)
    mask[::7] = False  # empty rows of the index (and of the transposed one's columns)
    mask[:, ::11] = False
    previous = ops.panel_lanes(lanes)
    try:
        for dense_grad in (False, True):
            assert_close_all(both(x, weight, mask, bias, dense_grad))
    finally:
        ops.panel_lanes(previous)
    assert ops.panel_lanes() == previous


def test_the_panel_setting_is_checked_and_the_caches_are_read():
    if not COMPILED:
        assert ops.panel_lanes() == -1 and ops.cache_bytes() == (0, 0)
        return
    l1, l2 = ops.cache_bytes()
    assert 4096 <= l1 <= l2  # what sysconf or /sys says, or the fallbacks (32 KiB, 1 MiB)
    with pytest.raises(ValueError, match="lanes must be a non-negative int"):
        ops.panel_lanes(-3)
