"""Forward jit kernel of the fused prefix-K/V attention (launched by :mod:`tpm_fast.kernels.prefix_attention`).

Online softmax in fp32 over the prefix block, then the token key blocks up to ``lengths[b]``; scores in log2 units.
16-bit inputs reach the tensor cores as 16-bit (P is rounded to the input dtype before ``P @ V``, as in
FlashAttention-2), accumulation is fp32; fp32 inputs use exact fp32 (``ieee``) dots. Also the shared helpers: the
dropout keep-mask (Philox ``tl.rand`` from (seed, offset)) and the interpreter-aware load.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)  # running max start: finite, so fully masked blocks give no NaN


@triton.jit
def _load(ptrs, mask, INTERPRET: tl.constexpr):
    """Masked load (0 where masked); fp32 under the interpreter, whose 16-bit arithmetic is wrong."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _keep(seed, row_base, offs_m, cols, n_cols, dropout_p):
    """Dropout keep-mask (len(offs_m), len(cols)) for joined columns ``cols`` of rows ``offs_m``."""
    offs = (row_base + offs_m.to(tl.int64))[:, None] * n_cols + cols.to(tl.int64)[None, :]  # shape: (BM, BN)
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _visible(MASK, b, stride_mb, offs_n, hi, HAS_MASK: tl.constexpr):
    """Token columns ``offs_n`` of row ``b`` that may be attended: below ``hi`` and (with a mask) True there."""
    ok = offs_n < hi
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b * stride_mb + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _key_bound(LENGTHS, b, N_K, HAS_LENGTHS: tl.constexpr):
    """Token keys [0, bound) of row ``b`` may be visible: ``lengths[b]`` clamped to [0, n_k], else n_k."""
    if HAS_LENGTHS:
        return tl.minimum(tl.maximum(tl.load(LENGTHS + b).to(tl.int32), 0), N_K)
    return N_K + 0 * b.to(tl.int32)


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q,  # shapes: (BLOCK_M, D) fp32, (BLOCK_M,) x2, (BLOCK_M, D) input dtype
    k_base, v_base,  # shape: (BLOCK_KV, D) rows of this (b, h), row stride stride_kn, unit column stride
    stride_kn, offs_kv, col_ok, cols, offs_d, offs_m, row_base, n_cols, qk_scale, dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over a key block (scores in log2 units); masked columns contribute nothing."""
    kt = _load(k_base + offs_kv[None, :] * stride_kn + offs_d[:, None], col_ok[None, :], INTERPRET)  # (D, BLOCK_KV)
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # shape: (BLOCK_M, BLOCK_KV) fp32
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # shape: (BLOCK_M,)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # shape: (BLOCK_M, BLOCK_KV)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_keep(seed, row_base, offs_m, cols, n_cols, dropout_p), p, 0.0)
    v = _load(v_base + offs_kv[:, None] * stride_kn + offs_d[None, :], col_ok[:, None], INTERPRET)  # (BLOCK_KV, D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")  # shape: (BLOCK_M, D)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, KP, VP,  # shapes: (B, H, n, D), (B, H, n_k, D) x2, (B, H, m, D) x2; one dtype
    MASK, LENGTHS, SEED,  # shapes: (B, n_k) uint8, (B,) int, (1,) int64: read when HAS_MASK / HAS_LENGTHS / HAS_DROPOUT
    OUT, LSE,  # shapes: (B, H, n, D) with Q's strides, (B, H, n) fp32 contiguous
    stride_qb, stride_qh, stride_qm,  # Q and OUT (unit last-dim stride)
    stride_kb, stride_kh, stride_kn,  # K and V
    stride_pb, stride_ph, stride_pn,  # KP and VP
    stride_mb,  # MASK (unit column stride)
    H, N_Q, N_K, M, scale, dropout_p,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_base = pid_bh.to(tl.int64) * N_Q
    n_cols = M + N_K
    qk_scale = scale * LOG2E
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < N_Q
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]  # shape: (BLOCK_M, D)
    q = _load(Q + q_off, row_ok[:, None], INTERPRET)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # prefix block: joined columns [0, m), always visible
    offs_p = tl.arange(0, BLOCK_P)
    p_base = b * stride_pb + h * stride_ph
    acc, m_i, l_i = _fwd_block(
        acc, m_i, l_i, q, KP + p_base, VP + p_base, stride_pn, offs_p, offs_p < M, offs_p, offs_d, offs_m,
        row_base, n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, INTERPRET,
    )  # fmt: skip
    # token blocks: joined columns m + [0, hi); blocks past lengths[b] are never visited
    hi = _key_bound(LENGTHS, b, N_K, HAS_LENGTHS)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_kb + h * stride_kh
    if INTERPRET:  # the interpreter cannot run range() over a loaded bound (numpy >= 2.4)
        start_n = hi * 0
        while start_n < hi:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, offs_n, _visible(MASK, b, stride_mb, offs_n, hi, HAS_MASK),
                M + offs_n, offs_d, offs_m, row_base, n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, INTERPRET,
            )  # fmt: skip
            start_n += BLOCK_N
    else:  # a for loop: software-pipelined (async copies of the next K/V blocks)
        for start_n in tl.range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _fwd_block(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, offs_n, _visible(MASK, b, stride_mb, offs_n, hi, HAS_MASK),
                M + offs_n, offs_d, offs_m, row_base, n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, INTERPRET,
            )  # fmt: skip
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # no visible key at all: output 0
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(OUT + q_off, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    # LSE in log2 units (no ln/log2 round trip: the backward recomputes p = exp2(s2 - lse2) from the same bits);
    # +inf for rows without a visible key, so the backward recomputes p = 0 there
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + row_base + offs_m, lse, mask=row_ok)


@triton.jit
def _dropout_keep_kernel(
    KEEP,  # shape: (B, H, n, m + n_k) uint8 contiguous
    SEED,  # shape: (1,) int64
    N_Q, n_cols, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_base = tl.program_id(2).to(tl.int64) * N_Q
    keep = _keep(tl.load(SEED), row_base, offs_m, cols, n_cols, dropout_p)  # shape: (BLOCK_M, BLOCK_N)
    ptrs = KEEP + (row_base + offs_m.to(tl.int64))[:, None] * n_cols + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m < N_Q)[:, None] & (cols < n_cols)[None, :])
