"""The op contract: every numeric kernel of dpf_ext goes through these functions.

Each op validates its input, picks a backend for the tensors' device (see
:mod:`dpf_ext.ops.dispatch`) and calls it. All backends implement the same semantics;
:mod:`dpf_ext.ops.reference` defines them.

- :func:`global_threshold`: the k-th largest ``|w|`` over many tensors, exact or within one
  histogram bin, as a 0-dim tensor on the weights' device (no host synchronisation); a
  :class:`Window` around a guess lets the exact one take a single pass.
- :func:`update_masks`: ``mask = |w| >= tau`` with kept and reactivation counts.
- :func:`nm_masks`: N:M masks (the n largest of every m consecutive weights) with counts.
- The first pass (:func:`magnitude_histogram`, or :func:`feedback_sgd_step` and
  :func:`feedback_adamw_step` counting it as they update the weights) can also fill a
  :class:`Window`.
- The channel floor: the first pass can also record each row's largest magnitude (``row_max``, see
  :func:`~dpf_ext.ops.bits.row_key`) at no extra pass; :func:`global_threshold` then
  counts the other weights only and :func:`update_masks` keeps each row's largest.
- :func:`masked_weight`: ``w ⊙ mask`` whose backward is the feedback (straight-through)
  estimator, or the masked gradient when ``feedback=False``.
- :func:`sparse_linear`: a Linear product from the kept weights only (forward, input
  gradient, dense or sampled weight gradient), through a :class:`SparseIndex` built from the
  mask (see :mod:`dpf_ext.ops.sparse`); :func:`values_linear`, the same for a weight held as
  its kept values only.
- :func:`sparse_conv2d`: a stride-1 Conv2d from the kept weights only, the same three
  products, through a :class:`ConvIndex` (see :mod:`dpf_ext.ops.sparse_conv`).
- :func:`feedback_sgd_step`: the SGD update of the dense weights in one multi-tensor pass.
- :func:`feedback_adamw_step`: the AdamW update of the dense weights in one multi-tensor
  pass.
"""

from __future__ import annotations

from typing import Callable

import torch

from .bits import (FINITE_LIMIT, HIGH_BINS, LOW_BINS, MAX_GROUP, NONFINITE_BIN, SUPPORTED_DTYPES,
                   bits_to_float)
from . import reference
from .dispatch import available_backends, backend_for
from .sparse import SparseIndex, cache_bytes, panel_lanes, simd, sparse_linear, values_linear
from .sparse_conv import ConvIndex, sparse_conv2d
from .window import Window
from . import triton, compiled  # noqa: F401, I001  (register the backends built; last preferred)

__all__ = [
    "ConvIndex",
    "SparseIndex",
    "Window",
    "available_backends",
    "backend_for",
    "cache_bytes",
    "feedback_adamw_step",
    "feedback_sgd_step",
    "global_threshold",
    "magnitude_histogram",
    "masked_weight",
    "nm_masks",
    "panel_lanes",
    "simd",
    "sparse_conv2d",
    "sparse_linear",
    "values_linear",
    "update_masks",
]


def _check_weights(weights: list[torch.Tensor], what: str = "weights") -> None:
    if not weights:
        raise ValueError(f"{what}: expected a non-empty list of tensors")
    device = weights[0].device
    for i, w in enumerate(weights):
        if w.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{what}[{i}] has dtype {w.dtype}; dpf_ext supports "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
        if w.device != device:
            raise ValueError(f"{what}[{i}] is on {w.device}, {what}[0] on {device}")


def _check_row_max(weights: list[torch.Tensor], row_max: list[torch.Tensor] | None) -> None:
    if row_max is None:
        return
    if len(row_max) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(row_max)} row_max tensors")
    for i, (w, r) in enumerate(zip(weights, row_max)):
        rows = r.numel()
        if (r.dtype != torch.int64 or r.dim() != 1 or r.device != w.device or not r.is_contiguous()
                or (rows == 0 and w.numel()) or (rows and w.numel() % rows)):
            raise ValueError(
                f"row_max[{i}] must be a contiguous 1-D int64 tensor on {w.device} with one "
                f"entry per row of a weight of {w.numel()} elements, got {r.dtype} "
                f"{tuple(r.shape)} on {r.device}"
            )


def _check_window(window: Window | None, device: torch.device) -> tuple:
    """The ``(counts, start)`` tensors the backends take for ``window`` (``None`` twice
    without one)."""
    if window is None:
        return None, None
    if not isinstance(window, Window):
        raise TypeError(f"window must be a dpf_ext.ops.Window, got {type(window).__name__}")
    if window.device != device:
        raise ValueError(f"the window counts on {window.device}, the weights are on {device}")
    return window.counts, window.start


