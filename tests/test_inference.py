"""Sparse inference modules: the same outputs as the dense model, chosen by measurement."""

import copy
import math

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
    choices = dpf_ext.to_sparse_inference(model, repeats=5, decide="measure")
    assert [c.name for c in choices] == ["0", "2", "4"]
    assert all(c.sparsity == pytest.approx(0.98, abs=0.01) for c in choices)
    for c in choices:
        assert isinstance(model[int(c.name)], SparseLinear) == c.sparse
        assert c.sparse == (c.dense_ms >= 1.1 * c.sparse_ms)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    # every layer converted, whatever the timing: the outputs still agree
    assert all(c.sparse for c in dpf_ext.to_sparse_inference(forced, min_speedup=1e-9, repeats=1,
                                                             decide="measure"))
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
    choices = dpf_ext.to_sparse_inference(model, min_speedup=1e-9, repeats=1, decide="measure")
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
    untried = dpf_ext.to_sparse_inference(copy.deepcopy(model), repeats=1, decide="measure")
    assert {c.name: c.reason for c in untried if c.name != "6"} == {
        "0": "a convolution: pass example= to measure it",
        "2": "a convolution: pass example= to measure it",
        "4": "its stride is (2, 2) (the sparse convolution needs (1, 1))"}
    choices = dpf_ext.to_sparse_inference(model, min_speedup=1e-9, repeats=1, example=x,
                                          decide="measure")
    assert [c.name for c in choices if c.sparse] == ["0", "2", "6"]
    assert isinstance(model[0], SparseConv2d) and isinstance(model[2], SparseConv2d)
    assert "sparsity=9" in repr(model[2]) and not isinstance(model[4], SparseConv2d)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model[:2](x[0]), model[:2](x[:1])[0])  # unbatched


def test_the_default_rule_converts_the_same_model_the_same_way_every_time():
    from dpf_ext.inference import LINEAR_RULE, SparseConv2d

    torch.manual_seed(0)
    model = dpf_ext.sparsify(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 1024),
        nn.Linear(1024, 10)))
    dpf_ext.Pruner(model, "static", 0.96, budget="uniform")
    with torch.no_grad():
        model[1].mask.fill_(True)  # 0% sparse
        model[5].mask.copy_(torch.arange(1024 * 1024).reshape(1024, 1024) % 10 < 3)  # density 0.3
        for layer in (model[1], model[5]):
            layer.weight.uniform_(0.5, 1.0)  # the pruned weights were zeroed
    x = torch.randn(4, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)
    runs = [dpf_ext.to_sparse_inference(copy.deepcopy(model), repeats=r) for r in (0, 1, 2)]
    decisions = [[(c.name, c.sparse, c.reason) for c in run] for run in runs]
    assert decisions[0] == decisions[1] == decisions[2]
    assert decisions[0] == [
        ("0", True, ""),  # a convolution needs no example under the rule
        ("1", False, "sparsity 0.0% under min_sparsity"),
        ("3", True, ""),  # 131,072 weights at density 0.04
        ("4", True, ""),
        ("5", False, f"density 0.3000 above the rule's 0.2 for {2**20:,}+ weights"),
        ("6", False, f"fewer than {LINEAR_RULE[-1][0]:,} weights: too small to gain (the rule)")]
    assert all(math.isnan(c.dense_ms) for c in runs[0])  # repeats=0: nothing timed
    linear = {c.name: c for c in runs[1]}["4"]
    assert linear.dense_ms > 0 and linear.sparse_ms > 0  # timed, not deciding
    dpf_ext.to_sparse_inference(model, repeats=0)
    assert isinstance(model[0], SparseConv2d) and isinstance(model[4], SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="decide must be one of"):
        dpf_ext.to_sparse_inference(model, decide="fastest")
    with pytest.raises(ValueError, match="repeats >= 1"):
        dpf_ext.to_sparse_inference(model, decide="measure", repeats=0)
