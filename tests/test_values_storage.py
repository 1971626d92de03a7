"""Values storage (``Pruner(storage="values")``): layers that hold their kept values only.

The same seed trains to the same losses, masks and weights as dense storage with the sparse
products; a mid-run checkpoint resumes bit-identical; no tensor of a layer's dense size stays
allocated; a model built on the meta device starts without one."""

import io
import itertools
import math

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext import ops
from dpf_ext.ops import reference


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 5))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g))
            for _ in range(n)]


def build(storage, method, adam=False, steps=30):
    model = dpf_ext.sparsify(make_model(), compute="sparse")
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if adam
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    pruner = dpf_ext.Pruner(model, method, 0.8, update_every=5, total_steps=steps,
                            optimizer=opt, storage=storage)
    return model, opt, pruner


def train(model, opt, pruner, data):
    losses = []
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        losses.append(loss.item())
    return losses


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("method,adam", list(itertools.product(["static", "set", "rigl"], [False, True])))
def test_values_storage_trains_as_dense_storage(method, adam):
    data = batches(30)
    dense = build("dense", method, adam)
    values = build("values", method, adam)
    torch.testing.assert_close(train(*values, data), train(*dense, data))
    assert values[2].report().kept == dense[2].report().kept
    if method != "static":  # the updates moved weights
        assert values[2].report().reactivated_total > 0
    dense[2].finalize()
    values[2].finalize()
    for a, b in zip(linears(dense[0]), linears(values[0])):
        assert torch.equal(a.mask, b.mask)
        torch.testing.assert_close(b.weight, a.weight)


def test_a_mid_run_checkpoint_resumes_bit_identical():
    data = batches(40)
    whole = build("values", "rigl", adam=True, steps=40)
    train(*whole, data)
    first = build("values", "rigl", adam=True, steps=40)
    train(*first, data[:13])
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                "pruner": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = build("values", "rigl", adam=True, steps=40)
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["pruner"])
    train(*resumed, data[13:])
    for (k, a), (_, b) in zip(whole[0].state_dict().items(), resumed[0].state_dict().items()):
        assert torch.equal(a, b), k


def test_no_tensor_of_a_layers_dense_size_stays_allocated():
    model, opt, pruner = build("values", "rigl", adam=True)
    train(model, opt, pruner, batches(12))  # two updates
    for layer in linears(model):
        tensors = [*layer.parameters(), *layer.buffers(),
                   *(p.grad for p in layer.parameters() if p.grad is not None),
                   *(v for p in layer.parameters() for v in opt.state[p].values()
                     if isinstance(v, torch.Tensor))]
        kept, dense = layer.weight.numel(), math.prod(layer.dense_shape)
        assert layer.weight.dim() == 1 and kept < dense
        assert all(t.numel() <= max(kept, max(layer.dense_shape) + 1) < dense for t in tensors)
        with pytest.raises(AttributeError, match="values storage"):
            layer.mask


def test_finalize_gives_back_dense_layers_and_plain_modules():
    model, opt, pruner = build("values", "set")
    train(model, opt, pruner, batches(8))
    x = torch.randn(3, 20)
    with torch.no_grad():
        before = model(x)
    pruner.finalize(unwrap=True)
    assert all(type(m) is nn.Linear for m in linears(model))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    assert 0.75 < sum((m.weight == 0).sum().item() for m in linears(model)) / sum(
        m.weight.numel() for m in linears(model)) < 0.85


