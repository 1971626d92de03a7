"""Every compiled backend against the reference backend, op by op, on random and
adversarial inputs (ties, zeros, -0.0, denormals, huge ranges, NaN, empty, non-contiguous and
expanded tensors, sizes that span many chunks), in float32, float16 and bfloat16."""

import pytest
import torch

from dpf_ext import ops
from dpf_ext.ops import reference
from dpf_ext.ops.bits import HIGH_BINS, NONFINITE_BIN, magnitude_bits

from cases import weight_cases

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def compiled(device):
    """A compiled backend under test (the reference is the oracle, not a subject)."""
    backend = ops.backend_for(device)
    if backend is reference:
        pytest.skip("the reference backend is the oracle")
    return device


def _cases(dtype):
    cases = weight_cases(dtype)
    g = torch.Generator().manual_seed(11)
    # spans many chunks and threads; expanded views as the filter scope passes them
    cases["large"] = [torch.randn(300_001, generator=g).to(dtype), torch.randn(70_000, generator=g).to(dtype)]
    scores = torch.rand(16, generator=g).to(dtype)
    cases["expanded"] = [scores.view(16, 1, 1).expand(16, 9, 5)]
    cases["with_nan"] = [torch.tensor([1.0, float("nan"), -2.0, float("inf"), 0.5]).to(dtype)]
    # odd sizes at addresses off 16-byte alignment: the scalar paths beside vectorised ones
    cases["misaligned"] = [torch.randn(4099, generator=g).to(dtype)[1:],
                           torch.randn(37, generator=g).to(dtype)[3:]]
    return cases


def _on(device, tensors):
    """Copies on ``device`` that keep a contiguous view's offset into its storage (and so
    its misalignment)."""
    out = []
    for t in tensors:
        if t.storage_offset() and t.is_contiguous():
            full = torch.empty(t.storage_offset() + t.numel(), dtype=t.dtype, device=device)
            out.append(full[t.storage_offset():].view(t.shape).copy_(t))
        else:
            out.append(t.to(device, copy=True))
    return out


def row_counts(weights):
    """Rows for the channel floor: the first dimension, or the whole tensor as one row."""
    return [(w.shape[0] if w.dim() > 1 else 1) if w.numel() else 0 for w in weights]


def zero_row_max(weights, device="cpu"):
    return [torch.zeros(r, dtype=torch.int64, device=device) for r in row_counts(weights)]


def assert_same_row_max(got, expected, msg):
    """Equal keys, except that a NaN maximum matches any NaN maximum (payloads are not
    semantics)."""
    for a, b in zip(got, expected):
        a = a.cpu()
        nan_a, nan_b = (a >> 32) > 0x7F800000, (b >> 32) > 0x7F800000
        assert torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b]), msg


def _nan_folded(hist):
    """The histogram with every NaN bin summed into one: NaN payloads are not semantics."""
    return torch.cat([hist[:NONFINITE_BIN + 1], hist[NONFINITE_BIN + 1:].sum().reshape(1)])