def _check_first_pass(params, histogram, row_max, window) -> tuple:
    """Checks what a fused step counts of the threshold's first pass; returns the window's
    ``(counts, start)`` as :func:`_check_window` does."""
    if histogram is not None and (histogram.dtype != torch.int64 or histogram.numel() != HIGH_BINS):
        raise ValueError(f"histogram must be an int64 tensor of {HIGH_BINS} bins")
    _check_row_max(params, row_max)
    if (row_max is not None or window is not None) and histogram is None:
        raise ValueError("row_max and window are counted with the histogram: pass it too")
    return _check_window(window, params[0].device)


def magnitude_histogram(
    weights: list[torch.Tensor],
    prefix: torch.Tensor | None = None,
    row_max: list[torch.Tensor] | None = None,
    window: Window | None = None,
) -> torch.Tensor:
    """Histogram (int64) of the float32 bit pattern of ``|w|`` summed over ``weights``.

    Without ``prefix``: 32768 bins of the top 16 bits. With ``prefix`` (a 0-dim int64 tensor
    holding a top-16-bit value): 65536 bins of the low 16 bits of the elements in that bin.
    Histograms of disjoint sets of weights add up, which is what lets processes agree on a
    global threshold by summing them.

    ``row_max`` (first pass only): one int64 tensor per weight with one entry per row (the
    rows being equal slices of the flattened weight); the same pass maximises each row's
    :func:`~dpf_ext.ops.bits.row_key` into it (start from zeros).

    ``window`` (first pass only): also adds into ``window.counts`` the low histograms of the
    window's high bins.
    """
    _check_weights(weights)
    _check_row_max(weights, row_max)
    if (row_max is not None or window is not None) and prefix is not None:
        raise ValueError("row_max and window are counted by the first pass only (prefix=None)")
    counts, start = _check_window(window, weights[0].device)
    return backend_for(weights[0].device).magnitude_histogram(weights, prefix, row_max or [],
                                                              counts, start)


def _row_max_histogram(row_max: list[torch.Tensor], prefix: torch.Tensor | None,
                       window: Window | None = None) -> torch.Tensor:
    """The histogram of the finite row maxima, as :func:`magnitude_histogram` would count
    those elements alone (empty rows, keys of 0, count nothing; summarised around
    ``window`` if given). Non-finite maxima are left out so that the non-finite bins still
    show them."""
    keys = torch.cat([k.flatten() for k in row_max])
    bits = keys >> 32
    counted = (keys > 0) & (bits < FINITE_LIMIT)
    if prefix is None:
        bins, idx = HIGH_BINS, bits >> 16
        if window is not None:
            idx = reference.summarise_bins(idx, window.start, window.width)
    else:
        bins, idx = LOW_BINS, bits & 0xFFFF
        counted &= (bits >> 16) == prefix
    idx = torch.where(counted, idx, 0)
    return torch.zeros(bins, dtype=torch.int64, device=keys.device).index_add_(0, idx, counted.long())