def test_the_values_product_matches_the_masked_dense_product_in_both_directions(isa):
    torch.manual_seed(3)
    for rows, cols, batch, density in [(37, 53, 70, 0.2), (1, 9, 1, 1.0), (8, 16, 33, 0.0),
                                       (64, 40, 17, 0.05)]:
        mask = torch.rand(rows, cols) < density
        mask[rows // 2] = False  # an empty row
        weight = torch.randn(rows, cols)
        index = ops.SparseIndex.from_mask(mask)
        values = weight[mask].clone().requires_grad_()
        x = torch.randn(batch, cols, requires_grad=True)
        bias = torch.randn(rows, requires_grad=True)
        y = ops.values_linear(x, values, index, bias)
        dy = torch.randn_like(y)
        y.backward(dy)
        x2 = x.detach().clone().requires_grad_()
        w2 = weight.clone().requires_grad_()
        bias2 = bias.detach().clone().requires_grad_()
        y2 = nn.functional.linear(x2, w2 * mask, bias2)
        y2.backward(dy)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values.grad, w2.grad[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bias.grad, bias2.grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampled_values_are_the_sampled_product_at_the_kept_positions(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if ops.simd() == "none":
        pytest.skip("the compiled kernels are not built")
    torch.manual_seed(4)
    for rows, cols, batch in [(37, 53, 70), (5, 3, 1), (16, 16, 0)]:
        mask = torch.rand(rows, cols, device=device) < 0.3
        index = ops.SparseIndex.from_mask(mask)
        dyt = torch.randn(rows, batch, device=device)
        xt = torch.randn(cols, batch, device=device)
        got = ops.backend_for(device, "sampled_values").sampled_values(dyt, xt, index.ptr, index.idx)
        want = (dyt @ xt.t())[mask]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reference.sampled_values(dyt, xt, index.ptr, index.idx), want,
                                   rtol=1e-5, atol=1e-5)


def test_the_values_product_gradchecks_in_float64():
    torch.manual_seed(5)
    mask = torch.rand(6, 7) < 0.5
    index = ops.SparseIndex.from_mask(mask)
    values = torch.randn(index.nnz, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: ops.values_linear(x, v, index, b),
                                    (x, values, bias))


def test_an_index_from_positions_equals_the_one_from_the_mask():
    torch.manual_seed(6)
    mask = torch.rand(13, 29) < 0.25
    mask[4] = False
    mask[:, 7] = False
    a = ops.SparseIndex.from_positions(13, 29, mask.reshape(-1).nonzero().view(-1))
    b = ops.SparseIndex.from_mask(mask)
    for field in ("ptr", "idx", "t_ptr", "t_idx", "t_perm"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    with pytest.raises(ValueError, match="sorted, distinct"):
        ops.SparseIndex.from_positions(2, 2, torch.tensor([1, 1]))


def test_random_positions_are_a_uniform_subset():
    from dpf_ext.nn.values_storage import random_positions
    g = torch.Generator().manual_seed(0)
    counts: dict[tuple, int] = {}
    for _ in range(3000):
        p = random_positions(5, 2, g, torch.device("cpu"))
        assert p.tolist() == sorted(set(p.tolist())) and len(p) == 2
        counts[tuple(p.tolist())] = counts.get(tuple(p.tolist()), 0) + 1
    assert len(counts) == 10 and all(200 < c < 400 for c in counts.values())  # 300 expected
    assert random_positions(7, 7, g, torch.device("cpu")).tolist() == list(range(7))
    assert random_positions(7, 0, g, torch.device("cpu")).numel() == 0


def test_a_model_built_on_the_meta_device_starts_without_a_dense_tensor():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 10))
    model = dpf_ext.sparsify(model)
    pruner = dpf_ext.Pruner(model, "static", 0.99, storage="values", budget="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = model[0]
    assert first.weight.numel() == round(0.01 * 512 * 1024)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    bound = 1 / math.sqrt(512)  # nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert first.weight.abs().max() <= bound
    assert abs(first.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert first.bias.abs().max() <= bound and first.bias.std() > 0
    assert pruner.report().kept == first.weight.numel() + model[2].weight.numel()
    x, y = torch.randn(32, 512), torch.randint(0, 10, (32,))
    losses = train(model, opt, pruner, [(x, y)] * 20)
    assert losses[-1] < losses[0]


def test_sparse_init_on_the_meta_device_scales_each_unit_by_its_kept_fan_in():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(400, 300))
    model = dpf_ext.sparsify(model)
    dpf_ext.Pruner(model, "static", 0.9, storage="values", budget="uniform", sparse_init=True)
    layer = model[0]
    kept = layer.kept_ptr.diff()
    rows = torch.repeat_interleave(torch.arange(300), kept)
    # U(-b, b) per weight times sqrt(400 / kept): each unit's bound follows its own kept count
    limit = (1 / math.sqrt(400)) * (400 / kept.clamp(min=1)).sqrt()
    assert bool((layer.weight.abs() <= limit[rows] + 1e-7).all())
    assert layer.weight.std() > 2.5 * (1 / math.sqrt(400)) / math.sqrt(3)  # sqrt(10) in expectation


def test_values_storage_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="feedback"):
        dpf_ext.Pruner(dpf_ext.sparsify(make_model()), "dpf", 0.8, total_steps=10,
                       storage="values")
    conv = dpf_ext.sparsify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)))
    with pytest.raises(ValueError, match="values storage covers Linear layers"):
        dpf_ext.Pruner(conv, "static", 0.8, storage="values")
    with pytest.raises(ValueError, match="storage must be one of"):
        dpf_ext.Pruner(dpf_ext.sparsify(make_model()), "static", 0.8, storage="sparse")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="materialize and initialise"):
        dpf_ext.Pruner(dpf_ext.sparsify(meta), "static", 0.5, storage="values")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="needs the dense weights"):
        dpf_ext.Pruner(dpf_ext.sparsify(meta), "snip", 0.5, storage="values",
                       batch_loss=lambda m: m(torch.randn(2, 8)).sum())


