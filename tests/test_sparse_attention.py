"""nn.MultiheadAttention with its projections on the sparse path, against torch's own forward
on the masked weights: self- and cross-attention, batch first or not, unbatched inputs, key
padding and attention masks (bool and float), the causal hint, the attention weights (per
head and averaged), and training steps of nn.TransformerEncoder for every method family."""

import copy

import pytest
import torch
from torch import nn

import dpf_ext
from cases import assert_same_training, train_steps

E, HEADS = 32, 4


def attention(batch_first, bias=True):
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, HEADS, batch_first=batch_first, bias=bias)


def pruned_pair(batch_first, bias=True):
    """A sparse and a dense DPF copy of one attention layer, the same 70% of each weight pruned."""
    base = dpf_ext.sparsify(nn.Sequential(attention(batch_first, bias)))
    dpf_ext.Pruner(base, "static", 0.7, seed=1)
    sparse = copy.deepcopy(base)
    dpf_ext.set_compute(sparse, "sparse")
    return sparse[0], base[0]


def inputs(batch_first, unbatched=False, same=True, length=5, source=7, batch=3):
    g = torch.Generator().manual_seed(2)
    shape = (length, E) if unbatched else (batch, length, E) if batch_first else (length, batch, E)
    q = torch.randn(shape, generator=g)
    if same:
        return q, q, q
    kshape = list(shape)
    kshape[-2 if unbatched or batch_first else 0] = source
    return q, torch.randn(kshape, generator=g), torch.randn(kshape, generator=g)


def compare(sparse, dense, args, kwargs):
    outs = []
    for layer in (sparse, dense):
        layer.zero_grad()
        q, k, v = (t.detach().clone().requires_grad_() for t in args)
        if args[0] is args[1] is args[2]:
            k = v = q
        out, weights = layer(q, k, v, **kwargs)
        out.square().sum().backward()
        grads = [p.grad for p in layer.parameters()]
        outs.append((out, weights, q.grad, grads))
    (o1, w1, g1, p1), (o2, w2, g2, p2) = outs
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("same", [True, False], ids=["self", "cross"])
def test_the_sparse_attention_matches_torchs(batch_first, need_weights, average, same):
    sparse, dense = pruned_pair(batch_first)
    args = inputs(batch_first, same=same)
    compare(sparse, dense, args, dict(need_weights=need_weights, average_attn_weights=average))


@pytest.mark.parametrize("need_weights", [False, True])
def test_masks_and_the_causal_hint(need_weights):
    sparse, dense = pruned_pair(True)
    q, k, v = inputs(True)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    per_head = torch.rand(3 * HEADS, 5, 5, generator=torch.Generator().manual_seed(3)) < 0.2
    per_head[..., 0] = False  # every query keeps one key
    for kwargs in (dict(key_padding_mask=padding), dict(attn_mask=causal, is_causal=True),
                   dict(attn_mask=causal, is_causal=True, key_padding_mask=padding),
                   dict(attn_mask=per_head), dict(attn_mask=torch.isinf(causal))):
        compare(sparse, dense, (q, k, v), dict(need_weights=need_weights, **kwargs))


def test_unbatched_input_and_no_bias():
    sparse, dense = pruned_pair(False, bias=False)
    compare(sparse, dense, inputs(False, unbatched=True), dict(need_weights=True))
    compare(sparse, dense, inputs(False, unbatched=True, same=False), dict(need_weights=False))


def test_both_projections_read_the_kept_weights_only():
    """A NaN at a pruned position reaches the dense path's output (0 · NaN) and not the
    sparse one's: the sparse products never read it."""
    for name in ("in_proj_weight", "out_proj.weight"):
        sparse, dense = pruned_pair(True)
        with torch.no_grad():
            for layer in (sparse, dense):
                weight = layer.get_parameter(name)
                mask = layer.mask if name == "in_proj_weight" else layer.out_proj.mask
                weight[~mask] = float("nan")
        q = inputs(True)[0]
        assert torch.isfinite(sparse(q, q, q)[0]).all(), name
        assert torch.isnan(dense(q, q, q)[0]).any(), name
    sparse.compute = "dense"  # the output projection alone set sparse: it runs sparse
    assert dpf_ext.compute_report(nn.Sequential(sparse)) == {"0": "dense", "0.out_proj": "sparse"}
    assert torch.isfinite(sparse(q, q, q)[0]).all()


def test_the_report_and_what_has_no_sparse_path():
    sparse, _ = pruned_pair(True)
    model = nn.Sequential(sparse)
    assert dpf_ext.compute_report(model) == {"0": "sparse", "0.out_proj": "sparse"}
    odd = dpf_ext.sparsify(nn.Sequential(nn.MultiheadAttention(E, HEADS, add_bias_kv=True)))
    with pytest.raises(ValueError, match="add_bias_kv, add_zero_attn and separate kdim/vdim"):
        dpf_ext.set_compute(odd, "sparse")
    dpf_ext.set_compute(odd, "auto")  # torch's forward reads its output projection densely
    assert dpf_ext.compute_report(odd) == {"0": "dense", "0.out_proj": "dense"}


def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, dim_feedforward=64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                         nn.Flatten(), nn.Linear(6 * E, 3))


def batch(g):
    return torch.randn(4, 6, E, generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize("method, options", [("static", {}), ("rigl", {"update_every": 3}),
                                             ("dpf", {"update_every": 3})])
def test_transformer_training_matches_the_dense_path(method, options):
    runs = []
    for mode in ("dense", "sparse"):
        model = dpf_ext.sparsify(encoder(), compute=mode)
        runs.append((train_steps(model, method, 6, batch, **options), model))
    report = dpf_ext.compute_report(runs[1][1])
    assert all(v == "sparse" for v in report.values()), report
    assert any(name.endswith("self_attn") for name in report)
    if method == "dpf":  # the feedback amplifies float differences at the threshold: one step
        assert runs[1][0][0] == pytest.approx(runs[0][0][0], rel=1e-5)
    else:
        assert_same_training(*runs)
