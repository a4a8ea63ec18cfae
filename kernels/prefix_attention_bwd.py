"""Backward jit kernels of the fused prefix-K/V attention (launched by :mod:`tpm_fast.kernels.prefix_attention`).

dK/dV per key block (program 0: the prefix block) looping over the query blocks, and dQ per query block looping
over the prefix and the visible key blocks. Probabilities are recomputed from the forward's log2 LSE; the dropout
keep-mask is regenerated from the seed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpm_fast.kernels.prefix_attention_fwd import LOG2E, _keep


@triton.jit
def _bwd_kv_block(
    q_base, do_base,  # shape: (n, D) rows of this (b, h)
    lse_base, delta_base,  # shape: (n,) fp32
    k_base, v_base,  # shape: (BLOCK_KV, D) rows
    stride_qm, stride_qd, stride_dom, stride_dod, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_kv, col_ok, cols, row_base, N_Q, n_cols, scale, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """dK, dV (BLOCK_KV, D) fp32 of one key block, looping over all query blocks.

    Scores are recomputed exactly as in the forward (``dot(q, k^T)``, same operand order), so p = exp2(s2 - lse2)
    matches the forward's bits even for huge logits; the products with p / dS then use their transposes.
    """
    offs_d = tl.arange(0, HEAD_D)
    qk_scale = scale * LOG2E
    kt = tl.load(k_base + offs_kv[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0)
    vt = tl.load(v_base + offs_kv[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=col_ok[None, :], other=0.0)
    kt = kt.to(tl.float32)  # shape: (D, BLOCK_KV)
    vt = vt.to(tl.float32)
    dk = tl.zeros([BLOCK_KV, HEAD_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_KV, HEAD_D], dtype=tl.float32)
    start_m = tl.zeros([], dtype=tl.int32)
    while start_m < N_Q:  # while, not range(): see the module doc
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_Q
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)  # shape: (BLOCK_M, D)
        do_ptrs = do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
        do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)  # shape: (BLOCK_M, D)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))  # shape: (BLOCK_M,)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # shape: (BLOCK_M, BLOCK_KV)
        p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)  # shape: (BLOCK_M, BLOCK_KV)
        if HAS_DROPOUT:
            z = tl.where(_keep(seed, row_base, offs_m, cols, n_cols, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
            dv += tl.dot(tl.trans(p * z), do, input_precision=DOT_PREC)
            ds = p * (dp * z - delta[:, None])
        else:
            dv += tl.dot(tl.trans(p), do, input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PREC)  # shape: (BLOCK_KV, D)
        start_m += BLOCK_M
    return dk * scale, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KP, VP, MASK, LENGTHS, DO,  # shapes as in _fwd_kernel; DO like OUT
    LSE, DELTA,  # shape: (B, H, n) fp32 contiguous
    DK, DV, DKP, DVP,  # shapes: like K, V, KP, VP
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kpb, stride_kph, stride_kpn, stride_kpd,
    stride_vpb, stride_vph, stride_vpn, stride_vpd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_dkpb, stride_dkph, stride_dkpn, stride_dkpd,
    stride_dvpb, stride_dvph, stride_dvpn, stride_dvpd,
    stride_mb, stride_mn,
    H, N_Q, N_K, M, scale, dropout_p, seed,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)  # 0: the prefix block; 1..: token key blocks
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    row_base = pid_bh.to(tl.int64) * N_Q
    n_cols = M + N_K
    offs_d = tl.arange(0, HEAD_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    if pid_n == 0:  # (names differ from the else branch: Triton requires same-typed names across branches)
        offs_p = tl.arange(0, BLOCK_P)
        p_ok = offs_p < M
        dkp, dvp = _bwd_kv_block(
            q_base, do_base, LSE + row_base, DELTA + row_base,
            KP + b * stride_kpb + h * stride_kph, VP + b * stride_vpb + h * stride_vph,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_kpn, stride_kpd, stride_vpn, stride_vpd,
            offs_p, p_ok, offs_p, row_base, N_Q, n_cols, scale, dropout_p, seed,
            HEAD_D, BLOCK_P, BLOCK_M, HAS_DROPOUT, DOT_PREC,
        )  # fmt: skip
        dkp_ptrs = (
            DKP + b * stride_dkpb + h * stride_dkph + offs_p[:, None] * stride_dkpn + offs_d[None, :] * stride_dkpd
        )
        dvp_ptrs = (
            DVP + b * stride_dvpb + h * stride_dvph + offs_p[:, None] * stride_dvpn + offs_d[None, :] * stride_dvpd
        )
        tl.store(dkp_ptrs, dkp.to(DKP.dtype.element_ty), mask=p_ok[:, None])
        tl.store(dvp_ptrs, dvp.to(DVP.dtype.element_ty), mask=p_ok[:, None])
    else:
        offs_n = (pid_n - 1) * BLOCK_N + tl.arange(0, BLOCK_N)
        hi = tl.minimum(tl.maximum(tl.load(LENGTHS + b).to(tl.int32), 0), N_K)
        ok = offs_n < hi
        if (pid_n - 1) * BLOCK_N < hi:
            if HAS_MASK:
                ok = ok & (tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=ok, other=0) != 0)
            dk, dv = _bwd_kv_block(
                q_base, do_base, LSE + row_base, DELTA + row_base,
                K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_kn, stride_kd, stride_vn, stride_vd,
                offs_n, ok, M + offs_n, row_base, N_Q, n_cols, scale, dropout_p, seed,
                HEAD_D, BLOCK_N, BLOCK_M, HAS_DROPOUT, DOT_PREC,
            )  # fmt: skip
        else:  # the whole block is padding: zero gradients
            dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
        in_range = offs_n < N_K
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
        dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=in_range[:, None])
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=in_range[:, None])


@triton.jit
def _bwd_q_block(
    dq, q, do, lse2, delta,  # shapes: (BLOCK_M, D) x3, (BLOCK_M,) x2
    k_base, v_base,  # shape: (BLOCK_KV, D) rows
    stride_kn, stride_kd, stride_vn, stride_vd,
    offs_kv, col_ok, cols, offs_d, offs_m, row_base, n_cols, qk_scale, dropout_p, seed,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Accumulate one key block's contribution to dQ (unscaled by ``scale``)."""
    kt = tl.load(k_base + offs_kv[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0)
    vt = tl.load(v_base + offs_kv[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=col_ok[None, :], other=0.0)
    kt = kt.to(tl.float32)  # shape: (D, BLOCK_KV)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # shape: (BLOCK_M, BLOCK_KV), as in the forward
    p = tl.where(col_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, vt.to(tl.float32), input_precision=DOT_PREC)  # shape: (BLOCK_M, BLOCK_KV)
    if HAS_DROPOUT:
        z = tl.where(_keep(seed, row_base, offs_m, cols, n_cols, dropout_p), 1.0 / (1.0 - dropout_p), 0.0)
        dp = dp * z
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds, tl.trans(kt), input_precision=DOT_PREC)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, KP, VP, MASK, LENGTHS, DO, LSE, DELTA,  # shapes as in _bwd_dkdv_kernel
    DQ,  # shape: like Q
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_kpb, stride_kph, stride_kpn, stride_kpd,
    stride_vpb, stride_vph, stride_vpn, stride_vpd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
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
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)  # shape: (BLOCK_M, D)
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))  # shape: (BLOCK_M,)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    offs_p = tl.arange(0, BLOCK_P)
    dq = _bwd_q_block(
        dq, q, do, lse2, delta, KP + b * stride_kpb + h * stride_kph, VP + b * stride_vpb + h * stride_vph,
        stride_kpn, stride_kpd, stride_vpn, stride_vpd, offs_p, offs_p < M, offs_p, offs_d, offs_m, row_base,
        n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, DOT_PREC,
    )  # fmt: skip
    hi = tl.minimum(tl.maximum(tl.load(LENGTHS + b).to(tl.int32), 0), N_K)
    start_n = tl.zeros([], dtype=tl.int32)
    while start_n < hi:  # while, not range(): see the module doc
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = offs_n < hi
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b * stride_mb + offs_n * stride_mn, mask=ok, other=0) != 0)
        dq = _bwd_q_block(
            dq, q, do, lse2, delta, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh,
            stride_kn, stride_kd, stride_vn, stride_vd, offs_n, ok, M + offs_n, offs_d, offs_m, row_base,
            n_cols, qk_scale, dropout_p, seed, HAS_DROPOUT, DOT_PREC,
        )  # fmt: skip
        start_n += BLOCK_N
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])