def test_an_optimizer_built_before_the_pruner_and_not_given_to_it_is_an_error():
    model = dpf_ext.sparsify(make_model())
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = dpf_ext.Pruner(model, "static", 0.8, storage="values")
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    stale.step()
    with pytest.raises(RuntimeError, match="Build the optimizer after the pruner"):
        pruner.step()


def test_a_dense_checkpoint_does_not_load_into_values_storage():
    dense_state = dpf_ext.sparsify(make_model()).state_dict()
    model = dpf_ext.sparsify(make_model())
    dpf_ext.Pruner(model, "static", 0.8, storage="values")
    with pytest.raises(ValueError, match="dense storage"):
        model.load_state_dict(dense_state)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_runs_values_storage(compiler):
    model = dpf_ext.sparsify(make_model())
    dpf_ext.Pruner(model, "static", 0.8, storage="values")
    x = torch.randn(16, 20)
    model(x).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.square().sum().backward()
    for p, g in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_opcheck_sampled_values():
    if not hasattr(torch.ops.dpf, "sampled_values"):
        pytest.skip("the compiled kernels are not built")
    g = torch.Generator().manual_seed(0)
    index = ops.SparseIndex.from_mask(torch.rand(9, 11, generator=g) < 0.4)
    torch.library.opcheck(torch.ops.dpf.sampled_values.default,
                          (torch.randn(9, 5, generator=g), torch.randn(11, 5, generator=g),
                           index.ptr, index.idx))


def test_save_sparse_and_sparse_inference_read_values_storage(tmp_path):
    model, opt, pruner = build("values", "set")
    train(model, opt, pruner, batches(8))
    x = torch.randn(5, 20)
    with torch.no_grad():
        want = model(x)
    dpf_ext.save_sparse(model, tmp_path / "model.pt")
    plain = dpf_ext.load_sparse(tmp_path / "model.pt", make_model(seed=1))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want)
    choices = dpf_ext.to_sparse_inference(model)
    assert [c.sparse for c in choices] == [True] * 3
    assert all(type(m).__name__ == "SparseLinear" for m in model if not isinstance(m, nn.ReLU))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_top_positions_is_hand_checked_and_the_same_for_any_blocks():
    from dpf_ext.methods.base import top_positions
    scores = torch.tensor([0.5, 0.0, 3.0, 0.2, 3.0, 0.0, 0.0, 1.0])
    excluded = torch.tensor([2, 7])
    # the largest outside 2 and 7: 4 (3.0), 0 (0.5), 3 (0.2)
    for size in (1, 3, 8):
        blocks = [(s, scores[s:s + size]) for s in range(0, 8, size)]
        assert top_positions(blocks, 3, excluded, seed=0).tolist() == [0, 3, 4]
    # five among the zeros 1, 5, 6 and the rest: ties at 0 go by the seed's hash, any blocks
    picks = {}
    for seed in range(12):
        chosen = [top_positions([(s, scores[s:s + size]) for s in range(0, 8, size)], 5,
                                excluded, seed).tolist() for size in (1, 2, 8)]
        assert chosen[0] == chosen[1] == chosen[2]
        assert set(chosen[0]) >= {0, 3, 4} and not set(chosen[0]) & {2, 7}
        picks[seed] = tuple(chosen[0])
    assert len(set(picks.values())) == 3  # each pair of the three zeros, by seed
    with pytest.raises(ValueError, match="non-finite"):
        top_positions([(0, torch.tensor([1.0, float("nan")]))], 1, torch.tensor([], dtype=torch.long), 0)


def test_rigl_on_values_storage_forms_its_gradient_a_block_at_a_time(monkeypatch):
    """The update step's dense gradient is recorded as products and formed in blocks of a
    few rows (here 64 entries: a row or two); the masks are those of dense storage."""
    import dpf_ext.nn.estimators as estimators
    formed = []
    blocks = estimators.ProductGradient.blocks

    def recording(self, entries=None):
        for r0, block in blocks(self, 64):
            formed.append(block.numel())
            yield r0, block
    monkeypatch.setattr(estimators.ProductGradient, "blocks", recording)
    data = batches(12)
    dense = build("dense", "rigl")
    values = build("values", "rigl")
    torch.testing.assert_close(train(*values, data), train(*dense, data))
    assert formed and max(formed) <= 64
    for a, b in zip(linears(dense[0]), linears(values[0])):
        from dpf_ext.nn.values_storage import dense as dense_of
        assert torch.equal(dense_of(b)[1], a.mask)
