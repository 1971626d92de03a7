"""Launchers: build the tensor tables and run the kernels, one launch per dtype present.

Plain functions on tensors (no autograd, no validation): :mod:`dpf_ext.ops.triton` wraps
them as torch ops and the op layer validates their input.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..ops.bits import HIGH_BINS, LOW_BINS
from ..ops.reference import adamw_coefficients
from . import kernels

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 4096 if INTERPRETED else 1024  # the interpreter pays per program, not per element
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _by_dtype(tensors: list[torch.Tensor]):
    """The positions of the non-empty ``tensors``, grouped by dtype: (dtype, indices) pairs."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, w in enumerate(tensors):
        if w.numel():
            groups.setdefault(w.dtype, []).append(i)
    return groups.items()


def _contiguous(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _table(tensors: list[torch.Tensor], device) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def _blocks(tensors: list[torch.Tensor], device):
    """(numels, block starts, total blocks) of a table of tensors."""
    numels = [t.numel() for t in tensors]
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + triton.cdiv(n, BLOCK))
    return (torch.tensor(numels, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device), starts[-1])


def _pad(n: int) -> int:
    return triton.next_power_of_2(max(n, 2))


def _row_tables(ws: list[torch.Tensor], row_max: list[torch.Tensor], idx: list[int], unused):
    """(row_max addresses, row lengths) of the weights ``ws`` at positions ``idx``, or
    ``unused`` twice without row maxima."""
    if not row_max:
        return unused, unused
    rows = [row_max[i] for i in idx]
    lengths = [w.numel() // r.numel() for w, r in zip(ws, rows)]
    return _table(rows, ws[0].device), torch.tensor(lengths, dtype=torch.int64, device=ws[0].device)


def _window_args(window: torch.Tensor | None, window_start: torch.Tensor | None, unused):
    """(counts, start, high bins) of the first pass's window, or ``unused`` twice and 0."""
    if window is None:
        return unused, unused, 0
    return (window, window_start.to(device=window.device, dtype=torch.int64).reshape(1),
            window.numel() // LOW_BINS)


def magnitude_histogram(weights: list[torch.Tensor], prefix: torch.Tensor | None,
                        row_max: list[torch.Tensor], window: torch.Tensor | None = None,
                        window_start: torch.Tensor | None = None) -> torch.Tensor:
    device = weights[0].device
    hist = torch.zeros(HIGH_BINS if prefix is None else LOW_BINS, dtype=torch.int64, device=device)
    prefix_t = hist if prefix is None else prefix.to(device=device, dtype=torch.int64).reshape(1)
    for dtype, idx in _by_dtype(weights):
        ws = _contiguous([weights[i] for i in idx])
        numels, starts, blocks = _blocks(ws, device)
        row_addr, row_len = _row_tables(ws, row_max, idx, numels)
        kernels.histogram_kernel[(blocks,)](
            _table(ws, device), numels, starts, hist, prefix_t, row_addr, row_len,
            *_window_args(window, window_start, numels), len(ws),
            T_PAD=_pad(len(ws)), DTYPE=_TL_DTYPE[dtype], LOW=prefix is not None,
            ROWS=bool(row_max), WINDOW=window is not None, BLOCK=BLOCK)
    return hist


def threshold_bits(taus: torch.Tensor) -> torch.Tensor:
    """int32 patterns ``keep`` compares against: tau <= 0 keeps all, NaN keeps none (as in
    csrc/dpf_math.h)."""
    bits = taus.float().contiguous().view(torch.int32)
    bits = torch.where(bits < 0, torch.zeros_like(bits), bits)
    return torch.where(taus.isnan(), torch.full_like(bits, kernels.INF_BITS + 1), bits)


def update_masks(weights, taus, masks, shrink_only: bool, row_max) -> torch.Tensor:
    device = weights[0].device
    stats = torch.zeros(len(weights), 2, dtype=torch.int64, device=device)
    bits = threshold_bits(taus)
    for dtype, idx in _by_dtype(weights):
        ws = _contiguous([weights[i] for i in idx])
        ms = _contiguous([masks[i] for i in idx])
        numels, starts, blocks = _blocks(ws, device)
        local = torch.zeros(len(idx), 2, dtype=torch.int64, device=device)
        row_addr, row_len = _row_tables(ws, row_max, idx, numels)
        kernels.update_masks_kernel[(blocks,)](
            _table(ws, device), _table(ms, device), numels, starts, bits[idx].contiguous(), local,
            row_addr, row_len, len(ws), T_PAD=_pad(len(ws)), DTYPE=_TL_DTYPE[dtype],
            SHRINK_ONLY=shrink_only, ROWS=bool(row_max), BLOCK=BLOCK)
        stats[idx] = local
        for i, m in zip(idx, ms):
            if m is not masks[i]:
                masks[i].copy_(m)
    return stats


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w, m = weight.contiguous(), mask.contiguous()
    out = torch.empty_like(w)
    if w.numel():
        kernels.masked_weight_kernel[(triton.cdiv(w.numel(), BLOCK),)](
            w, m.view(torch.int8), out, w.numel(), BLOCK=BLOCK)
    return out


def feedback_sgd_step(params, grads, bufs, fresh, lr, momentum, dampening, nesterov,
                      weight_decay, maximize, masks, masked_out, histogram, row_max, window=None,
                      window_start=None) -> None:
    device = params[0].device
    has_buf, has_out = momentum != 0, bool(masked_out)
    for dtype, idx in _by_dtype(params):
        # every tensor a table points into stays referenced here until the launch is done
        ps = _contiguous([params[i] for i in idx])
        gs = _contiguous([grads[i] for i in idx])
        bs = [bufs[i] for i in idx] if has_buf else []
        ms = _contiguous([masks[i] for i in idx]) if has_out else []
        outs = _contiguous([masked_out[i] for i in idx]) if has_out else []
        numels, starts, blocks = _blocks(ps, device)
        unused = numels  # any tensor, for the pointer slots a variant does not read
        fresh_flags = torch.tensor([fresh[i] for i in idx] if has_buf else [0], dtype=torch.int8,
                                   device=device)
        row_addr, row_len = _row_tables(ps, row_max, idx, unused)
        kernels.sgd_kernel[(blocks,)](
            _table(ps, device), _table(gs, device), _table(bs, device) if has_buf else unused,
            fresh_flags, _table(ms, device) if has_out else unused,
            _table(outs, device) if has_out else unused, numels, starts,
            histogram if histogram is not None else unused, row_addr, row_len,
            *_window_args(window, window_start, unused), lr, momentum, dampening, weight_decay,
            len(idx), T_PAD=_pad(len(idx)), DTYPE=_TL_DTYPE[dtype], NESTEROV=nesterov,
            MAXIMIZE=maximize, HAS_WEIGHT_DECAY=weight_decay != 0, HAS_BUF=has_buf,
            HAS_OUT=has_out, HAS_HIST=histogram is not None, ROWS=bool(row_max),
            WINDOW=window is not None, BLOCK=BLOCK)
        for j, i in enumerate(idx):
            if ps[j] is not params[i]:
                params[i].copy_(ps[j])
            if has_out and outs[j] is not masked_out[i]:
                masked_out[i].copy_(outs[j])


def feedback_adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, step, lr, beta1,
                        beta2, eps, weight_decay, amsgrad, maximize, histogram, row_max,
                        window=None, window_start=None) -> None:
    device = params[0].device
    c = adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step)
    for dtype, idx in _by_dtype(params):
        # every tensor a table points into stays referenced here until the launch is done
        ps = _contiguous([params[i] for i in idx])
        gs = _contiguous([grads[i] for i in idx])
        ms = _contiguous([exp_avgs[i] for i in idx])
        vs = _contiguous([exp_avg_sqs[i] for i in idx])
        vmaxs = _contiguous([max_exp_avg_sqs[i] for i in idx]) if amsgrad else []
        numels, starts, blocks = _blocks(ps, device)
        unused = numels  # any tensor, for the pointer slots a variant does not read
        row_addr, row_len = _row_tables(ps, row_max, idx, unused)
        kernels.adamw_kernel[(blocks,)](
            _table(ps, device), _table(gs, device), _table(ms, device), _table(vs, device),
            _table(vmaxs, device) if amsgrad else unused, numels, starts,
            histogram if histogram is not None else unused, row_addr, row_len,
            *_window_args(window, window_start, unused), c["decay"], c["one_minus_beta1"], c["beta2"], c["one_minus_beta2"], c["eps"],
            c["step_size"], c["bias_correction2_sqrt"], len(idx), T_PAD=_pad(len(idx)),
            DTYPE=_TL_DTYPE[dtype], AMSGRAD=amsgrad, MAXIMIZE=maximize,
            HAS_HIST=histogram is not None, ROWS=bool(row_max), WINDOW=window is not None,
            BLOCK=BLOCK)
        for j, i in enumerate(idx):
            for src, dst in ((ps, params), (ms, exp_avgs), (vs, exp_avg_sqs), (vmaxs, max_exp_avg_sqs)):
                if src and src[j] is not dst[i]:
                    dst[i].copy_(src[j])


NM_GROUPS = 256  # groups per program


def nm_masks(weights, n: int, m: int, masks) -> torch.Tensor:
    device = weights[0].device
    stats = torch.zeros(len(weights), 3, dtype=torch.int64, device=device)
    for dtype, idx in _by_dtype(weights):
        ws = _contiguous([weights[i] for i in idx])
        ms = _contiguous([masks[i] for i in idx])
        groups = [w.numel() // m for w in ws]
        starts = [0]
        for g in groups:
            starts.append(starts[-1] + triton.cdiv(g, NM_GROUPS))
        local = torch.zeros(len(idx), 3, dtype=torch.int64, device=device)
        kernels.nm_masks_kernel[(starts[-1],)](
            _table(ws, device), _table(ms, device), torch.tensor(groups, dtype=torch.int64, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device), local, n, m, len(ws),
            T_PAD=_pad(len(ws)), DTYPE=_TL_DTYPE[dtype], M_PAD=triton.next_power_of_2(m),
            BLOCK=NM_GROUPS)
        stats[idx] = local
        for i, mk in zip(idx, ms):
            if mk is not masks[i]:
                masks[i].copy_(mk)
    return stats
