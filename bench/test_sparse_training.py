"""Sparse training on the CPU: one Linear layer's training step (forward, input gradient,
weight gradient) at 80-99% sparsity through dpf_ext's sparse products, against the dense
layer, the masked dense layer (what every method ran before), torch's CSR route and
SparseProp (``pip install sparseprop``; skipped with a message where it does not build);
the cost of rebuilding the index at a mask update; whole training steps (MLP, a GPT-2
built from a config, an nn.TransformerEncoder and ResNet-20) at 90-98% with a masked and a dense (DPF) weight
gradient; and ResNet-20's 3x3 convolutions through the direct sparse convolution, against
dense, masked dense and SparseProp's.

Thread count: the run's (``torch.set_num_threads``; ``OMP_NUM_THREADS=1 python bench/run.py
-k sparse_training`` for the 1-thread figures)."""


import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.app.models import ResNet
from dpf_ext.ops import ConvIndex, SparseIndex, sparse_conv2d, sparse_linear
from memory import peak_extra_bytes
from dpf_ext.schedules import Constant
from workloads import interleaved_medians

SHAPES = [(768, 768), (1024, 4096), (4096, 1024)]  # (in, out)
SPARSITIES = [0.8, 0.9, 0.95, 0.98, 0.99]
BATCHES = [64, 256]
IMPLS = ["torch-dense", "torch-masked", "dpf-sparse", "dpf-sparse-fullgrad", "torch-csr",
         "sparseprop"]


def _case(shape, sparsity, batch):
    in_f, out_f = shape
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
    bias = nn.Parameter(torch.zeros(out_f))
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    x = torch.randn(batch, in_f, generator=g, requires_grad=True)
    return weight, bias, mask, x


def _step_fn(impl, weight, bias, mask, x):
    """One training step of the layer with ``impl``: forward, then the gradients of the
    input, the weight (at the kept positions, or dense for ``-fullgrad``) and the bias."""
    dy = torch.randn(x.shape[0], weight.shape[0])
    if impl == "torch-dense":
        return lambda: torch.autograd.backward(nn.functional.linear(x, weight, bias), dy)
    if impl == "torch-masked":
        return lambda: torch.autograd.backward(
            nn.functional.linear(x, dpf_ext.ops.masked_weight(weight, mask, False), bias), dy)
    if impl.startswith("dpf-sparse"):
        index = SparseIndex.from_mask(mask)
        full = impl.endswith("fullgrad")
        return lambda: torch.autograd.backward(sparse_linear(x, weight, index, bias, full), dy)
    if impl == "torch-csr":  # torch's sparse CSR kernels, the index built once
        index = SparseIndex.from_mask(mask)
        crow, col = index.ptr, index.idx.long()
        t_crow, t_col = index.t_ptr, index.t_idx.long()

        def step():
            w = weight.detach()
            csr = torch.sparse_csr_tensor(crow, col, w.view(-1)[index.pos], weight.shape)
            csr_t = torch.sparse_csr_tensor(t_crow, t_col, w.view(-1)[index.pos][index.t_perm],
                                            (weight.shape[1], weight.shape[0]))
            xd = x.detach()
            (csr @ xd.t()).t() + bias.detach()
            (csr_t @ dy.t()).t()
            torch.sparse.sampled_addmm(csr, dy.t().contiguous(), xd, beta=0.0)
            dy.sum(0)
        return step
    if impl == "sparseprop":
        try:
            from sparseprop.modules import SparseLinear
        except ImportError as exc:
            pytest.skip(f"sparseprop is not installed ({exc}): pip install sparseprop")
        with torch.no_grad():
            dense = (weight * mask).detach().clone()
        layer = SparseLinear(dense, nn.Parameter(bias.detach().clone()))
        return lambda: torch.autograd.backward(layer(x), dy)
    raise ValueError(impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_linear_training_step(benchmark, shape, batch, sparsity, impl):
    """One Linear step of ``impl``; every case but dense torch is also timed in interleaved
    rounds with dense torch (``interleaved``: its time as a fraction of dense torch's)."""
    weight, bias, mask, x = _case(shape, sparsity, batch)

    def timed(impl):
        step = _step_fn(impl, weight, bias, mask, x)

        def run():
            x.grad = weight.grad = bias.grad = None
            step()
        return run

    run = timed(impl)
    benchmark.group = (f"Linear {shape[0]}->{shape[1]} step, batch {batch}, {sparsity:.0%}, "
                       f"{torch.get_num_threads()} thread(s)")
    benchmark.extra_info.update(sparsity=sparsity, batch=batch, shape=list(shape))
    if impl != "torch-dense":
        medians = interleaved_medians({impl: run, "dense": timed("torch-dense")}, rounds=15)
        benchmark.extra_info["interleaved"] = {"of dense torch's time":
                                               medians[impl] / medians["dense"]}
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("op", ["forward", "input-gradient", "sampled-gradient"])
@pytest.mark.parametrize("lanes", [0, 16, 32, 64], ids=lambda n: f"panel-{n or 'derived'}")
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: f"{s[0]}to{s[1]}")
def test_linear_op_split(benchmark, shape, batch, sparsity, lanes, op):
    """Where a sparse step's time goes: each CPU op alone (the forward product, the input
    gradient through the transposed index, the sampled weight gradient) at each batch panel
    width (:func:`dpf_ext.ops.panel_lanes`; ``derived``: from the L2 size). The sampled
    gradient reads the whole batch (its panel is not set): one width only."""
    if dpf_ext.ops.simd() == "none":
        pytest.skip("the compiled kernels are not built")
    if op == "sampled-gradient" and lanes:
        pytest.skip("the sampled gradient has no panel width to set")
    weight, _, mask, _ = _case(shape, sparsity, batch)
    index = SparseIndex.from_mask(mask)
    values = weight.detach().reshape(-1)[index.pos].contiguous()
    values_t = values[index.t_perm].contiguous()  # the transposed index's order
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(shape[0], batch, generator=g)
    dyt = torch.randn(shape[1], batch, generator=g)
    fn = {"forward": lambda: torch.ops.dpf.sparse_mm(xt, values, index.ptr, index.idx, None),
          "input-gradient": lambda: torch.ops.dpf.sparse_mm(dyt, values_t, index.t_ptr,
                                                            index.t_idx, None),
          "sampled-gradient": lambda: torch.ops.dpf.sampled_mm(dyt, xt, index.ptr, index.idx)}[op]
    previous = dpf_ext.ops.panel_lanes(lanes)
    try:
        benchmark.group = (f"Linear {shape[0]}->{shape[1]} ops, batch {batch}, {sparsity:.0%}, "
                           f"{torch.get_num_threads()} thread(s)")
        benchmark.extra_info.update(kept=int(index.idx.numel()), batch=batch, op=op, lanes=lanes)
        benchmark.pedantic(fn, rounds=15, warmup_rounds=2)
    finally:
        dpf_ext.ops.panel_lanes(previous)


