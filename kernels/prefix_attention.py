"""Fused prefix-K/V attention in Triton (flash-attention style), forward and backward, no autograd.

out = softmax(scale * q [k_p; k]^T + mask) [v_p; v]: one online softmax over the m prefix slots (always visible,
read through their own pointers and strides) followed by the token keys, which are visited only up to
``lengths[b]`` (fully padded key blocks are skipped). K/V are never concatenated in memory. Loads are cast to
fp32 (scores, softmax and accumulation run in fp32; Triton's interpreter computes bf16 arithmetic wrongly);
``tl.dot`` runs in TF32 for 16-bit inputs (exact for their operands) and in IEEE fp32 when any input is fp32.

Optional attention dropout regenerates its keep-mask from ``(seed, offset)`` with Philox (``tl.rand``), offset
``((b * H + h) * n + row) * (m + n_k) + col`` over the joined columns (prefix first); nothing is stored.

Loops over runtime bounds are ``while`` loops: Triton 3.6's interpreter cannot run ``range()`` over a runtime
bound with numpy >= 2.4 (``int()`` of its 1-element scalar arrays raises). Both forms are valid GPU Triton; only
``for`` loops get software pipelining, which matters little at these sizes (n <= 512: a few blocks per loop).
The autograd / custom-op wiring lives in :mod:`tpm_fast.ops.prefix_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tpm_fast.ops._backend import interpreting

__all__ = ["block_config", "dropout_keep_mask", "prefix_attention_bwd", "prefix_attention_fwd"]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
NEG_INIT: tl.constexpr = tl.constexpr(-1.0e30)  # running max start: finite, so fully masked blocks give no NaN


def block_config(d: int, fp32: bool = False, interpret: bool | None = None) -> dict:
    """Block sizes / launch settings per kernel for head dim ``d`` (the one place they are chosen; no autotuning).

    Args:
        d: head dim; fp32: any fp32 input (FMA ``ieee`` dots: smaller tiles, more warps);
        interpret: Triton interpreter (default: read TRITON_INTERPRET): 16-wide blocks, so small test shapes span
            several blocks.

    Returns:
        {"fwd" | "dkdv" | "dq": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}}: BLOCK_M = query rows (per
        program for fwd / dq, per loop step for dkdv), BLOCK_N = token keys (per loop step for fwd / dq, per program
        for dkdv). GPU choices: no register spills in ptxas -v for sm_90 at d = 64 (16-bit inputs, mask + dropout
        on), few elsewhere; not yet timed on a GPU.
    """
    if interpret if interpret is not None else interpreting():
        cfg = (16, 16, 4)
        return {
            name: dict(zip(("BLOCK_M", "BLOCK_N", "num_warps"), cfg), num_stages=1) for name in ("fwd", "dkdv", "dq")
        }
    if fp32:
        table = {"fwd": (32, 32, 8), "dkdv": (32, 64, 8), "dq": (32, 32, 8)}
    elif d <= 64:
        table = {"fwd": (64, 64, 4), "dkdv": (32, 64, 8), "dq": (64, 32, 4)}
    else:
        table = {"fwd": (32, 32, 8), "dkdv": (32, 32, 8), "dq": (64, 32, 8)}
    return {
        name: {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": 2}
        for name, (bm, bn, warps) in table.items()
    }


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


# ---------------------------------------------------------------------------------------------------- launchers


def _check(q: Tensor, k: Tensor, k_p: Tensor) -> tuple[int, int, int, int, int, int]:
    b, h, n, d = q.shape
    n_k, m = k.shape[2], k_p.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton prefix-attention kernel needs a head dim that is a power of 2 >= 16, got {d}")
    for t in (q, k, k_p):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"the Triton prefix-attention kernel supports fp32/fp16/bf16, got {t.dtype}")
    return b, h, n, n_k, m, d


def _settings(d: int, m: int, tensors, block_m: int | None, block_n: int | None) -> dict:
    fp32 = any(t.dtype == torch.float32 for t in tensors)
    cfg = block_config(d, fp32)
    for kernel in cfg.values():
        kernel["BLOCK_M"] = block_m or kernel["BLOCK_M"]
        kernel["BLOCK_N"] = block_n or kernel["BLOCK_N"]
        kernel["BLOCK_P"] = max(16, triton.next_power_of_2(max(m, 1)))
        kernel["DOT_PREC"] = "ieee" if fp32 else "tf32"
    return cfg


def _mask_args(key_padding_mask: Tensor | None, lengths: Tensor) -> tuple[Tensor, int, int]:
    if key_padding_mask is None:
        return lengths, 0, 0  # dummy pointer, never read (HAS_MASK = False)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
    return mask, mask.stride(0), mask.stride(1)


def prefix_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    lengths: Tensor,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int = 0,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward launch. Inputs may be any strided views (all four strides are passed to the kernel).

    Args:
        q: (B, H, n, d); k, v: (B, H, n_k, d); k_p, v_p: (B, H, m, d) prefix (always visible), fp32/fp16/bf16,
            d a power of 2 >= 16, m >= 0.
        lengths: (B,) int32/int64 on q's device: token keys [0, lengths[b]) may be visible; the key loop stops
            there (values are clamped to [0, n_k]).
        key_padding_mask: optional (B, n_k) bool, True = visible; ANDed with ``lengths`` (so pass lengths >= the
            last True index + 1).
        dropout_p: attention-probability dropout in [0, 1), keep-mask from Philox(seed, offset) (see module doc).
        scale: score scale, default 1 / sqrt(d).
        seed: Philox seed (used only when dropout_p > 0).
        block_m, block_n: optional block-size overrides (powers of 2 >= 16), for tests.

    Returns:
        out (B, H, n, d) in q's dtype, contiguous (0 for rows with no visible key); lse (B, H, n) fp32 per-row
        log-sum-exp of the scaled scores in log2 units, log2(sum_j exp(scale * q.k_j)) = natural LSE * log2(e)
        (+inf for rows with no visible key), consumed by the backward.
    """
    b, h, n, n_k, m, d = _check(q, k, k_p)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = _settings(d, m, (q, k, v, k_p, v_p), block_m, block_n)
    out = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    if n == 0 or b * h == 0:
        return out, lse
    mask, smb, smn = _mask_args(key_padding_mask, lengths)
    fwd = cfg["fwd"]
    _fwd_kernel[(triton.cdiv(n, fwd["BLOCK_M"]), b * h)](
        q, k, v, k_p, v_p, mask, lengths, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *k_p.stride(), *v_p.stride(), *out.stride(), smb, smn,
        h, n, n_k, m, scale, float(dropout_p), int(seed), HEAD_D=d,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0.0, **fwd,
    )  # fmt: skip
    return out, lse


