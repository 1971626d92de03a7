"""Sparse-aware layers, sparsify and unsparsify."""

import pytest
import torch
from torch import nn

from dpf_ext import DPFConv1d, DPFConv2d, DPFConv3d, DPFLinear, sparsify, unsparsify
from dpf_ext.nn.estimators import MaskedGradient
from dpf_ext.app.models import ResNet


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


@pytest.mark.parametrize("cls, plain, args, x_shape", [
    (DPFLinear, nn.Linear, (6, 4), (2, 6)),
    (DPFConv1d, nn.Conv1d, (3, 4, 3), (2, 3, 9)),
    (DPFConv2d, nn.Conv2d, (3, 4, 3), (2, 3, 9, 9)),
    (DPFConv3d, nn.Conv3d, (3, 4, 3), (2, 3, 5, 5, 5)),
])
def test_layer_is_a_drop_in_with_a_masked_forward(cls, plain, args, x_shape):
    torch.manual_seed(0)
    layer = cls(*args)
    assert isinstance(layer, plain)
    assert layer.mask.dtype == torch.bool and layer.mask.all()
    assert set(layer.state_dict()) == {"weight", "bias", "mask"}
    x = torch.randn(x_shape)
    reference = plain(*args)
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "mask"})
    torch.testing.assert_close(layer(x), reference(x))
    # pruning changes the forward exactly as zeroing those weights would
    layer.mask.copy_(torch.rand(layer.mask.shape) < 0.5)
    with torch.no_grad():
        reference.weight.mul_(layer.mask)
    torch.testing.assert_close(layer(x), reference(x))


def test_feedback_gradient_reaches_pruned_weights():
    layer = DPFLinear(5, 3)
    layer.mask.zero_()
    layer.mask[0, 0] = True
    layer(torch.randn(4, 5)).sum().backward()
    assert (layer.weight.grad != 0).sum() > 1  # pruned coordinates got gradient
    layer.weight.grad = None
    layer.estimator = MaskedGradient()
    layer(torch.randn(4, 5)).sum().backward()
    assert torch.equal(layer.weight.grad != 0, layer.mask)


def test_sparsify_keeps_parameters_names_and_device():
    model = small_model()
    params = dict(model.named_parameters())
    out = sparsify(model)
    assert out is model
    assert isinstance(model[0], DPFConv2d) and isinstance(model[3], DPFLinear)
    for name, p in model.named_parameters():
        assert p is params[name]
    assert model[0].mask.shape == model[0].weight.shape


def test_sparsify_twice_is_harmless():
    model = sparsify(small_model())
    model[0].mask[0] = False
    sparsify(model)
    assert not model[0].mask[0].any()


def test_sparsify_exclude_by_name_pattern_and_predicate():
    model = sparsify(ResNet(20), exclude=["conv1", "fc"])
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layer1[0].conv1, DPFConv2d)
    model = sparsify(ResNet(20), exclude=["layer3.*"])
    assert type(model.layer3[0].conv1) is nn.Conv2d and isinstance(model.layer2[0].conv1, DPFConv2d)
    model = sparsify(ResNet(20), exclude=lambda name, m: isinstance(m, nn.Linear))
    assert type(model.fc) is nn.Linear and isinstance(model.conv1, DPFConv2d)


def test_sparsify_skips_layer_subclasses():
    mha = nn.MultiheadAttention(8, 2)
    sparsify(mha)
    assert not isinstance(mha.out_proj, DPFLinear)


def test_dense_checkpoint_loads_into_sparsified_model():
    dense = small_model()
    model = sparsify(small_model())
    model[0].mask.zero_()
    model.load_state_dict(dense.state_dict())
    assert model[0].mask.all()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), dense(x))


def test_unsparsify_folds_masks_and_restores_plain_layers():
    model = sparsify(small_model())
    model[0].mask.copy_(torch.rand(model[0].mask.shape) < 0.3)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    unsparsify(model)
    assert type(model[0]) is nn.Conv2d and "0.mask" not in model.state_dict()
    torch.testing.assert_close(model(x), expected)
    fresh = small_model()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), expected)


def test_saving_an_unfinalized_model_is_loud_and_finalized_is_quiet():
    import warnings

    import dpf_ext
    from dpf_ext.schedules import Constant

    model = sparsify(small_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.state_dict()  # nothing pruned yet: nothing to warn about
    pruner = dpf_ext.DPF(model, schedule=Constant(0.5))
    with pytest.warns(dpf_ext.nn.UnfinalizedWarning, match="DENSE weights plus the masks"):
        state = model.state_dict()
    plain = small_model()
    result = plain.load_state_dict(state, strict=False)  # the easy wrong way
    assert result.unexpected_keys == ["0.mask", "3.mask"]
    pruner.finalize(unwrap=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.load_state_dict(model.state_dict())  # the right way: strict, sparse
