"""Sparse inference modules: the same outputs as the dense model, chosen by measurement."""

import copy

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.inference import SparseLinear
from dpf_ext.schedules import Constant


def test_sparse_linear_matches_the_dense_layer():
    torch.manual_seed(0)
    for bias in (True, False):
        layer = nn.Linear(300, 200, bias=bias)
        with torch.no_grad():
            layer.weight[torch.rand_like(layer.weight) < 0.95] = 0
        sparse = SparseLinear(layer.weight, layer.bias)
        x = torch.randn(4, 7, 300)
        torch.testing.assert_close(sparse(x), layer(x), rtol=1e-5, atol=1e-5)
    assert "sparsity=95" in repr(sparse) or "sparsity=94" in repr(sparse)


def test_conversion_keeps_the_outputs_and_follows_the_measurement():
    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                           nn.ReLU(), nn.Linear(1024, 10)))
    dpf_ext.DPF(model, schedule=Constant(0.98), scope="layer")
    forced = copy.deepcopy(model)
    x = torch.randn(64, 64)
    with torch.no_grad():
        expected = model(x)
    choices = dpf_ext.to_sparse_inference(model, repeats=5)
    assert [c.name for c in choices] == ["0", "2", "4"]
    assert all(c.sparsity == pytest.approx(0.98, abs=0.01) for c in choices)
    for c in choices:
        assert isinstance(model[int(c.name)], SparseLinear) == c.sparse
        assert c.sparse == (c.dense_ms >= 1.1 * c.sparse_ms)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    # every layer converted, whatever the timing: the outputs still agree
    assert all(c.sparse for c in dpf_ext.to_sparse_inference(forced, min_speedup=1e-9, repeats=1))
    assert all(isinstance(m, SparseLinear) for m in forced if not isinstance(m, nn.ReLU))
    with torch.no_grad():
        torch.testing.assert_close(forced(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="min_sparsity"):
        dpf_ext.to_sparse_inference(model, min_sparsity=1.0)


def test_gpt2_conv1d_layers_convert_and_what_stays_dense_is_reported():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = dpf_ext.sparsify(transformers.GPT2LMHeadModel(config).eval())
    dpf_ext.DPF(model, schedule=Constant(0.9), scope="layer")
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        expected = model(ids).logits
    choices = dpf_ext.to_sparse_inference(model, min_speedup=1e-9, repeats=1)
    names = {c.name for c in choices if c.sparse}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= names
    assert isinstance(model.transformer.h[0].mlp.c_proj, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    dense = dpf_ext.to_sparse_inference(nn.Sequential(nn.Linear(8, 8)), repeats=1)
    assert [(c.sparse, c.reason) for c in dense] == [(False, "sparsity 0.0% under min_sparsity")]


def test_convolutions_convert_given_an_example_and_what_stays_dense_is_reported():
    from dpf_ext.inference import SparseConv2d

    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)))
    dpf_ext.DPF(model, schedule=Constant(0.95), scope="layer")
    x = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    untried = dpf_ext.to_sparse_inference(copy.deepcopy(model), repeats=1)
    assert {c.name: c.reason for c in untried if c.name != "6"} == {
        "0": "a convolution: pass example= to measure it",
        "2": "a convolution: pass example= to measure it",
        "4": "its stride is (2, 2) (the sparse convolution needs (1, 1))"}
    choices = dpf_ext.to_sparse_inference(model, min_speedup=1e-9, repeats=1, example=x)
    assert [c.name for c in choices if c.sparse] == ["0", "2", "6"]
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], SparseConv2d)
    assert "sparsity=9" in repr(model[2]) and not isinstance(model[4], SparseConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[:2](x[0]), model[:2](x[:1])[0])  # unbatched
