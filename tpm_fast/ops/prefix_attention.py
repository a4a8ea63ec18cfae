"""Prefix-K/V attention with backend dispatch: the fused Triton kernel (torch custom ops + autograd) or the reference.

:func:`prefix_attention` has the signature and semantics of :func:`tpm_fast.reference.prefix_attention.prefix_attention`
plus ``backend``. The Triton path is two custom ops, ``tpm_fast::prefix_attention_fwd`` (returns out and the per-row
LSE) and ``tpm_fast::prefix_attention_bwd``, with fake (meta) implementations and autograd wiring, so
``torch.compile(fullgraph=True)`` traces through them. Triton and the kernels are imported only when they launch.

Dropout: the Philox seed is a plain ``int`` drawn from ``generator`` (default: torch's CPU generator) with
``torch.randint``; no GPU sync for a CPU generator. Under ``torch.compile(fullgraph=True)`` only ``dropout_p=0`` traces
(the draw is an ``.item()``); with dropout, compile without fullgraph (the draw is a graph break).
fp64 inputs, or a head dim that is not a power of 2 >= 16: ``backend="auto"`` runs the reference, ``"triton"`` raises.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tpm_fast.ops._backend import resolve_backend
from tpm_fast.reference.prefix_attention import check_inputs
from tpm_fast.reference.prefix_attention import prefix_attention as _reference

__all__ = ["draw_dropout_seed", "prefix_attention", "triton_unsupported_reason"]


def triton_unsupported_reason(q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs (None when it can): dtype or head dim."""
    for t in (q, k, v, k_p, v_p):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the Triton kernel supports fp32/fp16/bf16 inputs, got {t.dtype}"
    d = q.shape[3]
    if d < 16 or d & (d - 1):
        return f"the Triton kernel needs a head dim that is a power of 2 >= 16, got {d}"
    return None


def draw_dropout_seed(generator: torch.Generator | None = None) -> int:
    """The Philox seed the Triton path uses: one ``torch.randint`` draw from ``generator`` (default: CPU)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).item())


# ------------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("tpm_fast::prefix_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    lengths: Tensor,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """Triton forward: (out (B,H,n,d) q dtype, lse (B,H,n) fp32); see kernels.prefix_attention_fwd."""
    from tpm_fast.kernels.prefix_attention import prefix_attention_fwd

    return prefix_attention_fwd(q, k, v, k_p, v_p, lengths, key_padding_mask, dropout_p, scale, seed)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, k_p, v_p, lengths, key_padding_mask, dropout_p, scale, seed):
    b, h, n, d = q.shape
    return q.new_empty((b, h, n, d)), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("tpm_fast::prefix_attention_bwd", mutates_args=())
def _bwd_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    out: Tensor,
    lse: Tensor,
    lengths: Tensor,
    key_padding_mask: Tensor | None,
    dropout_p: float,
    scale: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward: (dq, dk, dv, dk_p, dv_p), contiguous, input dtypes; see kernels.prefix_attention_bwd."""
    from tpm_fast.kernels.prefix_attention import prefix_attention_bwd

    return prefix_attention_bwd(
        grad_out, q, k, v, k_p, v_p, out, lse, lengths, key_padding_mask, dropout_p, scale, seed
    )


@_bwd_op.register_fake
def _bwd_fake(grad_out, q, k, v, k_p, v_p, out, lse, lengths, key_padding_mask, dropout_p, scale, seed):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, k_p, v_p))


def _setup_context(ctx, inputs, output):
    q, k, v, k_p, v_p, lengths, key_padding_mask, dropout_p, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, k_p, v_p, out, lse, lengths, key_padding_mask)
    ctx.dropout_p, ctx.scale, ctx.seed = dropout_p, scale, seed
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, k_p, v_p, out, lse, lengths, key_padding_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = _bwd_op(
        grad_out, q, k, v, k_p, v_p, out, lse, lengths, key_padding_mask, ctx.dropout_p, ctx.scale, ctx.seed
    )
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("tpm_fast::prefix_attention_fwd", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------- public API


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    key_padding_mask: Tensor | None = None,
    lengths: Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of n queries over m prefix slots plus n_k tokens (one softmax over the joined columns).

    Args:
        q: (B, H, n, d) queries; k, v: (B, H, n_k, d) token keys / values; k_p, v_p: (B, H, m, d) prefix keys /
            values, m >= 0, always visible. Any strides (e.g. slices of one joined HF key tensor): never copied.
        key_padding_mask: (B, n_k) bool, True = visible (any pattern); or ``lengths``: (B,) int, tokens
            [0, len) visible. At most one; neither = every token visible.
        dropout_p: attention-probability dropout in [0, 1), inverted scaling. Triton: Philox keep-mask from a seed
            drawn from ``generator`` (see :func:`draw_dropout_seed`); reference: ``bernoulli_`` on ``generator``.
        scale: score scale, default 1 / sqrt(d).
        backend: ``"auto"`` (Triton on CUDA when importable and the inputs are supported, else the reference),
            ``"triton"`` or ``"reference"``.

    Returns:
        (B, H, n, d) in q's dtype; 0 for a query with no visible key (m = 0 and all tokens padded), never NaN.

    Raises:
        ValueError: bad shapes / mask / lengths / dropout_p (as the reference), unknown backend, or
            ``backend="triton"`` where it cannot run (no Triton, CPU without TRITON_INTERPRET=1, fp64, bad head dim).
    """
    chosen = resolve_backend(backend, q, k, v, k_p, v_p)
    if chosen == "triton":  # the reference validates its own inputs
        check_inputs(q, k, v, k_p, v_p, key_padding_mask, lengths, dropout_p)
        reason = triton_unsupported_reason(q, k, v, k_p, v_p)
        if reason is not None:
            if backend == "triton":
                raise ValueError(reason)
            chosen = "reference"
    if chosen == "reference":
        return _reference(q, k, v, k_p, v_p, key_padding_mask, lengths, dropout_p, scale, generator)
    b, n_k = q.shape[0], k.shape[2]
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(q.device)
        # last visible key + 1 (0 when none): bounds the kernel's key loop, computed on device (no host sync)
        cols = torch.arange(1, n_k + 1, device=q.device, dtype=torch.int32)  # shape: (n_k,)
        lengths = (key_padding_mask * cols).amax(1) if n_k else torch.zeros(b, dtype=torch.int32, device=q.device)
    elif lengths is not None:
        lengths = lengths.to(device=q.device, dtype=torch.int64 if lengths.dtype == torch.int64 else torch.int32)
    else:
        lengths = torch.full((b,), n_k, dtype=torch.int32, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    seed = draw_dropout_seed(generator) if dropout_p > 0.0 else 0
    out, _ = _fwd_op(q, k, v, k_p, v_p, lengths, key_padding_mask, float(dropout_p), scale, seed)
    return out
