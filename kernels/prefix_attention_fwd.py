"""Forward jit kernels of the fused prefix-K/V attention (launched by :mod:`tpm_fast.kernels.prefix_attention`).

Online softmax in fp32 over the prefix block, then the token key blocks up to ``lengths[b]``; scores in log2 units.
Also the shared dropout keep-mask helper (Philox ``tl.rand`` from (seed, offset)) and a kernel materializing it.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)  # running max start: finite, so fully masked blocks give no NaN


@triton.jit
def _keep(seed, row_base, offs_m, cols, n_cols, dropout_p):
    """Dropout keep-mask (len(offs_m), len(cols)) for joined columns ``cols`` of rows ``offs_m``."""
    offs = (row_base + offs_m.to(tl.int64))[:, None] * n_cols + cols.to(tl.int64)[None, :]  # shape: (BM, BN)
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q,
    k_base, v_base,  # shape: (BLOCK_KV, D) rows of this (b, h)
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_kv, col_ok, cols, offs_d, offs_m, row_base, n_cols, qk_scale, dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over a key block (scores in log2 units); masked columns contribute nothing."""
    kt = tl.load(k_base + offs_kv[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0)
    s = tl.dot(q, kt.to(tl.float32), input_precision=DOT_PREC) * qk_scale  # shape: (BLOCK_M, BLOCK_KV)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # shape: (BLOCK_M,)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # shape: (BLOCK_M, BLOCK_KV)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        p = tl.where(_keep(seed, row_base, offs_m, cols, n_cols, dropout_p), p, 0.0)
    v = tl.load(v_base + offs_kv[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PREC)  # shape: (BLOCK_M, D)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, KP, VP,  # shapes: (B, H, n, D), (B, H, n_k, D) x2, (B, H, m, D) x2
    MASK, LENGTHS,  # shapes: (B, n_k) uint8 (read when HAS_MASK), (B,) int
    OUT, LSE,  # shapes: (B, H, n, D) q dtype, (B, H, n) fp32 contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kpb, stride_kph, stride_kpn, stride_kpd,
    stride_vpb, stride_vph, stride_vpn, stride_vpd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, N_Q, N_K, M, scale, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_base = pid_bh.to(tl.int64) * N_Q
    n_cols = M + N_K
    qk_scale = scale * LOG2E
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < N_Q
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)  # shape: (BLOCK_M, D)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # prefix block: joined columns [0, m), always visible
    offs_p = tl.arange(0, BLOCK_P)
    acc, m_i, l_i = _fwd_block(
        acc, m_i, l_i, q, KP + b * stride_kpb + h * stride_kph, VP + b * stride_vpb + h * stride_vph,
        stride_kpn, stride_kpd, stride_vpn, stride_vpd, offs_p, offs_p < M, offs_p, offs_d, offs_m, row_base,
        n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, DOT_PREC,
    )  # fmt: skip
    # token blocks: joined columns m + [0, hi); blocks past lengths[b] are never visited
    hi = tl.minimum(tl.maximum(tl.load(LENGTHS + b).to(tl.int32), 0), N_K)
    start_n = tl.zeros([], dtype=tl.int32)
    while start_n < hi:  # while, not range(): see the module doc
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = offs_n < hi
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=ok, other=0) != 0)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_n, ok, M + offs_n, offs_d, offs_m, row_base,
            n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, DOT_PREC,
        )  # fmt: skip
        start_n += BLOCK_N
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # no visible key at all: output 0
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    # LSE in log2 units (no ln/log2 round trip: the backward recomputes p = exp2(s2 - lse2) from the same bits);
    # +inf for rows without a visible key, so the backward recomputes p = 0 there
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + row_base + offs_m, lse, mask=row_ok)


@triton.jit
def _dropout_keep_kernel(
    KEEP,  # shape: (B, H, n, m + n_k) uint8 contiguous
    N_Q, n_cols, dropout_p, seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_base = tl.program_id(2).to(tl.int64) * N_Q
    keep = _keep(seed, row_base, offs_m, cols, n_cols, dropout_p)  # shape: (BLOCK_M, BLOCK_N)
    ptrs = KEEP + (row_base + offs_m.to(tl.int64))[:, None] * n_cols + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m < N_Q)[:, None] & (cols < n_cols)[None, :])
