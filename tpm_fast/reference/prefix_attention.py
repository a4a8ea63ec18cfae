"""Pure-PyTorch prefix-K/V attention (P-tuning-v2 / HVPNeT style), the correctness reference for the fast kernels.

softmax(q [k_p; k]^T * scale + mask) [v_p; v] with the m prefix slots always visible and padded tokens hidden,
computed without concatenating K/V in memory: one softmax runs over the joined score blocks. Scores, softmax
and the products run in fp32 (fp64 when q is fp64); the output has q's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_inputs", "prefix_attention"]


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_p: Tensor,
    v_p: Tensor,
    key_padding_mask: Tensor | None,
    lengths: Tensor | None,
    dropout_p: float,
) -> None:
    """Validate shapes, devices, mask / lengths and dropout_p (no host sync).

    Raises:
        ValueError: naming the first problem.
    """
    qs, ks, ps = q.shape, k.shape, k_p.shape
    if len(qs) != 4 or len(ks) != 4 or len(ps) != 4 or ks != v.shape or ps != v_p.shape:
        raise ValueError(
            f"expected q (B,H,n,d), k/v (B,H,n_k,d), k_p/v_p (B,H,m,d); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, k_p {tuple(k_p.shape)}, v_p {tuple(v_p.shape)}"
        )
    b, h, _, d = qs
    if ks[0] != b or ks[1] != h or ks[3] != d or ps[0] != b or ps[1] != h or ps[3] != d:
        raise ValueError(f"batch/head/head-dim mismatch: q {tuple(qs)}, k {tuple(ks)}, k_p {tuple(ps)}")
    device = q.device
    if (
        k.device != device
        or v.device != device
        or k_p.device != device
        or v_p.device != device
        or (key_padding_mask is not None and key_padding_mask.device != device)
        or (lengths is not None and lengths.device != device)
    ):
        devices = sorted({str(t.device) for t in (q, k, v, k_p, v_p, key_padding_mask, lengths) if t is not None})
        raise ValueError(f"all inputs must be on one device, got {devices}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if lengths is not None and lengths.shape != (b,):
        raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
    if key_padding_mask is not None and (key_padding_mask.shape != (b, ks[2]) or key_padding_mask.dtype != torch.bool):
        raise ValueError(
            f"key_padding_mask must be bool of shape ({b}, {ks[2]}), got {key_padding_mask.dtype} "
            f"{tuple(key_padding_mask.shape)}"
        )


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
    validate: bool = True,
) -> Tensor:
    """Attention of n queries over m prefix slots plus n_k tokens.

    Args:
        q: (B, H, n, d) queries; k, v: (B, H, n_k, d) token keys / values (n_k = n for self-attention);
            k_p, v_p: (B, H, m, d) prefix keys / values, m >= 0, all always visible.
        key_padding_mask: (B, n_k) bool, True = real token (visible); ``lengths``: (B,) int, tokens [0, len)
            visible. Both: ANDed; neither: every token visible.
        dropout_p: attention-probability dropout in [0, 1) (inverted scaling), drawn from ``generator``
            (one draw over the joined (n, m + n_k) probability block, prefix columns first).
        scale: score scale, default 1 / sqrt(d).
        validate: run :func:`check_inputs` first (False: the caller did).

    Returns:
        (B, H, n, d) in q's dtype. A query whose tokens are all padded attends to the prefix only; with m = 0 and
        no visible key its output is 0 (never NaN).
    """
    if validate:
        check_inputs(q, k, v, k_p, v_p, key_padding_mask, lengths, dropout_p)
    b, h, _, d = q.shape
    n_k = k.shape[2]
    if lengths is not None:
        in_length = torch.arange(n_k, device=q.device) < lengths.unsqueeze(1)  # shape: (B, n_k)
        key_padding_mask = in_length if key_padding_mask is None else key_padding_mask & in_length
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)
    m = k_p.shape[2]
    qf = q.to(dtype) * scale  # shape: (B, H, n, d)
    s_p = qf @ k_p.to(dtype).transpose(2, 3)  # shape: (B, H, n, m)
    s_t = qf @ k.to(dtype).transpose(2, 3)  # shape: (B, H, n, n_k)
    if key_padding_mask is not None:
        s_t = s_t.masked_fill(~key_padding_mask.view(b, 1, 1, n_k), float("-inf"))
    # one softmax over both score blocks (the scores are joined, never K/V)
    probs = torch.cat([s_p, s_t], dim=3).softmax(dim=3)  # shape: (B, H, n, m + n_k)
    if m == 0 and key_padding_mask is not None:
        probs = probs.nan_to_num(0.0)  # a row with no visible key at all: output 0, not NaN
    if dropout_p > 0.0:
        keep = torch.empty_like(probs).bernoulli_(1.0 - dropout_p, generator=generator)  # shape: like probs
        probs = probs * keep / (1.0 - dropout_p)
    a_p, a_t = probs.split([m, n_k], dim=3)  # shapes: (B, H, n, m), (B, H, n, n_k)
    out = a_p @ v_p.to(dtype) + a_t @ v.to(dtype)  # shape: (B, H, n, d)
    return out.to(q.dtype)
