"""Pure-PyTorch reference backend: the oracle every compiled backend is tested against.

It runs on any device torch supports and is the CPU fallback when no extension is built.
Each function takes lists of tensors and loops over them with stock torch ops; it allocates
per-tensor temporaries but never concatenates or sorts the weights.
"""

from __future__ import annotations

import torch

from .bits import HIGH_BINS, LOW_BINS, NONFINITE_BIN, key_columns, magnitude_bits, row_key


def _rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """``w`` as a ``(rows, numel / rows)`` matrix."""
    return w.detach().reshape(rows, w.numel() // rows)


def accumulate_row_max(w: torch.Tensor, row_max: torch.Tensor) -> None:
    """``row_max = max(row_max, largest key of each row of w)`` (see :func:`~.bits.row_key`),
    the rows being ``row_max.numel()`` equal slices of the flattened ``w``."""
    if w.numel() == 0:
        return
    bits = magnitude_bits(_rows(w, row_max.numel()))
    columns = torch.arange(bits.shape[1], dtype=torch.int64, device=w.device)
    torch.maximum(row_max, row_key(bits, columns).amax(dim=1), out=row_max)


def summarise_bins(high: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """The bins a first pass with a window of ``width`` high bins from ``start`` counts the
    high bins ``high`` (int64) in: finite ones clamped to ``[start - 1, start + width]``."""
    clamped = torch.minimum(torch.maximum(high, start - 1), start + width)
    return torch.where(high < NONFINITE_BIN, clamped, high)


def magnitude_histogram(weights: list[torch.Tensor], prefix: torch.Tensor | None,
                        row_max: list[torch.Tensor] | None = None,
                        window: torch.Tensor | None = None,
                        window_start: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram of the float32 bit pattern of ``|w|`` over all ``weights``.

    ``prefix is None``: counts of the top 16 bits (``HIGH_BINS`` bins); with ``row_max``
    (one int64 tensor per weight, one entry per row) also maximises each row's key into it.
    With ``window`` (int64, ``W * LOW_BINS``) and ``window_start`` (0-dim int64, a
    top-16-bit value ``s`` with ``s + W <= NONFINITE_BIN``) it adds, for the elements whose
    top 16 bits ``h`` lie in ``[s, s + W)``, their low 16 bits into the ``h - s``-th slice of
    ``window`` (the second pass's histograms of W bins at once), and the high histogram is
    summarised around the window: a finite element counts in bin ``clamp(h, s - 1, s + W)``
    (everything below the window in the bin under it, everything above in the bin over it);
    non-finite elements keep their bins.
    ``prefix`` (0-dim int64): counts of the low 16 bits of the elements whose top 16 bits
    equal ``prefix`` (``LOW_BINS`` bins).
    """
    device = weights[0].device
    if prefix is None:
        hist = torch.zeros(HIGH_BINS, dtype=torch.int64, device=device)
        for i, w in enumerate(weights):
            if row_max:
                accumulate_row_max(w, row_max[i])
            if not w.numel():
                continue
            bits = magnitude_bits(w).flatten().to(torch.int64)
            high = bits >> 16
            if window is not None:
                width = window.numel() // LOW_BINS
                slot = high - window_start
                inside = (slot >= 0) & (slot < width)
                window += torch.bincount(torch.where(inside, slot * LOW_BINS + (bits & 0xFFFF), 0),
                                         weights=inside.to(torch.float64),
                                         minlength=window.numel()).to(torch.int64)
                high = summarise_bins(high, window_start, width)
            hist += torch.bincount(high, minlength=HIGH_BINS)
        return hist
    # Elements outside the prefix bin go to an overflow bin that is dropped at the end.
    hist = torch.zeros(LOW_BINS + 1, dtype=torch.int64, device=device)
    for w in weights:
        if w.numel():
            bits = magnitude_bits(w)
            idx = torch.where((bits >> 16) == prefix, bits & 0xFFFF, LOW_BINS)
            hist += torch.bincount(idx.flatten(), minlength=LOW_BINS + 1)
    return hist[:LOW_BINS]


def update_masks(
    weights: list[torch.Tensor],
    taus: torch.Tensor,
    masks: list[torch.Tensor],
    shrink_only: bool,
    row_max: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write ``mask = |w| >= tau`` (and ``& mask`` if ``shrink_only``), then, with
    ``row_max``, also keep the element each row's key names (a key of 0 names none); return
    per-tensor ``[kept, reactivated]`` counts as an int64 tensor of shape
    ``(len(weights), 2)``."""
    stats = torch.zeros(len(weights), 2, dtype=torch.int64, device=taus.device)
    for i, (w, mask) in enumerate(zip(weights, masks)):
        keep = w.detach().abs().float() >= taus[i]
        if shrink_only:
            keep &= mask
        if row_max and w.numel():
            keys = row_max[i]
            columns = torch.arange(w.numel() // keys.numel(), device=w.device)
            forced = (columns == key_columns(keys)[:, None]) & (keys > 0)[:, None]
            keep |= forced.view(w.shape)
        stats[i, 0] = keep.sum()
        stats[i, 1] = (keep & ~mask).sum()
        mask.copy_(keep)
    return stats


def nm_masks(weights: list[torch.Tensor], n: int, m: int, masks: list[torch.Tensor]) -> torch.Tensor:
    """In each group of ``m`` consecutive elements (of the flattened tensor) keep the ``n``
    largest magnitudes, the earlier of equal ones; write the masks; return per-tensor
    ``[kept, reactivated, non-finite]`` counts, shape ``(len(weights), 3)``."""
    stats = torch.zeros(len(weights), 3, dtype=torch.int64, device=weights[0].device)
    for i, (w, mask) in enumerate(zip(weights, masks)):
        if w.numel() == 0:
            continue
        mags = magnitude_bits(w).reshape(-1, m).to(torch.int64)
        columns = torch.arange(m, device=w.device)
        keys = (mags << 4) | (15 - columns)  # distinct in a group; larger: kept first
        keep = torch.zeros_like(mags, dtype=torch.bool).scatter_(1, keys.topk(n, dim=1).indices, True)
        keep = keep.view(w.shape)
        stats[i, 0] = keep.sum()
        stats[i, 1] = (keep & ~mask).sum()
        stats[i, 2] = (mags >= 0x7F800000).sum()
        mask.copy_(keep)
    return stats


class _MaskedWeight(torch.autograd.Function):
    """Forward ``w ⊙ mask``; backward passes the gradient to ``w`` unchanged (feedback) or
    masked."""

    @staticmethod
    def forward(ctx, weight, mask, feedback):
        ctx.feedback = feedback
        if not feedback:
            ctx.save_for_backward(mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        if ctx.feedback:
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, feedback: bool) -> torch.Tensor:
    """``weight ⊙ mask`` whose gradient reaches ``weight`` in full (``feedback``) or masked."""
    return _MaskedWeight.apply(weight, mask, feedback)


def feedback_sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    masks: list[torch.Tensor] | None,
    masked_out: list[torch.Tensor] | None,
    histogram: torch.Tensor | None,
    row_max: list[torch.Tensor] | None = None,
    window: torch.Tensor | None = None,
    window_start: torch.Tensor | None = None,
) -> None:
    """SGD on the dense weights, with torch.optim.SGD's semantics and float32 math.

    Creates missing momentum buffers in ``momentum_buffers`` (in place, like torch.optim.SGD
    does on its first step). Writes ``param ⊙ mask`` into ``masked_out`` and adds the
    high-bits histogram of the updated ``|param|`` to ``histogram`` when they are given,
    maximising the rows' keys of the updated params into ``row_max`` and counting the
    ``window`` with it (as :func:`magnitude_histogram`).
    """
    for i, param in enumerate(params):
        p = param.detach()
        g = grads[i].float()
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p.float(), alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = g.to(p.dtype, copy=True)
                momentum_buffers[i] = buf
                buf32 = g
            else:
                buf32 = buf.float().mul_(momentum).add_(g, alpha=1 - dampening)
                buf.copy_(buf32)
            g = g.add(buf32, alpha=momentum) if nesterov else buf32
        p.copy_(p.float().add_(g, alpha=-lr))
        if masked_out is not None:
            masked_out[i].copy_(p * masks[i])
    if histogram is not None:
        histogram += magnitude_histogram([p.detach() for p in params], None, row_max, window,
                                         window_start)


def adamw_coefficients(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       step: int) -> dict[str, float]:
    """One AdamW step's coefficients in double precision, as every backend derives them
    before rounding them to float32 once (csrc/dpf_math.h's AdamwParams)."""
    return dict(decay=1.0 - lr * weight_decay, one_minus_beta1=1.0 - beta1, beta2=beta2,
                one_minus_beta2=1.0 - beta2, eps=eps, step_size=lr / (1.0 - beta1 ** step),
                bias_correction2_sqrt=(1.0 - beta2 ** step) ** 0.5)


def feedback_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    histogram: torch.Tensor | None,
    row_max: list[torch.Tensor] | None = None,
    window: torch.Tensor | None = None,
    window_start: torch.Tensor | None = None,
) -> None:
    """AdamW on the dense weights, with torch.optim.AdamW's semantics and float32 math, at
    optimizer step ``step`` (counted from 1); the histogram, row keys and window as
    :func:`feedback_sgd_step`."""
    c = {k: torch.tensor(v, dtype=torch.float32, device=params[0].device)  # float32 scalars
         for k, v in adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step).items()}
    for i, param in enumerate(params):
        p = param.detach()
        g = grads[i].float()
        if maximize:
            g = -g
        p32 = p.float() * c["decay"]
        m = exp_avgs[i].float()
        m = m + c["one_minus_beta1"] * (g - m)
        v = exp_avg_sqs[i].float() * c["beta2"] + c["one_minus_beta2"] * g * g
        second = v
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i].float(), v)
            max_exp_avg_sqs[i].copy_(second)
        denom = second.sqrt() / c["bias_correction2_sqrt"] + c["eps"]
        p.copy_(p32 + (-c["step_size"]) * (m / denom))
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
    if histogram is not None:
        histogram += magnitude_histogram([p.detach() for p in params], None, row_max, window,
                                         window_start)


