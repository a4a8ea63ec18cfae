"""Triton forward kernel of the linear-chain CRF (log partition + gold path score), and the helpers that the
backward and Viterbi kernels share. Launched by `tpm_fast.kernels.crf.launch_crf_forward`; conventions (tag padding
to ``BLOCK_T``, lengths from the mask, fp32 arithmetic, ``while`` time loops) are in `tpm_fast.kernels.crf`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lse_cols(s):
    """logsumexp over axis 0 of a (BT, BT) tile -> (BT,) indexed by column; an all -inf column gives -inf."""
    m = tl.max(s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.sum(tl.exp(s - m[None, :]), axis=0))


@triton.jit
def _log_z(alpha_last, end):
    """logsumexp_j(alpha_last[j] + end[j]) of (BT,) vectors: log Z less the forward's shift sum when alpha_last is
    the saved (shifted) last row (the backward recomputes it bit for bit)."""
    v = alpha_last + end
    m = tl.max(v, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.sum(tl.exp(v - m), axis=0))


@triton.jit
def _step_max(alpha):
    """A step's shift: max of a (BT,) alpha vector (padding lanes -inf) when finite, else 0 (an all -inf, +inf or
    NaN row is left unshifted). fp32 scalar."""
    m = tl.max(alpha, axis=0)
    return tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)


@triton.jit
def _clamp_tag(tag, T):
    """A tag value (any int) as int32 clamped into [0, T): out-of-range tags give wrong but memory-safe results."""
    return tl.minimum(tl.maximum(tag.to(tl.int32), 0), T - 1)


@triton.jit
def _row_length(mask_row, stride_mn, n, BLOCK_N: tl.constexpr):
    """Number of nonzero entries of one (n,) uint8 mask row, clamped to [1, n] (masks are left-aligned: the real
    tokens are positions 0 .. length-1). Read BLOCK_N entries at a time; returns an int32 scalar."""
    offs = tl.arange(0, BLOCK_N)
    count = tl.zeros([BLOCK_N], dtype=tl.int32)
    t = tl.program_id(0) * 0  # a runtime int32 (n == 1 may be specialized to a constant)
    while t < n:
        pos = t + offs
        count += (tl.load(mask_row + pos * stride_mn, mask=pos < n, other=0) != 0).to(tl.int32)
        t += BLOCK_N
    return tl.minimum(tl.maximum(tl.sum(count, axis=0), 1), n)


@triton.jit
def _gold_score(
    em_row,  # shape: (n, T) this row's emissions, last-dim stride 1
    tag_row,  # shape: (n,) this row's int64 gold tags
    start_ptr,  # shape: (T,)
    end_ptr,  # shape: (T,)
    trans_ptr,  # shape: (T, T) contiguous
    length,
    T,
    stride_en,
    stride_tn,
    BLOCK_N: tl.constexpr,
):
    """Score of the gold path over positions 0 .. length-1, by block loads over time (independent of the alpha
    recursion): start[y_0] + sum_t em[t, y_t] + sum_{t>=1} trans[y_{t-1}, y_t] + end[y_last]. fp32 scalar."""
    offs = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # shape: (BLOCK_N,) per-lane partial sums
    t = tl.program_id(0) * 0
    while t < length:
        pos = t + offs  # shape: (BLOCK_N,) time steps of this chunk
        live = pos < length
        pair = live & (pos > 0)
        cur = _clamp_tag(tl.load(tag_row + pos * stride_tn, mask=live, other=0), T)  # shape: (BLOCK_N,) y_t
        prev = _clamp_tag(tl.load(tag_row + (pos - 1) * stride_tn, mask=pair, other=0), T)  # y_{t-1}
        acc += tl.load(em_row + pos * stride_en + cur, mask=live, other=0.0).to(tl.float32)
        acc += tl.load(trans_ptr + prev * T + cur, mask=pair, other=0.0).to(tl.float32)
        t += BLOCK_N
    first = _clamp_tag(tl.load(tag_row), T)
    last = _clamp_tag(tl.load(tag_row + (length - 1) * stride_tn), T)
    ends = tl.load(start_ptr + first).to(tl.float32) + tl.load(end_ptr + last).to(tl.float32)
    return tl.sum(acc, axis=0) + ends


@triton.jit
def _crf_forward_kernel(
    em_ptr,  # shape: (B, n, T) emissions, any float dtype, last-dim stride 1
    tags_ptr,  # shape: (B, n) int64 gold tags (unused without HAS_TAGS)
    mask_ptr,  # shape: (B, n) uint8, left-aligned: row length = number of nonzero entries
    start_ptr,  # shape: (T,) contiguous
    end_ptr,  # shape: (T,) contiguous
    trans_ptr,  # shape: (T, T) contiguous, [i, j] = i -> j
    out_ptr,  # shape: (B,) fp32 out: gold - log Z (HAS_TAGS) or log Z
    alpha_ptr,  # shape: (B, n, T) fp32 out: forward log-potentials, each row shifted to max 0; 0 on rows t >= length
    n,
    T,
    stride_eb,
    stride_en,
    stride_tb,
    stride_tn,
    stride_mb,
    stride_mn,
    HAS_TAGS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    valid = offs < T
    tile_ok = valid[:, None] & valid[None, :]
    length = _row_length(mask_ptr + b * stride_mb, stride_mn, n, BLOCK_N)
    em_row = em_ptr + b * stride_eb
    al_row = alpha_ptr + b * n * T
    gold = 0.0
    if HAS_TAGS:  # vectorized over time, before the recursion: no dependent scalar loads inside it
        gold = _gold_score(
            em_row, tags_ptr + b * stride_tb, start_ptr, end_ptr, trans_ptr, length, T, stride_en, stride_tn, BLOCK_N
        )
    trans = tl.load(trans_ptr + offs[:, None] * T + offs[None, :], mask=tile_ok, other=float("-inf")).to(tl.float32)
    start = tl.load(start_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)

    # Each step's alphas are shifted by their max (saved shifted, the shifts summed): a step's softmax only sees
    # alpha differences, and small numbers keep their fp32 bits where unshifted alphas grow with t.
    alpha = start + tl.load(em_row + offs, mask=valid, other=float("-inf")).to(tl.float32)  # shape: (BT,)
    shift = _step_max(alpha)
    alpha -= shift
    shift_sum = shift  # fp32 scalar: log Z = shift_sum + logsumexp_j(alpha_hat_last[j] + end[j])
    tl.store(al_row + offs, alpha, mask=valid)
    t = length * 0 + 1
    while t < length:  # while, not range(): the interpreter cannot run range() over runtime bounds
        em = tl.load(em_row + t * stride_en + offs, mask=valid, other=float("-inf")).to(tl.float32)
        alpha = _lse_cols(alpha[:, None] + trans) + em  # shape: (BT,) logsumexp_i(alpha_i + trans_ij) + em_j
        shift = _step_max(alpha)
        alpha -= shift
        shift_sum += shift
        tl.store(al_row + t * T + offs, alpha, mask=valid)
        t += 1
    while t < n:  # padding rows: 0 (deterministic output)
        tl.store(al_row + t * T + offs, tl.zeros([BLOCK_T], dtype=tl.float32), mask=valid)
        t += 1
    end = tl.load(end_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)  # (not live in the loop)
    log_z = shift_sum + _log_z(alpha, end)
    if HAS_TAGS:
        tl.store(out_ptr + b, gold - log_z)
    else:
        tl.store(out_ptr + b, log_z)
