"""Sparse inference on the CPU: one Linear layer as a CSR product against the dense layer
at 50-99% sparsity (the crossover per shape), and whole models converted by
dpf_ext.to_sparse_inference against the dense ones (batch 64)."""

import copy

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.inference import SparseLinear
from dpf_ext.app.models import build_model
from dpf_ext.schedules import Constant

SHAPES = [(512, 64), (256, 512), (1024, 1024), (4096, 4096)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]


def _pruned_linear(out_f, in_f, sparsity):
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight[torch.rand_like(layer.weight) < sparsity] = 0
    return layer


@pytest.mark.parametrize("impl", ["torch-dense", "csr"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_linear_layer(benchmark, shape, sparsity, impl):
    layer = _pruned_linear(*shape, sparsity)
    module = layer if impl == "torch-dense" else SparseLinear(layer.weight, layer.bias)
    x = torch.randn(64, shape[1])
    benchmark.group = f"Linear {shape[0]}x{shape[1]} at {sparsity:.0%}, batch 64"
    with torch.no_grad():
        benchmark.pedantic(module, args=(x,), rounds=30, warmup_rounds=3)


def _model(name, sparsity):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048),
                              nn.ReLU(), nn.Linear(2048, 10))
        x = torch.randn(64, 1, 28, 28)
    else:
        model = build_model("resnet20", (3, 32, 32), 10)
        x = torch.randn(64, 3, 32, 32)
    dpf_ext.sparsify(model)
    pruner = dpf_ext.DPF(model, schedule=Constant(sparsity), scope="layer", channel_floor=False,
                         watch=False)
    pruner.finalize(unwrap=True)
    return model.eval(), x


@pytest.mark.parametrize("impl", ["torch-dense", "dpf_ext-converted"])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.98, 0.99])
@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_model(benchmark, name, sparsity, impl):
    model, x = _model(name, sparsity)
    if impl == "dpf_ext-converted":
        model = copy.deepcopy(model)
        dpf_ext.to_sparse_inference(model, repeats=5, example=x)
    benchmark.group = f"{name} at {sparsity:.0%}, batch 64 (inference)"
    with torch.no_grad():
        benchmark.pedantic(model, args=(x,), rounds=10, warmup_rounds=2)