def _csr_rows(ptr: torch.Tensor) -> torch.Tensor:
    """The row of each entry of a CSR index with offsets ``ptr``."""
    rows = torch.arange(ptr.numel() - 1, device=ptr.device)
    return torch.repeat_interleave(rows, ptr.diff())


def sparse_mm(xt: torch.Tensor, values: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``y[b, r] = bias[r] + Σ values[k] · xt[idx[k], b]`` over the entries ``k`` of row ``r``
    (CSR: ``ptr`` int64 offsets, ``idx`` int32 columns): ``(B, rows)``, contiguous. Only the
    kept weights multiply ``xt``: a non-finite activation reaches the rows that keep its
    column, no others."""
    rows, batch = ptr.numel() - 1, xt.shape[1]
    y = torch.zeros(rows, batch, dtype=xt.dtype, device=xt.device)
    y.index_add_(0, _csr_rows(ptr), values[:, None] * xt[idx.long()])
    if bias is not None:
        y += bias[:, None]
    return y.t().contiguous()


def sampled_mm(dyt: torch.Tensor, xt: torch.Tensor, ptr: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
    """``g[r, c] = Σ_b dyt[r, b] · xt[c, b]`` at the entries ``(r, c)`` of the CSR index, 0
    elsewhere: ``(rows, cols)``, contiguous."""
    rows, cols = ptr.numel() - 1, xt.shape[0]
    r, c = _csr_rows(ptr), idx.long()
    g = torch.zeros(rows, cols, dtype=xt.dtype, device=xt.device)
    g[r, c] = (dyt[r] * xt[c]).sum(1)
    return g


def sampled_values(dyt: torch.Tensor, xt: torch.Tensor, ptr: torch.Tensor,
                   idx: torch.Tensor) -> torch.Tensor:
    """``v[k] = Σ_b dyt[r, b] · xt[idx[k], b]`` for the entries ``k`` of each row ``r`` of the CSR
    index: :func:`sampled_mm` at the kept positions only, ``(nnz,)`` in the index's order."""
    return (dyt[_csr_rows(ptr)] * xt[idx.long()]).sum(1)


def kept_values(weight: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``values[k] = weight[r, idx[k]]`` for the entries ``k`` of each row ``r`` of the CSR index
    ``(ptr, idx)`` of the 2-D ``weight`` (any strides): its kept values in the index's order."""
    return weight[_csr_rows(ptr), idx.long()]


def batch_major(x: torch.Tensor, sums: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xt, s)``: ``x`` ``(B, cols)`` as the batch-major ``xt`` ``(cols, B)``, contiguous, and
    ``s`` the sum over the batch of each column when ``sums`` (the bias gradient; else empty)."""
    return x.t().contiguous(), x.sum(0) if sums else x.new_empty(0)


def _conv_inputs(x: torch.Tensor, idx: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The input each kept weight multiplies at every output position: ``(N, nnz, H, W)``,
    entry ``k`` of column ``c * kh * kw + i * kw + j`` reading ``x[n, c, h + i - kh // 2, w + j
    - kw // 2]`` (zero outside the plane)."""
    N, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2))
    patches = padded.unfold(2, H, 1).unfold(3, W, 1)  # (N, C, kh, kw, H, W)
    return patches.reshape(N, C * kh * kw, H, W)[:, idx.long()]