def assert_same_values(got, expected, msg):
    """Bit-identical, except that any NaN matches any NaN."""
    got, expected = got.detach().cpu().float(), expected.detach().float()
    assert torch.equal(got.isnan(), expected.isnan()), msg
    ok = ~expected.isnan()
    assert torch.equal(got[ok].view(torch.int32), expected[ok].view(torch.int32)), msg


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_histograms_match(compiled, dtype):
    for name, weights in _cases(dtype).items():
        on_dev = _on(compiled, weights)
        high = ops.magnitude_histogram(on_dev).cpu()
        expected = reference.magnitude_histogram(weights, None)
        assert torch.equal(_nan_folded(high), _nan_folded(expected)), name
        # the same pass with the channel floor's row maxima
        rows, expected_rows = zero_row_max(weights, compiled), zero_row_max(weights)
        with_rows = ops.magnitude_histogram(on_dev, row_max=rows).cpu()
        reference.magnitude_histogram(weights, None, expected_rows)
        assert torch.equal(with_rows, high), name
        assert_same_row_max(rows, expected_rows, name)
        occupied = torch.nonzero(high[:NONFINITE_BIN]).flatten().tolist()
        for b in occupied[:3] + occupied[-3:]:
            prefix = torch.tensor(b)
            low = ops.magnitude_histogram(on_dev, prefix.to(compiled)).cpu()
            assert torch.equal(low, reference.magnitude_histogram(weights, prefix)), (name, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shrink_only", [False, True])
@pytest.mark.parametrize("floor", [False, True], ids=["", "floor"])
def test_update_masks_match(compiled, dtype, shrink_only, floor):
    g = torch.Generator().manual_seed(12)
    for name, weights in _cases(dtype).items():
        if any(w.numel() == 0 for w in weights) and name != "with_empty":
            continue
        row_max = None
        if floor:
            row_max = zero_row_max(weights)
            reference.magnitude_histogram(weights, None, row_max)
        masks = [torch.rand(w.shape, generator=g) < 0.5 for w in weights]
        mags = torch.cat([magnitude_bits(w).flatten() for w in weights] or [torch.zeros(0)])
        candidates = [0.0, -0.0, -1.0, float("nan"), float("inf")]
        if mags.numel():
            candidates.append(float(mags[len(mags) // 2].view(torch.float32)))
        for tau_value in candidates:
            taus = torch.full((len(weights),), tau_value)
            expected_masks = [m.clone() for m in masks]
            expected = reference.update_masks(weights, taus, expected_masks, shrink_only, row_max)
            got_masks = _on(compiled, masks)
            got = ops.update_masks(_on(compiled, weights), taus.to(compiled), got_masks, shrink_only,
                                   row_max=row_max and _on(compiled, row_max))
            assert torch.equal(got.cpu(), expected), (name, tau_value)
            for a, b in zip(got_masks, expected_masks):
                assert torch.equal(a.cpu(), b), (name, tau_value)


def test_update_masks_non_contiguous_mask(compiled):
    w = torch.randn(30, 20)
    mask = torch.zeros(20, 30, dtype=torch.bool).t()
    expected = mask.clone()
    reference.update_masks([w], torch.tensor([0.5]), [expected], False)
    got = mask.to(compiled).t().contiguous().t()
    ops.update_masks([w.to(compiled)], torch.tensor(0.5, device=compiled), [got])
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feedback", [True, False])
def test_masked_weight_matches(compiled, dtype, feedback):
    g = torch.Generator().manual_seed(13)
    for name, weights in _cases(dtype).items():
        for w in weights:
            mask = torch.rand(w.shape, generator=g) < 0.5
            expected = reference.masked_weight(w, mask, feedback)
            wd = w.to(compiled, copy=True).requires_grad_()
            got = ops.masked_weight(wd, mask.to(compiled), feedback)
            assert got.dtype == dtype and got.shape == w.shape
            assert_same_values(got, expected, name)
            upstream = torch.randn(w.shape, generator=g).to(dtype)
            got.backward(upstream.to(compiled))
            assert torch.equal(wd.grad.cpu(), upstream if feedback else upstream * mask), name


# torch's own kernels may fuse multiply-adds, so a float32 result can differ in its last
# bit; rounded to 16 bits, such a difference flips a rounding now and then, and later steps
# carry it. So: nearly all elements bit-identical, the rest within a few units in the last
# place at the scale of the parameters (about 1 to 4).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=8e-3, atol=3e-2)}


def assert_sgd_close(got, expected, dtype):
    got = got.cpu()
    torch.testing.assert_close(got, expected, **TOL[dtype])
    if expected.numel() and dtype != torch.float32:
        assert (got == expected).float().mean() > 0.99


def _assert_first_pass_of(params, hist, row_max, window):
    """``hist``, ``row_max`` and ``window`` hold what the reference's first pass counts over
    ``params`` (the values a fused step wrote); the window is not empty."""
    written = [p.cpu() for p in params]
    rows = zero_row_max(written)
    counts = torch.zeros(window.counts.numel(), dtype=torch.int64)
    assert torch.equal(hist.cpu(), reference.magnitude_histogram(written, None, rows, counts,
                                                                 window.start.cpu()))
    for got, exp in zip(row_max, rows):
        assert torch.equal(got.cpu(), exp)
    assert torch.equal(window.counts.cpu(), counts) and counts.sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", [
    dict(lr=0.1, momentum=0.0),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(lr=0.02, momentum=0.8, dampening=0.25, weight_decay=1e-2, maximize=True),
], ids=["plain", "nesterov", "dampened"])
def test_feedback_sgd_step_matches(compiled, dtype, settings):
    g = torch.Generator().manual_seed(14)
    shapes = [(300, 301), (5,), (0,), (64, 3, 3, 3), (4099,)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    params[-1] = torch.randn(4100, generator=g).to(dtype)[1:]  # off 16-byte alignment
    masks = [torch.rand(s, generator=g) < 0.3 for s in shapes]
    ref_params = [p.clone() for p in params]
    dev_params = _on(compiled, params)
    ref_bufs, dev_bufs = [None] * len(shapes), [None] * len(shapes)
    for _ in range(3):
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        ref_out = [torch.empty_like(p) for p in params]
        dev_out = [torch.empty_like(p) for p in dev_params]
        ref_hist = torch.zeros(HIGH_BINS, dtype=torch.int64)
        dev_hist = torch.zeros(HIGH_BINS, dtype=torch.int64, device=compiled)
        ref_rows, dev_rows = zero_row_max(params), zero_row_max(params, compiled)
        window = ops.Window.around(torch.tensor(0.67, device=compiled))  # |randn|'s median
        kw = dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
        kw.update(settings)
        reference.feedback_sgd_step(ref_params, grads, ref_bufs, masks=masks, masked_out=ref_out,
                                    histogram=ref_hist, row_max=ref_rows,
                                    window=torch.zeros(window.counts.numel(), dtype=torch.int64),
                                    window_start=window.start.cpu(), **kw)
        ops.feedback_sgd_step(dev_params, _on(compiled, grads), dev_bufs, masks=_on(compiled, masks),
                              masked_out=dev_out, histogram=dev_hist, row_max=dev_rows,
                              window=window, **kw)
        for a, b in zip(dev_params, ref_params):
            assert_sgd_close(a, b, dtype)
        for a, b in zip(dev_out, ref_out):
            assert_sgd_close(a, b, dtype)
        if kw["momentum"]:
            for a, b in zip(dev_bufs, ref_bufs):
                assert_sgd_close(a, b, dtype)
        # the histogram, row maxima and window are of the values the backend wrote
        _assert_first_pass_of(dev_params, dev_hist, dev_rows, window)
        # values that differ by rounding may straddle a bin edge, no more
        assert (dev_hist.cpu() - ref_hist).abs().sum() <= 2 * sum(p.numel() for p in params) * 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", [
    dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=True),
], ids=["defaults", "amsgrad-maximize"])
def test_feedback_adamw_step_matches(compiled, dtype, settings):
    g = torch.Generator().manual_seed(15)
    shapes = [(300, 301), (5,), (0,), (64, 3, 3, 3), (4099,)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    params[-1] = torch.randn(4100, generator=g).to(dtype)[1:]  # off 16-byte alignment
    state = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    ref = dict(p=[p.clone() for p in params], m=state(), v=state(), vmax=state())
    dev = dict(p=_on(compiled, params), m=_on(compiled, state()), v=_on(compiled, state()),
               vmax=_on(compiled, state()))
    for step in range(1, 4):
        grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        ref_hist = torch.zeros(HIGH_BINS, dtype=torch.int64)
        dev_hist = torch.zeros(HIGH_BINS, dtype=torch.int64, device=compiled)
        ref_rows, dev_rows = zero_row_max(params), zero_row_max(params, compiled)
        window = ops.Window.around(torch.tensor(0.67, device=compiled))
        reference.feedback_adamw_step(ref["p"], grads, ref["m"], ref["v"], ref["vmax"], step=step,
                                      histogram=ref_hist, row_max=ref_rows, **settings)
        ops.feedback_adamw_step(dev["p"], _on(compiled, grads), dev["m"], dev["v"], dev["vmax"], step=step,
                                histogram=dev_hist, row_max=dev_rows, window=window, **settings)
        for key in ("p", "m", "v") + (("vmax",) if settings["amsgrad"] else ()):
            for a, b in zip(dev[key], ref[key]):
                assert_sgd_close(a, b, dtype)
        _assert_first_pass_of(dev["p"], dev_hist, dev_rows, window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nm", [(2, 4), (1, 3), (3, 8), (5, 16)], ids=lambda p: f"{p[0]}:{p[1]}")
def test_nm_masks_match(compiled, dtype, nm):
    n, m = nm
    g = torch.Generator().manual_seed(16)
    weights = [torch.randn(33, m * 7, generator=g).to(dtype), torch.randn(m, generator=g).to(dtype),
               torch.randint(-2, 3, (5, m * 3), generator=g).to(dtype),  # ties
               torch.zeros(4, m, dtype=dtype),  # all tied at zero
               torch.randn(m * 4101, generator=g).to(dtype)[m:],  # many chunks, misaligned
               torch.tensor([float("nan"), 1.0, float("inf"), -2.0] * m).to(dtype)]
    masks = [torch.rand(w.shape, generator=g) < 0.5 for w in weights]
    expected_masks = [mk.clone() for mk in masks]
    expected = reference.nm_masks(weights, n, m, expected_masks)
    got_masks = _on(compiled, masks)
    got = ops.nm_masks(_on(compiled, weights), n, m, got_masks)
    assert torch.equal(got.cpu(), expected)
    for a, b in zip(got_masks, expected_masks):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_pass_window_matches(compiled, dtype):
    for name, weights in _cases(dtype).items():
        high = reference.magnitude_histogram(weights, None)
        occupied = torch.nonzero(high[:NONFINITE_BIN]).flatten().tolist()
        for start in {occupied[0] - 1, occupied[len(occupied) // 2], occupied[-1]}:
            for width in (1, 3):
                start = min(start, NONFINITE_BIN - width)  # a window holds finite bins only
                expected = torch.zeros(width * 65536, dtype=torch.int64)
                summary = reference.magnitude_histogram(weights, None, [], expected,
                                                        torch.tensor(start))
                got = torch.zeros(width * 65536, dtype=torch.int64, device=compiled)
                got_high = ops.backend_for(compiled).magnitude_histogram(
                    _on(compiled, weights), None, [], got, torch.tensor(start, device=compiled))
                assert torch.equal(_nan_folded(got_high.cpu()), _nan_folded(summary)), name
                assert torch.equal(got.cpu(), expected), (name, start, width)
                # the summary: the window's bins and the non-finite ones as they are, the
                # rest folded into the bins beside the window
                outside = torch.ones(len(high), dtype=torch.bool)
                outside[start:start + width] = False
                outside[NONFINITE_BIN:] = False
                assert torch.equal(summary[~outside], high[~outside]), name
                if start > 0:
                    assert summary[start - 1] == high[:start].sum(), name
                if start + width < NONFINITE_BIN:
                    assert summary[start + width] == high[start + width:NONFINITE_BIN].sum(), name
                for slot in range(width):  # each slice is the second pass of its bin
                    if 0 <= start + slot < NONFINITE_BIN:
                        assert torch.equal(expected[slot * 65536:(slot + 1) * 65536],
                                           reference.magnitude_histogram(weights, torch.tensor(start + slot)))