@pytest.mark.parametrize("impl", ["torch-dense-product", "index-rebuild"])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}")
def test_index_rebuild(benchmark, shape, sparsity, impl):
    """A mask update's cost to the sparse path (both indices from the mask) against one
    dense product of the layer (batch 256)."""
    weight, _, mask, _ = _case(shape, sparsity, 1)
    x = torch.randn(256, shape[0])
    fn = (lambda: x @ weight.detach().t()) if impl == "torch-dense-product" else \
        (lambda: SparseIndex.from_mask(mask))
    benchmark.group = f"index rebuild {shape[0]}->{shape[1]} at {sparsity:.0%}"
    benchmark.pedantic(fn, rounds=7, warmup_rounds=1)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


def _resnet20():
    torch.manual_seed(0)
    return ResNet(20, 3, 10)


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(512, 8, dim_feedforward=2048, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Linear(512, 10))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=512, n_layer=2,
                                     n_head=8, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _model_step(model_name, sparsity, method, compute):
    """One optimizer step of ``model_name`` (see :func:`test_training_step`), and the model."""
    model = {"mlp": _mlp, "gpt2": _gpt2, "encoder": _encoder, "resnet20": _resnet20}[model_name]()
    if model_name == "encoder":  # 8 sequences of 64 tokens, a label per token
        tokens, labels = torch.randn(8, 64, 512), torch.randint(0, 10, (8 * 64,))
        loss_fn = lambda m: nn.functional.cross_entropy(m(tokens).reshape(-1, 10), labels)  # noqa: E731
    elif model_name != "gpt2":
        batch = ((torch.randn(256, 1024), torch.randint(0, 10, (256,))) if model_name == "mlp"
                 else (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))))
        loss_fn = lambda m: nn.functional.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    else:
        ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
        loss_fn = lambda m: m(ids, labels=ids).loss  # noqa: E731
    pruner = None
    if compute != "torch-dense":
        dpf_ext.sparsify(model, compute=compute)
        if method == "static":
            pruner = dpf_ext.Pruner(model, "static", sparsity, total_steps=10**6)
        else:
            pruner = dpf_ext.DPF(model, schedule=Constant(sparsity), update_every=10**6)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = loss_fn(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if pruner is not None:
            pruner.step()
    return step, model


@pytest.mark.parametrize("compute", ["torch-dense", "dense", "sparse", "auto"])
@pytest.mark.parametrize("method", ["static", "dpf"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.98])
@pytest.mark.parametrize("model_name", ["mlp", "gpt2", "encoder", "resnet20"])
def test_training_step(benchmark, model_name, sparsity, method, compute):
    """One optimizer step (forward, backward, SGD, the pruner's step; no mask update in the
    timed steps) of a whole model; ``torch-dense`` is the plain model without dpf_ext.
    ResNet-20 runs ``auto`` (its stride-2 convolutions have no sparse path), the others
    ``sparse``. The sparse cases are also timed in interleaved rounds with the plain model
    (``interleaved``: their time as a fraction of its, which a shared machine's slow spells
    hit alike)."""
    runs = "auto" if model_name == "resnet20" else "sparse"
    if compute in ("sparse", "auto") and compute != runs:
        pytest.skip(f"{model_name} runs compute={runs!r}")
    step, model = _model_step(model_name, sparsity, method, compute)
    benchmark.group = (f"training step {model_name} {method} at {sparsity:.0%}, "
                       f"{torch.get_num_threads()} thread(s)")
    if compute != "torch-dense":
        benchmark.extra_info["sparse_layers"] = sum(
            v == "sparse" for v in dpf_ext.compute_report(model).values())
    if compute == runs:
        plain, _ = _model_step(model_name, sparsity, method, "torch-dense")
        medians = interleaved_medians({"sparse": step, "plain": plain}, rounds=9)
        benchmark.extra_info["interleaved"] = {"of the plain model's time":
                                               medians["sparse"] / medians["plain"]}
    benchmark.pedantic(step, rounds=9, warmup_rounds=2)
    # after the warm-up rounds: the step's own peak, not the first call's allocations
    benchmark.extra_info["peak_extra_bytes"] = peak_extra_bytes(step)
    benchmark.extra_info["weights_bytes"] = sum(
        p.numel() * p.element_size() for p in model.parameters())


CONV_SHAPES = [(16, 32), (32, 16), (64, 8)]  # ResNet-20's 3x3 layers: (channels, side)
CONV_IMPLS = ["torch-dense", "torch-masked", "dpf-sparse", "dpf-sparse-fullgrad", "sparseprop"]


def _conv_step_fn(impl, weight, bias, mask, x, dy):
    """One training step of a 3x3 convolution (stride 1, padding 1) with ``impl``: forward,
    then the gradients of the input, the weight (at the kept positions, or dense for
    ``-fullgrad``) and the bias."""
    if impl == "torch-dense":
        return lambda: torch.autograd.backward(nn.functional.conv2d(x, weight, bias, padding=1), dy)
    if impl == "torch-masked":
        return lambda: torch.autograd.backward(nn.functional.conv2d(
            x, dpf_ext.ops.masked_weight(weight, mask, False), bias, padding=1), dy)
    if impl.startswith("dpf-sparse"):
        index = ConvIndex.from_mask(mask)
        full = impl.endswith("fullgrad")
        return lambda: torch.autograd.backward(sparse_conv2d(x, weight, index, bias, full), dy)
    if impl == "sparseprop":
        try:
            from sparseprop.modules import SparseConv2d
        except ImportError as exc:
            pytest.skip(f"sparseprop is not installed ({exc}): pip install sparseprop")
        with torch.no_grad():
            dense = (weight * mask).detach().clone()
        layer = SparseConv2d(dense, nn.Parameter(bias.detach().clone()), padding=1)
        return lambda: torch.autograd.backward(layer(x), dy)
    raise ValueError(impl)


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95, 0.98, 0.99])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: f"{s[0]}ch-{s[1]}px")
def test_conv_training_step(benchmark, shape, sparsity, impl):
    """ResNet-20's 3x3 convolutions, batch 64: dense, masked dense, the direct sparse
    convolution (sampled and dense weight gradient) and SparseProp's."""
    c, side = shape
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(c, c, 3, 3, generator=g) / (9 * c) ** 0.5)
    bias = nn.Parameter(torch.zeros(c))
    mask = torch.rand(c, c, 3, 3, generator=g) >= sparsity
    x = torch.randn(64, c, side, side, generator=g, requires_grad=True)
    dy = torch.randn(64, c, side, side, generator=g)
    step = _conv_step_fn(impl, weight, bias, mask, x, dy)

    def run():
        x.grad = weight.grad = bias.grad = None
        step()

    benchmark.group = (f"conv 3x3 {c}->{c} at {side}x{side}, batch 64, {sparsity:.0%}, "
                       f"{torch.get_num_threads()} thread(s)")
    benchmark.extra_info.update(sparsity=sparsity, conv=list(shape))
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)
