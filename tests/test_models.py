"""Models no one here wrote: transformers' GPT-2, BERT and ViT built from configs (no
download), ``nn.TransformerEncoder`` and ``nn.MultiheadAttention``: what DPF covers, the
target met, the fused attention paths on masked weights, tied embeddings, and a finalized
model reloaded strictly into the original class."""

import copy
import pickle

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.schedules import Constant

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100)


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, bos_token_id=0,
                                  eos_token_id=0, **SMALL)
    return transformers.GPT2LMHeadModel(cfg), lambda: {"input_ids": torch.randint(0, 100, (2, 12))}


def bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=32, **SMALL)
    return (transformers.BertForSequenceClassification(cfg),
            lambda: {"input_ids": torch.randint(0, 100, (2, 12))})


def vit():
    cfg = transformers.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8)
    return (transformers.ViTForImageClassification(cfg),
            lambda: {"pixel_values": torch.randn(2, 3, 32, 32)})


def encoder():
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), lambda: {"src": torch.randn(2, 12, 64)}


BUILDERS = {"gpt2": gpt2, "bert": bert, "vit": vit, "transformer_encoder": encoder}


def _out(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def _train(model, pruner, make_inputs, steps=8):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        _out(model, make_inputs()).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_real_models_are_covered_pruned_and_reload_strictly(name):
    torch.manual_seed(0)
    model, make_inputs = BUILDERS[name]()
    original_keys = set(model.state_dict())
    dpf_ext.sparsify(model)
    cov = dpf_ext.nn.coverage(model)
    assert cov.fraction_without_embeddings >= 0.95, str(cov)
    pruner = dpf_ext.DPF(model, 0.8, total_steps=8, update_every=4)
    _train(model, pruner, make_inputs)
    assert pruner.report().sparsity == pytest.approx(0.8, abs=2e-3)
    assert "dpf prunes" in str(pruner.report())
    model.eval()
    inputs = make_inputs()
    with torch.no_grad():
        sparse_out = _out(model, inputs)
    pruner.finalize(unwrap=True)
    state = model.state_dict()
    assert set(state) == original_keys
    fresh, _ = BUILDERS[name]()
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(_out(fresh, inputs), sparse_out)


def _counting(monkeypatch, name):
    """Count the calls of ``torch.<name>`` (a fused attention kernel)."""
    calls = []
    original = getattr(torch, name)
    monkeypatch.setattr(torch, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_attention_fused_path_runs_on_the_masked_weights(monkeypatch):
    fused_layer = _counting(monkeypatch, "_transformer_encoder_layer_fwd")
    fused_attention = _counting(monkeypatch, "_native_multi_head_attention")
    torch.manual_seed(0)
    model, make_inputs = encoder()
    dpf_ext.sparsify(model)
    assert isinstance(model.layers[0], dpf_ext.nn.DPFTransformerEncoderLayer)
    assert isinstance(model.layers[0].self_attn, dpf_ext.DPFMultiheadAttention)
    dpf_ext.DPF(model, schedule=Constant(0.7))
    zeroed = copy.deepcopy(model)
    dpf_ext.unsparsify(zeroed)  # plain layers, the pruned weights zero
    model.eval()
    zeroed.eval()
    src = make_inputs()["src"]
    with torch.no_grad():  # torch's fused encoder-layer kernel reads the weights directly
        torch.testing.assert_close(model(src), zeroed(src))
    assert len(fused_layer) == 4  # both models' 2 layers took the fused path
    attn = model.layers[0].self_attn
    with torch.no_grad():  # and a lone attention layer its fused kernel
        torch.testing.assert_close(attn(src, src, src)[0], zeroed.layers[0].self_attn(src, src, src)[0])
    assert len(fused_attention) == 2
    with torch.enable_grad():
        torch.testing.assert_close(model(src), zeroed(src))
    assert attn.mask.shape == attn.in_proj_weight.shape and not attn.mask.all()
    assert not attn.out_proj.mask.all()


def test_multihead_attention_with_separate_projections_is_reported_not_pruned():
    model = nn.Sequential(nn.Linear(8, 8))
    model.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=5)
    dpf_ext.sparsify(model)
    assert not isinstance(model.attn, dpf_ext.DPFMultiheadAttention)
    reasons = {name: reason for name, _, reason in dpf_ext.nn.coverage(model).dense}
    assert "separate q/k/v" in reasons["attn.q_proj_weight"]
    assert "attention layer stays dense" in reasons["attn.out_proj.weight"]


def test_tied_output_layer_stays_dense_and_the_embedding_is_never_pruned():
    torch.manual_seed(0)
    model, make_inputs = gpt2()
    embedding = model.transformer.wte.weight.detach().clone()
    dpf_ext.sparsify(model)
    assert not isinstance(model.lm_head, dpf_ext.DPFLayer)
    reasons = dict((n, r) for n, _, r in dpf_ext.nn.coverage(model).dense)
    assert "tied" in reasons["transformer.wte.weight"]
    pruner = dpf_ext.DPF(model, schedule=Constant(0.9))
    pruner.finalize(unwrap=True)
    assert torch.equal(model.transformer.wte.weight, embedding)  # untouched by finalize
    with pytest.raises(ValueError, match="side door"):
        dpf_ext.sparsify(gpt2()[0], tied="prune")


def test_tied_linear_layers_share_one_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight
    dpf_ext.sparsify(model, tied="prune")
    assert model[0].mask is model[2].mask
    pruner = dpf_ext.DPF(model, schedule=Constant(0.5))
    assert len(pruner.layers) == 1 and pruner.report().kept == 32
    dpf_ext.unsparsify(model)
    assert int((model[0].weight == 0).sum()) == 32  # folded once


def test_registering_a_layer_type():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.gain

    class DPFScale(dpf_ext.DPFLayer, Scale):
        weight_name = "gain"
        channel_dim = 1

        def forward(self, x):
            return x @ self.masked_weight()

    dpf_ext.register_prunable(Scale, DPFScale)
    try:
        model = nn.Sequential(Scale())
        dpf_ext.sparsify(model)
        assert isinstance(model[0], DPFScale) and set(model.state_dict()) == {"0.gain", "0.mask"}
        pruner = dpf_ext.DPF(model, schedule=Constant(0.5))
        assert model[0].mask.any(0).all()  # the floor: every output channel (column) kept
        assert pruner.report().kept == 6
        with pytest.raises(TypeError, match="must subclass"):
            dpf_ext.register_prunable(Scale, Scale)
    finally:
        dpf_ext.nn.PRUNABLE.pop(Scale)


def test_sparsified_models_deepcopy_and_pickle():
    model, make_inputs = gpt2()
    dpf_ext.sparsify(model)
    dpf_ext.DPF(model, schedule=Constant(0.5))
    inputs = make_inputs()
    model.eval()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.eval()
        with torch.no_grad():
            torch.testing.assert_close(_out(clone, inputs), _out(model, inputs))


def test_trainer_example_runs_and_learns():
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parent.parent / "examples" / "trainer_bert.py"))
    result = example["main"](["--steps", "200", "--sparsity", "0.8"])
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result["reactivations"] > 0
    assert result["accuracy"] > 0.8  # chance is about 0.5


def test_trainer_callback_rejects_a_bad_finalize():
    from dpf_ext.hf import DPFCallback

    with pytest.raises(ValueError, match="finalize"):
        DPFCallback(0.5, finalize="yes")
