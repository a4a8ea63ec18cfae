"""Fused prefix-K/V attention in Triton (FlashAttention-2 style): raw launchers, no autograd, no validation.

out = softmax(scale * q [k_p; k]^T + mask) [v_p; v]: one online softmax over the m prefix slots (always visible,
read through their own pointers) followed by the token keys, which are visited only up to ``lengths[b]`` (fully
padded key blocks are skipped). K/V are never concatenated in memory. Forward + backward = 3 launches
(`_fwd_kernel`; `_bwd_dq_kernel`, which also computes delta = rowsum(dO * O); `_bwd_dkdv_kernel`, whose first key
block program also owns the prefix slots).

Precision: 16-bit inputs go to the tensor cores as 16-bit with fp32 accumulation (P and dS rounded to 16-bit as in
FlashAttention-2); fp32 inputs use exact fp32 (``ieee``) dots. Under ``TRITON_INTERPRET=1`` loads are cast to fp32
(the interpreter's 16-bit arithmetic is wrong) and the key / query loops are ``while`` loops (it cannot run
``range()`` over runtime bounds with numpy >= 2.4); compiled code uses ``tl.range`` loops, software-pipelined.

Optional attention dropout regenerates its keep-mask from ``(seed, offset)`` with Philox (``tl.rand``), offset
``((b * H + h) * n + row) * (m + n_k) + col`` over the joined columns (prefix first); the seed is a (1,) int64
device tensor (drawn without a host sync); nothing else is stored.

Launch contract (established once per call by :func:`canonical_inputs`, so the launchers only allocate and launch):
one dtype for q, k, v, k_p, v_p; unit last-dim strides; v shares k's strides and v_p shares k_p's ("one stride set
per tensor family": q / out / dO / dQ, k / v / dK / dV, k_p / v_p / dK_p / dV_p); q dense, so ``empty_like(q)`` has
its strides (an output in the (B, n, H, d) memory order of a projection makes the merge of heads a free view).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from tpm_fast.kernels.prefix_attention_bwd import _bwd_dkdv_kernel, _bwd_dq_kernel
from tpm_fast.kernels.prefix_attention_fwd import _dropout_keep_kernel, _fwd_kernel

__all__ = [
    "LaunchPlan",
    "block_config",
    "canonical_inputs",
    "dropout_keep_mask",
    "launch_bwd",
    "launch_bwd_into",
    "launch_fwd",
    "launch_fwd_into",
    "launch_prefix_attention_bwd",
    "launch_prefix_attention_fwd",
    "plan_launches",
]

_META: dict[tuple, tuple[dict, dict]] = {}
_INTERPRET = isinstance(_fwd_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 when triton was imported


def block_config(d: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Block sizes and launch settings per kernel for head dim ``d`` and input ``dtype`` (no autotuning).

    Returns:
        {"fwd" | "dq" | "dkdv": {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}}: BLOCK_M = query rows (per
        program for fwd / dq, per loop step for dkdv), BLOCK_N = token keys (per loop step for fwd / dq, per
        program for dkdv). Chosen so that ``bench/kernel_report.py`` shows no register spill at d <= 64 on sm_80 and
        sm_90; not yet timed on a GPU. The interpreter gets 16-wide blocks (small test shapes span several blocks).
    """
    if interpret:
        return {name: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1) for name in ("fwd", "dq", "dkdv")}
    fp32 = dtype == torch.float32  # exact FMA dots: small tiles
    if fp32 and d <= 32:
        table = {"fwd": (32, 32, 4, 2), "dq": (32, 32, 8, 2), "dkdv": (16, 32, 4, 2)}
    elif fp32 and d <= 64:
        table = {"fwd": (32, 32, 4, 2), "dq": (32, 32, 8, 2), "dkdv": (32, 32, 8, 2)}
    elif fp32:
        table = {"fwd": (16, 32, 8, 2), "dq": (16, 32, 8, 2), "dkdv": (32, 32, 8, 2)}
    elif d <= 64:  # 16-bit: tensor-core tiles, 3-stage pipelines
        table = {"fwd": (64, 64, 4, 3), "dq": (64, 32, 4, 3), "dkdv": (32, 64, 4, 3)}
    else:
        table = {"fwd": (64, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (16, 32, 4, 2)}
    keys = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    return {name: dict(zip(keys, cfg)) for name, cfg in table.items()}


def _config(bh: int, n: int, n_k: int, d: int, m: int, dtype: torch.dtype, flags: tuple) -> tuple[dict, dict]:
    """(constexprs + launch options per kernel, grid per kernel) for B*H = ``bh`` and these sizes; ``flags`` =
    (has_mask, has_lengths, has_dropout). Cached: computed once per configuration, not per call."""
    key = (bh, n, n_k, d, m, dtype, flags)
    config = _META.get(key)
    if config is None:
        has_mask, has_lengths, has_dropout = flags
        common = dict(HEAD_D=d, BLOCK_P=max(16, triton.next_power_of_2(m)), HAS_MASK=has_mask,
                      HAS_LENGTHS=has_lengths, HAS_DROPOUT=has_dropout, INTERPRET=_INTERPRET)  # fmt: skip
        meta = {name: {**common, **cfg} for name, cfg in block_config(d, dtype, _INTERPRET).items()}
        grids = {
            "fwd": (-(-n // meta["fwd"]["BLOCK_M"]), bh),
            "dq": (-(-n // meta["dq"]["BLOCK_M"]), bh),
            "dkdv": (max(-(-n_k // meta["dkdv"]["BLOCK_N"]), 1), bh),  # program 0 also owns the prefix
        }
        if len(_META) >= 4096:  # many distinct batch geometries: start over rather than grow
            _META.clear()
        config = _META[key] = (meta, grids)
    return config


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with ``ref``'s strides (a copy only when they differ)."""
    if t.stride() == ref.stride():
        return t
    out = torch.empty_like(ref, dtype=t.dtype)
    return out.copy_(t)


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense with a unit last-dim stride: ``empty_like(t)`` then has ``t``'s strides."""
    if t.is_contiguous():
        return True
    strides = t.stride()
    if strides[3] != 1:
        return False
    _, h, n, d = t.shape
    if strides[1] == d and strides[2] == h * d and strides[0] == n * h * d:  # heads of a (B, n, H, d) projection
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, strides), key=lambda p: (p[1], p[0])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def canonical_inputs(q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor) -> tuple[Tensor, ...]:
    """The five inputs in the launch contract's layout (see the module doc): views as given when they already are
    (the usual case: projections split into heads), otherwise copies. Dtypes must already agree."""
    q = q if _dense(q) else q.contiguous()
    k = k if _dense(k) else k.contiguous()
    k_p = k_p if _dense(k_p) else k_p.contiguous()
    return q, k, _like(v, k), k_p, _like(v_p, k_p)


class LaunchPlan(NamedTuple):
    """What the three launches of one call share: computed once by the forward, reused by the backward (launched
    with ``kernel.run(..., grid=...)``: ``kernel[grid]`` would build a closure per launch)."""

    meta: dict  # kernel name -> constexprs and launch options
    tensors: tuple  # (mask, lengths, seed): shape (B, n_k) uint8 unit column stride, (B,), (1,); q where absent
    scalars: tuple  # the kernels' stride and scalar arguments, in order
    grids: dict  # kernel name -> grid


def plan_launches(
    q: Tensor, k: Tensor, k_p: Tensor, key_padding_mask: Tensor | None, lengths: Tensor | None, seed: Tensor | None,
    dropout_p: float, scale: float,
) -> LaunchPlan:  # fmt: skip
    """The :class:`LaunchPlan` of one call (inputs in the contract's layout; arguments as in
    :func:`launch_prefix_attention_fwd`)."""
    b, h, n, d = q.shape
    n_k, m = k.shape[2], k_p.shape[2]
    flags = (key_padding_mask is not None, lengths is not None, dropout_p > 0.0)
    meta, grids = _config(b * h, n, n_k, d, m, q.dtype, flags)
    mask, smb = key_padding_mask, 0
    if mask is not None:
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mask = mask if mask.stride(1) == 1 else mask.contiguous()
        smb = mask.stride(0)
    sq, sk, sp = q.stride(), k.stride(), k_p.stride()
    scalars = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sp[0], sp[1], sp[2], smb, h, n, n_k, m, scale, dropout_p)
    tensors = (q if mask is None else mask, q if lengths is None else lengths, q if seed is None else seed)
    return LaunchPlan(meta, tensors, scalars, grids)  # q stands in for an absent tensor: never read


def launch_fwd_into(
    plan: LaunchPlan, q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor, out: Tensor, lse: Tensor
) -> None:
    """The forward launch, writing ``out`` (``empty_like(q)``) and ``lse`` ((B, H, n) fp32 contiguous); the
    allocation-free tier under :func:`launch_fwd` and :func:`launch_prefix_attention_fwd` (which documents the
    arguments)."""
    if out.numel():
        _fwd_kernel.run(
            q, k, v, k_p, v_p, *plan.tensors, out, lse, *plan.scalars,
            grid=plan.grids["fwd"], warmup=False, **plan.meta["fwd"],
        )  # fmt: skip


def launch_bwd_into(
    plan: LaunchPlan, q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor, out: Tensor, grad_out: Tensor,
    lse: Tensor, delta: Tensor, dq: Tensor, dk: Tensor, dv: Tensor, dk_p: Tensor, dv_p: Tensor,
) -> None:  # fmt: skip
    """The backward launches, writing ``delta`` (``empty_like(lse)``) and the gradients (each ``empty_like`` its
    input); ``grad_out`` has q's strides. The allocation-free tier under :func:`launch_prefix_attention_bwd`."""
    if not dq.numel():
        for grad in (dk, dv, dk_p, dv_p):
            grad.zero_()
        return
    _bwd_dq_kernel.run(
        q, k, v, k_p, v_p, *plan.tensors, out, grad_out, lse, delta, dq, *plan.scalars,
        grid=plan.grids["dq"], warmup=False, **plan.meta["dq"],
    )  # fmt: skip
    _bwd_dkdv_kernel.run(
        q, k, v, k_p, v_p, *plan.tensors, grad_out, lse, delta, dk, dv, dk_p, dv_p, *plan.scalars,
        grid=plan.grids["dkdv"], warmup=False, **plan.meta["dkdv"],
    )  # fmt: skip


def launch_fwd(plan: LaunchPlan, q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`launch_fwd_into` into fresh buffers: (out, lse) as :func:`launch_prefix_attention_fwd` returns them."""
    out = torch.empty_like(q)  # shape: (B, H, n, d)
    lse = torch.empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32, device=q.device)  # shape: (B, H, n)
    launch_fwd_into(plan, q, k, v, k_p, v_p, out, lse)
    return out, lse


def launch_bwd(
    plan: LaunchPlan, grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor, out: Tensor,
    lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`launch_bwd_into` into fresh buffers (``grad_out`` copied into q's strides only if it has others): the
    gradients as :func:`launch_prefix_attention_bwd` returns them."""
    grads = tuple(torch.empty_like(t) for t in (q, k, v, k_p, v_p))
    delta = torch.empty_like(lse)  # shape: (B, H, n) fp32, rowsum(dO * O), written by the dQ kernel
    launch_bwd_into(plan, q, k, v, k_p, v_p, out, _like(grad_out, q), lse, delta, *grads)
    return grads


def launch_prefix_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Forward launch (inputs in the contract's layout, see :func:`canonical_inputs`).

    Args:
        q: (B, H, n, d); k, v: (B, H, n_k, d); k_p, v_p: (B, H, m, d) prefix (always visible); one dtype
            (fp32/fp16/bf16), d a power of 2 >= 16, m >= 0.
        key_padding_mask: optional (B, n_k) bool, True = visible; ANDed with ``lengths``.
        lengths: optional (B,) int32/int64 on q's device: token keys [0, lengths[b]) may be visible; the key
            loop stops there (values are clamped to [0, n_k]). None: all n_k keys (subject to the mask).
        seed: (1,) int64 Philox seed on q's device (read only when dropout_p > 0).
        dropout_p: attention-probability dropout in [0, 1); scale: score scale.

    Returns:
        out (B, H, n, d) in q's dtype and strides (0 for rows with no visible key); lse (B, H, n) fp32 contiguous,
        per-row log-sum-exp of the scaled scores in log2 units (+inf for rows with no visible key).
    """
    plan = plan_launches(q, k, k_p, key_padding_mask, lengths, seed, dropout_p, scale)
    return launch_fwd(plan, q, k, v, k_p, v_p)


def launch_prefix_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward launches: dQ (+ delta), then dK/dV (+ the prefix's). Arguments as in the forward, plus its outputs
    and ``grad_out`` (B, H, n, d) (copied into q's strides only if it has others).

    Returns:
        (dq, dk, dv, dk_p, dv_p) with the strides and dtypes of (q, k, v, k_p, v_p); padded keys get exactly 0.
    """
    plan = plan_launches(q, k, k_p, key_padding_mask, lengths, seed, dropout_p, scale)
    return launch_bwd(plan, grad_out, q, k, v, k_p, v_p, out, lse)


def dropout_keep_mask(b: int, h: int, n: int, m: int, n_k: int, dropout_p: float, seed: Tensor) -> Tensor:
    """The keep-mask the kernels use for (seed, dropout_p): (B, H, n, m + n_k) bool on seed's device, prefix first.

    Element [b, h, i, j] is ``tl.rand(seed, ((b * H + h) * n + i) * (m + n_k) + j) >= dropout_p``; the kept
    probabilities are scaled by 1 / (1 - dropout_p).
    """
    keep = torch.empty((b, h, n, m + n_k), dtype=torch.uint8, device=seed.device)
    if keep.numel():
        grid = (triton.cdiv(n, 16), triton.cdiv(m + n_k, 64), b * h)
        _dropout_keep_kernel[grid](keep, seed, n, m + n_k, float(dropout_p), BLOCK_M=16, BLOCK_N=64)
    return keep.bool()
