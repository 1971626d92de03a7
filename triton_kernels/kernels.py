"""Triton kernels of the dpf op contract.

Many tensors go into one launch through a tensor table: int64 arrays of data addresses and
element counts, and the running count of BLOCK-sized blocks per tensor. Program ``pid``
finds its tensor by counting the table's block starts at or below ``pid``. Tensors of one
dtype share a launch (``DTYPE`` is a compile-time constant); math is in float32.

The element-wise rules mirror csrc/dpf_math.h: the magnitude is the bit pattern of |w|
widened to float32; keep ``|w| >= tau`` on bit patterns, never a NaN weight.
"""

import triton
import triton.language as tl

INF_BITS = 0x7F800000
COLUMN_MASK = 0xFFFFFFFF


@triton.jit
def _locate(pid, block_start_ptr, T, T_PAD: tl.constexpr):
    """The tensor index of program ``pid`` and the first block of that tensor."""
    idx = tl.arange(0, T_PAD)
    ends = tl.load(block_start_ptr + 1 + idx, mask=idx < T, other=0x7FFFFFFFFFFFFFFF)
    t = tl.sum((ends <= pid).to(tl.int32), axis=0)
    return t, tl.load(block_start_ptr + t)


@triton.jit
def _elements(block_start_ptr, numel_ptr, T, T_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor ``t``, its element offsets in that tensor and which are valid."""
    pid = tl.program_id(0)
    t, first = _locate(pid, block_start_ptr, T, T_PAD)
    offs = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    return t, offs, offs < tl.load(numel_ptr + t)


@triton.jit
def _magnitude_bits(x):
    return tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)


@triton.jit
def _row_key(mag, offs, row_len):
    """The channel floor's key of each element (csrc/dpf_math.h's row_key) and its row."""
    row = offs // row_len
    key = (mag.to(tl.int64) << 32) | (COLUMN_MASK - (offs - row * row_len))
    return key, row


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE rounding to nearest even. bfloat16 is rounded by hand: a plain
    conversion truncates under the interpreter."""
    if DTYPE == tl.bfloat16:
        u = x.to(tl.int32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
        x = tl.where(x != x, x, u.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


@triton.jit
def histogram_kernel(addr_ptr, numel_ptr, block_start_ptr, hist_ptr, prefix_ptr,
                     row_max_addr_ptr, row_len_ptr, window_ptr, window_start_ptr, window_bins, T,
                     T_PAD: tl.constexpr, DTYPE: tl.constexpr, LOW: tl.constexpr,
                     ROWS: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """The first pass (see ``_count_first_pass``), or with LOW hist[low 16 bits] += 1 for the
    elements whose top 16 bits equal *prefix_ptr."""
    t, offs, valid = _elements(block_start_ptr, numel_ptr, T, T_PAD, BLOCK)
    w = tl.load(addr_ptr + t).to(tl.pointer_type(DTYPE))
    mag = _magnitude_bits(tl.load(w + offs, mask=valid, other=0.0))
    if LOW:
        prefix = tl.load(prefix_ptr).to(tl.int32)
        valid = valid & ((mag >> 16) == prefix)
        tl.atomic_add(hist_ptr + (mag & 0xFFFF), tl.full((BLOCK,), 1, tl.int64), mask=valid)
    else:
        _count_first_pass(mag, offs, valid, t, hist_ptr, row_max_addr_ptr, row_len_ptr,
                          window_ptr, window_start_ptr, window_bins, ROWS, WINDOW, BLOCK)


@triton.jit
def _max_rows(mag, offs, valid, row_max_addr_ptr, row_len_ptr, t):
    """row_max[row] = max(row_max[row], key) for the elements ``offs`` of tensor ``t``."""
    row_max = tl.load(row_max_addr_ptr + t).to(tl.pointer_type(tl.int64))
    key, row = _row_key(mag, offs, tl.load(row_len_ptr + t))
    tl.atomic_max(row_max + row, key, mask=valid)


@triton.jit
def _count_first_pass(mag, offs, valid, t, hist_ptr, row_max_addr_ptr, row_len_ptr, window_ptr,
                      window_start_ptr, window_bins, ROWS: tl.constexpr, WINDOW: tl.constexpr,
                      BLOCK: tl.constexpr):
    """The first pass over the elements ``offs`` of tensor ``t`` (magnitude bits ``mag``):
    hist[top 16 bits] += 1; with ROWS each row's largest key into its row_max; with WINDOW
    the low 16 bits of the elements of the window's high bins into their slice of it, and
    the histogram summarised around it (the finite elements below the window in the bin
    under it, those above in the bin over it: two sums instead of per-element atomics)."""
    bins = mag >> 16
    counted = valid
    if WINDOW:
        start = tl.load(window_start_ptr).to(tl.int32)
        slot = bins - start
        inside = valid & (slot >= 0) & (slot < window_bins)
        cell = slot.to(tl.int64) * 65536 + (mag & 0xFFFF)
        tl.atomic_add(window_ptr + tl.where(inside, cell, 0), tl.full((BLOCK,), 1, tl.int64),
                      mask=inside)
        finite = mag < INF_BITS
        below = tl.sum((valid & finite & (slot < 0)).to(tl.int64), axis=0)
        above = tl.sum((valid & finite & (slot >= window_bins)).to(tl.int64), axis=0)
        tl.atomic_add(hist_ptr + tl.maximum(start - 1, 0), below, mask=below > 0)
        tl.atomic_add(hist_ptr + start + window_bins, above, mask=above > 0)
        counted = valid & (inside | ~finite)
    tl.atomic_add(hist_ptr + bins, tl.full((BLOCK,), 1, tl.int64), mask=counted)
    if ROWS:
        _max_rows(mag, offs, valid, row_max_addr_ptr, row_len_ptr, t)


@triton.jit
def update_masks_kernel(addr_ptr, mask_addr_ptr, numel_ptr, block_start_ptr, tau_bits_ptr,
                        stats_ptr, row_max_addr_ptr, row_len_ptr, T, T_PAD: tl.constexpr,
                        DTYPE: tl.constexpr, SHRINK_ONLY: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """mask = |w| >= tau (and the old mask if SHRINK_ONLY), or with ROWS the element its
    row's key names; stats[t] += (kept, reactivated)."""
    t, offs, valid = _elements(block_start_ptr, numel_ptr, T, T_PAD, BLOCK)
    w = tl.load(addr_ptr + t).to(tl.pointer_type(DTYPE))
    m = tl.load(mask_addr_ptr + t).to(tl.pointer_type(tl.int8))
    tau_bits = tl.load(tau_bits_ptr + t)
    mag = _magnitude_bits(tl.load(w + offs, mask=valid, other=0.0))
    old = tl.load(m + offs, mask=valid, other=0) != 0
    keep = (mag >= tau_bits) & (mag <= INF_BITS) & valid
    if SHRINK_ONLY:
        keep = keep & old
    if ROWS:
        row_max = tl.load(row_max_addr_ptr + t).to(tl.pointer_type(tl.int64))
        row_len = tl.load(row_len_ptr + t)
        row = offs // row_len
        key = tl.load(row_max + row, mask=valid, other=0)
        forced = (key > 0) & (COLUMN_MASK - (key & COLUMN_MASK) == offs - row * row_len)
        keep = keep | (forced & valid)
    tl.store(m + offs, keep.to(tl.int8), mask=valid)
    tl.atomic_add(stats_ptr + 2 * t, tl.sum(keep.to(tl.int64), axis=0))
    tl.atomic_add(stats_ptr + 2 * t + 1, tl.sum((keep & ~old).to(tl.int64), axis=0))


@triton.jit
def masked_weight_kernel(w_ptr, mask_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = w * mask (float32 math, as torch computes it)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    w = tl.load(w_ptr + offs, mask=valid, other=0.0)
    m = tl.load(mask_ptr + offs, mask=valid, other=0)
    tl.store(out_ptr + offs, (w.to(tl.float32) * m.to(tl.float32)).to(w.dtype), mask=valid)


@triton.jit
def sgd_kernel(p_addr_ptr, g_addr_ptr, buf_addr_ptr, fresh_ptr, mask_addr_ptr, out_addr_ptr,
               numel_ptr, block_start_ptr, hist_ptr, row_max_addr_ptr, row_len_ptr, window_ptr,
               window_start_ptr, window_bins, lr, momentum, dampening, weight_decay, T,
               T_PAD: tl.constexpr, DTYPE: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_BUF: tl.constexpr,
               HAS_OUT: tl.constexpr, HAS_HIST: tl.constexpr, ROWS: tl.constexpr,
               WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """torch.optim.SGD's update of the dense weights, then optionally the masked copy and
    the first pass over the new |p| (``_count_first_pass``)."""
    t, offs, valid = _elements(block_start_ptr, numel_ptr, T, T_PAD, BLOCK)
    p_ptr = tl.load(p_addr_ptr + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(g_addr_ptr + t).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * p
    if HAS_BUF:
        b_ptr = tl.load(buf_addr_ptr + t).to(tl.pointer_type(DTYPE))
        fresh = tl.load(fresh_ptr + t) != 0
        old = tl.load(b_ptr + offs, mask=valid & ~fresh, other=0.0).to(tl.float32)
        buf = tl.where(fresh, g, momentum * old + (1.0 - dampening) * g)
        tl.store(b_ptr + offs, _round_to(buf, DTYPE), mask=valid)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    new = _round_to(p - lr * g, DTYPE)
    tl.store(p_ptr + offs, new, mask=valid)
    if HAS_OUT:
        m_ptr = tl.load(mask_addr_ptr + t).to(tl.pointer_type(tl.int8))
        o_ptr = tl.load(out_addr_ptr + t).to(tl.pointer_type(DTYPE))
        m = tl.load(m_ptr + offs, mask=valid, other=0)
        tl.store(o_ptr + offs, (new.to(tl.float32) * m.to(tl.float32)).to(DTYPE), mask=valid)
    if HAS_HIST:
        _count_first_pass(_magnitude_bits(new), offs, valid, t, hist_ptr, row_max_addr_ptr,
                          row_len_ptr, window_ptr, window_start_ptr, window_bins, ROWS, WINDOW,
                          BLOCK)


@triton.jit
def adamw_kernel(p_addr_ptr, g_addr_ptr, m_addr_ptr, v_addr_ptr, vmax_addr_ptr, numel_ptr,
                 block_start_ptr, hist_ptr, row_max_addr_ptr, row_len_ptr, window_ptr,
                 window_start_ptr, window_bins, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                 step_size, bias_correction2_sqrt, T, T_PAD: tl.constexpr, DTYPE: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_HIST: tl.constexpr,
                 ROWS: tl.constexpr, WINDOW: tl.constexpr, BLOCK: tl.constexpr):
    """torch.optim.AdamW's update of the dense weights (csrc/dpf_math.h's adamw_update),
    then optionally the first pass over the new |p| (``_count_first_pass``)."""
    t, offs, valid = _elements(block_start_ptr, numel_ptr, T, T_PAD, BLOCK)
    p_ptr = tl.load(p_addr_ptr + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(g_addr_ptr + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(m_addr_ptr + t).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(v_addr_ptr + t).to(tl.pointer_type(DTYPE))
    p = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    second = v
    if AMSGRAD:
        vmax_ptr = tl.load(vmax_addr_ptr + t).to(tl.pointer_type(DTYPE))
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=valid, other=0.0).to(tl.float32), v)
        tl.store(vmax_ptr + offs, _round_to(vmax, DTYPE), mask=valid)
        second = vmax
    denom = tl.sqrt(second) / bias_correction2_sqrt + eps
    new = _round_to(p + (-step_size) * (m / denom), DTYPE)
    tl.store(p_ptr + offs, new, mask=valid)
    tl.store(m_ptr + offs, _round_to(m, DTYPE), mask=valid)
    tl.store(v_ptr + offs, _round_to(v, DTYPE), mask=valid)
    if HAS_HIST:
        _count_first_pass(_magnitude_bits(new), offs, valid, t, hist_ptr, row_max_addr_ptr,
                          row_len_ptr, window_ptr, window_start_ptr, window_bins, ROWS, WINDOW,
                          BLOCK)


@triton.jit
def nm_masks_kernel(addr_ptr, mask_addr_ptr, groups_ptr, block_start_ptr, stats_ptr, n, m, T,
                    T_PAD: tl.constexpr, DTYPE: tl.constexpr, M_PAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """N:M masks for BLOCK groups of m consecutive elements: each group keeps its n largest
    magnitudes, the earlier of equal ones (csrc/dpf_math.h's nm_keep); stats[t] += (kept,
    reactivated, non-finite)."""
    t, group, valid_group = _elements(block_start_ptr, groups_ptr, T, T_PAD, BLOCK)
    w = tl.load(addr_ptr + t).to(tl.pointer_type(DTYPE))
    mk = tl.load(mask_addr_ptr + t).to(tl.pointer_type(tl.int8))
    j = tl.arange(0, M_PAD)
    offs = group[:, None] * m + j[None, :]
    valid = valid_group[:, None] & (j[None, :] < m)
    mag = _magnitude_bits(tl.load(w + offs, mask=valid, other=0.0)).to(tl.int64)
    key = tl.where(valid, (mag << 4) | (15 - j[None, :]), -1)
    # rank of each element in its group: how many keys of the group are larger
    rank = tl.sum((key[:, None, :] > key[:, :, None]).to(tl.int32), axis=2)
    keep = (rank < n) & valid
    old = tl.load(mk + offs, mask=valid, other=0) != 0
    tl.store(mk + offs, keep.to(tl.int8), mask=valid)
    tl.atomic_add(stats_ptr + 3 * t, tl.sum(tl.sum(keep.to(tl.int64), axis=1), axis=0))
    tl.atomic_add(stats_ptr + 3 * t + 1, tl.sum(tl.sum((keep & ~old).to(tl.int64), axis=1), axis=0))
    bad = (mag >= INF_BITS) & valid
    tl.atomic_add(stats_ptr + 3 * t + 2, tl.sum(tl.sum(bad.to(tl.int64), axis=1), axis=0))
