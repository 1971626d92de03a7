"""The op contract, on every backend (the ``device`` fixture): thresholds against
torch.kthvalue, the mask update, the feedback estimator and the SGD step against
torch.optim.SGD."""

import math

import pytest
import torch

from dpf_ext import ops
from dpf_ext.ops.bits import HIGH_BINS

from cases import concat_magnitudes, kth_largest, ks_for, weight_cases

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(x: torch.Tensor) -> int:
    return int(x.float().cpu().view(torch.int32))


def _on(device, tensors):
    return [t.to(device, copy=True) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_threshold_equals_kthvalue(device, dtype):
    for name, weights in weight_cases(dtype).items():
        n = sum(w.numel() for w in weights)
        on_device = _on(device, weights)
        for k in ks_for(n):
            tau = ops.global_threshold(on_device, k, exact=True)
            assert tau.shape == () and tau.dtype == torch.float32 and tau.device.type == device.type
            assert _bits(tau) == _bits(kth_largest(weights, k)), (name, k)


def test_exact_threshold_on_fresh_random_inputs(device):
    for seed in range(20):
        g = torch.Generator().manual_seed(1000 + seed)
        n_tensors = int(torch.randint(1, 8, (1,), generator=g))
        weights = [torch.randn(int(torch.randint(0, 500, (1,), generator=g)), generator=g)
                   * float(10 ** torch.randint(-6, 6, (1,), generator=g)) for _ in range(n_tensors)]
        n = sum(w.numel() for w in weights)
        if n == 0:
            continue
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        assert _bits(ops.global_threshold(_on(device, weights), k)) == _bits(kth_largest(weights, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_approx_threshold_is_the_bin_edge(device, dtype):
    for name, weights in weight_cases(dtype).items():
        n = sum(w.numel() for w in weights)
        on_device = _on(device, weights)
        for k in ks_for(n):
            exact = ops.global_threshold(on_device, k, exact=True).cpu()
            approx = ops.global_threshold(on_device, k, exact=False).cpu()
            assert _bits(approx) == (_bits(exact) >> 16) << 16, (name, k)
            assert approx <= exact
            if exact >= torch.finfo(torch.float32).tiny:  # relative bound holds for normals
                assert (exact - approx) / exact < 2**-7
            # keeping |w| >= approx keeps at least k weights
            assert int((concat_magnitudes(weights) >= approx).sum()) >= k


def test_threshold_flags_non_finite_weights_with_nan(device):
    for bad in (float("nan"), float("inf"), -float("inf")):
        weights = _on(device, [torch.randn(100), torch.tensor([1.0, bad])])
        for exact in (True, False):
            assert math.isnan(float(ops.global_threshold(weights, 10, exact)))


def test_threshold_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        ops.global_threshold([torch.randn(10)], 0)
    with pytest.raises(ValueError, match="k must be"):
        ops.global_threshold([torch.randn(10)], 11)
    with pytest.raises(ValueError, match="non-empty"):
        ops.global_threshold([], 1)
    with pytest.raises(TypeError, match="dtype"):
        ops.global_threshold([torch.arange(10)], 1)
    with pytest.raises(TypeError, match="dtype"):
        ops.global_threshold([torch.randn(10, dtype=torch.float64)], 1)


def test_histograms_add_up_over_disjoint_sets(device):
    weights = _on(device, weight_cases()["random_mixed_shapes"])
    whole = ops.magnitude_histogram(weights)
    parts = sum(ops.magnitude_histogram([w]) for w in weights)
    assert whole.shape == (HIGH_BINS,) and torch.equal(whole, parts)
    assert int(whole.sum()) == sum(w.numel() for w in weights)


def test_update_masks_counts_and_reactivations(device):
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(40, 5, generator=g), torch.randn(17, generator=g)]
    old = [torch.rand(w.shape, generator=g) < 0.5 for w in weights]
    masks = _on(device, old)
    tau = torch.tensor(0.8, device=device)
    stats = ops.update_masks(_on(device, weights), tau, masks).cpu()
    for i, (w, m, o) in enumerate(zip(weights, [m.cpu() for m in masks], old)):
        expected = w.abs() >= 0.8
        assert torch.equal(m, expected)
        assert stats[i].tolist() == [int(expected.sum()), int((expected & ~o).sum())]


def test_update_masks_shrink_only_and_per_tensor_thresholds(device):
    weights = _on(device, [torch.tensor([3.0, -2.0, 0.5, 1.0]), torch.tensor([0.1, -0.2])])
    masks = _on(device, [torch.tensor([False, True, True, True]), torch.tensor([True, False])])
    taus = torch.tensor([0.9, 0.15], device=device)
    stats = ops.update_masks(weights, taus, masks, shrink_only=True)
    assert masks[0].tolist() == [False, True, False, True]  # 3.0 stays pruned
    assert masks[1].tolist() == [False, False]  # -0.2 stays pruned
    assert stats.tolist() == [[2, 0], [0, 0]]


def test_update_masks_signed_zero_and_zero_threshold(device):
    weights = _on(device, [torch.tensor([0.0, -0.0, 1e-45])])
    masks = _on(device, [torch.zeros(3, dtype=torch.bool)])
    stats = ops.update_masks(weights, torch.tensor(0.0, device=device), masks)
    assert masks[0].all() and stats.tolist() == [[3, 3]]


def test_update_masks_rejects_bad_masks():
    with pytest.raises(ValueError, match="bool tensor"):
        ops.update_masks([torch.randn(4)], torch.tensor(0.1), [torch.ones(4)])
    with pytest.raises(ValueError, match="masks"):
        ops.update_masks([torch.randn(4)], torch.tensor(0.1), [])


@pytest.mark.parametrize("feedback", [True, False])
def test_masked_weight_gradient(device, feedback):
    w = torch.randn(6, 4, device=device, requires_grad=True)
    mask = torch.rand(6, 4, device=device) < 0.5
    out = ops.masked_weight(w, mask, feedback)
    assert torch.equal(out, w.detach() * mask)
    upstream = torch.randn(6, 4, device=device)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream if feedback else upstream * mask)


SGD_SETTINGS = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(lr=0.01, momentum=0.8, dampening=0.3, weight_decay=5e-4),
    dict(lr=0.01, momentum=0.5, maximize=True),
]


