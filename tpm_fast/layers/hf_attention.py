"""Our prefix-K/V attention as a transformers attention implementation, for MNER code built on HF BERT.

HVPNeT-style code runs ``BertModel(..., cache=DynamicCache(prefix))``: every layer's keys/values arrive joined
(prefix first) with a (B, m + n) padding mask. Registered as ``"tpm_prefix"`` (an ``AttentionInterface`` function
plus an ``AttentionMaskInterface`` entry that hands it the 2-D padding mask), ``BertModel.from_pretrained(...,
attn_implementation="tpm_prefix")``, ``model.set_attn_implementation("tpm_prefix")`` or :func:`apply_to_bert` route
the attention product through :func:`tpm_fast.ops.prefix_attention.prefix_attention`, which reads the prefix and the
token slices of those tensors in place.

Rules: the prefix slots (the first ``kv_len - q_len`` keys) are always visible, as in HVPNeT and P-tuning v2 (their
mask columns are not read); the token part of the mask is any (B, n) padding mask. Causal (decoder) attention is
not supported.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from tpm_fast.ops import prefix_attention as ops
from tpm_fast.ops.backend import check_backend

NAME = "tpm_prefix"
BACKEND_ATTR = "tpm_prefix_backend"
"""Config attribute read by the attention function: ``"auto"`` (default), ``"triton"`` or ``"reference"``."""


def tpm_prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function (the ``AttentionInterface`` signature).

    Args:
        module: the calling attention module (its ``config`` may carry ``tpm_prefix_backend``).
        query: (B, H, n, d); key, value: (B, H, m + n, d), prefix first (a ``DynamicCache`` prefix of m slots).
        attention_mask: (B, m + n) bool/0-1 padding mask from the registered mask function, or None (no padding).
        scaling: score scale (default 1/sqrt(d)); dropout: attention-probability dropout.

    Returns:
        ((B, n, H, d) attention output in query's dtype, None): attention weights are never materialized.
    """
    if getattr(module, "is_causal", False):
        raise ValueError(f"attn_implementation={NAME!r} supports bidirectional (encoder) attention only")
    n = query.shape[2]
    m = key.shape[2] - n
    if m < 0:
        raise ValueError(f"{NAME}: expected keys = prefix + the {n} query tokens, got {key.shape[2]} keys")
    token_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{NAME}: expected a (B, m + n) padding mask, got shape {tuple(attention_mask.shape)}")
        token_mask = attention_mask[:, m:].bool()  # shape: (B, n)
    backend = getattr(getattr(module, "config", None), BACKEND_ATTR, "auto")
    out = ops.prefix_attention(
        query,
        key[:, :, m:],  # shape: (B, H, n, d) views of the joined tensors: no copy
        value[:, :, m:],
        key[:, :, :m],  # shape: (B, H, m, d)
        value[:, :, :m],
        key_padding_mask=token_mask,
        dropout_p=dropout,  # transformers passes 0.0 outside training
        scale=scaling,
        backend=backend,
    )  # shape: (B, H, n, d)
    return out.transpose(1, 2), None


def register() -> None:
    """Register ``"tpm_prefix"`` with transformers (idempotent): the attention function and its mask builder."""
    AttentionInterface.register(NAME, tpm_prefix_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)  # 2-D (B, kv_len) padding mask, or None


def apply_to_bert(model: PreTrainedModel, backend: str = "auto") -> PreTrainedModel:
    """Make an HF BERT-family model run its self-attention with our prefix-K/V kernel (in place).

    Args:
        model: e.g. ``transformers.BertModel`` or a task model wrapping one.
        backend: ``"auto"`` (Triton on CUDA, native C++ on CPU, else the PyTorch reference), ``"triton"``,
            ``"native"`` or ``"reference"``.

    Returns:
        The same model, for chaining.
    """
    check_backend(backend)
    register()
    model.set_attn_implementation(NAME)
    for config in {id(m.config): m.config for m in model.modules() if isinstance(m, PreTrainedModel)}.values():
        setattr(config, BACKEND_ATTR, backend)
    return model
