"""Fused Triton kernels for a batched linear-chain CRF (pytorch-crf semantics), no autograd here.

One program per sequence (grid ``(B,)``). The ``T`` tags (``T <= MAX_TAGS``) are padded to a power-of-two
``BLOCK_T = next_pow2(max(T, 16))``; padded tags get score ``-inf`` everywhere and are never read or written.
``transitions[i, j]`` scores tag ``i`` -> tag ``j``; ``start`` / ``end`` score the first / last tag.
Every sequence ``b`` is the prefix ``0 .. lengths[b] - 1`` of its row (left-aligned masks); its length is read
from a device tensor (no host sync) and clamped to ``[1, n]``.

All arithmetic is fp32 (emissions and parameters may be fp16 / bf16 / fp32; loads are cast to fp32, which also
keeps the Triton CPU interpreter, whose bf16 arithmetic is wrong, exact). Log-sum-exps subtract their max, with
an all ``-inf`` column giving ``-inf`` (not NaN), so ``-inf`` / ``-1e4`` constraint transitions are exact.
Time loops are ``while`` loops bounded by the per-row length: Triton's interpreter (with numpy 2.4) cannot run
``range()`` over runtime bounds, and compiled code skips the padding steps either way.

Launchers:

- `crf_forward`: forward algorithm (+ gold path score) -> (out (B,), alpha (B, n, T), log_z (B,)), fp32.
- `crf_backward`: marginals by the reverse-mode (adjoint) recursion over the saved alphas -> grad of emissions
  and per-sequence partial parameter grads.
- `crf_viterbi`: max-plus recursion with torchcrf's sums and tie-breaking, back-pointers in an int8 scratch
  buffer, backtrace in the kernel -> (B, n) int64 tags, 0 on padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["MAX_TAGS", "crf_forward", "crf_backward", "crf_viterbi"]

MAX_TAGS = 64  # larger tag sets do not fit the (BLOCK_T, BLOCK_T) register tile; callers use the reference


@triton.jit
def _lse_cols(s):
    """logsumexp over axis 0 of a (BT, BT) tile -> (BT,) indexed by column; an all -inf column gives -inf."""
    m = tl.max(s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    return m + tl.log(tl.sum(tl.exp(s - m[None, :]), axis=0))


@triton.jit
def _crf_forward_kernel(
    em_ptr,  # shape: (B, n, T) emissions, any float dtype, last-dim stride 1
    tags_ptr,  # shape: (B, n) int64 gold tags (unused without HAS_TAGS)
    len_ptr,  # shape: (B,) int sequence lengths
    start_ptr,  # shape: (T,)
    end_ptr,  # shape: (T,)
    trans_ptr,  # shape: (T, T) contiguous, [i, j] = i -> j
    out_ptr,  # shape: (B,) fp32 out: gold - log Z (HAS_TAGS) or log Z
    alpha_ptr,  # shape: (B, n, T) fp32 out: forward log-potentials, 0 on rows t >= length
    logz_ptr,  # shape: (B,) fp32 out: log Z
    n,
    T,
    stride_eb,
    stride_en,
    stride_tb,
    stride_tn,
    HAS_TAGS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    valid = offs < T
    tile_ok = valid[:, None] & valid[None, :]
    trans = tl.load(trans_ptr + offs[:, None] * T + offs[None, :], mask=tile_ok, other=float("-inf")).to(tl.float32)
    start = tl.load(start_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    end = tl.load(end_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    length = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int32), 1), n)
    em_row = em_ptr + b * stride_eb
    al_row = alpha_ptr + b * n * T
    tag_row = tags_ptr + b * stride_tb

    em = tl.load(em_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
    alpha = start + em  # shape: (BT,)
    tl.store(al_row + offs, alpha, mask=valid)
    gold = 0.0
    prev = 0
    if HAS_TAGS:
        prev = tl.minimum(tl.maximum(tl.load(tag_row).to(tl.int32), 0), T - 1)  # clamped: memory-safe
        gold = tl.load(start_ptr + prev).to(tl.float32) + tl.load(em_row + prev).to(tl.float32)
    t = length * 0 + 1
    while t < length:  # while, not range(): the interpreter cannot run range() over runtime bounds
        em = tl.load(em_row + t * stride_en + offs, mask=valid, other=float("-inf")).to(tl.float32)
        alpha = _lse_cols(alpha[:, None] + trans) + em  # shape: (BT,) logsumexp_i(alpha_i + trans_ij) + em_j
        tl.store(al_row + t * T + offs, alpha, mask=valid)
        if HAS_TAGS:
            cur = tl.minimum(tl.maximum(tl.load(tag_row + t * stride_tn).to(tl.int32), 0), T - 1)
            gold += tl.load(trans_ptr + prev * T + cur).to(tl.float32)
            gold += tl.load(em_row + t * stride_en + cur).to(tl.float32)
            prev = cur
        t += 1
    while t < n:  # padding rows: 0 (deterministic output)
        tl.store(al_row + t * T + offs, tl.zeros([BLOCK_T], dtype=tl.float32), mask=valid)
        t += 1
    v = alpha + end
    m = tl.max(v, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    log_z = m + tl.log(tl.sum(tl.exp(v - m), axis=0))
    tl.store(logz_ptr + b, log_z)
    if HAS_TAGS:
        gold += tl.load(end_ptr + prev).to(tl.float32)
        tl.store(out_ptr + b, gold - log_z)
    else:
        tl.store(out_ptr + b, log_z)


@triton.jit
def _crf_backward_kernel(
    grad_ptr,  # shape: (B,) fp32 incoming grad of `out` (negated by the launcher for log Z)
    tags_ptr,  # shape: (B, n) int64 (unused without HAS_TAGS)
    len_ptr,  # shape: (B,) int
    end_ptr,  # shape: (T,)
    trans_ptr,  # shape: (T, T) contiguous
    alpha_ptr,  # shape: (B, n, T) fp32 from the forward
    logz_ptr,  # shape: (B,) fp32 from the forward
    gem_ptr,  # shape: (B, n, T) contiguous out, emissions' dtype: g * (onehot - gamma), 0 on padding
    gstart_ptr,  # shape: (B, T) fp32 out: g * (onehot(tag_0) - gamma_0)
    gend_ptr,  # shape: (B, T) fp32 out: g * (onehot(tag_last) - gamma_last)
    gtrans_ptr,  # shape: (B, T, T) fp32 out: g * sum_t (onehot pair - xi_t)
    n,
    T,
    stride_tb,
    stride_tn,
    HAS_TAGS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # Reverse mode of the forward recursion, i.e. forward-backward in normalized form: the adjoint
    # gamma_t = d log Z / d alpha_t is carried backwards in time through the column-softmax of each step,
    # P_t[i, j] = exp(alpha_{t-1}[i] + trans[i, j] - lse_i(...)[j]), recomputed from the saved alphas with the
    # forward's own arithmetic: xi_t = P_t * gamma_t[None, :], gamma_{t-1} = xi_t.sum(1). Every exponent is a
    # difference of values computed from the same rounded numbers, so marginals stay exact even when the
    # alphas are ~1e5 (exp(alpha + beta - log Z) would lose ~ulp(1e5) = 8e-3 in fp32 there).
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    valid = offs < T
    tile_ok = valid[:, None] & valid[None, :]
    tile_offs = offs[:, None] * T + offs[None, :]
    trans = tl.load(trans_ptr + tile_offs, mask=tile_ok, other=float("-inf")).to(tl.float32)
    end = tl.load(end_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    length = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int32), 1), n)
    g = tl.load(grad_ptr + b).to(tl.float32)
    log_z = tl.load(logz_ptr + b)
    al_row = alpha_ptr + b * n * T
    gem_row = gem_ptr + b * n * T
    tag_row = tags_ptr + b * stride_tb
    out_ty = gem_ptr.dtype.element_ty

    t = length
    while t < n:  # padding: zero gradient
        tl.store(gem_row + t * T + offs, tl.zeros([BLOCK_T], dtype=out_ty), mask=valid)
        t += 1

    last = length - 1
    gamma = tl.exp(tl.load(al_row + last * T + offs, mask=valid, other=float("-inf")) + end - log_z)  # shape: (BT,)
    cur = 0
    d = -gamma  # shape: (BT,) onehot - gamma at the current step
    if HAS_TAGS:
        cur = tl.minimum(tl.maximum(tl.load(tag_row + last * stride_tn).to(tl.int32), 0), T - 1)
        d += tl.where(offs == cur, 1.0, 0.0)
    tl.store(gem_row + last * T + offs, (g * d).to(out_ty), mask=valid)
    tl.store(gend_ptr + b * T + offs, g * d, mask=valid)
    gtrans = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)
    t = last
    while t > 0:  # t = last .. 1: pair (t-1, t)
        alpha_prev = tl.load(al_row + (t - 1) * T + offs, mask=valid, other=float("-inf"))  # shape: (BT,)
        s = alpha_prev[:, None] + trans  # shape: (BT, BT) as in the forward
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(s - m[None, :])  # shape: (BT, BT)
        colsum = tl.sum(e, axis=0)  # shape: (BT,) 0 only for unreachable / padded tags (then gamma_t = 0)
        xi = e * (gamma / tl.where(colsum == 0.0, 1.0, colsum))[None, :]  # shape: (BT, BT) pairwise marginal
        gamma = tl.sum(xi, axis=1)  # shape: (BT,) gamma_{t-1}
        gtrans -= xi
        d = -gamma
        if HAS_TAGS:
            prev = tl.minimum(tl.maximum(tl.load(tag_row + (t - 1) * stride_tn).to(tl.int32), 0), T - 1)
            gtrans += tl.where((offs[:, None] == prev) & (offs[None, :] == cur), 1.0, 0.0)
            d += tl.where(offs == prev, 1.0, 0.0)
            cur = prev
        tl.store(gem_row + (t - 1) * T + offs, (g * d).to(out_ty), mask=valid)
        t -= 1
    tl.store(gstart_ptr + b * T + offs, g * d, mask=valid)
    tl.store(gtrans_ptr + b * T * T + tile_offs, g * gtrans, mask=tile_ok)


@triton.jit
def _crf_viterbi_kernel(
    em_ptr,  # shape: (B, n, T) emissions, last-dim stride 1
    len_ptr,  # shape: (B,) int
    start_ptr,  # shape: (T,)
    end_ptr,  # shape: (T,)
    trans_ptr,  # shape: (T, T) contiguous
    bp_ptr,  # shape: (B, n, T) int8 scratch: best previous tag, rows 1 .. length-1
    out_ptr,  # shape: (B, n) int64 out: best path, 0 on padding
    n,
    T,
    stride_eb,
    stride_en,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    valid = offs < T
    tile_ok = valid[:, None] & valid[None, :]
    trans = tl.load(trans_ptr + offs[:, None] * T + offs[None, :], mask=tile_ok, other=float("-inf")).to(tl.float32)
    start = tl.load(start_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    end = tl.load(end_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    length = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int32), 1), n)
    em_row = em_ptr + b * stride_eb
    bp_row = bp_ptr + b * n * T
    out_row = out_ptr + b * n

    score = start + tl.load(em_row + offs, mask=valid, other=float("-inf")).to(tl.float32)  # shape: (BT,)
    t = length * 0 + 1
    while t < length:
        em = tl.load(em_row + t * stride_en + offs, mask=valid, other=float("-inf")).to(tl.float32)
        nxt = (score[:, None] + trans) + em[None, :]  # shape: (BT, BT) same sums as torchcrf
        score, idx = tl.max(nxt, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(bp_row + t * T + offs, idx.to(tl.int8), mask=valid)
        t += 1
    _, best = tl.max(score + end, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.debug_barrier()  # back-pointers written by all threads must be visible to the scalar loads below
    cur = best.to(tl.int32)
    tl.store(out_row + length - 1, cur.to(tl.int64))
    t = length - 1
    while t > 0:
        cur = tl.load(bp_row + t * T + cur).to(tl.int32)
        tl.store(out_row + t - 1, cur.to(tl.int64))
        t -= 1
    t = length
    while t < n:  # padding -> 0, BLOCK_T positions at a time
        pos = t + offs
        tl.store(out_row + pos, tl.zeros([BLOCK_T], dtype=tl.int64), mask=pos < n)
        t += BLOCK_T


def _block_t(t: int) -> int:
    if t > MAX_TAGS:
        raise ValueError(f"the Triton CRF kernels support at most {MAX_TAGS} tags, got {t}")
    return triton.next_power_of_2(max(t, 16))


def _num_warps(block_t: int) -> int:
    # 1 warp keeps the reductions in warp shuffles; at 64 tags the backward needs 8 warps to avoid register spills
    # (ptxas, sm_90: 4 warps spill 168 bytes)
    return 1 if block_t <= 32 else 8


def _em_view(emissions: Tensor) -> Tensor:
    return emissions if emissions.stride(2) == 1 else emissions.contiguous()


def crf_forward(
    emissions: Tensor, tags: Tensor | None, lengths: Tensor, start: Tensor, end: Tensor, transitions: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward algorithm and (with ``tags``) gold path score, fused.

    Args:
        emissions: (B, n, T) fp16/bf16/fp32 (any strides; copied only if the last dim is not contiguous).
        tags: (B, n) int64 gold tags in [0, T) on real tokens (out-of-range values are clamped, not checked),
            ignored past each length; or None for the log partition only.
        lengths: (B,) int64/int32 number of real (left-aligned) tokens per row, in [1, n] (clamped into it).
        start, end: (T,) float; transitions: (T, T) float, ``[i, j]`` = score of i -> j. T <= `MAX_TAGS`.

    Returns:
        out: (B,) fp32, ``gold - log Z`` with tags, else ``log Z``;
        alpha: (B, n, T) fp32 forward log-potentials (0 on rows ``t >= lengths[b]``);
        log_z: (B,) fp32.
    """
    b, n, t = emissions.shape
    block_t = _block_t(t)
    dev = emissions.device
    out = torch.empty(b, dtype=torch.float32, device=dev)
    alpha = torch.empty(b, n, t, dtype=torch.float32, device=dev)
    log_z = torch.empty(b, dtype=torch.float32, device=dev)
    if b == 0:
        return out, alpha, log_z
    em = _em_view(emissions)
    tg = tags if tags is not None else lengths  # dummy pointer, never read without HAS_TAGS
    stb, stn = (tags.stride(0), tags.stride(1)) if tags is not None else (0, 0)
    _crf_forward_kernel[(b,)](
        em, tg, lengths, start.contiguous(), end.contiguous(), transitions.contiguous(), out, alpha, log_z,
        n, t, em.stride(0), em.stride(1), stb, stn,
        HAS_TAGS=tags is not None, BLOCK_T=block_t, num_warps=_num_warps(block_t),
    )  # fmt: skip
    return out, alpha, log_z


