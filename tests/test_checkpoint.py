"""Compact sparse checkpoints: bit-for-bit round trips, sizes, and the wrong file or model."""

import io

import pytest
import torch

import dpf_ext
from dpf_ext.app.models import build_model
from dpf_ext.schedules import Constant


def trained(sparsity, seed=0):
    torch.manual_seed(seed)
    model = dpf_ext.sparsify(build_model("resnet20", (1, 8, 8), 10))
    pruner = dpf_ext.DPF(model, schedule=Constant(sparsity), update_every=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(4):
        x = torch.randn(8, 1, 8, 8)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,))).backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    return model, pruner


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def test_round_trip_reproduces_the_finalized_model_bit_for_bit(tmp_path):
    model, pruner = trained(0.9)
    masks = {n: m.mask.clone() for n, m in dpf_ext.nn.dpf_layers(model)}
    path = tmp_path / "sparse.pt"
    dpf_ext.save_sparse(model, path)  # from the DPF model, which stays as it was
    assert all(torch.equal(m.mask, masks[n]) for n, m in dpf_ext.nn.dpf_layers(model))
    sparse_form = tmp_path / "form" / "sparse.pt"  # the model's state-dict form changes nothing
    sparse_form.parent.mkdir()
    dpf_ext.save_sparse(dpf_ext.nn.set_state_dict_form(model, "sparse"), sparse_form)
    assert sparse_form.read_bytes() == path.read_bytes()
    dpf_ext.nn.set_state_dict_form(model, "dense")
    plain = dpf_ext.load_sparse(path, build_model("resnet20", (1, 8, 8), 10))
    pruner.finalize(unwrap=True)
    expected = model.state_dict()
    got = plain.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(bits(got[key]), bits(expected[key])), key
    # into a sparsified model: the masks come back too
    again = dpf_ext.sparsify(build_model("resnet20", (1, 8, 8), 10))
    again = dpf_ext.load_sparse(path, dpf_ext.nn.set_state_dict_form(again, "sparse"))
    for name, layer in dpf_ext.nn.dpf_layers(again):
        assert torch.equal(layer.mask, masks[name]), name
    # and a finalized plain model saves to the same file contents
    path2 = tmp_path / "plain.pt"
    dpf_ext.save_sparse(plain, path2)
    reloaded = dpf_ext.load_sparse(path2, build_model("resnet20", (1, 8, 8), 10))
    for key, value in reloaded.state_dict().items():
        assert torch.equal(bits(value), bits(expected[key])), key


@pytest.mark.parametrize("sparsity, at_most", [(0.5, 0.60), (0.9, 0.20), (0.98, 0.10)])
def test_checkpoint_is_smaller(tmp_path, sparsity, at_most):
    model, pruner = trained(sparsity)
    size = dpf_ext.save_sparse(model, tmp_path / "sparse.pt")
    pruner.finalize(unwrap=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert size < at_most * buffer.getbuffer().nbytes


def test_wrong_model_or_file_is_a_clear_error_and_loads_nothing(tmp_path):
    model, _ = trained(0.9)
    path = tmp_path / "sparse.pt"
    dpf_ext.save_sparse(model, path)
    other = build_model("resnet32", (1, 8, 8), 10)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model.*missing.*nothing was loaded"):
        dpf_ext.load_sparse(path, other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="shapes differ"):
        dpf_ext.load_sparse(path, build_model("resnet20", (1, 8, 8), 7))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a dpf_ext sparse checkpoint"):
        dpf_ext.load_sparse(tmp_path / "plain.pt", other)
