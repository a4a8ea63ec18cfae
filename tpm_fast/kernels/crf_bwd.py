"""Triton backward kernel of the linear-chain CRF: gradients of `_crf_forward_kernel`'s output by the reverse-mode
(adjoint) recursion over the saved alphas. Launched by `tpm_fast.kernels.crf.launch_crf_backward`; conventions are
in `tpm_fast.kernels.crf`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tpm_fast.kernels.crf_fwd import _clamp_tag, _log_z, _row_length


@triton.jit
def _gold_minus_marginals(gamma, is_gold):
    """onehot(y) - gamma over a (BT,) vector of marginals, the gold entry (``is_gold``) formed as the sum of the
    other marginals (= 1 - gamma[y] in exact arithmetic, without that difference's cancellation)."""
    rest = tl.sum(tl.where(is_gold, 0.0, gamma), axis=0)
    return tl.where(is_gold, rest, -gamma)


@triton.jit
def _crf_backward_kernel(
    grad_ptr,  # shape: (B,) any float, incoming grad of the forward's `out` (element stride stride_g, may be 0)
    tags_ptr,  # shape: (B, n) int64 (unused without HAS_TAGS)
    mask_ptr,  # shape: (B, n) uint8, left-aligned
    end_ptr,  # shape: (T,) contiguous
    trans_ptr,  # shape: (T, T) contiguous
    alpha_ptr,  # shape: (B, n, T) fp32 from the forward
    gem_ptr,  # shape: (B, n, T) contiguous out, emissions' dtype: g * d_t, 0 on padding
    gpar_ptr,  # shape: (B, 2T + T*T) fp32 out: per-sequence partials [start (T) | end (T) | transitions (T*T)]
    n,
    T,
    stride_g,
    stride_tb,
    stride_tn,
    stride_mb,
    stride_mn,
    HAS_TAGS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Reverse mode of the forward recursion, i.e. forward-backward in normalized form: the adjoint
    # gamma_t = d log Z / d alpha_t is carried backwards in time through the column-softmax of each step,
    # P_t[i, j] = exp(alpha_{t-1}[i] + trans[i, j] - lse_i(...)[j]), recomputed from the saved alphas with the
    # forward's own arithmetic: xi_t = P_t * gamma_t[None, :], gamma_{t-1} = xi_t.sum(1). Every exponent is a
    # difference of values computed from the same rounded numbers, so marginals stay exact even when the
    # alphas are ~1e5 (exp(alpha + beta - log Z) would lose ~ulp(1e5) = 8e-3 in fp32 there).
    # The saved alphas are shifted per step (each row's max is 0): the softmaxes only see alpha differences, and
    # log Z recomputed from the last row is log Z less the forward's shift sum, as gamma_last needs.
    # With tags the output is gold - log Z: d_t = onehot(y_t) - gamma_t; without, it is log Z: d_t = gamma_t.
    # The gold entries 1 - gamma_t[y_t] and 1 - xi_t[y_{t-1}, y_t] are formed as the sums of the OTHER marginals
    # (equal: marginals sum to 1): for a confident model gamma_t[y_t] ~ 1 - 1e-4, whose fp32 rounding would be
    # ~1e-3 of 1 - gamma_t[y_t].
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    valid = offs < T
    tile_ok = valid[:, None] & valid[None, :]
    tile_offs = offs[:, None] * T + offs[None, :]
    trans = tl.load(trans_ptr + tile_offs, mask=tile_ok, other=float("-inf")).to(tl.float32)
    end = tl.load(end_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    length = _row_length(mask_ptr + b * stride_mb, stride_mn, n, BLOCK_N)
    g = tl.load(grad_ptr + b * stride_g).to(tl.float32)
    al_row = alpha_ptr + b * n * T
    gem_row = gem_ptr + b * n * T
    tag_row = tags_ptr + b * stride_tb
    par_row = gpar_ptr + b * (2 * T + T * T)
    out_ty = gem_ptr.dtype.element_ty

    t = length
    while t < n:  # padding: zero gradient
        tl.store(gem_row + t * T + offs, tl.zeros([BLOCK_T], dtype=out_ty), mask=valid)
        t += 1

    last = length - 1
    alpha_last = tl.load(al_row + last * T + offs, mask=valid, other=float("-inf"))  # shape: (BT,)
    gamma = tl.exp(alpha_last + end - _log_z(alpha_last, end))  # shape: (BT,) log Z as the forward computed it
    cur = 0
    if HAS_TAGS:
        cur = _clamp_tag(tl.load(tag_row + last * stride_tn), T)
        d = _gold_minus_marginals(gamma, offs == cur)  # shape: (BT,)
    else:
        d = gamma
    tl.store(gem_row + last * T + offs, (g * d).to(out_ty), mask=valid)
    tl.store(par_row + T + offs, g * d, mask=valid)  # end
    gtrans = tl.zeros([BLOCK_T, BLOCK_T], dtype=tl.float32)  # shape: (BT, BT) sum_t (onehot pair - xi_t) or xi_t
    t = last
    while t > 0:  # t = last .. 1: pair (t-1, t)
        alpha_prev = tl.load(al_row + (t - 1) * T + offs, mask=valid, other=float("-inf"))  # shape: (BT,)
        s = alpha_prev[:, None] + trans  # shape: (BT, BT) as in the forward
        m = tl.max(s, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(s - m[None, :])  # shape: (BT, BT)
        colsum = tl.sum(e, axis=0)  # shape: (BT,) 0 only for unreachable / padded tags (then gamma_t = 0)
        w = gamma / tl.where(colsum == 0.0, 1.0, colsum)  # shape: (BT,) gamma_t / column sums
        xi = e * w[None, :]  # shape: (BT, BT) pairwise marginal
        gamma = tl.sum(xi, axis=1)  # shape: (BT,) gamma_{t-1}
        if HAS_TAGS:
            prev = _clamp_tag(tl.load(tag_row + (t - 1) * stride_tn), T)
            is_prev = offs == prev
            others = tl.sum(tl.where(is_prev, 0.0, gamma), axis=0)  # sum_{i != y_{t-1}} gamma_{t-1}[i]
            # row y_{t-1} of xi, by the tile's arithmetic from two loads (no extra pass over the tile)
            a_prev = tl.load(al_row + (t - 1) * T + prev)
            tr_prev = tl.load(trans_ptr + prev * T + offs, mask=valid, other=float("-inf")).to(tl.float32)
            xi_prev = tl.exp((a_prev + tr_prev) - m) * w  # shape: (BT,)
            # the gold pair's 1 - xi[y_{t-1}, y_t]: the sum of the other pairs' xi (rows i != y_{t-1} and the
            # gold row's other columns)
            rest = others + tl.sum(tl.where(offs == cur, 0.0, xi_prev), axis=0)
            gtrans += tl.where(is_prev[:, None] & (offs == cur)[None, :], rest, -xi)
            d = tl.where(is_prev, others, -gamma)  # onehot(y_{t-1}) - gamma_{t-1}, the gold entry as others
            cur = prev
        else:
            gtrans += xi
            d = gamma
        tl.store(gem_row + (t - 1) * T + offs, (g * d).to(out_ty), mask=valid)
        t -= 1
    tl.store(par_row + offs, g * d, mask=valid)  # start
    tl.store(par_row + 2 * T + tile_offs, g * gtrans, mask=tile_ok)  # transitions