def prefix_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    out: Tensor,
    lse: Tensor,
    lengths: Tensor,
    key_padding_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int = 0,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward launch (same arguments as :func:`prefix_attention_fwd` plus its outputs and ``grad_out``).

    Args:
        grad_out: (B, H, n, d) gradient of ``out`` (any strides); out, lse: what the forward returned.

    Returns:
        (dq, dk, dv, dk_p, dv_p), contiguous, each in its input's dtype; padded keys get exactly 0. The dropout
        keep-mask is regenerated from ``seed``.
    """
    b, h, n, n_k, m, d = _check(q, k, k_p)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    cfg = _settings(d, m, (q, k, v, k_p, v_p), block_m, block_n)
    dq, dk, dv, dk_p, dv_p = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, k_p, v_p))
    if n == 0 or b * h == 0:
        for t in (dk, dv, dk_p, dv_p):
            t.zero_()
        return dq, dk, dv, dk_p, dv_p
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # shape: (B, H, n) fp32, rowsum(dO * O)
    lse = lse.contiguous()
    mask, smb, smn = _mask_args(key_padding_mask, lengths)
    common = dict(
        H=h, N_Q=n, N_K=n_k, M=m, scale=scale, dropout_p=float(dropout_p), seed=int(seed), HEAD_D=d,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0.0,
    )  # fmt: skip
    strides = (*q.stride(), *k.stride(), *v.stride(), *k_p.stride(), *v_p.stride(), *grad_out.stride())
    dkdv, dqc = cfg["dkdv"], cfg["dq"]
    _bwd_dkdv_kernel[(triton.cdiv(n_k, dkdv["BLOCK_N"]) + 1, b * h)](
        q, k, v, k_p, v_p, mask, lengths, grad_out, lse, delta, dk, dv, dk_p, dv_p,
        *strides, *dk.stride(), *dv.stride(), *dk_p.stride(), *dv_p.stride(), smb, smn, **common, **dkdv,
    )  # fmt: skip
    _bwd_dq_kernel[(triton.cdiv(n, dqc["BLOCK_M"]), b * h)](
        q, k, v, k_p, v_p, mask, lengths, grad_out, lse, delta, dq, *strides, *dq.stride(), smb, smn, **common, **dqc
    )
    return dq, dk, dv, dk_p, dv_p


def dropout_keep_mask(
    b: int, h: int, n: int, m: int, n_k: int, dropout_p: float, seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """The keep-mask the kernels use for (seed, dropout_p): (B, H, n, m + n_k) bool, prefix columns first.

    Element [b, h, i, j] is ``tl.rand(seed, ((b * H + h) * n + i) * (m + n_k) + j) >= dropout_p``; the kept
    probabilities are scaled by 1 / (1 - dropout_p).
    """
    keep = torch.empty((b, h, n, m + n_k), dtype=torch.uint8, device=device)
    if keep.numel():
        grid = (triton.cdiv(n, 16), triton.cdiv(m + n_k, 64), b * h)
        _dropout_keep_kernel[grid](keep, n, m + n_k, float(dropout_p), int(seed), BLOCK_M=16, BLOCK_N=64)
    return keep.bool()