def sparse_conv(x: torch.Tensor, values: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor,
                kh: int, kw: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The stride-1 convolution with "same" padding (odd ``kh``, ``kw``) of ``x`` ``(N, C, H,
    W)`` with the kept weights (CSR by output channel: ``ptr`` int64 offsets, ``idx`` int32
    columns ``c * kh * kw + i * kw + j``): ``y[n, r, h, w] = bias[r] + Σ values[k] · x[n, c, h
    + i - kh // 2, w + j - kw // 2]`` over the entries ``k`` of row ``r`` (zero outside the
    plane), ``(N, rows, H, W)``, contiguous. As :func:`sparse_mm`, only kept weights multiply
    the input."""
    rows = ptr.numel() - 1
    inputs = _conv_inputs(x, idx, kh, kw)
    y = x.new_zeros(rows, x.shape[0], *x.shape[2:])
    y.index_add_(0, _csr_rows(ptr), (values[None, :, None, None] * inputs).transpose(0, 1))
    if bias is not None:
        y += bias[:, None, None, None]
    return y.transpose(0, 1).contiguous()


def sampled_conv(dy: torch.Tensor, x: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor,
                 kh: int, kw: int) -> torch.Tensor:
    """The weight gradient of :func:`sparse_conv` at its kept entries: ``g[r, col] = Σ dy[n,
    r, h, w] · x[n, c, h + i - kh // 2, w + j - kw // 2]`` for each entry ``(r, col)``, 0
    elsewhere: ``(rows, C * kh * kw)``, contiguous."""
    rows, cols = ptr.numel() - 1, x.shape[1] * kh * kw
    r = _csr_rows(ptr)
    g = x.new_zeros(rows, cols)
    g[r, idx.long()] = (dy[:, r] * _conv_inputs(x, idx, kh, kw)).sum((0, 2, 3))
    return g


def sparse_index(mask: torch.Tensor, s0: int, s1: int) -> list[torch.Tensor]:
    """Both CSR indices of the ``True`` entries of the 2-D bool ``mask``: by row (``ptr`` int64
    offsets, ``idx`` int32 columns, ``pos`` int64 storage offsets ``r * s0 + c * s1``) and by
    column (``t_ptr``, ``t_idx`` int32 rows, ``t_perm`` int64: each entry's position in the
    row-major order, where its value is), each in row-major order of its own."""
    def csr(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        at = m.nonzero()
        ptr = torch.zeros(m.shape[0] + 1, dtype=torch.int64, device=m.device)
        torch.cumsum(torch.bincount(at[:, 0], minlength=m.shape[0]), 0, out=ptr[1:])
        return ptr, at[:, 0], at[:, 1]

    ptr, r, c = csr(mask)
    t_ptr, tc, tr = csr(mask.t())
    order = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
    order[r, c] = torch.arange(r.numel(), device=mask.device)
    return [ptr, c.to(torch.int32), r * s0 + c * s1, t_ptr, tr.to(torch.int32), order[tr, tc]]
