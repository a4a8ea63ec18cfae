"""Backward jit kernels of the fused prefix-K/V attention (launched by :mod:`tpm_fast.kernels.prefix_attention`).

Two launches, in this order (FlashAttention-2's split, with its preprocess folded in):

1. dQ per query block, looping over the prefix and the visible key blocks. It also computes ``delta = rowsum(dO * O)``
   for its rows (the FA-2 preprocess) and stores it for the second kernel.
2. dK/dV per token key block, looping over the query blocks; the program of the first key block also computes the
   prefix slots' dK_p/dV_p (so the m prefix keys need no programs of their own).

Probabilities are recomputed from the forward's log2 LSE; the dropout keep-mask is regenerated from the seed.
16-bit operands go to the tensor cores as 16-bit (P and dS rounded to the input dtype, FA-2 style), fp32 inputs use
exact fp32 dots; accumulation is fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpm_fast.kernels.prefix_attention_fwd import LOG2E, _keep, _key_bound, _load, _visible


@triton.jit
def _kv_step(
    dk, dv, kt, vt,  # shapes: (BLOCK_KV, D) fp32 x2, (D, BLOCK_KV) input dtype x2
    q_base, do_base, lse_base, delta_base,  # shapes: (n, D) rows of this (b, h) x2, (n,) fp32 x2
    stride_qm, start_m, col_ok, cols, row_base, N_Q, n_cols, qk_scale, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One query block's contribution to a key block's dK (unscaled) and dV.

    Scores are recomputed exactly as in the forward (``dot(q, k^T)``, same operand order), so p = exp2(s2 - lse2)
    matches the forward's bits even for huge logits; the products with p / dS then use their transposes.
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < N_Q
    rows = offs_m[:, None] * stride_qm + offs_d[None, :]  # shape: (BLOCK_M, D)
    q = _load(q_base + rows, row_ok[:, None], INTERPRET)
    do = _load(do_base + rows, row_ok[:, None], INTERPRET)
    lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # shape: (BLOCK_M,)
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # shape: (BLOCK_M, BLOCK_KV)
    p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, vt, input_precision="ieee")  # shape: (BLOCK_M, BLOCK_KV)
    if HAS_DROPOUT:
        z = tl.where(_keep(seed, row_base, offs_m, cols, n_cols, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
        dv += tl.dot(tl.trans((p * z).to(do.dtype)), do, input_precision="ieee")
        ds = p * (dp * z - delta[:, None])
    else:
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")  # shape: (BLOCK_KV, D)
    return dk, dv


@triton.jit
def _kv_block(
    q_base, do_base, lse_base, delta_base,  # shapes: (n, D) x2, (n,) fp32 x2
    k_base, v_base,  # shape: (BLOCK_KV, D) rows, row stride stride_kn
    stride_qm, stride_kn, offs_kv, col_ok, cols, row_base, N_Q, n_cols, scale, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """dK, dV (BLOCK_KV, D) fp32 of one key block, looping over all query blocks."""
    offs_d = tl.arange(0, HEAD_D)
    qk_scale = scale * LOG2E
    kt = _load(k_base + offs_kv[None, :] * stride_kn + offs_d[:, None], col_ok[None, :], INTERPRET)  # (D, BLOCK_KV)
    vt = _load(v_base + offs_kv[None, :] * stride_kn + offs_d[:, None], col_ok[None, :], INTERPRET)
    dk = tl.zeros([BLOCK_KV, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KV, HEAD_D], dtype=tl.float32)
    if INTERPRET:  # the interpreter cannot run range() over a runtime bound (numpy >= 2.4)
        start_m = N_Q * 0
        while start_m < N_Q:
            dk, dv = _kv_step(
                dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, stride_qm, start_m, col_ok, cols, row_base,
                N_Q, n_cols, qk_scale, dropout_p, seed, HEAD_D, BLOCK_M, HAS_DROPOUT, INTERPRET,
            )  # fmt: skip
            start_m += BLOCK_M
    else:  # software-pipelined: the next Q / dO blocks load while this one computes
        for start_m in tl.range(0, N_Q, BLOCK_M):
            dk, dv = _kv_step(
                dk, dv, kt, vt, q_base, do_base, lse_base, delta_base, stride_qm, start_m, col_ok, cols, row_base,
                N_Q, n_cols, qk_scale, dropout_p, seed, HEAD_D, BLOCK_M, HAS_DROPOUT, INTERPRET,
            )  # fmt: skip
    return dk * scale, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KP, VP, MASK, LENGTHS, SEED, DO,  # shapes as in _fwd_kernel; DO with Q's strides
    LSE, DELTA,  # shape: (B, H, n) fp32 contiguous (DELTA written by _bwd_dq_kernel)
    DK, DV, DKP, DVP,  # shapes and strides: like K, V, KP, VP
    stride_qb, stride_qh, stride_qm,  # Q and DO
    stride_kb, stride_kh, stride_kn,  # K, V, DK, DV
    stride_pb, stride_ph, stride_pn,  # KP, VP, DKP, DVP
    stride_mb,
    H, N_Q, N_K, M, scale, dropout_p,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)  # token key block; block 0 also owns the prefix slots
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_base = pid_bh.to(tl.int64) * N_Q
    n_cols = M + N_K
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    offs_d = tl.arange(0, HEAD_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_qb + h * stride_qh
    if pid_n == 0:
        offs_p = tl.arange(0, BLOCK_P)
        p_ok = offs_p < M
        p_off = b * stride_pb + h * stride_ph
        dkp, dvp = _kv_block(
            q_base, do_base, LSE + row_base, DELTA + row_base, KP + p_off, VP + p_off, stride_qm, stride_pn,
            offs_p, p_ok, offs_p, row_base, N_Q, n_cols, scale, dropout_p, seed,
            HEAD_D, BLOCK_P, BLOCK_M, HAS_DROPOUT, INTERPRET,
        )  # fmt: skip
        p_ptrs = p_off + offs_p[:, None] * stride_pn + offs_d[None, :]  # shape: (BLOCK_P, D)
        tl.store(DKP + p_ptrs, dkp.to(DKP.dtype.element_ty), mask=p_ok[:, None])
        tl.store(DVP + p_ptrs, dvp.to(DVP.dtype.element_ty), mask=p_ok[:, None])
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    hi = _key_bound(LENGTHS, b, N_K, HAS_LENGTHS)
    if pid_n * BLOCK_N < hi:
        k_off = b * stride_kb + h * stride_kh
        dk, dv = _kv_block(
            q_base, do_base, LSE + row_base, DELTA + row_base, K + k_off, V + k_off, stride_qm, stride_kn,
            offs_n, _visible(MASK, b, stride_mb, offs_n, hi, HAS_MASK), M + offs_n, row_base, N_Q, n_cols, scale,
            dropout_p, seed, HEAD_D, BLOCK_N, BLOCK_M, HAS_DROPOUT, INTERPRET,
        )  # fmt: skip
    else:  # the whole block is padding: zero gradients
        dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    k_ptrs = b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]  # shape: (BLOCK_N, D)
    in_range = (offs_n < N_K)[:, None]
    tl.store(DK + k_ptrs, dk.to(DK.dtype.element_ty), mask=in_range)
    tl.store(DV + k_ptrs, dv.to(DV.dtype.element_ty), mask=in_range)


@triton.jit
def _q_block(
    dq, q, do, lse2, delta,  # shapes: (BLOCK_M, D) fp32, (BLOCK_M, D) input dtype x2, (BLOCK_M,) fp32 x2
    k_base, v_base,  # shape: (BLOCK_KV, D) rows, row stride stride_kn
    stride_kn, offs_kv, col_ok, cols, offs_d, offs_m, row_base, n_cols, qk_scale, dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Accumulate one key block's contribution to dQ (unscaled by ``scale``)."""
    kt = _load(k_base + offs_kv[None, :] * stride_kn + offs_d[:, None], col_ok[None, :], INTERPRET)  # (D, BLOCK_KV)
    vt = _load(v_base + offs_kv[None, :] * stride_kn + offs_d[:, None], col_ok[None, :], INTERPRET)
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # shape: (BLOCK_M, BLOCK_KV), as in the forward
    p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, vt, input_precision="ieee")  # shape: (BLOCK_M, BLOCK_KV)
    if HAS_DROPOUT:
        dp = dp * tl.where(_keep(seed, row_base, offs_m, cols, n_cols, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision="ieee")


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, KP, VP, MASK, LENGTHS, SEED, OUT, DO,  # shapes as in _fwd_kernel; OUT, DO with Q's strides
    LSE, DELTA,  # shape: (B, H, n) fp32 contiguous; DELTA is written here
    DQ,  # shape: like Q, Q's strides
    stride_qb, stride_qh, stride_qm,  # Q, OUT, DO, DQ
    stride_kb, stride_kh, stride_kn,  # K, V
    stride_pb, stride_ph, stride_pn,  # KP, VP
    stride_mb,
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
    do = _load(DO + q_off, row_ok[:, None], INTERPRET)
    o = tl.load(OUT + q_off, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # shape: (BLOCK_M,) FA-2's preprocess
    tl.store(DELTA + row_base + offs_m, delta, mask=row_ok)
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))  # shape: (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    p_off = b * stride_pb + h * stride_ph
    dq = _q_block(
        dq, q, do, lse2, delta, KP + p_off, VP + p_off, stride_pn, offs_p, offs_p < M, offs_p, offs_d, offs_m,
        row_base, n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, INTERPRET,
    )  # fmt: skip
    hi = _key_bound(LENGTHS, b, N_K, HAS_LENGTHS)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_kb + h * stride_kh
    if INTERPRET:  # see _fwd_kernel
        start_n = hi * 0
        while start_n < hi:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            dq = _q_block(
                dq, q, do, lse2, delta, k_base, v_base, stride_kn, offs_n,
                _visible(MASK, b, stride_mb, offs_n, hi, HAS_MASK), M + offs_n, offs_d, offs_m, row_base, n_cols,
                qk_scale, dropout_p, seed, HAS_DROPOUT, INTERPRET,
            )  # fmt: skip
            start_n += BLOCK_N
    else:
        for start_n in tl.range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            dq = _q_block(
                dq, q, do, lse2, delta, k_base, v_base, stride_kn, offs_n,
                _visible(MASK, b, stride_mb, offs_n, hi, HAS_MASK), M + offs_n, offs_d, offs_m, row_base, n_cols,
                qk_scale, dropout_p, seed, HAS_DROPOUT, INTERPRET,
            )  # fmt: skip
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
