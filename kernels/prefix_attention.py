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
import os

import torch
import triton
from torch import Tensor

from tpm_fast.kernels.prefix_attention_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel
from tpm_fast.kernels.prefix_attention_fwd import _dropout_keep_kernel, _fwd_kernel

__all__ = ["block_config", "dropout_keep_mask", "prefix_attention_bwd", "prefix_attention_fwd"]


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
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpret:
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