def crf_backward(
    grad: Tensor,
    tags: Tensor | None,
    lengths: Tensor,
    end: Tensor,
    transitions: Tensor,
    alpha: Tensor,
    log_z: Tensor,
    grad_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``out`` of `crf_forward` (marginals by the reverse-mode recursion, no autograd through time).

    Args:
        grad: (B,) incoming gradient of ``out``; tags, lengths, end, transitions: as given to `crf_forward`
            (emissions and ``start`` are not needed); alpha (B, n, T) fp32 and log_z (B,) fp32: from `crf_forward`.
        grad_dtype: dtype of the emissions' gradient (the emissions' dtype).

    Returns:
        grad_emissions: (B, n, T) contiguous, ``grad_dtype``: ``g_b * (onehot(tag_t) - gamma_t)`` with tags, else
            ``g_b * gamma_t``, for ``t < lengths[b]``; 0 on padding.
        grad_start, grad_end: (B, T) fp32 per-sequence partials (same rule at the first / last real token);
        grad_transitions: (B, T, T) fp32 per-sequence partials ``g_b * sum_t (onehot pair - xi_t)`` (or
            ``g_b * sum_t xi_t``). Sum over B for the parameters' gradients (deterministic, no atomics).
    """
    b, n, t = alpha.shape
    block_t = _block_t(t)
    dev = alpha.device
    g_em = torch.empty(b, n, t, dtype=grad_dtype, device=dev)
    g_start = torch.empty(b, t, dtype=torch.float32, device=dev)
    g_end = torch.empty(b, t, dtype=torch.float32, device=dev)
    g_trans = torch.empty(b, t, t, dtype=torch.float32, device=dev)
    if b == 0:
        return g_em, g_start, g_end, g_trans
    g = grad.to(torch.float32)
    if tags is None:
        g = -g  # the kernel writes g * (0 - gamma)
    g = g.contiguous()
    tg = tags if tags is not None else lengths
    stb, stn = (tags.stride(0), tags.stride(1)) if tags is not None else (0, 0)
    _crf_backward_kernel[(b,)](
        g, tg, lengths, end.contiguous(), transitions.contiguous(), alpha, log_z, g_em, g_start, g_end, g_trans,
        n, t, stb, stn,
        HAS_TAGS=tags is not None, BLOCK_T=block_t, num_warps=_num_warps(block_t),
    )  # fmt: skip
    return g_em, g_start, g_end, g_trans


def crf_viterbi(emissions: Tensor, lengths: Tensor, start: Tensor, end: Tensor, transitions: Tensor) -> Tensor:
    """Best tag paths with torchcrf's arithmetic (``(score_i + trans_ij) + em_j`` in fp32) and tie-breaking
    (first index of the max), backtrace in the kernel.

    Args: as for `crf_forward` (no tags).

    Returns:
        (B, n) int64 best tags on real tokens, 0 on padding.
    """
    b, n, t = emissions.shape
    block_t = _block_t(t)
    dev = emissions.device
    out = torch.empty(b, n, dtype=torch.int64, device=dev)
    if b == 0:
        return out
    bp = torch.empty(b, n, t, dtype=torch.int8, device=dev)  # shape: (B, n, T) back-pointers
    em = _em_view(emissions)
    _crf_viterbi_kernel[(b,)](
        em, lengths, start.contiguous(), end.contiguous(), transitions.contiguous(), bp, out,
        n, t, em.stride(0), em.stride(1),
        BLOCK_T=block_t, num_warps=_num_warps(block_t),
    )  # fmt: skip
    return out