@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: ",".join(s))
def test_feedback_sgd_step_matches_torch_sgd(device, settings):
    g = torch.Generator().manual_seed(5)
    params = _on(device, [torch.randn(30, 7, generator=g), torch.randn(11, generator=g), torch.empty(0)])
    ours = [p.clone() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(theirs, **settings)
    bufs = [None] * len(ours)
    hp = {k: settings.get(k, d) for k, d in dict(momentum=0.0, dampening=0.0, nesterov=False,
                                                   weight_decay=0.0, maximize=False).items()}
    for _ in range(4):
        grads = _on(device, [torch.randn(p.shape, generator=g) for p in params])
        for t, gr in zip(theirs, grads):
            t.grad = gr.clone()
        opt.step()
        ops.feedback_sgd_step(ours, grads, bufs, lr=settings["lr"], **hp)
        for o, t in zip(ours, theirs):
            torch.testing.assert_close(o, t.detach(), rtol=1e-6, atol=1e-7)
    if hp["momentum"]:
        for b, t in zip(bufs, theirs):
            torch.testing.assert_close(b, opt.state[t]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_feedback_sgd_step_masked_copy_and_histogram(device):
    g = torch.Generator().manual_seed(6)
    params = _on(device, [torch.randn(20, 3, generator=g), torch.randn(9, generator=g)])
    grads = _on(device, [torch.randn(p.shape, generator=g) for p in params])
    masks = _on(device, [torch.rand(p.shape, generator=g) < 0.5 for p in params])
    out = [torch.empty_like(p) for p in params]
    hist = torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
    ops.feedback_sgd_step(params, grads, [None, None], lr=0.1, momentum=0.9, masks=masks,
                          masked_out=out, histogram=hist)
    for p, m, o in zip(params, masks, out):
        assert torch.equal(o, p * m)
    assert torch.equal(hist, ops.magnitude_histogram(params))


def test_feedback_sgd_step_rejects_bad_arguments():
    p = [torch.randn(3)]
    with pytest.raises(ValueError, match="Nesterov"):
        ops.feedback_sgd_step(p, [torch.randn(3)], [None], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="together"):
        ops.feedback_sgd_step(p, [torch.randn(3)], [None], lr=0.1, masks=[torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="histogram"):
        ops.feedback_sgd_step(p, [torch.randn(3)], [None], lr=0.1, histogram=torch.zeros(10))


def test_masked_weight_rejects_bad_masks():
    w = torch.randn(6, 5)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        ops.masked_weight(w, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        ops.masked_weight(w, torch.ones(6, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_warm_started_exact_threshold_is_the_exact_one(device, dtype):
    """A guess anywhere (the window hit, missed above or below, at its edges, zero, huge)
    changes the work, never the result."""
    for name, weights in weight_cases(dtype).items():
        n = sum(w.numel() for w in weights)
        on_device = _on(device, weights)
        for k in ks_for(n):
            exact = ops.global_threshold(on_device, k)
            if not torch.isfinite(exact):
                continue
            step = 2.0 ** -7  # one high bin, relatively
            for near in (exact, exact * (1 + step), exact * (1 - step), exact * (1 + 3 * step),
                         exact * 4, exact / 4, torch.zeros(()), torch.full((), 3e38)):
                for width in (1, 3, 9):
                    window = ops.Window.around(near.to(device), width)
                    got = ops.global_threshold(on_device, k, window=window)
                    assert _bits(got) == _bits(exact), (name, k, float(near), width)
    with pytest.raises(ValueError, match="1 to 64 high bins"):
        ops.Window.around(torch.tensor(1.0), 0)
    with pytest.raises(ValueError, match="exact threshold only"):
        w = _on(device, [torch.randn(10)])
        window = ops.Window.around(torch.tensor(1.0, device=device))
        ops.global_threshold(w, 3, exact=False, histogram=ops.magnitude_histogram(w, window=window),
                             window=window)
    with pytest.raises(TypeError, match="dpf_ext.ops.Window"):
        ops.global_threshold(_on(device, [torch.randn(10)]), 3, window=3)
    with pytest.raises(ValueError, match="pass it too"):
        ops.feedback_sgd_step([torch.randn(3)], [torch.randn(3)], [None], lr=0.1,
                              window=ops.Window.around(torch.tensor(1.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_warm_threshold_with_the_channel_floor_and_a_counted_pass(device, dtype):
    """With the rows' maxima left out, and from a first pass counted beforehand (as a fused
    step counts it), a window anywhere gives the exact threshold."""
    g = torch.Generator().manual_seed(21)
    weights = _on(device, [torch.randn(40, 9, generator=g).to(dtype), torch.randn(3, 700, generator=g).to(dtype),
                           torch.randint(-3, 4, (16, 16), generator=g).to(dtype)])  # ties
    rows = sum(w.shape[0] for w in weights)
    n = sum(w.numel() for w in weights) - rows
    for k in (1, n // 10, n // 2, n):
        zero_rows = lambda: [torch.zeros(w.shape[0], dtype=torch.int64, device=device) for w in weights]  # noqa: E731
        exact = ops.global_threshold(weights, k, row_max=zero_rows())
        step = 2.0 ** -7
        for guess in (exact, exact * (1 + step), exact * (1 - 2 * step), exact * 8, torch.zeros(())):
            for width in (1, 3):
                window = ops.Window.around(guess.to(device), width)
                got = ops.global_threshold(weights, k, row_max=zero_rows(), window=window)
                assert _bits(got) == _bits(exact), (k, float(guess), width)
                rows_max, window = zero_rows(), ops.Window.around(guess.to(device), width)
                counted = ops.magnitude_histogram(weights, row_max=rows_max, window=window)
                got = ops.global_threshold(weights, k, histogram=counted, row_max=rows_max,
                                           window=window)
                assert _bits(got) == _bits(exact), (k, float(guess), width, "counted")
