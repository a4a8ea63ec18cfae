"""Fused Triton kernels for a batched linear-chain CRF (pytorch-crf semantics): raw launchers, no autograd, no
validation (the tiers are named as in flash-attention: `launch_crf_forward` here; `CRFLogLikelihoodFunc` and the
``tpm_fast::crf_*`` custom ops in `tpm_fast.ops.crf`; the public `tpm_fast.ops.crf.crf_log_likelihood`).

One program per sequence (grid ``(B,)``). The ``T`` tags (``T <= tpm_fast.ops.backend.MAX_TAGS``) are padded to a
power-of-two ``BLOCK_T = next_pow2(max(T, 16))``; padded tags get score ``-inf`` everywhere and are never read or
written. ``transitions[i, j]`` scores tag ``i`` -> tag ``j``; ``start`` / ``end`` score the first / last tag.
Each kernel computes its row's length from the (B, n) mask (number of nonzero entries, clamped to ``[1, n]``; no
``mask.sum`` launch, no host sync): the contract is left-aligned masks, row ``b`` being positions
``0 .. length-1``. Tags on real tokens are clamped into ``[0, T)`` (out-of-range tags give a wrong but memory-safe
result; the ops layer validates them).

All arithmetic is fp32 (emissions and parameters may be fp16 / bf16 / fp32; loads are cast to fp32, which also
keeps the Triton CPU interpreter, whose bf16 arithmetic is wrong, exact). Log-sum-exps subtract their max, with
an all ``-inf`` column giving ``-inf`` (not NaN), so ``-inf`` / ``-1e4`` constraint transitions are exact.
Time loops are ``while`` loops bounded by the per-row length: Triton's interpreter (with numpy 2.4) cannot run
``range()`` over runtime bounds, and compiled code skips the padding steps either way. Gradients are deterministic
(per-sequence partials, no atomics).

Kernels (`tpm_fast.kernels.crf_fwd`, `crf_bwd`, `crf_viterbi`), one launch each:

- `launch_crf_forward`: gold path score (block loads over time, outside the recursion) + forward algorithm, each
  step's alphas shifted by their max (saved shifted, the shifts summed into log Z).
- `launch_crf_backward`: marginals by the reverse-mode (adjoint) recursion over the saved alphas -> grad of the
  emissions and per-sequence parameter partials in one (B, 2T + T*T) buffer (one ``.sum(0)`` reduces it).
- `launch_crf_viterbi`: max-plus recursion, int8 back-pointers, backtrace in the kernel; also writes the lengths.

Precision on a confident model's batches (gold tags favoured by a large margin, path scores of several hundred,
marginals ~1 - 1e-4; ``tests.oracles.confident_crf_case``): the saved alphas are shifted per step, since unshifted
log-space alphas grow with t (ulp 3e-5 at 400) and every softmax recomputed from them would carry that error; and
the gold entries of the gradients, ``1 - gamma_t[y_t]`` and ``1 - xi_t[y_{t-1}, y_t]``, are formed as the sums of
the other marginals (equal in exact arithmetic), not as differences that keep only ~1e-3 of them. The gradients
are then within ~1e-6 of fp64 (before: 4e-4 to 2e-3). The C++ CPU kernels (csrc/crf_cpu.cpp) do the same, with
the same saved-alpha contract.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from tpm_fast.kernels.crf_bwd import _crf_backward_kernel
from tpm_fast.kernels.crf_fwd import _crf_forward_kernel
from tpm_fast.kernels.crf_viterbi import _crf_viterbi_kernel
from tpm_fast.ops.backend import MAX_TAGS

__all__ = [
    "BLOCK_N",
    "launch_crf_backward",
    "launch_crf_forward",
    "launch_crf_viterbi",
    "launch_meta",
    "launch_spec",
]

BLOCK_N = 64
"""Time steps per block load (mask row lengths, gold path score, Viterbi padding)."""

_F32 = torch.float32
_META: dict[int, tuple[int, int, int]] = {}  # T -> (BLOCK_T, num_warps forward / Viterbi, num_warps backward)


def launch_meta(num_tags: int) -> tuple[int, int, int]:
    """(BLOCK_T, num_warps of the forward and Viterbi kernels, num_warps of the backward) for ``num_tags`` tags,
    cached.

    Raises:
        ValueError: more than ``MAX_TAGS`` tags (the (BLOCK_T, BLOCK_T) tile lives in registers).
    """
    meta = _META.get(num_tags)
    if meta is None:
        if num_tags > MAX_TAGS:
            raise ValueError(f"the Triton CRF supports at most {MAX_TAGS} tags, got {num_tags}")
        block_t = triton.next_power_of_2(max(num_tags, 16))
        # 1 warp keeps the reductions in warp shuffles. At 64 tags (bench/kernel_report.py, sm_80 / sm_90): forward
        # and Viterbi fit 4 warps (96 / 106 registers), the backward's extra (BT, BT) tiles need 8 (~120
        # registers; ~210 at 4 warps)
        meta = _META[num_tags] = (block_t, 1, 1) if block_t <= 32 else (block_t, 4, 8)
    return meta


_OPTIONS: dict[tuple[int, bool, int], tuple[dict, dict]] = {}


def _options(num_tags: int, has_tags: bool, batch: int) -> tuple[dict, dict]:
    """The forward's and the backward's ``kernel.run`` keywords (constexprs, launch options, ``grid=(B,)``), cached
    per (T, tags given, B): a launch then builds no dict, no grid and no closure (``kernel[grid]`` would build
    them)."""
    options = _OPTIONS.get((num_tags, has_tags, batch))
    if options is None:
        if len(_OPTIONS) >= 4096:  # batch sizes seen by a long-lived process: keep the cache bounded
            _OPTIONS.clear()
        block_t, warps_fwd, warps_bwd = launch_meta(num_tags)
        common = dict(HAS_TAGS=has_tags, BLOCK_T=block_t, BLOCK_N=BLOCK_N, warmup=False, grid=(batch,))
        options = _OPTIONS[num_tags, has_tags, batch] = (
            {**common, "num_warps": warps_fwd},
            {**common, "num_warps": warps_bwd},
        )
    return options


def _dense(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


def _u8(mask: Tensor) -> Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _rows(tags: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor, int, int, int, int]:
    """(tags or the mask as a never-read stand-in, the mask as uint8, its two strides, the tags' two strides)."""
    mask = _u8(mask)
    smb, smn = mask.stride()
    if tags is None:
        return mask, mask, 0, 0, smb, smn
    stb, stn = tags.stride()
    return tags, mask, stb, stn, smb, smn


def launch_spec(num_tags: int, has_tags: bool, batch: int) -> tuple:
    """What the C++ autograd node ``tpm_fast._C.crf_autograd`` launches (``kernel.run(*args, **keywords)``, with the
    arguments `launch_crf_forward` / `launch_crf_backward` pass, built in C++): (forward kernel, its keywords,
    backward kernel, its keywords). The kernels are read from this module at each call."""
    forward, backward = _options(num_tags, has_tags, batch)
    return _crf_forward_kernel, forward, _crf_backward_kernel, backward


def launch_crf_forward(
    emissions: Tensor, tags: Tensor | None, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor
) -> tuple[Tensor, Tensor]:
    """Forward algorithm and (with ``tags``) gold path score, one launch.

    Args:
        emissions: (B, n, T) fp16/bf16/fp32, any strides (copied only if the last dim is not contiguous).
        tags: (B, n) int64 gold tags in [0, T) on real tokens, any strides, any value on padding; or None for the
            log partition only.
        mask: (B, n) bool or uint8, any strides, left-aligned; row length = its number of nonzero entries.
        start, end: (T,) float; transitions: (T, T) float, ``[i, j]`` = score of i -> j (copied if not
            contiguous). T <= ``MAX_TAGS``.

    Returns:
        out: (B,) fp32, ``gold - log Z`` with tags, else ``log Z``;
        alpha: (B, n, T) fp32 forward log-potentials, each real row ``t < length`` shifted by its max over the
            tags (so its max is 0; a row whose max is not finite, e.g. all ``-inf``, is left unshifted), 0 on rows
            ``t >= length``. log Z = (the sum of the shifts) + logsumexp_j(alpha[length-1, j] + end[j]). The
            backward needs only these: each step's softmax sees alpha differences, and gamma_last = exp(alpha_last
            + end - logsumexp_j(alpha_last[j] + end[j])) is the same for shifted and unshifted alphas.
    """
    b, n, t = emissions.shape
    out = torch.empty(b, dtype=_F32, device=emissions.device)  # shape: (B,)
    alpha = torch.empty((b, n, t), dtype=_F32, device=emissions.device)  # shape: (B, n, T)
    if b == 0:
        return out, alpha
    if emissions.stride(2) != 1:
        emissions = emissions.contiguous()
    seb, sen, _ = emissions.stride()
    gold, mask, stb, stn, smb, smn = _rows(tags, mask)
    _crf_forward_kernel.run(
        emissions, gold, mask, _dense(start), _dense(end), _dense(transitions),
        out, alpha, n, t, seb, sen, stb, stn, smb, smn, **_options(t, tags is not None, b)[0],
    )  # fmt: skip
    return out, alpha


def launch_crf_backward(
    grad: Tensor,
    tags: Tensor | None,
    mask: Tensor,
    end: Tensor,
    transitions: Tensor,
    alpha: Tensor,
    grad_dtype: torch.dtype = _F32,
) -> tuple[Tensor, Tensor]:
    """Gradients of ``out`` of `launch_crf_forward` (marginals by the reverse-mode recursion), one launch.

    Args:
        grad: (B,) any float dtype and stride (an expanded scalar is fine): incoming gradient of ``out``.
        tags, mask, end, transitions: as given to `launch_crf_forward` (emissions and ``start`` are not needed);
        alpha: (B, n, T) fp32 from `launch_crf_forward`.
        grad_dtype: dtype of the emissions' gradient (the emissions' dtype).

    Returns:
        grad_emissions: (B, n, T) contiguous, ``grad_dtype``: ``g_b * (onehot(tag_t) - gamma_t)`` with tags, else
            ``g_b * gamma_t``, for ``t < length_b``; 0 on padding.
        grad_params: (B, 2T + T*T) fp32 per-sequence partials, columns ``[start (T) | end (T) | transitions (T*T,
            row-major)]``: the same rule at the first / last real token, and ``g_b * sum_t (onehot pair - xi_t)``
            (or ``g_b * sum_t xi_t``). ``.sum(0)`` gives the parameters' gradients (deterministic, no atomics).
    """
    b, n, t = alpha.shape
    g_em = torch.empty((b, n, t), dtype=grad_dtype, device=alpha.device)  # shape: (B, n, T)
    g_par = torch.empty((b, 2 * t + t * t), dtype=_F32, device=alpha.device)  # shape: (B, 2T + T*T)
    if b == 0:
        return g_em, g_par
    gold, mask, stb, stn, smb, smn = _rows(tags, mask)
    _crf_backward_kernel.run(
        grad, gold, mask, _dense(end), _dense(transitions), alpha, g_em, g_par,
        n, t, grad.stride(0), stb, stn, smb, smn, **_options(t, tags is not None, b)[1],
    )  # fmt: skip
    return g_em, g_par


def launch_crf_viterbi(
    emissions: Tensor, mask: Tensor, start: Tensor, end: Tensor, transitions: Tensor
) -> tuple[Tensor, Tensor]:
    """Best tag paths with torchcrf's arithmetic (``(score_i + trans_ij) + em_j`` in fp32) and tie-breaking
    (first index of the max), backtrace in the kernel, one launch.

    Args: as for `launch_crf_forward` (no tags).

    Returns:
        tags: (B, n) int64 best tags on real tokens, 0 on padding. NaN scores: every tag is in [0, T), the path is
            unspecified (back-pointer reads are clamped: the backtrace never leaves its row).
        lengths: (B,) int64 row lengths (nonzero mask entries, clamped to [1, n]).
    """
    b, n, t = emissions.shape
    block_t, warps, _ = _META.get(t) or launch_meta(t)
    dev = emissions.device
    out = torch.empty((b, n), dtype=torch.int64, device=dev)  # shape: (B, n)
    lengths = torch.empty(b, dtype=torch.int64, device=dev)  # shape: (B,)
    if b == 0:
        return out, lengths
    bp = torch.empty((b, n, t), dtype=torch.int8, device=dev)  # shape: (B, n, T) back-pointers
    if emissions.stride(2) != 1:
        emissions = emissions.contiguous()
    mask = _u8(mask)
    seb, sen, _ = emissions.stride()
    smb, smn = mask.stride()
    _crf_viterbi_kernel.run(
        emissions, mask, _dense(start), _dense(end), _dense(transitions), bp, out, lengths,
        n, t, seb, sen, smb, smn,
        grid=(b,), warmup=False, BLOCK_T=block_t, BLOCK_N=BLOCK_N, num_warps=warps,
    )  # fmt: skip
    return out, lengths