def _select_bin(hist: torch.Tensor, k: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Find the bin holding the k-th largest element counted from the top bin.

    Returns ``(bin, rank)`` as 0-dim int64 tensors on ``hist``'s device: the bin index and
    the rank (1-based, from the top) of the k-th largest element inside that bin.
    Overwrites ``hist`` with its running sum (the threshold keeps no second copy).
    """
    below = hist.cumsum_(0)  # below[b]: elements in bins <= b
    total = below[-1:]
    if not isinstance(k, torch.Tensor):
        k = torch.full((), k, dtype=torch.int64, device=hist.device)
    # the bin is the lowest b with total - below[b - 1] >= k: one past the bins whose
    # running count stays <= total - k
    b = torch.searchsorted(below, total - k, right=True).clamp_(max=hist.numel() - 1)
    rank = k - (total - below[b])
    return b.reshape(()), rank.reshape(())


def global_threshold(
    weights: list[torch.Tensor],
    k: int,
    exact: bool = True,
    histogram: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    row_max: list[torch.Tensor] | None = None,
    window: Window | None = None,
) -> torch.Tensor:
    """The k-th largest magnitude over all ``weights`` as a 0-dim float32 tensor.

    ``exact=True`` returns the exact value (equal to ``torch.kthvalue`` of the negated
    concatenated magnitudes); keeping ``|w| >= tau`` then keeps ``k`` weights plus any ties
    at ``tau``. ``exact=False`` returns the lower edge of the histogram bin holding it (one
    pass over the weights; relative error below 2^-7 for normal floats, the edge may be 0
under float32's smallest normal, 1.2e-38), which keeps every weight of that bin:
    at least ``k``, the exact count being what :func:`update_masks` reports.

    ``histogram``: the first-pass histogram of exactly these weights if it is at hand (as
    :func:`feedback_sgd_step` accumulates it), which saves that pass; it is not modified.

    ``reduce``: applied to each histogram before it is used, for weights spread over
    processes: an in-place sum over the ranks (``dist.all_reduce``). ``k`` then counts the
    weights of all ranks, and every rank gets the same threshold.

    ``row_max`` (the channel floor): one int64 tensor per weight, one entry per row. The
    weights' rows' maxima are then left out: the result is the k-th largest of the other
    weights, and ``k`` counts those. Without ``histogram`` the first pass records the
    maxima into ``row_max`` (pass zeros); with it, ``row_max`` must hold the keys recorded
    with that histogram (as :func:`feedback_sgd_step` does).

    ``window`` (exact mode): a fresh :class:`Window` around a guess of the result, such as
    ``Window.around(previous_threshold)``. Without ``histogram`` the first pass run here
    fills it; with ``histogram``, it must be the window counted with that (summarised)
    histogram, as :func:`feedback_sgd_step` does. If the result falls in the window it comes
    out of that one cheap pass; otherwise a full first pass and the second pass run. The
    result is the same either way; deciding costs one host synchronisation.

    If any weight is Inf or NaN the result is NaN. Without ``window``, nothing syncs with the
    host.
    """
    _check_weights(weights)
    _check_row_max(weights, row_max)
    counts, start = _check_window(window, weights[0].device)
    n = sum(w.numel() for w in weights)
    if row_max is not None:
        n -= sum(r.numel() for r, w in zip(row_max, weights) if w.numel())
    if k < 1 or (reduce is None and k > n):
        raise ValueError(f"k must be in [1, {n}] (the number of weights counted), got {k}")
    reduce = reduce or (lambda hist: hist)
    backend = backend_for(weights[0].device)
    if histogram is None:
        if not exact:
            counts = start = window = None  # nothing to count it for
        hist = backend.magnitude_histogram(weights, None, row_max or [], counts, start)
    elif window is not None and not exact:
        raise ValueError("a histogram counted with a window serves the exact threshold only")
    else:
        hist = histogram.clone()

    def select(hist, window):
        """(bin, rank in it, any non-finite weight) from a first pass's histogram."""
        if row_max is not None:
            hist -= _row_max_histogram(row_max, None, window)
        hist = reduce(hist)
        nonfinite = hist[NONFINITE_BIN:].sum() > 0
        return (*_select_bin(hist, k), nonfinite)

    b, rank, nonfinite = select(hist, window)
    del hist
    low = None
    if window is not None:
        low = window.low_histogram(b)  # the host sync
        if low is None:  # the threshold left the window: the full first pass (rows are known)
            b, rank, nonfinite = select(backend.magnitude_histogram(weights, None, [], None, None),
                                        None)
    bits = b << 16
    if exact:
        if low is None:
            low = backend.magnitude_histogram(weights, b, [], None, None)
        if row_max is not None:
            low -= _row_max_histogram(row_max, b)
        low, _ = _select_bin(reduce(low), rank)
        bits = bits | low
    tau = bits_to_float(bits)
    return torch.where(nonfinite, torch.full_like(tau, float("nan")), tau)


def update_masks(
    weights: list[torch.Tensor],
    tau: torch.Tensor,
    masks: list[torch.Tensor],
    shrink_only: bool = False,
    row_max: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Write ``mask = |w| >= tau`` in place for every pair; return counts.

    ``tau`` is a 0-dim tensor (one threshold for all) or one threshold per tensor.
    ``shrink_only=True`` keeps pruned weights pruned (``mask &= |w| >= tau``).
    ``row_max`` (the channel floor, keys as :func:`magnitude_histogram` records them): the
    element each row's key names is kept too, whatever ``tau`` and ``shrink_only`` say.
    Returns an int64 tensor of shape ``(len(weights), 2)``: kept weights and reactivations
    (mask was 0 and is now 1) per tensor, on the weights' device.
    """
    _check_weights(weights)
    if len(masks) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(masks)} masks")
    for i, (w, m) in enumerate(zip(weights, masks)):
        if m.dtype != torch.bool or m.shape != w.shape or m.device != w.device:
            raise ValueError(
                f"masks[{i}] must be a bool tensor of shape {tuple(w.shape)} on {w.device}, "
                f"got {m.dtype} {tuple(m.shape)} on {m.device}"
            )
    _check_row_max(weights, row_max)
    taus = tau.to(device=weights[0].device, dtype=torch.float32).expand(len(weights))
    counts = backend_for(weights[0].device).update_masks(weights, taus, masks, shrink_only,
                                                         row_max or [])
    _written(masks)
    return counts


def _written(tensors: list[torch.Tensor]) -> None:
    """Move the version counters of tensors a kernel wrote in place, as torch's in-place
    ops do (custom ops do not), so that what is cached on a mask sees the change."""
    torch.autograd.graph.increment_version(tensors)


def nm_masks(weights: list[torch.Tensor], n: int, m: int, masks: list[torch.Tensor]) -> torch.Tensor:
    """N:M masks in one pass: in each group of ``m`` consecutive elements of every weight
    (flattened in its layout; pass the GEMM-lowered ``(out, in * kernel)`` view) keep the
    ``n`` largest magnitudes, the earlier of equal ones, so exactly ``n`` per group. Writes
    ``masks`` in place; returns int64 ``(len(weights), 3)``: kept, reactivated (mask was 0,
    now 1) and non-finite weights per tensor."""
    _check_weights(weights)
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= MAX_GROUP):
        raise ValueError(f"N:M needs integers 0 < N < M <= {MAX_GROUP}, got {n}:{m}")
    if len(masks) != len(weights):
        raise ValueError(f"got {len(weights)} weights but {len(masks)} masks")
    for i, (w, mask) in enumerate(zip(weights, masks)):
        if mask.dtype != torch.bool or mask.shape != w.shape or mask.device != w.device:
            raise ValueError(f"masks[{i}] must be a bool tensor of shape {tuple(w.shape)} on {w.device}")
        if w.numel() % m:
            raise ValueError(f"weights[{i}] has {w.numel()} elements, not a multiple of M = {m}")
    counts = backend_for(weights[0].device).nm_masks(weights, n, m, masks)
    _written(masks)
    return counts


def masked_weight(weight: torch.Tensor, mask: torch.Tensor, feedback: bool = True) -> torch.Tensor:
    """``weight ⊙ mask`` with the DPF gradient: ``d(w ⊙ m)/dw := I`` when ``feedback`` (the
    dense weight receives the full gradient), ``m`` otherwise (pruned weights get none)."""
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(weight.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return backend_for(weight.device).masked_weight(weight, mask, feedback)


def feedback_sgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
    masks: list[torch.Tensor] | None = None,
    masked_out: list[torch.Tensor] | None = None,
    histogram: torch.Tensor | None = None,
    row_max: list[torch.Tensor] | None = None,
    window: Window | None = None,
) -> None:
    """One SGD step (torch.optim.SGD semantics, float32 math) on the dense ``params``.

    Missing entries of ``momentum_buffers`` are created in place. With ``masks`` and
    ``masked_out``, writes ``param ⊙ mask`` for the next forward; with ``histogram`` (int64,
    32768 bins), adds the high-bits histogram of the updated ``|param|`` to it, so the next
    approximate threshold needs no extra pass over the weights, and with ``row_max`` also
    maximises the rows' keys of the updated params into it, and with ``window`` also fills
    the window (as :func:`magnitude_histogram`): an exact :func:`global_threshold` on that
    histogram and window then needs no pass over the weights when it lands in the window.
    """
    if not params:
        return
    _check_weights(params, "params")
    if not (len(grads) == len(momentum_buffers) == len(params)):
        raise ValueError("params, grads and momentum_buffers must have the same length")
    if (masked_out is None) != (masks is None):
        raise ValueError("masks and masked_out go together")
    counts, start = _check_first_pass(params, histogram, row_max, window)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    backend_for(params[0].device).feedback_sgd_step(
        params, grads, momentum_buffers, lr=lr, momentum=momentum, dampening=dampening,
        nesterov=nesterov, weight_decay=weight_decay, maximize=maximize, masks=masks,
        masked_out=masked_out, histogram=histogram, row_max=row_max or [], window=counts,
        window_start=start,
    )


def feedback_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor] | None = None,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    histogram: torch.Tensor | None = None,
    row_max: list[torch.Tensor] | None = None,
    window: Window | None = None,
) -> None:
    """One AdamW step (torch.optim.AdamW semantics, float32 math) on the dense ``params``,
    all at optimizer step ``step`` (counted from 1, after this step's increment).

    The state tensors (``exp_avgs``, ``exp_avg_sqs``, with ``amsgrad`` ``max_exp_avg_sqs``)
    exist and are updated in place. ``histogram``, ``row_max`` and ``window`` as in
    :func:`feedback_sgd_step`.
    """
    if not params:
        return
    _check_weights(params, "params")
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(params)):
        raise ValueError("params, grads, exp_avgs and exp_avg_sqs must have the same length")
    if amsgrad and (max_exp_avg_sqs is None or len(max_exp_avg_sqs) != len(params)):
        raise ValueError("amsgrad needs one max_exp_avg_sq per param")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive int, got {step!r}")
    counts, start = _check_first_pass(params, histogram, row_max, window)
    backend_for(params[0].device).feedback_adamw_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [], step=step, lr=lr,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
        maximize=maximize, histogram=histogram, row_max=row_max or [], window=counts,
        window_start=start,
    )
