"""Prompted BERT: every layer of an HF ``BertModel`` attends to per-layer prefix keys/values (P-tuning v2 style).

The function walks the modules of an unmodified ``transformers.BertModel`` (so pretrained weights, ZeRO-3 parameter
hooks and ``state_dict`` names stay those of HF) and replaces only the attention product with
:func:`tpm_fast.ops.prefix_attention.prefix_attention` (the fused Triton kernel on CUDA, the native C++ kernel on
CPU, else the PyTorch reference), which reads the prefix and the token K/V from their own tensors. At real word
pieces it equals ``BertModel(..., cache=DynamicCache(prefix))`` with a ``(B, m + n)`` all-ones-then-padding mask,
and without a prefix plain ``BertModel`` (``tests/test_prompted_bert.py``, every backend).

Padding is skipped (as MosaicBERT's and FasterTransformer's "remove padding"): everything but the attention product
(the projections, the FFN, the LayerNorms, dropout) runs on the T real word pieces only, packed as (T, d_t); only
Q, K and V are scattered into (B, n, d_t) buffers, zero at padding, for the attention. The projections and the FFN
are ~90 % of a step, so a batch with a quarter padding does a quarter less of that work.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import BertModel

from tpm_fast.ops import backend as _backend
from tpm_fast.ops.prefix_attention import key_bounds, prefix_attention


def pack_index(attention_mask: Tensor) -> Tensor:
    """(T,) long: the flat positions ``b * n + i`` of the real word pieces, for ``prompted_bert(token_index=...)``.

    Compute it where the mask is on the CPU (e.g. in the collate function): on CUDA it is a host sync.
    """
    return attention_mask.reshape(-1).nonzero().squeeze(1)


def prompted_bert(
    bert: BertModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    prefix: list[tuple[Tensor, Tensor]] | None,
    shift_positions: bool = True,
    backend: str = "auto",
    pack: bool | None = None,
    token_index: Tensor | None = None,
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
        pack: skip the padding (see the module doc). None (default): when ``token_index`` is given or the mask is
            on the CPU (on CUDA, finding the real pieces is a host sync: give ``token_index`` instead).
        token_index: :func:`pack_index` of ``attention_mask``, on its device (computed here when None and packing).

    Returns:
        (B, n, d_t) last hidden states, in the dtype of the embeddings. Packed: 0 at padded positions, which pass no
        gradient; else what BERT computes there.
    """
    mask = attention_mask.bool()  # shape: (B, n)
    layers = bert.encoder.layer
    if prefix is not None and len(prefix) != len(layers):
        raise ValueError(f"prefix has {len(prefix)} layers, BERT has {len(layers)}")
    batch, n = input_ids.shape
    m = prefix[0][0].shape[2] if prefix is not None else 0
    start = m if shift_positions else 0
    if start + n > bert.config.max_position_embeddings:
        raise ValueError(
            f"{n} word pieces from position {start} exceed BERT's {bert.config.max_position_embeddings} positions"
        )
    position_ids = torch.arange(start, start + n, device=input_ids.device).expand(batch, n)  # shape: (B, n)
    hidden = bert.embeddings(input_ids=input_ids, position_ids=position_ids)  # shape: (B, n, d_t)
    d_t = hidden.shape[2]
    attn = layers[0].attention.self
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size
    if prefix is None:  # plain BERT: an empty prefix
        empty = hidden.new_empty(batch, heads, 0, head_dim)  # shape: (B, H, 0, d_h)
        prefix = [(empty, empty)] * len(layers)
    if pack is None:
        pack = token_index is not None or mask.device.type == "cpu"
    if not pack:
        token_index = None
    elif token_index is None:
        token_index = pack_index(mask)
    if token_index is not None:
        hidden = hidden.reshape(batch * n, d_t).index_select(0, token_index)  # shape: (T, d_t)
    # once per forward, shared by every layer: the backend and the key loop's bound
    dtype = torch.promote_types(hidden.dtype, prefix[0][0].dtype)
    unsupported = _backend.attention_unsupported(dtype, head_dim)
    backend = _backend.resolve(backend, "prefix_attention", hidden.device, dtype, unsupported)
    bounds = key_bounds(mask)  # shape: (B,)
    for i, (layer, (k_p, v_p)) in enumerate(zip(layers, prefix)):
        attn = layer.attention.self
        q, k, v = (_heads(proj(hidden), token_index, batch, n, heads) for proj in (attn.query, attn.key, attn.value))
        dropout_p = attn.dropout.p if attn.training else 0.0
        context = prefix_attention(
            q, k, v, k_p, v_p, mask, bounds, dropout_p, backend=backend, validate=i == 0
        )  # shape: (B, H, n, d_h), on the Triton path in q's (B, n, H, d_h) memory order
        context = context.transpose(1, 2).reshape(batch * n, d_t)  # shape: (B * n, d_t), a view on the Triton path
        context = context if token_index is None else context.index_select(0, token_index)  # shape: (T, d_t)
        hidden = layer.attention.output(context.view(hidden.shape), hidden)  # dense + dropout + residual LayerNorm
        hidden = layer.output(layer.intermediate(hidden), hidden)  # FFN + residual LayerNorm
    if token_index is None:
        return hidden
    return hidden.new_zeros(batch * n, d_t).index_copy(0, token_index, hidden).view(batch, n, d_t)


def _heads(x: Tensor, index: Tensor | None, batch: int, n: int, heads: int) -> Tensor:
    """(B, H, n, d_h) view of a projection: x (B, n, d_t) as is, or x (T, d_t) scattered into zeros at ``index``."""
    if index is not None:
        x = x.new_zeros(batch * n, x.shape[-1]).index_copy(0, index, x)  # shape: (B * n, d_t)
    return x.view(batch, n, heads, -1).transpose(1, 2)
