"""Prompted BERT: every layer of an HF ``BertModel`` attends to per-layer prefix keys/values (P-tuning v2 style).

The function walks the modules of an unmodified ``transformers.BertModel`` (so pretrained weights, ZeRO-3 parameter
hooks and ``state_dict`` names stay those of HF) and replaces only the attention product with
:func:`tpm_fast.ops.prefix_attention.prefix_attention` (the fused Triton kernel on CUDA, the native C++ kernel on
CPU, else the PyTorch reference), which reads the prefix and the token K/V from their own tensors. It equals
``BertModel(..., cache=DynamicCache(prefix))`` with a ``(B, m + n)`` all-ones-then-padding mask
(``tests/test_prompted_bert.py``, for both backends).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import BertModel

from tpm_fast.ops import backend as _backend
from tpm_fast.ops.prefix_attention import key_bounds, prefix_attention


def prompted_bert(
    bert: BertModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix: list[tuple[Tensor, Tensor]] | None,
    shift_positions: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Run ``bert``'s encoder over word pieces with an optional prefix in every layer.

    Args:
        bert: an HF ``BertModel`` (encoder only; its pooler, if any, is not used).
        input_ids: (B, n) long word-piece ids.
        attention_mask: (B, n) bool or 0/1, True on real pieces; padding keys are masked, prefix slots never are.
        prefix: one ``(k_p, v_p)`` pair per layer, each (B, H, m, d_h), or None for plain BERT (text-only mode).
        shift_positions: start token position ids at m, as transformers does with a prefix cache (the authors'
            checkpoints were trained so); False starts them at 0.
        backend: attention backend, ``"auto"`` (Triton on CUDA, native C++ on CPU, else the reference), ``"triton"``,
            ``"native"`` or ``"reference"``; resolved once per call, and only the first layer's inputs validated.

    Returns:
        (B, n, d_t) last hidden states, in the dtype of the embeddings.
    """
    mask = attention_mask.bool()  # shape: (B, n)
    if prefix is None:
        return bert(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
    layers = bert.encoder.layer
    if len(prefix) != len(layers):
        raise ValueError(f"prefix has {len(prefix)} layers, BERT has {len(layers)}")
    batch, n = input_ids.shape
    m = prefix[0][0].shape[2]
    start = m if shift_positions else 0
    if start + n > bert.config.max_position_embeddings:
        raise ValueError(
            f"{n} word pieces from position {start} exceed BERT's {bert.config.max_position_embeddings} positions"
        )
    position_ids = torch.arange(start, start + n, device=input_ids.device).expand(batch, n)  # shape: (B, n)
    hidden = bert.embeddings(input_ids=input_ids, position_ids=position_ids)  # shape: (B, n, d_t)
    # once per forward, shared by every layer: the backend and the key loop's bound
    head_dim = layers[0].attention.self.attention_head_size
    dtype = torch.promote_types(hidden.dtype, prefix[0][0].dtype)
    unsupported = _backend.attention_unsupported(dtype, head_dim)
    backend = _backend.resolve(backend, "prefix_attention", hidden.device, dtype, unsupported)
    bounds = key_bounds(mask)  # shape: (B,)
    for i, (layer, (k_p, v_p)) in enumerate(zip(layers, prefix)):
        attn = layer.attention.self
        heads_shape = (batch, n, attn.num_attention_heads, attn.attention_head_size)
        q, k, v = (proj(hidden).view(heads_shape).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))
        dropout_p = attn.dropout.p if attn.training else 0.0
        context = prefix_attention(
            q, k, v, k_p, v_p, mask, bounds, dropout_p, backend=backend, validate=i == 0
        )  # shape: (B, H, n, d_h), on the Triton path in q's (B, n, H, d_h) memory order
        context = context.transpose(1, 2).reshape(hidden.shape)  # shape: (B, n, d_t), a view on the Triton path
        hidden = layer.attention.output(context, hidden)  # dense + dropout + residual LayerNorm
        hidden = layer.output(layer.intermediate(hidden), hidden)  # FFN + residual LayerNorm
    return hidden
